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
