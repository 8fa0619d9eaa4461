"""Tucker tensors stored at a fixed *capacity*, with their true ranks as a device array.

A :class:`PaddedTucker` ``(core, factors, ranks)`` holds ``core`` of shape ``capacity`` and
``factors[k]`` of shape ``(n_k, capacity[k])``; the true ranks ``ranks`` (an integer array of
shape ``(d,)`` on the arrays' device) say which leading block is live. Factor columns at and
beyond ``ranks[k]`` and core entries outside the leading ``ranks`` block are exactly zero, so the
padded tensor *is* the unpadded one: products, forward passes and gradients through it are
those of the true-rank tensor, entry for entry. A rank change inside the capacity changes values,
not shapes; compilers (``jax.jit``, ``torch.compile``) see one shape per capacity.

Capacities come from a *policy* (:func:`capacity_sizes`): the sizes a mode's capacity may take,
e.g. powers of two, so that a layer is reallocated (or a step recompiled) only when its rank
leaves its size class.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import tuckerman.backends as backends
from tuckerman._compat import is_array, namespace_of
from tuckerman._tucker import TuckerTensor
from tuckerman.validation import as_ranks

__all__ = [
    "PaddedTucker",
    "check_capacity_policy",
    "capacity_sizes",
    "capacity_of",
    "next_capacity",
    "pad_array",
    "fit_array",
    "trim_array",
    "rank_mask",
]

POLICIES = ("pow2", "max", "exact")


# --------------------------------------------------------------------------- capacity policy
def check_capacity_policy(policy: Any) -> Any:
    """Validate a capacity policy: ``"pow2"``, ``"max"``, ``"exact"`` (or None) or sizes.

    Returns the policy in canonical form (a sorted tuple for sizes, ``"exact"`` for None).

    Examples
    --------
    >>> from tuckerman.engine import check_capacity_policy
    >>> check_capacity_policy((16, 4, 8)), check_capacity_policy(None)
    ((4, 8, 16), 'exact')
    """
    if policy is None:
        return "exact"
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"capacity policy must be one of {POLICIES}, None or a sequence of positive "
                f"ints, got {policy!r}"
            )
        return policy
    if not isinstance(policy, Sequence) or not policy:
        raise ValueError(
            f"capacity policy must be one of {POLICIES}, None or a non-empty sequence of "
            f"positive ints, got {policy!r}"
        )
    for b in policy:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"capacity sizes must be positive ints, got {b!r} in {tuple(policy)}")
    return tuple(sorted({int(b) for b in policy}))


def capacity_sizes(policy: Any, cap: int) -> tuple[int, ...] | None:
    """The capacities a mode whose rank is at most ``cap`` may take (None: any, exact).

    ``"pow2"``: 4, 8, 16, ... below ``cap``, then ``cap``; ``"max"``: only ``cap`` (preallocate
    the largest rank: never reallocated, most padding); ``"exact"`` / None: the rank itself
    (no padding; a new shape at every rank change); a sequence: its entries below ``cap``, then
    ``cap``.

    Examples
    --------
    >>> from tuckerman.engine import capacity_sizes
    >>> capacity_sizes("pow2", 20), capacity_sizes("max", 20), capacity_sizes((5, 10, 30), 20)
    ((4, 8, 16, 20), (20,), (5, 10, 20))
    """
    policy = check_capacity_policy(policy)
    cap = int(cap)
    if policy == "exact":
        return None
    if policy == "max":
        return (cap,)
    if policy == "pow2":
        sizes, b = [], 4
        while b < cap:
            sizes.append(b)
            b *= 2
    else:
        sizes = [b for b in policy if b < cap]
    return (*sizes, cap)


def capacity_of(sizes: tuple[int, ...] | None, rank: int) -> int:
    """The smallest capacity in ``sizes`` that holds ``rank`` (``rank`` itself for None).

    Examples
    --------
    >>> from tuckerman.engine import capacity_of
    >>> capacity_of((4, 8, 16, 20), 9), capacity_of(None, 9)
    (16, 9)
    """
    if sizes is None:
        return int(rank)
    i = bisect.bisect_left(sizes, int(rank))
    return sizes[min(i, len(sizes) - 1)]


def next_capacity(sizes: tuple[int, ...] | None, capacity: int, rank: int) -> int:
    """The capacity a mode holding ``rank`` moves to from ``capacity`` (itself: no change).

    Grow to the smallest size that holds ``rank`` when it outgrows ``capacity``; shrink only
    when even twice the rank fits a smaller size (to that size), so a rank moving back and forth
    across a size boundary does not reallocate every step. ``sizes`` None (exact): the rank.

    Examples
    --------
    >>> from tuckerman.engine import next_capacity
    >>> s = (4, 8, 16, 32)
    >>> next_capacity(s, 16, 17), next_capacity(s, 32, 16), next_capacity(s, 32, 7)
    (32, 32, 16)
    """
    rank, capacity = int(rank), int(capacity)
    if sizes is None:
        return rank
    if rank > capacity:
        return max(capacity_of(sizes, rank), rank)
    target = capacity_of(sizes, 2 * rank)
    return target if target < capacity else capacity


# --------------------------------------------------------------------------- padding
def pad_array(xp: Any, a: Any, shape: Sequence[int]) -> Any:
    """Zero-pad ``a`` at the end of every axis up to ``shape`` (a copy when it grows)."""
    shape = tuple(int(s) for s in shape)
    if tuple(a.shape) == shape:
        return a
    out = a
    for axis, (n, s) in enumerate(zip(a.shape, shape)):
        if s > n:
            fill = list(out.shape)
            fill[axis] = s - n
            out = xp.concat([out, xp.zeros(tuple(fill), dtype=a.dtype, device=_dev(a))], axis=axis)
        elif s < n:
            raise ValueError(f"cannot pad an array of shape {tuple(a.shape)} to {shape}")
    return out


def fit_array(xp: Any, a: Any, shape: Sequence[int]) -> Any:
    """``a`` zero-padded or cut at the end of every axis to ``shape``."""
    shape = tuple(int(s) for s in shape)
    grow = tuple(max(int(n), s) for n, s in zip(a.shape, shape))
    return trim_array(pad_array(xp, a, grow), shape)


def trim_array(a: Any, shape: Sequence[int]) -> Any:
    """The leading ``shape`` block of ``a`` (a view where the library gives one)."""
    return a[tuple(slice(0, int(s)) for s in shape)]


def rank_mask(xp: Any, rank: Any, size: int, dtype: Any, device: Any) -> Any:
    """``(arange(size) < rank)`` as ``dtype``; ``rank`` may be a stack (leading axes kept)."""
    j = xp.arange(int(size), device=device)
    r = xp.asarray(rank, device=device)
    return xp.astype(j < r[..., None], dtype)


def _dev(a: Any) -> Any:
    from tuckerman._compat import device_of

    return device_of(a)


# --------------------------------------------------------------------------- the type
class PaddedTucker(NamedTuple):
    """A Tucker tensor at a fixed capacity with its true ranks on the device.

    ``core`` has shape ``capacity`` and is zero outside the leading ``ranks`` block;
    ``factors[k]`` has shape ``(n_k, capacity[k])`` with orthonormal leading ``ranks[k]``
    columns and zero columns after them; ``ranks`` is an integer array of shape ``(d,)`` in the
    arrays' library and device. The represented tensor is exactly the true-rank one.

    A named tuple, so JAX and ``torch.utils._pytree`` treat it as a pytree.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.engine import PaddedTucker
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> p = PaddedTucker.from_tucker(x, capacity=(4, 4, 3))
    >>> p.capacity, p.host_ranks(), bool(np.allclose(p.to_dense(), x.to_dense()))
    ((4, 4, 3), (2, 2, 2), True)
    >>> p.to_tucker().ranks
    (2, 2, 2)
    """

    core: Any
    factors: tuple
    ranks: Any

    @classmethod
    def from_tucker(cls, x: TuckerTensor, capacity: Any = None) -> PaddedTucker:
        """Pad ``x`` with zeros to ``capacity`` (default: its own ranks)."""
        if not isinstance(x, TuckerTensor):
            raise TypeError(f"expected a TuckerTensor, got {type(x).__name__}")
        xp = namespace_of(x.core, *x.factors)
        capacity = x.ranks if capacity is None else as_ranks(capacity, x.ndim, "capacity")
        for k, (r, c, n) in enumerate(zip(x.ranks, capacity, x.shape)):
            if not r <= c <= n:
                raise ValueError(
                    f"capacity {tuple(capacity)} must hold the ranks {x.ranks} and fit the shape "
                    f"{x.shape}: need ranks[{k}] = {r} <= capacity[{k}] = {c} <= {n}"
                )
        core = pad_array(xp, x.core, capacity)
        factors = tuple(pad_array(xp, u, (u.shape[0], c)) for u, c in zip(x.factors, capacity))
        ranks = xp.asarray(list(x.ranks), dtype=xp.int64, device=_dev(x.core))
        return cls(core, factors, ranks)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor."""
        return tuple(int(u.shape[0]) for u in self.factors)

    @property
    def capacity(self) -> tuple[int, ...]:
        """The padded ranks (the core's shape)."""
        return tuple(int(s) for s in self.core.shape)

    @property
    def ndim(self) -> int:
        """Order of the represented tensor."""
        return len(self.factors)

    def host_ranks(self) -> tuple[int, ...]:
        """The true ranks as Python ints (one device-to-host copy)."""
        return tuple(int(r) for r in backends.to_numpy(self.ranks).tolist())

    def to_tucker(self, ranks: Any = None) -> TuckerTensor:
        """The true-rank :class:`~tuckerman.TuckerTensor` (leading blocks; exact).

        ``ranks`` (host ints) skips reading them from the device.
        """
        ranks = self.host_ranks() if ranks is None else tuple(int(r) for r in ranks)
        core = trim_array(self.core, ranks)
        return TuckerTensor(core, [u[:, :r] for u, r in zip(self.factors, ranks)])

    def to_dense(self) -> Any:
        """The full tensor (for references and small cases; zeros make padding exact)."""
        return TuckerTensor(self.core, self.factors).to_dense()

    def with_capacity(self, capacity: Sequence[int]) -> PaddedTucker:
        """The same tensor at another capacity (each entry at least the true rank).

        Shrinking a mode below its true rank would drop live columns; the caller guarantees
        ``capacity[k] >= ranks[k]`` (checked only when the ranks can be read, i.e. not under
        ``jax.jit``).
        """
        xp = namespace_of(self.core)
        capacity = tuple(int(c) for c in capacity)
        if not _traced(self.ranks):
            ranks = self.host_ranks()
            if any(c < r for c, r in zip(capacity, ranks)):
                raise ValueError(f"capacity {capacity} cannot hold the ranks {ranks}")
        core = fit_array(xp, self.core, capacity)
        factors = tuple(fit_array(xp, u, (u.shape[0], c)) for u, c in zip(self.factors, capacity))
        return PaddedTucker(core, factors, self.ranks)


def _traced(a: Any) -> bool:
    """Whether ``a`` is an abstract value (a JAX tracer) that cannot be read on the host."""
    if not is_array(a):
        return False
    try:
        backends.to_numpy(a)
    except Exception:
        return True
    return False


def full_rank_caps(shape: Sequence[int], max_rank: Any = None) -> tuple[int, ...]:
    """Per mode the largest rank a Tucker tensor of ``shape`` can have, capped by ``max_rank``."""
    from tuckerman.validation import full_ranks

    full = full_ranks(shape)
    if max_rank is None:
        return full
    return tuple(f if m is None else min(f, int(m)) for f, m in zip(full, max_rank))


def prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)
