"""Tucker tensors and the factored operations on them.

A Tucker tensor is ``X = C ×_1 U_1 ×_2 U_2 ⋯ ×_d U_d``; it is stored as the core ``C`` and the
factors ``U_k`` and is only formed densely by :meth:`TuckerTensor.to_dense`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import tuckerman.backends as backends
from tuckerman._compat import is_array, namespace_of
from tuckerman._kernels import (
    _fold,
    _host_float,
    _mp,
    _rank_from_tol,
    _svd,
    _unfold,
)
from tuckerman.validation import as_ranks, check_real_floating, check_tol

__all__ = [
    "TuckerTensor",
    "unfold",
    "fold",
    "mode_product",
    "multi_mode_product",
    "hosvd",
    "truncate",
    "inner",
    "norm",
    "add",
    "scale",
]


# --------------------------------------------------------------------------- checked mode algebra
def _check_mode(mode: Any, ndim: int) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int, got {mode!r}")
    if not -ndim <= mode < ndim:
        raise ValueError(f"mode {mode} is out of range for a tensor with {ndim} modes")
    return mode % ndim


def unfold(x: Any, mode: int) -> Any:
    """Mode-``mode`` unfolding (matricization) of a dense tensor.

    Row index: the chosen mode; column index: the other modes in increasing order,
    the last varying fastest (C order).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> tm.unfold(np.arange(24.0).reshape(2, 3, 4), 1).shape
    (3, 8)
    """
    xp = namespace_of(x)
    return _unfold(xp, x, _check_mode(mode, x.ndim))


def fold(matrix: Any, mode: int, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`unfold`: rebuild the tensor of ``shape`` from its mode unfolding.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> a = np.arange(24.0).reshape(2, 3, 4)
    >>> bool(np.all(tm.fold(tm.unfold(a, 2), 2, a.shape) == a))
    True
    """
    xp = namespace_of(matrix)
    shape = tuple(int(s) for s in shape)
    mode = _check_mode(mode, len(shape))
    rest = math.prod(shape) // shape[mode] if shape[mode] else 0
    if tuple(matrix.shape) != (shape[mode], rest):
        raise ValueError(
            f"cannot fold a matrix of shape {tuple(matrix.shape)} along mode {mode} into "
            f"shape {shape}: expected ({shape[mode]}, {rest})"
        )
    return _fold(xp, matrix, mode, shape)


def mode_product(x: Any, matrix: Any, mode: int) -> Any:
    """The mode product ``x ×_mode matrix``: ``matrix`` (m × n_mode) acts on mode ``mode``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> tm.mode_product(np.ones((2, 3, 4)), np.ones((5, 3)), 1).shape
    (2, 5, 4)
    """
    xp = namespace_of(x, matrix)
    mode = _check_mode(mode, x.ndim)
    if matrix.ndim != 2 or matrix.shape[1] != x.shape[mode]:
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} cannot act on mode {mode} of a tensor of "
            f"shape {tuple(x.shape)}: expected shape (m, {x.shape[mode]})"
        )
    return _mp(xp, x, matrix, mode)


def multi_mode_product(x: Any, matrices: Any, modes: Any = None, *, transpose: bool = False) -> Any:
    """Apply ``matrices[i]`` on ``modes[i]`` (all modes by default); ``transpose`` uses ``Mᵀ``.

    ``multi_mode_product(A, factors, transpose=True)`` is ``A ×_1 U_1ᵀ ⋯ ×_d U_dᵀ``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> u = [np.eye(4, 2), np.eye(5, 3), np.eye(6, 2)]
    >>> tm.multi_mode_product(np.ones((4, 5, 6)), u, transpose=True).shape
    (2, 3, 2)
    """
    matrices = list(matrices)
    modes = list(range(len(matrices))) if modes is None else list(modes)
    if len(modes) != len(matrices):
        raise ValueError(f"got {len(matrices)} matrices for {len(modes)} modes {modes}")
    for m, k in zip(matrices, modes):
        x = mode_product(x, m.mT if transpose else m, k)
    return x


# --------------------------------------------------------------------------- the type
class _TuckerFields(NamedTuple):
    core: Any
    factors: tuple


class TuckerTensor(_TuckerFields):
    """A tensor in Tucker format ``X = core ×_1 factors[0] ⋯ ×_d factors[d-1]``.

    A named tuple ``(core, factors)``, so JAX and ``torch.utils._pytree`` treat it as a pytree
    without registration. Arithmetic is that of tensors, not of tuples: ``X + Y`` and ``X - Y``
    give the exact sum (ranks add), ``a * X`` scales the core.

    Parameters
    ----------
    core : array
        Core tensor of shape ``ranks``.
    factors : sequence of arrays
        ``factors[k]`` has shape ``(shape[k], ranks[k])``; same library, device and dtype as core.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.TuckerTensor(np.ones((2, 2, 2)), [np.eye(4, 2)] * 3)
    >>> X.shape, X.ranks, X.to_dense().shape
    ((4, 4, 4), (2, 2, 2), (4, 4, 4))
    """

    __slots__ = ()
    __array_ufunc__ = None  # NumPy defers arithmetic to us instead of broadcasting the tuple

    def __new__(cls, core: Any, factors: Any) -> TuckerTensor:
        factors = tuple(factors)
        if is_array(core) and all(is_array(u) for u in factors):
            _check_structure(core, factors)
        # otherwise: a pytree placeholder (JAX in_axes specs, tree_map over leaves), kept as given
        return super().__new__(cls, core, factors)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full tensor."""
        return tuple(int(u.shape[0]) for u in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Multilinear rank bound (the core's shape)."""
        return tuple(int(s) for s in self.core.shape)

    @property
    def ndim(self) -> int:
        """Order d of the tensor."""
        return len(self.factors)

    @property
    def dtype(self) -> Any:
        """The dtype of core and factors."""
        return self.core.dtype

    @property
    def device(self) -> Any:
        """The device of core and factors."""
        from tuckerman._compat import device_of

        return device_of(self.core)

    def to_dense(self) -> Any:
        """The full tensor (allocates ``prod(shape)`` entries: for references and small cases).

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> tm.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1)), np.ones((3, 1))]).to_dense()
        array([[1., 1., 1.],
               [1., 1., 1.]])
        """
        xp = self._namespace()
        t = self.core
        for k in reversed(range(self.ndim)):
            t = _mp(xp, t, self.factors[k], k)
        return t

    def _namespace(self) -> Any:
        return namespace_of(self.core, *self.factors)

    def __repr__(self) -> str:
        return (
            f"TuckerTensor(shape={self.shape}, ranks={self.ranks}, dtype={self.dtype}, "
            f"library={backends.name_of(self.core)})"
        )

    # arithmetic of tensors, not tuples
    def __add__(self, other: Any) -> TuckerTensor:
        if not isinstance(other, TuckerTensor):
            return NotImplemented
        return add(self, other)

    def __sub__(self, other: Any) -> TuckerTensor:
        if not isinstance(other, TuckerTensor):
            return NotImplemented
        return add(self, scale(other, -1.0))

    def __neg__(self) -> TuckerTensor:
        return scale(self, -1.0)

    def __mul__(self, other: Any) -> TuckerTensor:
        return scale(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TuckerTensor:
        return scale(self, 1.0 / _python_or_array_scalar(other))


def _check_structure(core: Any, factors: tuple) -> None:
    xp = namespace_of(core, *factors)
    check_real_floating(xp, core, *factors, what="core and factors")
    if core.ndim != len(factors):
        raise ValueError(
            f"core has {core.ndim} modes (shape {tuple(core.shape)}) but {len(factors)} factors "
            "were given"
        )
    if core.ndim < 1:
        raise ValueError("a Tucker tensor needs at least one mode")
    for k, u in enumerate(factors):
        if u.ndim != 2 or u.shape[1] != core.shape[k]:
            raise ValueError(
                f"factors[{k}] has shape {tuple(u.shape)} but the core has {core.shape[k]} "
                f"columns in mode {k} (core shape {tuple(core.shape)}): expected (n_{k}, "
                f"{core.shape[k]})"
            )


def _as_tucker(x: Any, what: str = "x") -> TuckerTensor:
    if not isinstance(x, TuckerTensor):
        raise TypeError(f"{what} must be a TuckerTensor, got {type(x).__name__}")
    return x


def _python_or_array_scalar(a: Any) -> Any:
    if isinstance(a, bool):
        raise TypeError("cannot scale by a bool")
    if isinstance(a, (int, float)):
        return a
    if getattr(a, "ndim", None) == 0 or getattr(a, "shape", None) == ():
        return a
    raise TypeError(f"expected a scalar (Python number or 0-d array), got {type(a).__name__}")


# --------------------------------------------------------------------------- factored arithmetic
def scale(x: TuckerTensor, alpha: Any) -> TuckerTensor:
    """``alpha * x`` (scales the core). ``alpha``: a Python number or a 0-d array.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1))] * 2)
    >>> float(tm.scale(X, 3.0).core[0, 0])
    3.0
    """
    x = _as_tucker(x)
    xp = x._namespace()
    return TuckerTensor(_scale_array(xp, x.core, alpha), x.factors)


def _scale_array(xp: Any, a: Any, alpha: Any) -> Any:
    alpha = _python_or_array_scalar(alpha)
    if isinstance(alpha, (int, float)):
        return a * float(alpha)  # a Python float is weakly typed: the array keeps its dtype
    if is_array(alpha) and namespace_of(alpha) is xp:
        return a * xp.astype(alpha, a.dtype)
    return a * float(alpha)  # NumPy scalar or a 0-d array of another library


def add(x: TuckerTensor, y: TuckerTensor) -> TuckerTensor:
    """Exact sum ``x + y`` in Tucker format: block-diagonal core, factors side by side.

    Ranks add; call :func:`truncate` to re-compress.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1))] * 2)
    >>> tm.add(X, X).ranks
    (2, 2)
    """
    x, y = _as_tucker(x), _as_tucker(y, "y")
    xp = namespace_of(x.core, y.core)
    if x.shape != y.shape:
        raise ValueError(f"cannot add Tucker tensors of shapes {x.shape} and {y.shape}")
    check_real_floating(xp, x.core, y.core, what="the two Tucker tensors")
    d = x.ndim
    core = _block_core(xp, {(0,) * d: x.core, (1,) * d: y.core}, x.ranks, y.ranks)
    factors = [xp.concat([u, v], axis=1) for u, v in zip(x.factors, y.factors)]
    return TuckerTensor(core, factors)


def _block_core(xp: Any, blocks: dict, sizes0: tuple, sizes1: tuple) -> Any:
    """Core with ``blocks[position]`` in the block at ``position`` (a 0/1 tuple per mode).

    Block sizes are ``sizes0[k]`` (position 0) and ``sizes1[k]`` (position 1) along mode k.
    """
    total = None
    for position, block in blocks.items():
        t = block
        for k, p in enumerate(position):
            pad_shape = list(t.shape)
            pad_shape[k] = sizes1[k] if p == 0 else sizes0[k]
            pad = xp.zeros(tuple(pad_shape), dtype=block.dtype, device=_device(block))
            t = xp.concat([t, pad] if p == 0 else [pad, t], axis=k)
        total = t if total is None else total + t
    return total


def _device(a: Any) -> Any:
    from tuckerman._compat import _device_or_none

    return _device_or_none(a)


def inner(x: TuckerTensor, y: TuckerTensor) -> Any:
    """Frobenius inner product ``<x, y>`` of two Tucker tensors, without forming either.

    Cost ``O(sum_k n_k r_k s_k + r^d s)``; returns a 0-d array.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1))] * 2)
    >>> float(tm.inner(X, X))
    4.0
    """
    x, y = _as_tucker(x), _as_tucker(y, "y")
    xp = namespace_of(x.core, y.core)
    if x.shape != y.shape:
        raise ValueError(f"inner product of Tucker tensors of shapes {x.shape} and {y.shape}")
    t = y.core
    for k in range(x.ndim):
        t = _mp(xp, t, x.factors[k].mT @ y.factors[k], k)
    return xp.sum(x.core * t)


def norm(x: TuckerTensor) -> Any:
    """Frobenius norm of a Tucker tensor without forming it (orthonormal factors not assumed).

    ``||x|| = ||C ×_1 R_1 ⋯ ×_d R_d||`` with ``U_k = Q_k R_k`` (QR): no inner product is
    formed, so the norm of a small difference ``x - y`` keeps its relative accuracy (the
    inner-product route loses it below ``sqrt(eps) ||x||``). Cost
    ``O(sum_k n_k r_k^2 + r^(d+1))``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1))] * 2)
    >>> round(float(tm.norm(X)), 12)
    2.0
    """
    x = _as_tucker(x)
    xp = x._namespace()
    core = x.core
    for k, u in enumerate(x.factors):
        _, r = xp.linalg.qr(u)
        core = _mp(xp, core, r, k)
    return xp.linalg.vector_norm(core)


# --------------------------------------------------------------------------- HOSVD and truncation
def _st_hosvd(xp: Any, t: Any, ranks: tuple | None, tol: float | None, tnorm: Any = None):
    """Sequentially truncated HOSVD of a dense tensor: (core, factors).

    With ``tol``, each mode discards singular values of 2-norm <= tol*||t||/sqrt(d), so the total
    error is <= tol*||t||. ``ranks`` caps the ranks (None: no cap).
    """
    d = t.ndim
    threshold = None
    if tol is not None:
        nrm = tnorm if tnorm is not None else xp.linalg.vector_norm(t)
        threshold = tol * _host_float(nrm) / math.sqrt(d)
    factors = []
    for k in range(d):
        unfolded = _unfold(xp, t, k)
        if unfolded.shape[0] < unfolded.shape[1]:  # wide: LAPACK is faster on the tall transpose
            v, s, uh = _svd(xp, unfolded.mT)
            u, vh = uh.mT, v.mT
        else:
            u, s, vh = _svd(xp, unfolded)
        r = s.shape[0]
        if ranks is not None:
            r = min(r, ranks[k])
        if threshold is not None:
            r = min(r, max(1, _rank_from_tol(xp, s, threshold)))
        factors.append(u[:, :r])
        new_shape = tuple(r if j == k else t.shape[j] for j in range(d))
        t = _fold(xp, xp.reshape(s[:r], (r, 1)) * vh[:r, :], k, new_shape)
    return t, factors


def hosvd(a: Any, ranks: Any = None, *, tol: float | None = None) -> TuckerTensor:
    """Sequentially truncated HOSVD (ST-HOSVD) of a dense array.

    Parameters
    ----------
    a : array
        Dense tensor of order d >= 2, real floating dtype, any supported library.
    ranks : int or sequence of int, optional
        Target multilinear rank (one int for all modes). Ranks larger than possible are lowered
        to ``min(n_k, product of the other current sizes)``. None: no cap.
    tol : float, optional
        Relative accuracy: the result satisfies ``||a - X|| <= tol * ||a||``. Combined with
        ``ranks``, the smaller rank wins. Choosing ranks by tolerance is a host-side decision
        (not jit-able).

    Returns
    -------
    TuckerTensor
        Orthonormal factors, in the library, dtype and device of ``a``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> a = np.random.default_rng(0).standard_normal((6, 7, 8))
    >>> X = tm.hosvd(a, ranks=(6, 7, 8))
    >>> bool(np.allclose(X.to_dense(), a))
    True
    >>> tm.hosvd(a, ranks=2).ranks
    (2, 2, 2)
    """
    xp = namespace_of(a)
    check_real_floating(xp, a, what="a")
    if a.ndim < 2:
        raise ValueError(f"hosvd needs an array with at least 2 modes, got shape {tuple(a.shape)}")
    ranks = None if ranks is None else as_ranks(ranks, a.ndim)
    tol = check_tol(tol)
    core, factors = _st_hosvd(xp, a, ranks, tol)
    return TuckerTensor(core, factors)


def truncate(x: TuckerTensor, ranks: Any = None, *, tol: float | None = None) -> TuckerTensor:
    """Re-compress a Tucker tensor to lower multilinear rank, never forming it densely.

    QR of each factor, the R factors folded into the core, ST-HOSVD of the small core.
    Cost ``O(sum_k n_k s_k^2 + s^(d+1))`` for input ranks ``s``.

    Parameters
    ----------
    x : TuckerTensor
        Any factors (orthonormality not assumed).
    ranks, tol
        As in :func:`hosvd`; ``tol`` is relative to ``||x||``.

    Returns
    -------
    TuckerTensor
        Orthonormal factors.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> X = tm.hosvd(np.random.default_rng(0).standard_normal((5, 6, 7)), ranks=3)
    >>> Y = tm.truncate(X + X, ranks=3)           # rank 6 -> 3, same tensor 2X
    >>> bool(np.allclose(Y.to_dense(), 2 * X.to_dense()))
    True
    """
    x = _as_tucker(x)
    xp = x._namespace()
    ranks = None if ranks is None else as_ranks(ranks, x.ndim)
    tol = check_tol(tol)
    core = x.core
    qs = []
    for k, u in enumerate(x.factors):
        q, r = xp.linalg.qr(u)
        qs.append(q)
        core = _mp(xp, core, r, k)
    small, ws = _st_hosvd(xp, core, ranks, tol)
    return TuckerTensor(small, [q @ w for q, w in zip(qs, ws)])
