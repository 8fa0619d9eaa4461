"""JAX: random numbers from PRNG keys and host copies."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _key(key: Any):
    if key is None:
        key = int(np.random.default_rng().integers(2**31))
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key  # a raw or typed PRNG key


def normal(shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    sample = jax.random.normal(_key(key), shape, dtype=dtype)
    return sample if device is None else jax.device_put(sample, device)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def segment_sum(data: Any, segment_ids: Any, num_segments: int):
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)


def solve_triangular(a: Any, b: Any, *, upper: bool):
    import jax.scipy.linalg

    return jax.scipy.linalg.solve_triangular(a, b, lower=not upper)
