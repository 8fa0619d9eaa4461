"""Backend and dtype fixtures shared by the test suite.

Every numerical test runs on numpy, array_api_strict, torch and jax (CPU), plus cupy and
torch-CUDA when a GPU is present, in float32 and float64, with tolerances from the dtype.
"""

from __future__ import annotations

import enum
import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tuckerman._compat import namespace_from_name

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)  # the tests use tiny tensors: threads only add overhead (~50x)

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 tests; float32 stays float32

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Backend(enum.Enum):
    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    JAX = "jax"
    CUPY = "cupy"
    TORCH_CUDA = "torch_cuda"

    @property
    def library(self) -> str:
        return "torch" if self is Backend.TORCH_CUDA else self.value

    @property
    def device(self):
        return "cuda" if self is Backend.TORCH_CUDA else None


def _available(b: Backend) -> str | None:
    """None when usable, else the reason to skip."""
    if importlib.util.find_spec(b.library) is None:
        return f"{b.library} is not installed"
    if b is Backend.CUPY:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as err:  # no GPU or driver
            return f"cupy has no usable GPU: {err}"
    if b is Backend.TORCH_CUDA:
        import torch

        if not torch.cuda.is_available():
            return "torch has no CUDA device"
    return None


@pytest.fixture(params=list(Backend), ids=lambda b: b.value)
def backend(request) -> Backend:
    reason = _available(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def xp(backend):
    return namespace_from_name(backend.library)


@pytest.fixture(params=["float32", "float64"])
def dtype(request, xp):
    return getattr(xp, request.param)


@pytest.fixture
def rtol(xp, dtype):
    """Relative tolerance for dense comparisons: 1000 eps."""
    return 1e3 * float(xp.finfo(dtype).eps)


@pytest.fixture
def min_decay(xp, dtype):
    """Smallest core singular value ratio drawn for points: 1e-12 in float64, 1e-3 in float32."""
    return 1e-12 if xp.finfo(dtype).eps < 1e-10 else 1e-3


@pytest.fixture
def make(xp, dtype, backend):
    """Convert a NumPy array to the backend under test."""

    def convert(a):
        kwargs = {} if backend.device is None else {"device": backend.device}
        return xp.asarray(np.asarray(a), dtype=dtype, **kwargs)

    return convert
