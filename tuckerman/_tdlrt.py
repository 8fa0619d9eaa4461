"""The rank-adaptive TDLRT step (Algorithm 1 of Zangrando et al., NeurIPS 2024) and its parts.

One step from a point ``x = C ×_k U_k``:

1. basis step for every mode from one gradient evaluation (:func:`augment`),
2. exact representation of ``x`` in the augmented bases ``Û_k = orth([U_k, K_k^new])``,
3. Galerkin step on the augmented core from a second gradient evaluation
   (:func:`core_gradient`, :func:`galerkin_step`),
4. per-mode truncation of the augmented core by tolerance or to fixed ranks
   (:func:`truncate_core`).

The building blocks return the per-mode maps between bases, so state kept on the core
(momentum, Adam moments) can follow the point through augmentation and truncation
(:func:`transport_core_state`, :func:`transport_core_second_moment`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import tuckerman.backends as backends
from tuckerman._compat import is_array, namespace_of
from tuckerman._kernels import _mp, _rank_from_tol, _svd, _unfold
from tuckerman._manifold import FixedRankTucker, _contract_q, _core_qr
from tuckerman._sparse import SparseTensor, sparse_all_but_one
from tuckerman._tucker import TuckerTensor, _as_tucker
from tuckerman.validation import check_tol, feasible_ranks, per_mode

__all__ = [
    "augment",
    "augment_basis",
    "core_gradient",
    "galerkin_step",
    "truncate_core",
    "tdlrt_step",
    "fixed_rank_step",
    "transport_core_state",
    "transport_core_second_moment",
]

Maps = tuple  # per-mode matrices


# --------------------------------------------------------------------------- checks
def _check_lr(lr: Any) -> Any:
    if is_array(lr):
        if getattr(lr, "ndim", None) != 0:
            raise ValueError(f"lr must be a scalar, got an array of shape {tuple(lr.shape)}")
        try:
            value = float(backends.to_numpy(lr))
        except Exception:  # traced (a schedule under jit): checked by the caller
            return lr
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise TypeError(f"lr must be a positive real number, got {lr!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lr must be finite and > 0, got {value}")
    return lr


def _leaves(z: Any) -> list[Any]:
    if isinstance(z, TuckerTensor):
        return [z.core, *z.factors]
    if isinstance(z, SparseTensor):
        return [z.values]
    return [z]


def _check_finite(z: Any, what: str) -> None:
    """FloatingPointError on NaN/Inf; skipped for traced values (inside jit)."""
    for leaf in _leaves(z):
        if not is_array(leaf):
            continue
        xp = namespace_of(leaf)
        try:
            ok = bool(backends.to_numpy(xp.all(xp.isfinite(leaf))))
        except Exception:  # a JAX tracer: cannot be inspected inside jit
            return
        if not ok:
            raise FloatingPointError(
                f"{what} contains NaN or Inf (array of shape {tuple(leaf.shape)}); "
                "the step was not taken"
            )


def _check_modes(adaptive_modes: Any, d: int) -> tuple[int, ...]:
    if adaptive_modes is None:
        return tuple(range(d))
    modes = tuple(adaptive_modes)
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not -d <= int(m) < d:
            raise ValueError(f"adaptive_modes entries must be modes in [0, {d}), got {m!r}")
    return tuple(sorted({int(m) % d for m in modes}))


def _manifold_of(x: TuckerTensor) -> FixedRankTucker:
    return FixedRankTucker(x.shape, x.ranks)


# --------------------------------------------------------------------------- 1-2: augmentation
def augment_basis(x: TuckerTensor, directions: Sequence[Any]) -> tuple[TuckerTensor, Maps]:
    """Augment every basis with new directions and represent ``x`` exactly in the new bases.

    ``Û_k = orth([U_k, D_k])`` has ``min(r_k + cols(D_k), n_k)`` columns and contains ``U_k``;
    the core becomes ``C ×_k (Û_kᵀ U_k)``, so the tensor is unchanged.

    Parameters
    ----------
    x : TuckerTensor
        Orthonormal factors.
    directions : sequence of arrays
        ``directions[k]`` of shape ``(n_k, c_k)``, e.g. the new K-step basis ``K_k^new`` or the
        factor gradient ``∂L/∂U_k`` (same span together with ``U_k``).

    Returns
    -------
    (TuckerTensor, tuple)
        The augmented point and the maps ``Û_kᵀ U_k`` (shape ``(m_k, r_k)``): any state ``S``
        living on the old core moves to the augmented core as ``S ×_k (Û_kᵀ U_k)``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> d = [np.ones((n, 2)) for n in x.shape]
    >>> y, maps = tm.augment_basis(x, d)
    >>> y.ranks, bool(np.allclose(y.to_dense(), x.to_dense()))
    ((4, 4, 4), True)
    """
    x = _as_tucker(x)
    xp = x._namespace()
    directions = list(directions)
    if len(directions) != x.ndim:
        raise ValueError(f"got {len(directions)} direction matrices for a tensor of order {x.ndim}")
    factors, maps = [], []
    core = x.core
    for k, (u, dk) in enumerate(zip(x.factors, directions)):
        if dk.ndim != 2 or dk.shape[0] != u.shape[0]:
            raise ValueError(
                f"directions[{k}] has shape {tuple(dk.shape)}, expected ({u.shape[0]}, c)"
            )
        q, _ = xp.linalg.qr(xp.concat([u, dk], axis=1))
        m = q.mT @ u
        factors.append(q)
        maps.append(m)
        core = _mp(xp, core, m, k)
    return TuckerTensor(core, factors), tuple(maps)


def augment(x: TuckerTensor, egrad_x: Any, *, lr: Any) -> tuple[TuckerTensor, Maps]:
    """Basis (K) step for every mode from one gradient, then augmentation (steps 1-2).

    Literal K-step: ``C_(k)ᵀ = Q_k S_kᵀ`` (QR), ``K_k = U_k S_k``,
    ``∇_{K_k} L = [∇L ×_{j≠k} U_jᵀ]_(k) Q_k``, ``K_k^new = K_k - lr ∇_{K_k} L`` and
    ``Û_k = orth([U_k, K_k^new])``. No pseudo-inverse of the core is formed.

    Parameters
    ----------
    x : TuckerTensor
        The current point (orthonormal factors, full multilinear rank core).
    egrad_x : array, TuckerTensor or SparseTensor
        Euclidean gradient of the loss at ``x``.
    lr : float
        Learning rate (> 0).

    Returns
    -------
    (TuckerTensor, tuple)
        See :func:`augment_basis`.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> y, maps = tm.augment(x, np.ones((6, 7, 8)), lr=0.1)
    >>> y.ranks, [m.shape for m in maps]
    ((4, 4, 4), [(4, 2), (4, 2), (4, 2)])
    """
    x = _as_tucker(x)
    manifold = _manifold_of(x)
    xp = manifold._point(x)
    manifold._ambient(xp, x, egrad_x, "egrad_x")
    _check_lr(lr)
    _check_finite(egrad_x, "the gradient at x")
    ts, vs = manifold._contractions(xp, egrad_x, list(x.factors))
    directions = []
    for k, (q, r) in enumerate(_core_qr(xp, x.core)):
        grad_k = _contract_q(xp, ts[k], q, k)
        if vs is not None:
            grad_k = vs[k] @ grad_k
        directions.append(x.factors[k] @ r.mT - lr * grad_k)  # K_k^new = U_k S_k - lr ∇_K L
    return augment_basis(x, directions)


# --------------------------------------------------------------------------- 3: Galerkin step
def core_gradient(x: TuckerTensor, egrad_x: Any) -> Any:
    """Gradient of the loss with respect to the core: ``∇L ×_1 U_1ᵀ ⋯ ×_d U_dᵀ``.

    For a dense gradient one pass over it; for Tucker and sparse gradients nothing of the full
    shape is formed.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> tm.core_gradient(x, np.ones((6, 7, 8))).shape
    (2, 2, 2)
    """
    x = _as_tucker(x)
    xp = x._namespace()
    if isinstance(egrad_x, TuckerTensor) and egrad_x.shape == x.shape:
        t = egrad_x.core
        for k, (u, v) in enumerate(zip(x.factors, egrad_x.factors)):
            t = _mp(xp, t, u.mT @ v, k)
        return t
    if isinstance(egrad_x, SparseTensor) and egrad_x.shape == x.shape:
        t0 = sparse_all_but_one(xp, egrad_x, list(x.factors), modes=(0,))[0]
        return _mp(xp, t0, x.factors[0].mT, 0)
    if not is_array(egrad_x) or tuple(egrad_x.shape) != x.shape:
        raise ValueError(
            f"egrad_x must be an ambient tensor of shape {x.shape} (dense, TuckerTensor or "
            f"SparseTensor), got {type(egrad_x).__name__} of shape "
            f"{getattr(egrad_x, 'shape', None)}"
        )
    t = egrad_x
    for k in [0, *reversed(range(1, x.ndim))]:  # outer modes first: no transpose copies
        t = _mp(xp, t, x.factors[k].mT, k)
    return t


def galerkin_step(x: TuckerTensor, core_grad: Any, *, lr: Any) -> TuckerTensor:
    """Gradient step on the core with the bases fixed: ``C ← C - lr ∇_C L`` (step 3).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> y = tm.galerkin_step(x, np.ones((2, 2, 2)), lr=0.5)
    >>> bool(np.allclose(y.core, x.core - 0.5))
    True
    """
    x = _as_tucker(x)
    _check_lr(lr)
    if tuple(core_grad.shape) != x.ranks:
        raise ValueError(f"core_grad has shape {tuple(core_grad.shape)}, expected {x.ranks}")
    _check_finite(core_grad, "the core gradient")
    return TuckerTensor(x.core - lr * core_grad, x.factors)


# --------------------------------------------------------------------------- 4: truncation
def truncate_core(
    x: TuckerTensor,
    *,
    tau: float | None = None,
    ranks: Any = None,
    min_rank: Any = 1,
    max_rank: Any = None,
    absolute: bool = False,
    adaptive_modes: Any = None,
) -> tuple[TuckerTensor, Maps]:
    """Per-mode truncation of the (augmented) core (step 4).

    For each mode, the SVD ``C_(k) = P_k Σ_k V_kᵀ``. Adaptive modes keep the smallest rank whose
    discarded singular values have 2-norm ``<= ϑ`` (``ϑ = tau ||C||_F``, or ``tau`` with
    ``absolute=True``), clipped to ``[min_rank, max_rank]``; the other modes keep ``ranks[k]``.
    All ranks are then lowered to ``n_k`` and to the feasibility bound
    ``r_k <= prod_{j≠k} r_j``. ``U_k ← U_k P_k``, ``C ← C ×_k P_kᵀ``; the total error is at most
    ``sqrt(d) ϑ`` for the adaptive modes.

    Parameters
    ----------
    x : TuckerTensor
    tau : float, optional
        Tolerance; None truncates every mode to ``ranks`` (fixed rank, jit-able).
    ranks : int or sequence of int, optional
        Ranks of the non-adaptive modes (required when ``tau`` is None or some mode is not
        adaptive).
    min_rank, max_rank : int or sequence (per mode), optional
    absolute : bool
    adaptive_modes : sequence of int, optional
        Default: every mode.

    Returns
    -------
    (TuckerTensor, tuple)
        The truncated point and the maps ``P_kᵀ``: state ``S`` on the input core moves to the
        new core as ``S ×_k P_kᵀ``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 3).random_point(key=0)
    >>> y, maps = tm.truncate_core(x, tau=0.5)
    >>> all(r <= 3 for r in y.ranks), len(maps)
    (True, 3)
    """
    x = _as_tucker(x)
    xp = x._namespace()
    d = x.ndim
    tau = check_tol(tau, "tau")
    adaptive = _check_modes(adaptive_modes, d) if tau is not None else ()
    fixed = per_mode(ranks, d, "ranks", None)
    for k in range(d):
        if k not in adaptive and fixed[k] is None:
            raise ValueError(
                f"mode {k} is not adaptive (tau={tau}, adaptive_modes={adaptive_modes}) so "
                "ranks must give its rank"
            )
    lows = per_mode(min_rank, d, "min_rank", 1)
    highs = per_mode(max_rank, d, "max_rank", None)
    threshold = 0.0
    if adaptive:
        assert tau is not None  # adaptive modes exist only with a tolerance
        nrm = float(backends.to_numpy(xp.linalg.vector_norm(x.core)))
        threshold = tau if absolute else tau * nrm
    svds, chosen = [], []
    for k in range(d):
        p, s, _ = _svd(xp, _unfold(xp, x.core, k))
        svds.append(p)
        available = int(s.shape[0])
        if k in adaptive:
            r = _rank_from_tol(xp, s, threshold)
            r = max(r, lows[k] or 1)
            if highs[k] is not None:
                r = min(r, highs[k])
        else:
            r = fixed[k]
        chosen.append(max(1, min(r, available, x.shape[k])))
    chosen = list(feasible_ranks(chosen))
    maps = tuple(p[:, :r].mT for p, r in zip(svds, chosen))
    core = x.core
    for k, m in enumerate(maps):
        core = _mp(xp, core, m, k)
    return TuckerTensor(core, [u @ m.mT for u, m in zip(x.factors, maps)]), maps


# --------------------------------------------------------------------------- the step
def tdlrt_step(
    x: TuckerTensor,
    egrad: Callable[[TuckerTensor], Any],
    *,
    lr: Any,
    tau: float,
    min_rank: Any = 1,
    max_rank: Any = None,
    absolute: bool = False,
    adaptive_modes: Any = None,
) -> TuckerTensor:
    """One rank-adaptive TDLRT step (Algorithm 1 of the paper).

    Parameters
    ----------
    x : TuckerTensor
        Orthonormal factors.
    egrad : callable
        ``egrad(point) -> ambient gradient`` (dense array, TuckerTensor or SparseTensor) of the
        loss at a TuckerTensor point. Called exactly twice: at ``x`` (basis step for every mode)
        and at the augmented point (Galerkin step).
    lr : float
        Learning rate.
    tau : float
        Truncation tolerance: relative to ``||core||`` by default, absolute with
        ``absolute=True``.
    min_rank, max_rank : int or per-mode sequence
        Rank bounds for the adaptive modes.
    adaptive_modes : sequence of int, optional
        Modes whose rank may change (default all); the others keep their rank.

    Returns
    -------
    TuckerTensor
        The new point; its ranks may differ from ``x.ranks``.

    Raises
    ------
    ValueError, TypeError
        Bad ``lr``, ``tau``, rank bounds, modes or gradient shapes, before ``egrad`` is called.
    FloatingPointError
        A gradient with NaN or Inf (nothing is returned; ``x`` is untouched).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> A = tm.FixedRankTucker((8, 9, 10), 2).random_point(key=1).to_dense()
    >>> x = tm.FixedRankTucker((8, 9, 10), 4).random_point(key=0)
    >>> for _ in range(30):
    ...     x = tm.tdlrt_step(x, lambda y: y.to_dense() - A, lr=1.0, tau=1e-6)
    >>> x.ranks, bool(np.allclose(x.to_dense(), A))
    ((2, 2, 2), True)
    """
    x = _as_tucker(x)
    _check_lr(lr)
    if tau is None:
        raise TypeError("tau must be a number (use fixed_rank_step for fixed ranks)")
    check_tol(tau, "tau")
    d = x.ndim
    _check_modes(adaptive_modes, d)
    per_mode(min_rank, d, "min_rank", 1)
    per_mode(max_rank, d, "max_rank", None)
    _manifold_of(x)  # feasible ranks
    x_aug, _ = augment(x, egrad(x), lr=lr)
    x_gal = galerkin_step(x_aug, core_gradient(x_aug, _checked(egrad(x_aug), x_aug)), lr=lr)
    x_new, _ = truncate_core(
        x_gal,
        tau=tau,
        ranks=x.ranks,
        min_rank=min_rank,
        max_rank=max_rank,
        absolute=absolute,
        adaptive_modes=adaptive_modes,
    )
    return x_new


def _checked(g: Any, x: TuckerTensor) -> Any:
    _check_finite(g, "the gradient at the augmented point")
    return g


def fixed_rank_step(x: TuckerTensor, egrad: Callable[[TuckerTensor], Any], *, lr: Any):
    """TDLRT with truncation back to the current ranks (the fixed-rank BUG step).

    Jit-able under JAX (all shapes static; the finiteness check is skipped for traced values).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((8, 9, 10), 2).random_point(key=0)
    >>> tm.fixed_rank_step(x, lambda y: y.to_dense(), lr=0.1).ranks
    (2, 2, 2)
    """
    x = _as_tucker(x)
    _check_lr(lr)
    _manifold_of(x)
    x_aug, _ = augment(x, egrad(x), lr=lr)
    x_gal = galerkin_step(x_aug, core_gradient(x_aug, _checked(egrad(x_aug), x_aug)), lr=lr)
    x_new, _ = truncate_core(x_gal, ranks=x.ranks)
    return x_new


# --------------------------------------------------------------------------- state transport
def transport_core_state(state: Any, maps: Maps) -> Any:
    """Move a core-shaped state (e.g. a momentum buffer) along basis maps: ``S ×_k maps[k]``.

    Use the maps of :func:`augment` / :func:`augment_basis` (old core → augmented core) and of
    :func:`truncate_core` (augmented → truncated). Exact for linear state such as SGD momentum:
    the transported buffer represents the same tensor ``S ×_k U_k`` in the new bases
    (restricted to them after truncation).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> y, maps = tm.augment(x, np.ones((6, 7, 8)), lr=0.1)
    >>> bool(np.allclose(tm.transport_core_state(x.core, maps), y.core))
    True
    """
    xp = namespace_of(state)
    if state.ndim != len(maps):
        raise ValueError(f"state has {state.ndim} modes but {len(maps)} maps were given")
    for k, m in enumerate(maps):
        if m.shape[1] != state.shape[k]:
            raise ValueError(
                f"maps[{k}] has shape {tuple(m.shape)} but the state has size {state.shape[k]} "
                f"in mode {k} (state shape {tuple(state.shape)})"
            )
        state = _mp(xp, state, m, k)
    return state


def transport_core_second_moment(state: Any, maps: Maps) -> Any:
    """Move an elementwise second moment (Adam's ``v``) along basis maps: ``V ×_k (M_k ∘ M_k)``.

    A second moment is not a tensor that rotates with the basis: ``E[g²]`` of a rotated gradient
    ``g' = M g`` is ``M E[g gᵀ] Mᵀ`` on the diagonal, which needs the covariance Adam does not
    keep. Assuming independent coordinates (the diagonal approximation Adam itself makes)
    ``E[g'_i²] = sum_j M_ij² E[g_j²]``: the map with squared entries. This keeps ``V >= 0``, is
    exact for permutations and sign flips (the common case for the kept directions), and
    preserves the total ``sum V`` for orthogonal maps. (The research code's
    sqrt → rotate → square is not monotone in ``V`` and can create zeros.)

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> v = np.ones((2, 2))
    >>> maps = (np.array([[0.0, 1.0], [1.0, 0.0]]), np.eye(2))
    >>> tm.transport_core_second_moment(v, maps).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return transport_core_state(state, tuple(m * m for m in maps))
