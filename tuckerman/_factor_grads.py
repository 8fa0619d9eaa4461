"""Riemannian gradients from the gradients with respect to the core and the factors.

What autodiff gives through ``f(TuckerTensor(core, factors))`` (or through a factorized layer) is
``∂f/∂C = G ×_1 U_1ᵀ ⋯ ×_d U_dᵀ`` and ``∂f/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ`` for the
Euclidean gradient ``G``, which is never formed (DESIGN.md §3).
"""

from __future__ import annotations

from typing import Any

from tuckerman._compat import namespace_of
from tuckerman._manifold import (
    TangentVector,
    _core_qr,
    _orth_complement_apply,
    _times_r_inv,
    _times_r_inv_t,
)
from tuckerman._tucker import TuckerTensor
from tuckerman.validation import check_real_floating

__all__ = ["rgrad_from_factor_grads"]


def _check_factor_grads(x: TuckerTensor, dcore: Any, dfactors: Any) -> tuple:
    dfactors = tuple(dfactors)
    if tuple(dcore.shape) != x.ranks:
        raise ValueError(
            f"the core gradient has shape {tuple(dcore.shape)}, expected the core's shape {x.ranks}"
        )
    if len(dfactors) != x.ndim:
        raise ValueError(f"got {len(dfactors)} factor gradients for a tensor with {x.ndim} modes")
    for k, (g, u) in enumerate(zip(dfactors, x.factors)):
        if tuple(g.shape) != tuple(u.shape):
            raise ValueError(
                f"factor_grads[{k}] has shape {tuple(g.shape)}, expected the shape of "
                f"factors[{k}], {tuple(u.shape)}"
            )
    xp = namespace_of(x.core, dcore, *dfactors)
    check_real_floating(xp, x.core, dcore, *dfactors, what="x and its gradients")
    return dfactors


def rgrad_from_factor_grads(
    manifold: Any, x: TuckerTensor, dcore_grad: Any, factor_grads: Any
) -> TangentVector:
    """Riemannian gradient from the gradients of ``f(TuckerTensor(core, factors))``.

    What autodiff gives through a Tucker-format cost (or a factorized layer) is the pair
    ``∂f/∂C = G ×_1 U_1ᵀ ⋯ ×_d U_dᵀ`` and ``∂f/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ`` for the
    Euclidean gradient ``G``, which is never formed. The Riemannian gradient is then
    ``dcore = ∂f/∂C`` and ``dU_k = (I − U_kU_kᵀ)(∂f/∂U_k)(C_(k)C_(k)ᵀ)⁻¹``; the inverse is
    applied through the QR factor ``R_k`` of ``C_(k)ᵀ`` (two triangular-shaped solves), never
    formed. The result equals ``manifold.egrad_to_rgrad(x, G)``.

    Parameters
    ----------
    manifold : FixedRankTucker
        The manifold of ``x``.
    x : TuckerTensor
        A point of ``manifold`` (orthonormal factors, core of full multilinear rank).
    dcore_grad : array
        ``∂f/∂C``, shape ``x.ranks``.
    factor_grads : sequence of arrays
        ``∂f/∂U_k``, shapes ``(n_k, r_k)``.

    Returns
    -------
    TangentVector

    Notes
    -----
    The factor part carries rounding errors of about ``eps · cond(C)`` relative (see
    :func:`~tuckerman.core_condition`); with the all-orthogonal cores that the manifold's
    operations return, ``R_k`` is diagonal and the result is accurate to a few ``eps``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import rgrad_from_factor_grads
    >>> M = tm.FixedRankTucker((6, 7, 8), (2, 3, 2))
    >>> x = M.random_point(key=0)
    >>> G = np.random.default_rng(1).standard_normal(M.shape)     # some Euclidean gradient
    >>> dcore = tm.multi_mode_product(G, x.factors, transpose=True)
    >>> dfactors = [
    ...     tm.unfold(tm.multi_mode_product(G, [u for j, u in enumerate(x.factors) if j != k],
    ...               [j for j in range(3) if j != k], transpose=True), k)
    ...     @ tm.unfold(x.core, k).T
    ...     for k in range(3)
    ... ]
    >>> g = rgrad_from_factor_grads(M, x, dcore, dfactors)
    >>> ref = M.egrad_to_rgrad(x, G)
    >>> bool(np.allclose(M.tangent_to_dense(x, g), M.tangent_to_dense(x, ref)))
    True
    """
    if not isinstance(x, TuckerTensor):
        raise TypeError(f"x must be a TuckerTensor, got {type(x).__name__}")
    if x.shape != tuple(manifold.shape) or x.ranks != tuple(manifold.ranks):
        raise ValueError(
            f"x has shape {x.shape} and ranks {x.ranks}, but the manifold has shape "
            f"{tuple(manifold.shape)} and ranks {tuple(manifold.ranks)}"
        )
    dfactors = _check_factor_grads(x, dcore_grad, factor_grads)
    xp = x._namespace()
    out = []
    for k, (_, r) in enumerate(_core_qr(xp, x.core)):
        b = _orth_complement_apply(xp, x.factors[k], dfactors[k])
        # b (C_(k)C_(k)ᵀ)⁻¹ = b (R_kᵀR_k)⁻¹ = (b R_k⁻¹) R_k⁻ᵀ
        out.append(_times_r_inv_t(xp, _times_r_inv(xp, b, r), r))
    return TangentVector(dcore_grad, out)


# --------------------------------------------------------------------------- the frameworks
