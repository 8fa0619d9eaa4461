"""The one module that talks to array-api-compat / array-api-extra.

Everything else in the core gets its namespace through :func:`namespace_of`
and its helpers from here, so the compatibility layer can change in one place.
"""

from __future__ import annotations

import importlib
from typing import Any

import array_api_compat as _aac
import array_api_extra as xpx  # noqa: F401  (re-exported for the core)

__all__ = [
    "is_array",
    "namespace_of",
    "device_of",
    "backend_name",
    "xpx",
]


def is_array(x: Any) -> bool:
    """True when ``x`` is an array of a supported array library."""
    return _aac.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def backend_name(x: Any) -> str:
    """Short name of the library that owns array ``x``.

    One of ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"array_api_strict"``.
    """
    if _aac.is_numpy_array(x):
        return "numpy"
    if _aac.is_torch_array(x):
        return "torch"
    if _aac.is_jax_array(x):
        return "jax"
    if _aac.is_cupy_array(x):
        return "cupy"
    if _aac.is_array_api_strict_namespace(_aac.array_namespace(x)):
        return "array_api_strict"
    raise TypeError(f"unsupported array type {type(x).__name__!r}")


def device_of(x: Any) -> Any:
    """The device of array ``x`` (array API ``device``)."""
    return _aac.device(x)


def namespace_of(*arrays: Any) -> Any:
    """The array namespace shared by ``arrays``; a clear error when they differ.

    Raises
    ------
    TypeError
        If the arrays come from different libraries, or if one is not an array.
    ValueError
        If the arrays live on different devices.
    """
    arrays = tuple(a for a in arrays if a is not None)
    if not arrays:
        raise TypeError("expected at least one array, got none")
    for a in arrays:
        if not is_array(a):
            raise TypeError(f"expected an array, got {type(a).__name__!r}: {a!r:.80}")
    names = {backend_name(a) for a in arrays}
    if len(names) > 1:
        raise TypeError(
            "arrays from different libraries cannot be mixed: got "
            + ", ".join(sorted(names))
            + "; convert them to one library first"
        )
    xp = _aac.array_namespace(*arrays)
    devices: list[Any] = []
    for a in arrays:
        d = _device_or_none(a)
        if d is not None and all(d != e for e in devices):
            devices.append(d)
    if len(devices) > 1:
        raise ValueError(
            "arrays live on different devices: "
            + ", ".join(str(d) for d in devices)
            + "; move them to one device first"
        )
    return xp


def _device_or_none(a: Any) -> Any:
    try:
        return _aac.device(a)
    except Exception:  # a JAX tracer under jit/vmap has no concrete device
        return None


def namespace_from_name(name_or_namespace: Any) -> Any:
    """The compat namespace for a library name (``"torch"``) or module (``torch``)."""
    if name_or_namespace is None:
        name = "numpy"
    elif isinstance(name_or_namespace, str):
        name = name_or_namespace
    else:
        name = getattr(name_or_namespace, "__name__", "")
    name = name.replace("array_api_compat.", "")
    modules = {
        "numpy": "array_api_compat.numpy",
        "np": "array_api_compat.numpy",
        "torch": "array_api_compat.torch",
        "jax": "jax.numpy",
        "jax.numpy": "jax.numpy",
        "jnp": "jax.numpy",
        "cupy": "array_api_compat.cupy",
        "array_api_strict": "array_api_strict",
        "strict": "array_api_strict",
    }
    if name not in modules:
        raise ValueError(
            f"unknown array library {name_or_namespace!r}; expected one of "
            "'numpy', 'torch', 'jax', 'cupy', 'array_api_strict' or their modules"
        )
    return importlib.import_module(modules[name])
