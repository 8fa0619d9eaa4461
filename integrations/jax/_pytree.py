"""Pytree registration of the core's named tuples and batching helpers for ``jax.vmap``.

``TuckerTensor`` and ``TangentVector`` are named tuples, which JAX already flattens. JAX
rebuilds a named tuple by calling its constructor, and the core's constructors validate shapes;
a batch of points (every leaf with a leading batch axis) is not a valid single point, so the
outputs of ``jax.vmap`` could not be rebuilt. Registering the two classes with an unflatten
that skips the validation (``cls._make``) fixes that; flattening is unchanged (leaves
``core, *factors`` / ``dcore, *dfactors`` in that order).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import tuckerman as tm

__all__ = ["stack_points", "unstack_points"]

_REGISTERED = False


def _children(t: Any) -> tuple[tuple[Any, Any], None]:
    return (t[0], t[1]), None


def _rebuild(cls: Any, _aux: None, children: Any) -> Any:
    return cls._make(children)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    for cls in (tm.TuckerTensor, tm.TangentVector):
        try:
            jax.tree_util.register_pytree_node(cls, _children, functools.partial(_rebuild, cls))
        except ValueError:  # registered already (e.g. by the core in a later version)
            pass
    _REGISTERED = True


def stack_points(points: Sequence[Any]) -> Any:
    """Stack equally shaped TuckerTensors (or TangentVectors) into one batch for ``jax.vmap``.

    Every leaf gets a leading batch axis; the result is a pytree of the same class, not a valid
    single point (its core has one mode too many).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, tuckerman as tm
    >>> from tuckerman.integrations.jax import stack_points
    >>> M = tm.FixedRankTucker((5, 6, 7), 2)
    >>> xs = stack_points([M.random_point(key=i, xp=jnp) for i in range(4)])
    >>> jax.vmap(lambda x: tm.norm(x))(xs).shape
    (4,)
    """
    points = list(points)
    if not points:
        raise ValueError("stack_points needs at least one point, got an empty sequence")
    first: Any = jax.tree_util.tree_structure(points[0])
    for i, p in enumerate(points):
        if jax.tree_util.tree_structure(p) != first:
            raise ValueError(
                f"points[{i}] has structure {jax.tree_util.tree_structure(p)}, "
                f"expected {first} (points[0])"
            )
        shapes = [tuple(a.shape) for a in jax.tree_util.tree_leaves(p)]
        ref = [tuple(a.shape) for a in jax.tree_util.tree_leaves(points[0])]
        if shapes != ref:
            raise ValueError(f"points[{i}] has leaf shapes {shapes}, expected {ref} (points[0])")
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *points)


def unstack_points(batch: Any) -> list[Any]:
    """Inverse of :func:`stack_points`: the list of single points (validated).

    Examples
    --------
    >>> import jax.numpy as jnp, tuckerman as tm
    >>> from tuckerman.integrations.jax import stack_points, unstack_points
    >>> M = tm.FixedRankTucker((5, 6, 7), 2)
    >>> len(unstack_points(stack_points([M.random_point(key=i, xp=jnp) for i in range(3)])))
    3
    """
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    if not leaves:
        raise ValueError("unstack_points got a pytree without arrays")
    n = int(leaves[0].shape[0])
    cls = type(batch)
    out = []
    for i in range(n):
        item = jax.tree_util.tree_unflatten(treedef, [a[i] for a in leaves])
        if isinstance(item, (tm.TuckerTensor, tm.TangentVector)):
            item = cls(item[0], item[1])  # validates the single point
        out.append(item)
    return out
