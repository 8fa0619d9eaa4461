"""What each array library lacks from the array API standard.

Each submodule (``numpy``, ``torch``, ``jax``, ``cupy``, ``strict``) provides

- ``normal(shape, *, key, dtype, device)``: standard normal samples, where ``key`` is an
  int seed, ``None`` (fresh entropy) or the library's own generator (``numpy.random.Generator``,
  ``torch.Generator``, a JAX PRNG key, ``cupy.random.Generator``);
- ``to_numpy(x)``: a host NumPy copy;
- ``segment_sum(data, segment_ids, num_segments)``: sums the rows of ``data`` (shape (m, p))
  that share a segment id into row ``segment_ids[i]`` of a (num_segments, p) result, duplicates
  accumulated (a scatter-add; the standard has none). array_api_strict uses a one-hot matmul
  that stays inside the standard.

Optionally ``solve_triangular(a, b, *, upper)`` (solve ``a x = b`` for triangular ``a``, stacks
allowed) where the library has one that does not check for singularity on the host
(``xp.linalg.solve`` does: a device synchronization on GPUs).

:func:`get` picks the submodule for an array, a namespace or a library name.
"""

from __future__ import annotations

import importlib
from typing import Any

from tuckerman._compat import backend_name, is_array

__all__ = ["get", "normal", "to_numpy", "name_of", "segment_sum", "solve_triangular"]

_MODULES = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "cupy": "cupy",
    "array_api_strict": "strict",
}


def name_of(obj: Any) -> str:
    """Library name of an array, an array namespace / module, or a name string."""
    if is_array(obj):
        return backend_name(obj)
    name = obj if isinstance(obj, str) else getattr(obj, "__name__", repr(obj))
    name = name.replace("array_api_compat.", "")
    aliases = {"jax.numpy": "jax", "np": "numpy", "jnp": "jax", "strict": "array_api_strict"}
    name = aliases.get(name, name)
    if name not in _MODULES:
        raise ValueError(
            f"unknown array library {obj!r}; expected one of {sorted(_MODULES)} or their modules"
        )
    return name


_LOADED: dict[str, Any] = {}


def get(obj: Any) -> Any:
    """The backend module for an array, namespace or library name (imported once, then a
    dictionary lookup: compilers such as ``torch.compile`` trace through it)."""
    name = _MODULES[name_of(obj)]
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f"tuckerman.backends.{name}")
    return module


def normal(xp: Any, shape: tuple[int, ...], *, key: Any = None, dtype: Any, device: Any = None):
    """Standard normal samples of ``shape`` in library ``xp`` (see the module docstring)."""
    return get(xp).normal(tuple(shape), key=key, dtype=dtype, device=device)


def to_numpy(x: Any):
    """A host NumPy copy of any supported array (NumPy arrays and scalars pass through)."""
    if not is_array(x):
        import numpy as np

        return np.asarray(x)
    return get(x).to_numpy(x)


def segment_sum(data: Any, segment_ids: Any, num_segments: int):
    """Scatter-add of the rows of ``data`` into ``num_segments`` rows (see the module docstring)."""
    return get(data).segment_sum(data, segment_ids, int(num_segments))


def solve_triangular(a: Any, b: Any, *, upper: bool):
    """Solve ``a x = b`` for a triangular ``a`` (``upper`` or lower); the library's triangular
    solver where the backend has one, else the standard's ``linalg.solve``."""
    backend = get(a)
    if hasattr(backend, "solve_triangular"):
        return backend.solve_triangular(a, b, upper=upper)
    from tuckerman._compat import namespace_of

    return namespace_of(a, b).linalg.solve(a, b)
