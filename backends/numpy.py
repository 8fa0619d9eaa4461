"""NumPy: random numbers and host copies (the array API is covered by array-api-compat)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _generator(key: Any) -> np.random.Generator:
    if isinstance(key, np.random.Generator):
        return key
    if key is None or isinstance(key, (int, np.integer)):
        return np.random.default_rng(key)
    raise TypeError(f"key must be None, an int seed or a numpy.random.Generator, got {key!r}")


def normal(shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    if device not in (None, "cpu"):
        raise ValueError(f"NumPy arrays live on 'cpu', got device={device!r}")
    return _generator(key).standard_normal(shape).astype(dtype, copy=False)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def segment_sum(data: Any, segment_ids: Any, num_segments: int) -> np.ndarray:
    # one bincount per column: about 3x faster than np.add.at (accumulates in float64)
    columns = [
        np.bincount(segment_ids, weights=data[:, j], minlength=num_segments)
        for j in range(data.shape[1])
    ]
    if not columns:
        return np.zeros((num_segments, 0), dtype=data.dtype)
    return np.stack(columns, axis=1).astype(data.dtype, copy=False)
