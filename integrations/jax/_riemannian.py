"""Fixed-rank Riemannian optimization as optax gradient transformations.

The parameters are a pytree whose :class:`~tuckerman.TuckerTensor` nodes are points of
``FixedRankTucker(x.shape, x.ranks)``; the gradients are what ``jax.grad`` gives for them
(``∂L/∂C`` and ``∂L/∂U_k``, the Euclidean gradient never formed).

* :func:`riemannian_gradient` turns the factor gradients of each TuckerTensor into the
  Riemannian gradient (a :class:`~tuckerman.TangentVector`, itself a pytree) and passes the
  other leaves through;
* :func:`tangent_momentum` is heavy-ball momentum whose buffer is moved to the current point by
  the manifold's vector transport;
* any elementwise optax transformation that follows (``optax.scale``,
  ``optax.scale_by_learning_rate``, schedules, ...) acts on the tangent vectors' components;
* :func:`apply_updates` retracts the Tucker leaves (``FixedRankTucker.retract``) and adds the
  others, replacing ``optax.apply_updates``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

import tuckerman as tm

__all__ = ["riemannian_gradient", "tangent_momentum", "riemannian_sgd", "apply_updates"]


def _is_point(x: Any) -> bool:
    return isinstance(x, (tm.TuckerTensor, tm.TangentVector))


def _manifold(x: tm.TuckerTensor) -> tm.FixedRankTucker:
    return tm.FixedRankTucker(x.shape, x.ranks)


def _flat(tree: Any) -> tuple[list, Any]:
    return jax.tree_util.tree_flatten(tree, is_leaf=_is_point)


def _need_params(params: Any, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} needs params (call tx.update(grads, state, params))")


def _matched(updates: Any, params: Any, who: str) -> tuple[list, list, Any]:
    _need_params(params, who)
    u_leaves, _ = _flat(updates)
    p_leaves, treedef = _flat(params)
    if len(u_leaves) != len(p_leaves):
        raise ValueError(
            f"{who}: updates have {len(u_leaves)} leaves but params have {len(p_leaves)}; they "
            "must have the same structure"
        )
    return u_leaves, p_leaves, treedef


def riemannian_gradient() -> optax.GradientTransformation:
    """Factor gradients of each TuckerTensor → its Riemannian gradient (a TangentVector).

    Uses ``tm.rgrad_from_factor_grads`` (the full gradient is never formed). Non-Tucker leaves
    pass through unchanged. Needs ``params`` in ``update``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax, tuckerman as tm
    >>> from tuckerman.integrations.jax import riemannian_gradient, apply_updates
    >>> x = tm.FixedRankTucker((5, 6, 7), 2).random_point(key=0, xp=jnp)
    >>> loss = lambda p: 0.5 * tm.norm(p["w"]) ** 2
    >>> params = {"w": x}
    >>> tx = optax.chain(riemannian_gradient(), optax.scale(-0.5))
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    >>> new = apply_updates(params, updates)
    >>> round(float(tm.norm(new["w"]) / tm.norm(x)), 6)
    0.5
    """

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        u_leaves, p_leaves, treedef = _matched(updates, params, "riemannian_gradient")
        out = []
        for g, x in zip(u_leaves, p_leaves):
            if isinstance(x, tm.TuckerTensor):
                if not isinstance(g, tm.TuckerTensor):
                    raise TypeError(
                        "riemannian_gradient: the gradient of a TuckerTensor parameter must be "
                        f"the TuckerTensor of its core and factor gradients, got {type(g).__name__}"
                    )
                g = tm.rgrad_from_factor_grads(_manifold(x), x, g.core, g.factors)
            out.append(g)
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


class TangentMomentumState(NamedTuple):
    """The buffers (TangentVectors at ``points``, arrays elsewhere) and the points they live at."""

    points: Any
    buffers: Any


def tangent_momentum(decay: float, nesterov: bool = False) -> optax.GradientTransformation:
    """Heavy-ball momentum with the buffer transported to the current point.

    ``b ← decay · transport(b) + g`` (``g + decay · b`` with ``nesterov``), after
    :func:`riemannian_gradient`; plain ``optax.trace`` for the other leaves.

    Examples
    --------
    >>> import optax
    >>> from tuckerman.integrations.jax import riemannian_gradient, tangent_momentum
    >>> tx = optax.chain(riemannian_gradient(), tangent_momentum(0.9), optax.scale(-0.1))
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")

    def init_fn(params: Any) -> TangentMomentumState:
        leaves, treedef = _flat(params)
        buffers: list[Any] = []
        for x in leaves:
            if isinstance(x, tm.TuckerTensor):
                buffers.append(_manifold(x).zero_tangent(x))
            else:
                buffers.append(jax.numpy.zeros_like(x))
        return TangentMomentumState(params, jax.tree_util.tree_unflatten(treedef, buffers))

    def update_fn(updates: Any, state: TangentMomentumState, params: Any = None):
        u_leaves, p_leaves, treedef = _matched(updates, params, "tangent_momentum")
        old_points, _ = _flat(state.points)
        old_bufs, _ = _flat(state.buffers)
        outs, bufs = [], []
        for g, x, x0, b in zip(u_leaves, p_leaves, old_points, old_bufs):
            if isinstance(x, tm.TuckerTensor):
                if not isinstance(g, tm.TangentVector):
                    raise TypeError(
                        "tangent_momentum needs Riemannian gradients (chain it after "
                        f"riemannian_gradient()), got {type(g).__name__} for a TuckerTensor"
                    )
                b = _manifold(x).transport(x0, x, b)
            b = decay * b + g
            bufs.append(b)
            outs.append(g + decay * b if nesterov else b)
        new_state = TangentMomentumState(params, jax.tree_util.tree_unflatten(treedef, bufs))
        return jax.tree_util.tree_unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def riemannian_sgd(
    learning_rate: Any, momentum: float = 0.0, nesterov: bool = False
) -> optax.GradientTransformation:
    """Fixed-rank Riemannian SGD (with transported momentum); apply with :func:`apply_updates`.

    ``optax.chain(riemannian_gradient(), tangent_momentum(momentum, nesterov),
    optax.scale_by_learning_rate(learning_rate))``; the non-Tucker leaves get ordinary SGD.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, tuckerman as tm
    >>> from tuckerman.integrations.jax import riemannian_sgd, apply_updates
    >>> A = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=1, xp=jnp).to_dense()
    >>> params = {"w": tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0, xp=jnp)}
    >>> loss = lambda p: 0.5 * jnp.sum((p["w"].to_dense() - A) ** 2)
    >>> tx = riemannian_sgd(0.5, momentum=0.5)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...     return apply_updates(params, updates), state
    >>> for _ in range(60):
    ...     params, state = step(params, state)
    >>> bool(loss(params) < 1e-6)
    True
    """
    parts = [riemannian_gradient()]
    if momentum:
        parts.append(tangent_momentum(momentum, nesterov))
    elif nesterov:
        raise ValueError("nesterov needs momentum > 0")
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def apply_updates(params: Any, updates: Any) -> Any:
    """Retract every TuckerTensor along its TangentVector update; add the other updates.

    The replacement of ``optax.apply_updates`` for the transformations of this module.

    Examples
    --------
    >>> import jax.numpy as jnp, tuckerman as tm
    >>> from tuckerman.integrations.jax import apply_updates
    >>> M = tm.FixedRankTucker((5, 6, 7), 2)
    >>> x = M.random_point(key=0, xp=jnp)
    >>> y = apply_updates({"w": x}, {"w": M.zero_tangent(x)})["w"]
    >>> bool(jnp.allclose(y.to_dense(), x.to_dense(), atol=1e-5))
    True
    """
    u_leaves, p_leaves, treedef = _matched(updates, params, "apply_updates")
    out = []
    for u, x in zip(u_leaves, p_leaves):
        if isinstance(x, tm.TuckerTensor):
            if not isinstance(u, tm.TangentVector):
                raise TypeError(
                    "apply_updates: the update of a TuckerTensor must be a TangentVector (from "
                    f"riemannian_gradient), got {type(u).__name__}"
                )
            out.append(_manifold(x).retract(x, u))
        else:
            out.append(optax.apply_updates(x, u))
    return jax.tree_util.tree_unflatten(treedef, out)
