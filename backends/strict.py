"""array_api_strict: the test backend that keeps the core inside the standard."""

from __future__ import annotations

from typing import Any

import array_api_strict as xp
import numpy as np
from tuckerman.backends import numpy as _np_backend


def normal(shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    sample = _np_backend.normal(shape, key=key, dtype=np.float64)
    kwargs = {} if device is None else {"device": device}
    return xp.asarray(sample, dtype=dtype, **kwargs)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def segment_sum(data: Any, segment_ids: Any, num_segments: int):
    """One-hot matmul: O(m * num_segments) memory, standard functions only (a test backend)."""
    segments = xp.arange(num_segments, dtype=segment_ids.dtype, device=data.device)
    one_hot = xp.astype(segment_ids[None, :] == segments[:, None], data.dtype)
    return one_hot @ data
