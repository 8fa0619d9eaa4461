"""Small helpers for the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np

from tuckerman import backends


def host(a) -> np.ndarray:
    """Float64 host copy of any array."""
    return backends.to_numpy(a).astype(np.float64)


def rel(a, b) -> float:
    """Relative Frobenius distance ||a - b|| / ||b|| of host copies."""
    a, b = host(a), host(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def library_of(a) -> str:
    return backends.name_of(a)
