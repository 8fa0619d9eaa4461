"""Deterministic builders behind the strategies: seeds in, arrays of any library out."""

from __future__ import annotations

from typing import Any

import numpy as np

from tuckerman._compat import namespace_from_name
from tuckerman._kernels import _mp, _unfold
from tuckerman._manifold import FixedRankTucker
from tuckerman._tucker import TuckerTensor

__all__ = ["conditioned_point", "to_library"]


def to_library(a: np.ndarray, xp: Any = None, dtype: Any = None, device: Any = None) -> Any:
    """Convert a NumPy array to library ``xp`` (a name or module) with ``dtype`` / ``device``."""
    ns = namespace_from_name(xp)
    if dtype is None:
        dtype = ns.float64
    kwargs = {} if device is None else {"device": device}
    return ns.asarray(np.ascontiguousarray(a), dtype=dtype, **kwargs)


def conditioned_point(
    manifold: FixedRankTucker,
    seed: int,
    *,
    decay: float = 1.0,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
) -> TuckerTensor:
    """A point whose core has singular values spread from 1 down to ``decay``.

    The core starts Gaussian; the unfolding of mode ``seed % d`` gets the singular values
    ``logspace(0, log10(decay), r_k)`` exactly (the other unfoldings follow, with their smallest
    singular values of the order of ``decay`` or larger). The core is then put in all-orthogonal
    (HOSVD) form, the representative that :meth:`~tuckerman.FixedRankTucker.random_point`,
    :func:`~tuckerman.hosvd`, :func:`~tuckerman.truncate` and the retraction return. Built in
    float64 NumPy, then converted.

    Examples
    --------
    >>> import tuckerman as tm
    >>> from tuckerman.testing import conditioned_point
    >>> M = tm.FixedRankTucker((6, 7, 8), (3, 4, 5))
    >>> x = conditioned_point(M, 0, decay=1e-12)
    >>> 1e11 < tm.core_condition(x) < 1e13, M.check_point(x)
    (True, True)
    """
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(manifold.ranks)
    mode = seed % manifold.ndim
    if decay < 1:
        w, s, _ = np.linalg.svd(_unfold(np, core, mode), full_matrices=False)
        target = np.logspace(0.0, np.log10(decay), manifold.ranks[mode])
        core = _mp(np, core, (w * (target / s)) @ w.T, mode)
    for k in range(core.ndim):  # all-orthogonal form: rotate each mode to its singular vectors
        w, _, _ = np.linalg.svd(_unfold(np, core, k), full_matrices=False)
        core = _mp(np, core, w.T, k)
    factors = [
        np.linalg.qr(rng.standard_normal((n, r)))[0] for n, r in zip(manifold.shape, manifold.ranks)
    ]
    return TuckerTensor(
        to_library(core, xp, dtype, device), [to_library(u, xp, dtype, device) for u in factors]
    )
