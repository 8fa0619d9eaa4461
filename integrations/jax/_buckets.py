"""Rank buckets: static padded shapes for rank-adaptive training under ``jax.jit``.

A Tucker weight of true ranks ``r`` is stored at padded ranks ``B = bucket(r)`` (per mode the
smallest bucket size ``>= r_k``): factor columns ``r_k..B_k-1`` and core slices beyond ``r_k``
are zero, so the weight, the forward pass and every gradient are exactly those of the unpadded
weight. The jitted step is compiled once per bucket configuration, not once per rank.
"""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

import tuckerman as tm

__all__ = ["bucket_sizes", "bucket_of", "pad_tucker", "trim_tucker", "pad_core", "trim_core"]


def check_buckets(buckets: Any) -> Any:
    """``"pow2"``, ``"max"``, ``None`` or a sequence of positive ints (validated)."""
    if buckets is None or buckets in ("pow2", "max"):
        return buckets
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise ValueError(
            f"buckets must be 'pow2', 'max', None or a non-empty sequence of positive ints, "
            f"got {buckets!r}"
        )
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"bucket sizes must be positive ints, got {b!r} in {tuple(buckets)}")
    return tuple(sorted({int(b) for b in buckets}))


def bucket_sizes(buckets: Any, cap: int) -> tuple[int, ...] | None:
    """The padded sizes a mode of maximal rank ``cap`` may take (None: no padding).

    ``"pow2"``: 4, 8, 16, ... below ``cap``, then ``cap``; ``"max"``: only ``cap``
    (preallocated maximal rank); a sequence: its entries below ``cap``, then ``cap``.

    Examples
    --------
    >>> from tuckerman.integrations.jax import bucket_sizes
    >>> bucket_sizes("pow2", 20), bucket_sizes("max", 20), bucket_sizes((5, 10, 30), 20)
    ((4, 8, 16, 20), (20,), (5, 10, 20))
    """
    if buckets is None:
        return None
    if buckets == "max":
        return (cap,)
    if buckets == "pow2":
        sizes, b = [], 4
        while b < cap:
            sizes.append(b)
            b *= 2
    else:
        sizes = [b for b in buckets if b < cap]
    return (*sizes, cap)


def bucket_of(sizes: tuple[int, ...] | None, r: int) -> int:
    """The smallest size ``>= r`` (``r`` itself when there is no bucketing)."""
    if sizes is None:
        return int(r)
    i = bisect.bisect_left(sizes, int(r))
    return sizes[min(i, len(sizes) - 1)]


def pad_core(a: Any, shape: Sequence[int]) -> Any:
    """Zero-pad a core-shaped array at the end of every mode up to ``shape``."""
    return jnp.pad(a, [(0, int(s) - int(n)) for n, s in zip(a.shape, shape)])


def trim_core(a: Any, shape: Sequence[int]) -> Any:
    """Keep the leading ``shape`` block of a core-shaped array."""
    return a[tuple(slice(0, int(s)) for s in shape)]


def pad_tucker(x: tm.TuckerTensor, ranks: Sequence[int]) -> tm.TuckerTensor:
    """Zero-padded representation at larger ranks (the same tensor, exactly)."""
    factors = [jnp.pad(u, [(0, 0), (0, int(r) - u.shape[1])]) for u, r in zip(x.factors, ranks)]
    return tm.TuckerTensor._make((pad_core(x.core, ranks), tuple(factors)))


def trim_tucker(x: tm.TuckerTensor, ranks: Sequence[int]) -> tm.TuckerTensor:
    """The leading block (exact when the dropped columns and core slices are zero)."""
    factors = tuple(u[:, : int(r)] for u, r in zip(x.factors, ranks))
    return tm.TuckerTensor._make((trim_core(x.core, ranks), factors))
