"""Argument checks shared by the core and the integrations. Every message names the value and
the expectation."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "positive_int",
    "int_pair",
    "per_mode",
    "real_number",
    "as_shape",
    "as_ranks",
    "check_tol",
    "check_real_floating",
    "feasible_ranks",
    "feasible_ranks_error",
]


def positive_int(value: Any, what: str) -> int:
    """A positive int (``TypeError`` for other types, ``ValueError`` for values below 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return int(value)


def int_pair(value: Any, what: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each ``>= minimum``, as ``(h, w)``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{what} entries must be >= {minimum}, got {tuple(value)}")
        out.append(int(v))
    return out[0], out[1]


def per_mode(value: Any, ndim: int, what: str, default: int | None) -> tuple[Any, ...]:
    """One positive int (or ``None``) per mode from ``None`` (``default`` everywhere), one int
    (the same for every mode) or a sequence of ``ndim`` ints or ``None`` (``default`` there).

    Examples
    --------
    >>> from tuckerman.validation import per_mode
    >>> per_mode(None, 3, "max_rank", None), per_mode(4, 2, "max_rank", None)
    ((None, None, None), (4, 4))
    >>> per_mode((2, None), 2, "min_rank", 1)
    (2, 1)
    >>> per_mode((2, 0), 2, "min_rank", 1)
    Traceback (most recent call last):
    ...
    ValueError: min_rank[1] must be a positive integer or None, got 0
    """
    if value is None:
        return (default,) * ndim
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{what} has {len(value)} entries {value} but the tensor has {ndim} modes")
    for k, v in enumerate(value):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
            raise ValueError(f"{what}[{k}] must be a positive integer or None, got {v!r}")
    return tuple(default if v is None else int(v) for v in value)


def real_number(value: Any, what: str, *, positive: bool = False, below_one: bool = False) -> float:
    """A finite real number ``>= 0`` (``> 0`` with ``positive``; ``< 1`` with ``below_one``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0) and (v < 1 or not below_one)
    if not ok:
        rng = "> 0" if positive else (">= 0 and < 1" if below_one else ">= 0")
        raise ValueError(f"{what} must be finite and {rng}, got {value!r}")
    return v


def _as_positive_ints(values: Any, what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a sequence of positive integers, got {values!r}")
    out = []
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what}[{k}] must be an integer, got {v!r} ({type(v).__name__})")
        if v <= 0:
            raise ValueError(f"{what}[{k}] must be positive, got {v}")
        out.append(int(v))
    return tuple(out)


def as_shape(shape: Any) -> tuple[int, ...]:
    """Validate a tensor shape: a sequence of at least two positive ints."""
    shape = _as_positive_ints(shape, "shape")
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 modes (order d >= 2), got {shape}")
    return shape


def as_ranks(ranks: Any, ndim: int, what: str = "ranks") -> tuple[int, ...]:
    """Validate ranks: one positive int (used for every mode) or one per mode."""
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        ranks = (ranks,) * ndim
    ranks = _as_positive_ints(ranks, what)
    if len(ranks) != ndim:
        raise ValueError(f"{what} has {len(ranks)} entries {ranks} but the tensor has {ndim} modes")
    return ranks


def feasible_ranks_error(shape: tuple[int, ...], ranks: tuple[int, ...]) -> str | None:
    """Why ``ranks`` are not a feasible multilinear rank for ``shape`` (None when they are)."""
    if len(shape) != len(ranks):
        return f"ranks {ranks} have {len(ranks)} entries but shape {shape} has {len(shape)} modes"
    for k, (n, r) in enumerate(zip(shape, ranks)):
        if r > n:
            return f"ranks[{k}] = {r} exceeds the mode size shape[{k}] = {n} (shape {shape})"
        others = math.prod(ranks[:k] + ranks[k + 1 :])
        if r > others:
            return (
                f"ranks[{k}] = {r} exceeds the product of the other ranks ({others}) in {ranks}: "
                "no core of that multilinear rank exists"
            )
    return None


def feasible_ranks(ranks: Any, shape: Any = None) -> tuple[int, ...]:
    """The given ranks, lowered until feasible: ``r_k <= n_k`` (when ``shape`` is given) and
    ``r_k <= prod_{j≠k} r_j`` (largest offender first, each lowered to that product).

    Examples
    --------
    >>> import tuckerman as tm
    >>> tm.feasible_ranks((1, 2, 5)), tm.feasible_ranks((9, 9, 9), shape=(4, 30, 30))
    ((1, 2, 2), (4, 9, 9))
    """
    ranks = list(as_ranks(ranks, len(ranks) if hasattr(ranks, "__len__") else 1))
    if shape is not None:
        shape = _as_positive_ints(shape, "shape")
        if len(shape) != len(ranks):
            raise ValueError(f"ranks {tuple(ranks)} and shape {shape} have different lengths")
        ranks = [min(r, n) for r, n in zip(ranks, shape)]
    while True:
        bad = [k for k, r in enumerate(ranks) if r > math.prod(ranks) // r]
        if not bad:
            return tuple(ranks)
        k = max(bad, key=lambda j: ranks[j])
        ranks[k] = math.prod(ranks) // ranks[k]


def check_tol(tol: Any, what: str = "tol") -> float | None:
    """Validate a tolerance: None or a finite number >= 0."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{what} must be a non-negative real number or None, got {tol!r}")
    tol = float(tol)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {tol}")
    return tol


def check_real_floating(xp: Any, *arrays: Any, what: str = "arrays") -> Any:
    """All arrays share one real floating dtype; return it."""
    dtypes = []
    for a in arrays:
        if a.dtype not in dtypes:
            dtypes.append(a.dtype)
    if len(dtypes) > 1:
        raise TypeError(
            f"{what} must share one dtype, got {', '.join(str(d) for d in dtypes)}; "
            "cast them to one dtype first"
        )
    dtype = dtypes[0]
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{what} must have a real floating dtype (float32/float64), got {dtype}")
    return dtype


def full_ranks(shape: Any) -> tuple[int, ...]:
    """The largest feasible multilinear rank of a tensor of ``shape``: ``min(n_k, prod_{j≠k} n_j)``
    per mode, lowered until feasible."""
    shape = tuple(int(n) for n in shape)
    return feasible_ranks([min(n, math.prod(shape) // n) for n in shape])
