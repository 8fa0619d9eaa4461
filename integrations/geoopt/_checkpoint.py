"""Loading geoopt optimizer checkpoints without losing precision."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["load_optimizer_state"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)``, keeping integer step counters integers.

    geoopt's :class:`~geoopt.optim.RiemannianAdam` counts steps with a Python int, but
    ``torch.optim.Adam.load_state_dict`` (which it inherits) turns every ``"step"`` into a
    float32 0-d tensor. The bias corrections ``1 - beta**step`` are then computed in float32, so
    a resumed float64 run drifts from the uninterrupted one at the 1e-7 level. This function
    loads the state and puts the saved integers back, so that the continuation is identical.
    Optimizers without integer steps are loaded unchanged.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Built over the same parameters, in the same order, as the saved one.
    state_dict : dict
        What ``optimizer.state_dict()`` returned (possibly through ``torch.save`` /
        ``torch.load(..., weights_only=True)``).

    Examples
    --------
    >>> import geoopt, torch
    >>> from tuckerman.integrations.geoopt import TuckerManifold, load_optimizer_state
    >>> M = TuckerManifold((4, 5, 6), 2)
    >>> x = geoopt.ManifoldParameter(M.random(key=0, dtype=torch.float64), manifold=M)
    >>> opt = geoopt.optim.RiemannianAdam([x], lr=0.1)
    >>> (M.unpack(x).to_dense() ** 2).sum().backward()
    >>> opt.step()
    >>> twin = geoopt.optim.RiemannianAdam([x], lr=0.1)
    >>> load_optimizer_state(twin, opt.state_dict())
    >>> twin.state[x]["step"]
    1
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise TypeError("state_dict must be what optimizer.state_dict() returned")
    optimizer.load_state_dict(state_dict)
    params: list[Any] = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state_dict["state"].items():
        step = saved.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            optimizer.state[params[index]]["step"] = step
