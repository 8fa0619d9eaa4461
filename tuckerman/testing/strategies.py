"""Hypothesis strategies for Tucker manifolds, points, tangent vectors and ambient tensors.

Every strategy draws integers (sizes, ranks, seeds, decay exponents) and builds arrays from them
deterministically, so failures shrink to small, readable examples. Arrays can be drawn for any
supported library and dtype.

Examples
--------
>>> from hypothesis import given, settings
>>> from tuckerman.testing import strategies as tst
>>> @settings(max_examples=5, deadline=None)
... @given(tst.manifolds_and_points(max_order=3))
... def test_points_are_points(mx):
...     M, x = mx
...     assert M.check_point(x)
>>> test_points_are_points()
"""

from __future__ import annotations

import math
from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "tuckerman.testing.strategies needs Hypothesis: pip install 'tuckerman[test]'"
    ) from err

import tuckerman.backends as backends
from tuckerman._compat import namespace_from_name
from tuckerman._manifold import FixedRankTucker
from tuckerman.testing._build import conditioned_point
from tuckerman.validation import feasible_ranks

__all__ = [
    "shapes_and_ranks",
    "manifolds",
    "points",
    "manifolds_and_points",
    "tangent_vectors",
    "ambient_tensors",
]


@st.composite
def shapes_and_ranks(
    draw: Any,
    *,
    min_order: int = 2,
    max_order: int = 4,
    min_size: int = 1,
    max_size: int = 7,
    max_rank: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A shape of order ``min_order..max_order`` and a feasible multilinear rank for it.

    Feasible: ``1 <= r_k <= n_k``, ``r_k <= max_rank`` and ``r_k <= prod_{j≠k} r_j``.
    """
    d = draw(st.integers(min_order, max_order))
    shape = tuple(draw(st.integers(min_size, max_size)) for _ in range(d))
    cap = [n if max_rank is None else min(n, max_rank) for n in shape]
    ranks = [draw(st.integers(1, c)) for c in cap]
    return shape, feasible_ranks(ranks)


@st.composite
def manifolds(draw: Any, **kwargs: Any) -> FixedRankTucker:
    """A :class:`~tuckerman.FixedRankTucker` (keyword arguments as :func:`shapes_and_ranks`)."""
    return FixedRankTucker(*draw(shapes_and_ranks(**kwargs)))


@st.composite
def points(
    draw: Any,
    manifold: FixedRankTucker,
    *,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    min_decay: float = 1e-12,
) -> Any:
    """A point of ``manifold`` whose core unfoldings have singular values decaying from 1 to a
    drawn ``decay`` in ``[min_decay, 1]`` (powers of ten), in library ``xp``."""
    seed = draw(st.integers(0, 2**32 - 1))
    lowest = int(round(-math.log10(min_decay)))
    decay = 10.0 ** -draw(st.integers(0, max(lowest, 0)))
    return conditioned_point(manifold, seed, decay=decay, xp=xp, dtype=dtype, device=device)


@st.composite
def manifolds_and_points(
    draw: Any,
    *,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    min_decay: float = 1e-12,
    **kwargs: Any,
) -> tuple[FixedRankTucker, Any]:
    """A pair ``(manifold, point)``; keyword arguments as :func:`shapes_and_ranks`."""
    manifold = draw(manifolds(**kwargs))
    x = draw(points(manifold, xp=xp, dtype=dtype, device=device, min_decay=min_decay))
    return manifold, x


@st.composite
def tangent_vectors(draw: Any, manifold: FixedRankTucker, x: Any) -> Any:
    """A tangent vector at ``x`` with norm drawn from {1e-3, 1e-2, ..., 1e2}."""
    seed = draw(st.integers(0, 2**32 - 1))
    size = 10.0 ** draw(st.integers(-3, 2))
    return size * manifold.random_tangent(x, key=seed)


@st.composite
def ambient_tensors(
    draw: Any, manifold: FixedRankTucker, x: Any = None, *, xp: Any = None, dtype: Any = None
) -> Any:
    """A dense Gaussian tensor of ``manifold.shape``, in the library/dtype/device of ``x`` (or of
    ``xp``/``dtype``)."""
    seed = draw(st.integers(0, 2**32 - 1))
    if x is not None:
        ns = x._namespace()
        return backends.normal(ns, manifold.shape, key=seed, dtype=x.dtype, device=x.device)
    ns = namespace_from_name(xp)
    return backends.normal(ns, manifold.shape, key=seed, dtype=dtype or ns.float64)
