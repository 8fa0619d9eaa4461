"""Sparse tensors given by their observed entries, and entries of Tucker tensors.

A :class:`SparseTensor` is what tensor completion produces as a gradient: values at a set of
indices Ω, zero elsewhere. The manifold operations accept it wherever they accept a dense
ambient tensor and never form the full shape: contracting it with factors costs
``O(|Ω| prod r)``.
"""

from __future__ import annotations

import math
from typing import Any

import tuckerman.backends as backends
from tuckerman._compat import is_array, namespace_of
from tuckerman._tucker import TuckerTensor, _as_tucker
from tuckerman.validation import as_shape, check_real_floating

__all__ = ["SparseTensor", "entries"]


def _check_indices(xp: Any, indices: Any, shape: tuple[int, ...], what: str = "indices") -> None:
    if not is_array(indices) or not xp.isdtype(indices.dtype, "integral"):
        raise TypeError(
            f"{what} must be an integer array of shape (nnz, {len(shape)}), got "
            f"{getattr(indices, 'dtype', type(indices).__name__)}"
        )
    if indices.ndim != 2 or indices.shape[1] != len(shape):
        raise ValueError(
            f"{what} has shape {tuple(indices.shape)}, expected (nnz, {len(shape)}) for a tensor "
            f"of shape {shape}"
        )
    try:
        host = backends.to_numpy(indices)
    except Exception:  # traced under jit: bounds are the caller's responsibility
        return
    if host.size:
        low, high = host.min(axis=0), host.max(axis=0)
        for k, n in enumerate(shape):
            if low[k] < 0 or high[k] >= n:
                raise ValueError(
                    f"{what}[:, {k}] ranges over [{low[k]}, {high[k]}] but mode {k} has size {n}"
                )


class SparseTensor:
    """A tensor of ``shape`` that is zero except at ``indices`` (with duplicates summed).

    Parameters
    ----------
    indices : integer array, shape (nnz, d)
    values : real floating array, shape (nnz,)
    shape : sequence of int

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> S = tm.SparseTensor(np.array([[0, 1, 2], [3, 0, 1]]), np.array([1.0, -2.0]), (4, 2, 3))
    >>> S.nnz, S.to_dense()[3, 0, 1]
    (2, np.float64(-2.0))
    """

    __slots__ = ("indices", "values", "shape")
    __array_ufunc__ = None

    def __init__(self, indices: Any, values: Any, shape: Any) -> None:
        shape = as_shape(shape)
        xp = namespace_of(indices, values)
        _check_indices(xp, indices, shape)
        check_real_floating(xp, values, what="values")
        if values.ndim != 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"values has shape {tuple(values.shape)}, expected ({indices.shape[0]},) to match "
                f"indices of shape {tuple(indices.shape)}"
            )
        self.indices, self.values, self.shape = indices, values, shape

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.values.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    def _namespace(self) -> Any:
        return namespace_of(self.indices, self.values)

    def with_values(self, values: Any) -> SparseTensor:
        """Same indices, new values (e.g. residuals at the observed entries)."""
        return SparseTensor(self.indices, values, self.shape)

    def to_dense(self) -> Any:
        """The dense tensor (allocates ``prod(shape)`` entries)."""
        xp = self._namespace()
        strides = [math.prod(self.shape[k + 1 :]) for k in range(self.ndim)]
        flat = None
        for k, s in enumerate(strides):
            term = self.indices[:, k] * s
            flat = term if flat is None else flat + term
        out = backends.segment_sum(xp.reshape(self.values, (-1, 1)), flat, math.prod(self.shape))
        return xp.reshape(out, self.shape)

    def __repr__(self) -> str:
        return f"SparseTensor(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"


def _rows(xp: Any, matrix: Any, index: Any) -> Any:
    return xp.take(matrix, index, axis=0)


def sparse_all_but_one(xp: Any, z: SparseTensor, mats_t: list[Any], modes: Any = None) -> dict:
    """``{k: z ×_{j≠k} W_jᵀ}`` for ``k`` in ``modes`` (default all), ``mats_t[j] = W_j``
    (n_j × m_j); mode k keeps size n_k.

    Cost and memory ``O(nnz · prod_{j≠k} m_j)`` per mode; nothing of the full shape is formed.
    """
    d = z.ndim
    rows = [_rows(xp, w, z.indices[:, j]) for j, w in enumerate(mats_t)]
    out = {}
    for k in range(d) if modes is None else modes:
        p = xp.reshape(z.values, (-1, 1))
        for j in range(d):
            if j != k:
                p = xp.reshape(p[:, :, None] * rows[j][:, None, :], (p.shape[0], -1))
        t = backends.segment_sum(p, z.indices[:, k], z.shape[k])
        other = tuple(mats_t[j].shape[1] for j in range(d) if j != k)
        t = xp.reshape(t, (z.shape[k], *other))
        if k:
            t = xp.permute_dims(t, (*range(1, k + 1), 0, *range(k + 1, d)))
        out[k] = t
    return out


def entries(x: TuckerTensor, indices: Any) -> Any:
    """Entries of a Tucker tensor at ``indices`` (nnz, d), in ``O(nnz · prod r)``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.FixedRankTucker((4, 5, 6), 2).random_point(key=0)
    >>> idx = np.array([[0, 1, 2], [3, 4, 5]])
    >>> bool(np.allclose(tm.entries(X, idx), X.to_dense()[idx[:, 0], idx[:, 1], idx[:, 2]]))
    True
    """
    x = _as_tucker(x)
    xp = namespace_of(x.core, indices)
    _check_indices(xp, indices, x.shape)
    d = x.ndim
    t = _rows(xp, x.factors[0], indices[:, 0]) @ xp.reshape(x.core, (x.ranks[0], -1))
    for k in range(1, d):
        t = xp.reshape(t, (t.shape[0], x.ranks[k], -1))
        t = xp.sum(_rows(xp, x.factors[k], indices[:, k])[:, :, None] * t, axis=1)
    return xp.reshape(t, (-1,))
