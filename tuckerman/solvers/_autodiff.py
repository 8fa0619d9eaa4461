"""Riemannian gradients from the gradients with respect to the core and the factors.

Autodiff through ``cost(TuckerTensor(core, factors))`` gives ``∂f/∂C = G ×_1 U_1ᵀ ⋯ ×_d U_dᵀ``
and ``∂f/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ`` for the Euclidean gradient ``G`` that is never
formed. The Riemannian gradient follows (DESIGN.md §3):
``dC = ∂f/∂C`` and ``dU_k = (I − U_kU_kᵀ) (∂f/∂U_k) (C_(k)C_(k)ᵀ)⁻¹``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuckerman._compat import backend_name
from tuckerman._factor_grads import rgrad_from_factor_grads
from tuckerman._tucker import TuckerTensor

__all__ = ["rgrad_from_factor_grads", "value_and_factor_grads"]

AUTODIFF = ("torch", "jax")


def value_and_factor_grads(
    library: str, cost: Callable, x: TuckerTensor, *, core_only: bool = False
) -> tuple:
    """``(cost(x), ∂f/∂C, [∂f/∂U_k])`` by the autodiff of ``library`` ("torch" or "jax").

    With ``core_only`` the factor gradients are not computed (None)."""
    have = backend_name(x.core)
    if have != library:
        raise TypeError(
            f"autodiff={library!r} needs {library} arrays, but the point holds {have} arrays; "
            f"convert x0 to {library} or pass egrad"
        )
    if library == "torch":
        return _torch(cost, x, core_only)
    return _jax(cost, x, core_only)


def _torch(cost: Callable, x: TuckerTensor, core_only: bool) -> tuple:
    import torch

    leaves = [x.core.detach().requires_grad_(True)]
    leaves += [u.detach().requires_grad_(not core_only) for u in x.factors]
    with torch.enable_grad():
        value = cost(TuckerTensor(leaves[0], leaves[1:]))
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise TypeError(
                f"with autodiff='torch' the cost must return a 0-d torch tensor, got {shape}"
            )
        raw: Any = (None,) * len(leaves)  # when the cost does not depend on the point
        wrt = leaves[:1] if core_only else leaves
        if value.requires_grad:
            raw = torch.autograd.grad(value, wrt, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, wrt)]
    return value.detach(), grads[0], None if core_only else grads[1:]


def _jax(cost: Callable, x: TuckerTensor, core_only: bool) -> tuple:
    import jax

    def f(core: Any, factors: tuple) -> Any:
        return cost(TuckerTensor(core, factors))

    if core_only:
        value, gc = jax.value_and_grad(f, argnums=0)(x.core, tuple(x.factors))
        return value, gc, None
    value, (gc, gf) = jax.value_and_grad(f, argnums=(0, 1))(x.core, tuple(x.factors))
    return value, gc, list(gf)
