"""PyTorch: random numbers from ``torch.Generator`` and host copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def normal(shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(key, torch.Generator):
        generator = key
    elif key is None or isinstance(key, (int, np.integer)):
        generator = torch.Generator(device=device)
        generator.manual_seed(int(key) if key is not None else int(torch.seed()))
    else:
        raise TypeError(f"key must be None, an int seed or a torch.Generator, got {key!r}")
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy()


def segment_sum(data: Any, segment_ids: Any, num_segments: int):
    out = torch.zeros((num_segments, data.shape[1]), dtype=data.dtype, device=data.device)
    return out.index_add(0, segment_ids.to(torch.int64), data)


def solve_triangular(a: Any, b: Any, *, upper: bool):
    return torch.linalg.solve_triangular(a, b, upper=upper)  # no singularity check: no sync
