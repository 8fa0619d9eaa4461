"""CuPy: random numbers from ``cupy.random.Generator`` and host copies."""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np


def normal(shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    if isinstance(key, cupy.random.Generator):
        generator = key
    elif key is None or isinstance(key, (int, np.integer)):
        generator = cupy.random.default_rng(key)
    else:
        raise TypeError(f"key must be None, an int seed or a cupy.random.Generator, got {key!r}")
    with device if device is not None else cupy.cuda.Device():
        return generator.standard_normal(shape, dtype=cupy.float64).astype(dtype)


def to_numpy(x: Any) -> np.ndarray:
    return cupy.asnumpy(x)


def segment_sum(data: Any, segment_ids: Any, num_segments: int):
    import cupyx

    out = cupy.zeros((num_segments, data.shape[1]), dtype=data.dtype)
    cupyx.scatter_add(out, segment_ids, data)
    return out


def solve_triangular(a: Any, b: Any, *, upper: bool):
    if a.ndim > 2:  # cupyx's solver takes one matrix
        return cupy.linalg.solve(a, b)
    import cupyx.scipy.linalg

    return cupyx.scipy.linalg.solve_triangular(a, b, lower=not upper)
