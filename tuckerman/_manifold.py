"""The manifold of tensors of fixed multilinear rank, embedded in R^{n_1 × ⋯ × n_d}.

Geometry of Koch & Lubich (2010); retraction of Kressner, Steinlechner & Vandereycken (2014).
Tangent vectors are stored as ``(dcore, dfactors)`` in the gauge ``U_kᵀ dU_k = 0``:

    ξ = dcore ×_1 U_1 ⋯ ×_d U_d + Σ_k core ×_k dU_k ×_{j≠k} U_j .
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import tuckerman.backends as backends
from tuckerman._compat import is_array, namespace_from_name, namespace_of
from tuckerman._kernels import _all_but_one, _mp, _others, _unfold
from tuckerman._sparse import SparseTensor, sparse_all_but_one
from tuckerman._tucker import (
    TuckerTensor,
    _block_core,
    _check_structure,
    _scale_array,
    truncate,
)
from tuckerman.validation import as_ranks, as_shape, check_real_floating, feasible_ranks_error

__all__ = ["FixedRankTucker", "TangentVector", "core_condition"]


# --------------------------------------------------------------------------- tangent vectors
class _TangentFields(NamedTuple):
    dcore: Any
    dfactors: tuple


class TangentVector(_TangentFields):
    """A tangent vector ``(dcore, dfactors)`` at a Tucker point, gauge ``U_kᵀ dU_k = 0``.

    Supports ``u + v``, ``u - v``, ``-v``, ``a * v``, ``v * a`` and ``v / a`` for Python numbers,
    NumPy scalars and 0-d arrays (the result keeps the vector's dtype). One exception:
    array_api_strict arrays raise on ``a * v`` themselves instead of deferring, so write
    ``v * a`` there. A named tuple, hence a JAX / torch pytree.

    Examples
    --------
    >>> import tuckerman as tm
    >>> M = tm.FixedRankTucker((5, 6, 7), (2, 2, 2))
    >>> x = M.random_point(key=0)
    >>> v = M.random_tangent(x, key=1)
    >>> w = 2.0 * v - v
    >>> round(float(M.norm(x, w)), 12)
    1.0
    """

    __slots__ = ()
    __array_ufunc__ = None  # NumPy scalars defer to __rmul__ instead of broadcasting the tuple

    def __new__(cls, dcore: Any, dfactors: Any) -> TangentVector:
        dfactors = tuple(dfactors)
        if is_array(dcore) and all(is_array(u) for u in dfactors):
            _check_structure(dcore, dfactors)
        return super().__new__(cls, dcore, dfactors)

    def _zip(self, other: Any, op: Any) -> TangentVector:
        if not isinstance(other, TangentVector):
            return NotImplemented
        if len(other.dfactors) != len(self.dfactors) or tuple(other.dcore.shape) != tuple(
            self.dcore.shape
        ):
            raise ValueError(
                "tangent vectors of different structure: dcore shapes "
                f"{tuple(self.dcore.shape)} and {tuple(other.dcore.shape)}"
            )
        for k, (a, b) in enumerate(zip(self.dfactors, other.dfactors)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"tangent vectors of different structure: dfactors[{k}] shapes "
                    f"{tuple(a.shape)} and {tuple(b.shape)}"
                )
        return TangentVector(
            op(self.dcore, other.dcore), [op(a, b) for a, b in zip(self.dfactors, other.dfactors)]
        )

    def __add__(self, other: Any) -> TangentVector:
        return self._zip(other, lambda a, b: a + b)

    def __sub__(self, other: Any) -> TangentVector:
        return self._zip(other, lambda a, b: a - b)

    def __neg__(self) -> TangentVector:
        return TangentVector(-self.dcore, [-u for u in self.dfactors])

    def __mul__(self, alpha: Any) -> TangentVector:
        if isinstance(alpha, (TangentVector, TuckerTensor)):
            return NotImplemented
        xp = namespace_of(self.dcore)
        return TangentVector(
            _scale_array(xp, self.dcore, alpha), [_scale_array(xp, u, alpha) for u in self.dfactors]
        )

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> TangentVector:
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            return self * (1.0 / alpha)
        xp = namespace_of(self.dcore)
        return (
            TangentVector(self.dcore / alpha, [u / alpha for u in self.dfactors])
            if (is_array(alpha) and namespace_of(alpha) is xp)
            else self * (1.0 / float(alpha))
        )

    def __repr__(self) -> str:
        return (
            f"TangentVector(ranks={tuple(self.dcore.shape)}, "
            f"shape={tuple(int(u.shape[0]) for u in self.dfactors)}, dtype={self.dcore.dtype})"
        )


# --------------------------------------------------------------------------- helpers
def _core_qr(xp: Any, core: Any) -> list[tuple[Any, Any]]:
    """Per mode k: ``C_(k)ᵀ = Q_k R_k`` with ``Q_k`` folded to shape (r_{j≠k}..., r_k)."""
    d = core.ndim
    out = []
    for k in range(d):
        q, r = xp.linalg.qr(_unfold(xp, core, k).mT)
        other_shape = tuple(core.shape[j] for j in _others(d, k))
        out.append((xp.reshape(q, (*other_shape, core.shape[k])), r))
    return out


def _times_r_inv_t(xp: Any, m: Any, r: Any) -> Any:
    """``m R⁻ᵀ`` via a solve (never an explicit inverse)."""
    return xp.linalg.solve(r, m.mT).mT


def _times_r_inv(xp: Any, m: Any, r: Any) -> Any:
    """``m R⁻¹`` via a solve."""
    return xp.linalg.solve(r.mT, m.mT).mT


def _contract_others(xp: Any, t: Any, other: Any, k: int) -> Any:
    """``[t]_(k) [other]_(k)ᵀ`` for ``other`` shaped like ``t`` outside mode k (its last axis
    playing mode k when ``other`` is a folded Q)."""
    d = t.ndim
    return xp.tensordot(t, other, axes=(_others(d, k), _others(d, k)))


def _contract_q(xp: Any, t: Any, q: Any, k: int) -> Any:
    d = t.ndim
    return xp.tensordot(t, q, axes=(_others(d, k), tuple(range(d - 1))))


def _block_slices(ranks: tuple, k: int | None, second: int | None) -> tuple:
    """Index selecting, in a 2r-blocked tensor, block 0 in every mode except ``second`` (block 1)
    and mode ``k`` (kept whole)."""
    out = []
    for j, r in enumerate(ranks):
        if j == k:
            out.append(slice(None))
        elif j == second:
            out.append(slice(r, 2 * r))
        else:
            out.append(slice(0, r))
    return tuple(out)


def _orth_complement_apply(xp: Any, u: Any, b: Any) -> Any:
    """``(I - U Uᵀ) b``."""
    return b - u @ (u.mT @ b)


def core_condition(x: TuckerTensor) -> float:
    """Largest condition number ``σ_max / σ_min`` over the core's unfoldings (host-side).

    Factor-form quantities (``dfactors``, inner products in the gauge) are accurate to about
    ``eps * core_condition(x)``; dense tangent tensors stay accurate to ``eps``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> x = tm.TuckerTensor(np.diag([1.0, 1e-3]), [np.eye(3, 2), np.eye(4, 2)])
    >>> round(tm.core_condition(x))
    1000
    """
    xp = x._namespace()
    worst = 1.0
    for k in range(x.ndim):
        s = backends.to_numpy(xp.linalg.svdvals(_unfold(xp, x.core, k)))
        worst = max(worst, float(s[0] / s[-1]) if s[-1] > 0 else math.inf)
    return worst


# --------------------------------------------------------------------------- the manifold
class FixedRankTucker:
    """Tensors of shape ``shape`` and fixed multilinear rank ``ranks`` (Tucker manifold).

    Points are :class:`~tuckerman.TuckerTensor` values with orthonormal factors and a core of full
    multilinear rank; tangent vectors are :class:`~tuckerman.TangentVector`. The metric is the
    Frobenius inner product of the embedding. Every operation works on NumPy, PyTorch, JAX, CuPy
    and array_api_strict arrays (float32 / float64) and keeps the input's library, dtype and
    device; fixed-rank operations are jit-able under JAX.

    Parameters
    ----------
    shape : sequence of int
        Tensor shape ``(n_1, ..., n_d)``, d >= 2.
    ranks : int or sequence of int
        Multilinear rank; feasible when ``r_k <= n_k`` and ``r_k <= prod_{j≠k} r_j``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> M = tm.FixedRankTucker((10, 11, 12), (3, 4, 5))
    >>> x = M.random_point(key=0)
    >>> g = M.project(x, np.ones((10, 11, 12)))
    >>> y = M.retract(x, -0.1 * g)
    >>> M.check_point(y), M.dim
    (True, 144)
    """

    def __init__(self, shape: Any, ranks: Any) -> None:
        shape = as_shape(shape)
        ranks = as_ranks(ranks, len(shape))
        reason = feasible_ranks_error(shape, ranks)
        if reason is not None:
            raise ValueError(f"infeasible ranks: {reason}")
        self._shape = shape
        self._ranks = ranks

    # ----------------------------------------------------------------- description
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensors on the manifold."""
        return self._shape

    @property
    def ranks(self) -> tuple[int, ...]:
        """The fixed multilinear rank."""
        return self._ranks

    @property
    def ndim(self) -> int:
        """Tensor order d."""
        return len(self._shape)

    @property
    def dim(self) -> int:
        """Manifold dimension ``prod r_k + sum_k (n_k r_k - r_k^2)``."""
        return math.prod(self._ranks) + sum(n * r - r * r for n, r in zip(self._shape, self._ranks))

    def __repr__(self) -> str:
        return f"FixedRankTucker(shape={self._shape}, ranks={self._ranks})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FixedRankTucker)
            and other.shape == self.shape
            and other.ranks == self.ranks
        )

    def __hash__(self) -> int:
        return hash((FixedRankTucker, self._shape, self._ranks))

    # ----------------------------------------------------------------- input checks
    def _point(self, x: Any, what: str = "x") -> Any:
        """Structural check of a point (shapes, library, dtype); returns the namespace."""
        if not isinstance(x, TuckerTensor):
            raise TypeError(f"{what} must be a TuckerTensor, got {type(x).__name__}")
        if x.ndim != self.ndim or x.shape != self._shape or x.ranks != self._ranks:
            raise ValueError(
                f"{what} has shape {x.shape} and ranks {x.ranks}, but this manifold has shape "
                f"{self._shape} and ranks {self._ranks}"
            )
        return x._namespace()

    def _tangent(self, x: TuckerTensor, v: Any, what: str = "v") -> None:
        if not isinstance(v, TangentVector):
            raise TypeError(f"{what} must be a TangentVector, got {type(v).__name__}")
        shapes = [tuple(u.shape) for u in v.dfactors]
        expected = [tuple(u.shape) for u in x.factors]
        if tuple(v.dcore.shape) != self._ranks or shapes != expected:
            raise ValueError(
                f"{what} has dcore shape {tuple(v.dcore.shape)} and dfactor shapes {shapes}, but "
                f"tangent vectors of {self} have dcore shape {self._ranks} and dfactor shapes "
                f"{expected}"
            )
        namespace_of(x.core, v.dcore)
        check_real_floating(namespace_of(x.core), x.core, v.dcore, what=f"x and {what}")

    def _ambient(self, xp: Any, x: TuckerTensor, z: Any, what: str) -> None:
        if isinstance(z, (TuckerTensor, SparseTensor)):
            if z.shape != self._shape:
                raise ValueError(
                    f"{what} is a {type(z).__name__} of shape {z.shape}, expected shape "
                    f"{self._shape}"
                )
            leaf = z.core if isinstance(z, TuckerTensor) else z.values
            namespace_of(x.core, leaf)
            check_real_floating(xp, x.core, leaf, what=f"x and {what}")
            return
        if not is_array(z):
            raise TypeError(
                f"{what} must be a dense array, a TuckerTensor, a SparseTensor or a TangentVector, "
                f"got {type(z).__name__}"
            )
        if tuple(z.shape) != self._shape:
            raise ValueError(f"{what} has shape {tuple(z.shape)}, expected {self._shape}")
        namespace_of(x.core, z)
        check_real_floating(xp, x.core, z, what=f"x and {what}")

    # ----------------------------------------------------------------- points and vectors
    def random_point(
        self, *, key: Any = None, xp: Any = None, dtype: Any = None, device: Any = None
    ) -> TuckerTensor:
        """A random point: Gaussian core (full multilinear rank almost surely), orthonormal
        factors from the QR of Gaussian matrices, returned with the core in all-orthogonal
        (HOSVD) form, the gauge in which factor-form tangent vectors stay accurate to ``eps``
        however ill-conditioned the core (see :func:`core_condition`).

        Parameters
        ----------
        key : int, generator or JAX key, optional
            Seed or the library's generator; None draws fresh entropy.
        xp : module or str, optional
            Array library (``numpy``, ``torch``, ``jax.numpy``, ``cupy``, ``array_api_strict``
            or their names). Default NumPy.
        dtype : optional
            Default: the library's default real floating dtype (float64 for NumPy, float32 for
            torch and for JAX without ``jax_enable_x64``).
        device : optional
            Default: the library's default device.

        Examples
        --------
        >>> import tuckerman as tm
        >>> x = tm.FixedRankTucker((4, 5, 6), 2).random_point(key=0)
        >>> x.ranks, str(x.dtype)
        ((2, 2, 2), 'float64')
        """
        ns = namespace_from_name(xp)
        if dtype is None:
            info = ns.__array_namespace_info__()
            dtype = info.default_dtypes(device=device)["real floating"]
        elif not ns.isdtype(dtype, "real floating"):
            raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
        sizes = [n * r for n, r in zip(self._shape, self._ranks)]
        total = sum(sizes) + math.prod(self._ranks)
        sample = backends.normal(ns, (total,), key=key, dtype=dtype, device=device)
        factors, start = [], 0
        for n, r, size in zip(self._shape, self._ranks, sizes):
            q, _ = ns.linalg.qr(ns.reshape(sample[start : start + size], (n, r)))
            factors.append(q)
            start += size
        core = ns.reshape(sample[start:], self._ranks)
        for k in range(self.ndim):  # all-orthogonal (HOSVD) core: the well-conditioned gauge
            w, _, _ = ns.linalg.svd(_unfold(ns, core, k), full_matrices=False)
            core = _mp(ns, core, w.mT, k)
            factors[k] = factors[k] @ w
        return TuckerTensor(core, factors)

    def zero_tangent(self, x: TuckerTensor) -> TangentVector:
        """The zero tangent vector at ``x``.

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> x = M.random_point(key=0)
        >>> float(M.norm(x, M.zero_tangent(x)))
        0.0
        """
        self._point(x)
        return TangentVector(0.0 * x.core, [0.0 * u for u in x.factors])

    def random_tangent(self, x: TuckerTensor, *, key: Any = None) -> TangentVector:
        """A random tangent vector at ``x`` of unit norm (Gaussian coordinates, gauge imposed).

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> x = M.random_point(key=0)
        >>> round(float(M.norm(x, M.random_tangent(x, key=1))), 12)
        1.0
        """
        xp = self._point(x)
        sizes = [n * r for n, r in zip(self._shape, self._ranks)]
        total = sum(sizes) + math.prod(self._ranks)
        device = x.device
        sample = backends.normal(xp, (total,), key=key, dtype=x.dtype, device=device)
        dfactors, start = [], 0
        for u, size in zip(x.factors, sizes):
            g = xp.reshape(sample[start : start + size], tuple(u.shape))
            dfactors.append(_orth_complement_apply(xp, u, g))
            start += size
        v = TangentVector(xp.reshape(sample[start:], self._ranks), dfactors)
        return v / self.norm(x, v)

    # ----------------------------------------------------------------- projection
    def _contractions(self, xp: Any, z: Any, ws: list[Any]) -> tuple[dict, list | None]:
        """For each k: ``z ×_{j≠k} W_jᵀ = t_k ×_k V_k`` (``V_k`` None for dense z)."""
        if isinstance(z, TuckerTensor):
            mats = [w.mT @ f for w, f in zip(ws, z.factors)]
            return _all_but_one(xp, z.core, mats), list(z.factors)
        if isinstance(z, SparseTensor):
            return sparse_all_but_one(xp, z, list(ws)), None
        return _all_but_one(xp, z, [w.mT for w in ws]), None

    def project(self, x: TuckerTensor, z: Any) -> TangentVector:
        """Orthogonal projection of ``z`` onto the tangent space at ``x``.

        Parameters
        ----------
        x : TuckerTensor
            A point of the manifold.
        z : array, TuckerTensor, SparseTensor or TangentVector
            A dense ambient tensor of ``self.shape``; a Tucker tensor (projected in factored
            form, never densified); a sparse tensor of observed entries (``O(nnz prod r)``,
            never densified); or a tangent vector at ``x`` whose ``dfactors`` may have left
            the gauge (the result is the same tensor, re-expressed in the gauge).

        Returns
        -------
        TangentVector
            ``dcore = z ×_j U_jᵀ``, ``dU_k = (I - U_kU_kᵀ)[z ×_{j≠k} U_jᵀ]_(k) C_(k)⁺``.

        Notes
        -----
        Partial contractions are shared across modes (two passes over a dense ``z`` of order
        3). ``C_(k)⁺`` is applied through a QR of ``C_(k)ᵀ`` and a solve, never the Gram inverse.
        When the core is all-orthogonal (HOSVD form: what :meth:`random_point`, :func:`hosvd`,
        :func:`truncate` and :meth:`retract` return) that QR is a diagonal scaling and the dense
        tangent vector is accurate to a few ``eps`` even for cores with singular values down to
        ``1e-12``; in a general gauge the error grows like ``eps * cond(C)``.

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> v = M.project(x, np.ones((6, 7, 8)))
        >>> bool(np.allclose(M.tangent_to_dense(x, M.project(x, v)), M.tangent_to_dense(x, v)))
        True
        """
        xp = self._point(x)
        if isinstance(z, TangentVector):
            self._tangent(x, z, "z")
            return self._regauge(xp, x, z)
        self._ambient(xp, x, z, "z")
        core, us = x.core, x.factors
        ts, vs = self._contractions(xp, z, list(us))
        m0 = us[0].mT if vs is None else us[0].mT @ vs[0]
        dcore = _mp(xp, ts[0], m0, 0)
        dfactors = []
        for k, (q, r) in enumerate(_core_qr(xp, core)):
            b = _contract_q(xp, ts[k], q, k)
            if vs is not None:
                b = vs[k] @ b
            b = _orth_complement_apply(xp, us[k], b)
            dfactors.append(_times_r_inv_t(xp, b, r))
        return TangentVector(dcore, dfactors)

    def _regauge(self, xp: Any, x: TuckerTensor, v: TangentVector) -> TangentVector:
        dcore = v.dcore
        dfactors = []
        for k, (u, du) in enumerate(zip(x.factors, v.dfactors)):
            a = u.mT @ du
            dcore = dcore + _mp(xp, x.core, a, k)
            dfactors.append(du - u @ a)
        return TangentVector(dcore, dfactors)

    def egrad_to_rgrad(self, x: TuckerTensor, egrad: Any) -> TangentVector:
        """Riemannian gradient from the Euclidean one: the projection (embedded metric).

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> g = M.egrad_to_rgrad(x, x.to_dense())     # gradient of ||X||^2 / 2
        >>> bool(np.allclose(M.tangent_to_dense(x, g), x.to_dense()))
        True
        """
        return self.project(x, egrad)

    # ----------------------------------------------------------------- representations
    def _blocked(self, xp: Any, x: TuckerTensor, v: TangentVector, first_block: Any):
        d = self.ndim
        blocks = {(0,) * d: first_block}
        for k in range(d):
            blocks[tuple(1 if j == k else 0 for j in range(d))] = x.core
        core = _block_core(xp, blocks, self._ranks, self._ranks)
        factors = [xp.concat([u, du], axis=1) for u, du in zip(x.factors, v.dfactors)]
        return TuckerTensor(core, factors)

    def tangent_to_tucker(self, x: TuckerTensor, v: TangentVector) -> TuckerTensor:
        """The tangent vector as a Tucker tensor of rank <= 2r (factors ``[U_k, dU_k]``).

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> M.tangent_to_tucker(x, M.random_tangent(x, key=1)).ranks
        (4, 4, 4)
        """
        xp = self._point(x)
        self._tangent(x, v)
        return self._blocked(xp, x, v, v.dcore)

    def tangent_to_dense(self, x: TuckerTensor, v: TangentVector) -> Any:
        """The tangent vector as a dense array of ``self.shape`` (references and small cases).

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> M.tangent_to_dense(x, M.zero_tangent(x)).shape
        (6, 7, 8)
        """
        return self.tangent_to_tucker(x, v).to_dense()

    # ----------------------------------------------------------------- metric
    def inner(self, x: TuckerTensor, u: TangentVector, v: TangentVector) -> Any:
        """Riemannian (Frobenius) inner product of tangent vectors at ``x``; a 0-d array.

        ``<u, v> = <dC_u, dC_v> + sum_k tr(dU_kᵀ(u) dU_k(v) C_(k) C_(k)ᵀ)`` in the gauge,
        evaluated as ``sum_k <dU_k(u) R_kᵀ, dU_k(v) R_kᵀ>`` with ``C_(k)ᵀ = Q_k R_k``: rounding
        errors grow like ``eps cond(C)``, not ``eps cond(C)²`` as with the Gram matrix.

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> u, v = M.random_tangent(x, key=1), M.random_tangent(x, key=2)
        >>> dense = np.sum(M.tangent_to_dense(x, u) * M.tangent_to_dense(x, v))
        >>> bool(np.isclose(M.inner(x, u, v), dense))
        True
        """
        xp = self._point(x)
        self._tangent(x, u, "u")
        self._tangent(x, v, "v")
        total = xp.sum(u.dcore * v.dcore)
        for k, (_, r) in enumerate(_core_qr(xp, x.core)):
            total = total + xp.sum((u.dfactors[k] @ r.mT) * (v.dfactors[k] @ r.mT))
        return total

    def norm(self, x: TuckerTensor, v: TangentVector) -> Any:
        """Norm of a tangent vector (0-d array).

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> round(float(M.norm(x, M.random_tangent(x, key=1))), 12)
        1.0
        """
        xp = self._point(x)
        ip = self.inner(x, v, v)
        return xp.sqrt(xp.clip(ip, 0.0, None))

    # ----------------------------------------------------------------- moving
    def retract(self, x: TuckerTensor, v: TangentVector) -> TuckerTensor:
        """Retraction: ST-HOSVD truncation of ``x + v`` back to ``self.ranks``, never dense.

        ``x + v`` is a Tucker tensor of rank <= 2r with factors ``[U_k, dU_k]``; after a QR of
        each factor only the ``(2r)^d`` core is decomposed. Cost
        ``O(sum_k n_k r_k^2 + (2r)^(d+1))``.

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> y = M.retract(x, 0.1 * M.random_tangent(x, key=1))
        >>> M.check_point(y)
        True
        """
        xp = self._point(x)
        self._tangent(x, v)
        return truncate(self._blocked(xp, x, v, x.core + v.dcore), self._ranks)

    def transport(self, x: TuckerTensor, y: TuckerTensor, v: TangentVector) -> TangentVector:
        """Vector transport of ``v`` from ``T_x`` to ``T_y`` by projection (structured).

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> v = M.random_tangent(x, key=1)
        >>> y = M.retract(x, 0.1 * v)
        >>> M.check_tangent(y, M.transport(x, y, v))
        True
        """
        self._point(y, "y")
        return self.project(y, self.tangent_to_tucker(x, v))

    # ----------------------------------------------------------------- second order
    def ehess_to_rhess(
        self, x: TuckerTensor, egrad: Any, ehess_v: Any, v: TangentVector
    ) -> TangentVector:
        """Riemannian Hessian applied to ``v`` from Euclidean derivatives.

        ``Hess f(x)[v] = P_x(ehess_v) + P_x (D_v P_x)(N)``, ``N = egrad - P_x egrad`` the normal
        part of the gradient (the Weingarten term). In the gauge the second term is

        - ``dcore = sum_i N ×_i dU_iᵀ ×_{j≠i} U_jᵀ``,
        - ``dU_k = (I - U_kU_kᵀ)( [sum_{i≠k} N ×_i dU_iᵀ ×_{j≠k,i} U_jᵀ]_(k) C_(k)⁺ +
          [N ×_{j≠k} U_jᵀ]_(k) [dC]_(k)ᵀ (C_(k)C_(k)ᵀ)⁻¹ )``,

        computed from contractions of ``N`` with the augmented factors ``[U_j, dU_j]``.

        Parameters
        ----------
        egrad, ehess_v : array, TuckerTensor or SparseTensor
            Euclidean gradient at ``x`` and Euclidean Hessian applied to (the dense form of) ``v``.

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> M = tm.FixedRankTucker((6, 7, 8), 2)
        >>> x = M.random_point(key=0)
        >>> a = np.random.default_rng(1).standard_normal(M.shape)
        >>> v = M.random_tangent(x, key=2)            # f = ||X - A||^2 / 2: ehess_v = v
        >>> h = M.ehess_to_rhess(x, x.to_dense() - a, M.tangent_to_dense(x, v), v)
        >>> M.check_tangent(x, h)
        True
        """
        xp = self._point(x)
        self._tangent(x, v)
        self._ambient(xp, x, egrad, "egrad")
        self._ambient(xp, x, ehess_v, "ehess_v")
        qrs = _core_qr(xp, x.core)
        grad_tangent = self._blocked(xp, x, g := self.project(x, egrad), g.dcore)
        w_full = self._weingarten_map(xp, x, egrad, v, qrs)
        w_tan = self._weingarten_map(xp, x, grad_tangent, v, qrs)
        return self.project(x, ehess_v) + (w_full - w_tan)

    def _weingarten_map(self, xp: Any, x: TuckerTensor, z: Any, v: TangentVector, qrs: list):
        """The linear map ``z -> P_x (D_v P)(z)`` in the form valid for normal ``z``."""
        d, ranks = self.ndim, self._ranks
        us = x.factors
        augmented = [xp.concat([u, du], axis=1) for u, du in zip(us, v.dfactors)]
        ts, vs = self._contractions(xp, z, augmented)
        m0 = augmented[0].mT if vs is None else augmented[0].mT @ vs[0]
        full = _mp(xp, ts[0], m0, 0)
        dcore = None
        for i in range(d):
            block = full[_block_slices(ranks, None, i)]
            dcore = block if dcore is None else dcore + block
        dfactors = []
        for k, (q, r) in enumerate(qrs):
            t = ts[k]
            y = t[_block_slices(ranks, k, None)]
            term2 = _contract_others(xp, y, v.dcore, k)
            z1 = None
            for i in _others(d, k):
                block = t[_block_slices(ranks, k, i)]
                z1 = block if z1 is None else z1 + block
            term1 = _contract_q(xp, z1, q, k)
            if vs is not None:
                term1, term2 = vs[k] @ term1, vs[k] @ term2
            f = _times_r_inv_t(xp, term1 + _times_r_inv(xp, term2, r), r)
            dfactors.append(_orth_complement_apply(xp, us[k], f))
        return TangentVector(dcore, dfactors)

    # ----------------------------------------------------------------- membership checks
    def _tolerance(self, xp: Any, dtype: Any, atol: float | None) -> float:
        return float(atol) if atol is not None else math.sqrt(float(xp.finfo(dtype).eps))

    def check_point(self, x: Any, *, explain: bool = False, atol: float | None = None) -> Any:
        """Whether ``x`` is a point of this manifold.

        Checks the structure (type, shape, ranks, dtype), orthonormal factors
        (``||U_kᵀU_k - I|| <= atol``, default ``sqrt(eps)``) and full multilinear rank of the
        core (each unfolding's smallest singular value above ``eps·max(shape)`` times its
        largest). Returns a bool, or ``(ok, reason)`` with ``explain=True``. Host-side: not for
        use under jit. :meth:`assert_point` raises instead.

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> M.check_point(M.random_point(key=0))
        True
        >>> ones = [np.ones((4, 2)), np.ones((5, 2)), np.ones((6, 2))]
        >>> bad = tm.TuckerTensor(np.ones((2, 2, 2)), ones)
        >>> M.check_point(bad, explain=True)[0]
        False
        """
        reason = self._point_reason(x, atol)
        return (reason is None, reason) if explain else reason is None

    def _point_reason(self, x: Any, atol: float | None) -> str | None:
        try:
            xp = self._point(x)
            check_real_floating(xp, x.core, *x.factors, what="core and factors")
        except (TypeError, ValueError) as err:
            return str(err)
        tol = self._tolerance(xp, x.dtype, atol)
        for k, u in enumerate(x.factors):
            eye = xp.eye(u.shape[1], dtype=u.dtype, device=x.device)
            dev = float(backends.to_numpy(xp.max(xp.abs(u.mT @ u - eye))))
            if not dev <= tol:
                return f"factors[{k}] is not orthonormal: max |U_kᵀU_k - I| = {dev:.3g} > {tol:.3g}"
        eps = float(xp.finfo(x.dtype).eps)
        for k in range(self.ndim):
            s = backends.to_numpy(xp.linalg.svdvals(_unfold(xp, x.core, k)))
            if not (s[-1] > eps * max(self._shape) * s[0]):
                return (
                    f"the core does not have full multilinear rank: its mode-{k} unfolding has "
                    f"singular values from {s[0]:.3g} down to {s[-1]:.3g}"
                )
        return None

    def check_tangent(
        self, x: Any, v: Any, *, explain: bool = False, atol: float | None = None
    ) -> Any:
        """Whether ``v`` is a tangent vector at ``x`` in the gauge ``U_kᵀ dU_k = 0``.

        The off-gauge part of each mode, measured as a tensor (``||U_kᵀ dU_k C_(k)||``), must be
        at most ``atol`` times ``||v||``; the default is ``max(sqrt(eps), 100 eps cond(C))``,
        since factor-form results carry errors of about ``eps cond(C)`` (:func:`core_condition`).
        Bool, or ``(ok, reason)``.

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> x = M.random_point(key=0)
        >>> M.check_tangent(x, M.random_tangent(x, key=1))
        True
        """
        reason = self._tangent_reason(x, v, atol)
        return (reason is None, reason) if explain else reason is None

    def _tangent_reason(self, x: Any, v: Any, atol: float | None) -> str | None:
        try:
            xp = self._point(x)
            self._tangent(x, v)
        except (TypeError, ValueError) as err:
            return str(err)
        tol = self._tolerance(xp, x.dtype, atol)
        if atol is None:  # the factor form carries errors of size eps * cond(core)
            tol = max(tol, 100 * float(xp.finfo(x.dtype).eps) * core_condition(x))
        scale = float(backends.to_numpy(self.norm(x, v)))
        for k, (u, du) in enumerate(zip(x.factors, v.dfactors)):
            # size of the off-gauge part as a tensor: ||C ×_k (U_kᵀ dU_k)|| = ||U_kᵀ dU_k C_(k)||
            off = (u.mT @ du) @ _unfold(xp, x.core, k)
            size = float(backends.to_numpy(xp.linalg.matrix_norm(off)))
            if not size <= tol * scale:
                return (
                    f"dfactors[{k}] leaves the gauge U_kᵀ dU_k = 0: the off-gauge part has norm "
                    f"{size:.3g} for a tangent vector of norm {scale:.3g} (tolerance {tol:.3g} "
                    "relative)"
                )
        return None

    def assert_point(self, x: Any, *, atol: float | None = None) -> None:
        """Raise ``ValueError`` with the reason when :meth:`check_point` fails.

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> M.assert_point(M.random_point(key=0))
        """
        reason = self._point_reason(x, atol)
        if reason is not None:
            raise ValueError(f"not a point of {self}: {reason}")

    def assert_tangent(self, x: Any, v: Any, *, atol: float | None = None) -> None:
        """Raise ``ValueError`` with the reason when :meth:`check_tangent` fails.

        Examples
        --------
        >>> import tuckerman as tm
        >>> M = tm.FixedRankTucker((4, 5, 6), 2)
        >>> x = M.random_point(key=0)
        >>> M.assert_tangent(x, M.zero_tangent(x))
        """
        reason = self._tangent_reason(x, v, atol)
        if reason is not None:
            raise ValueError(f"not a tangent vector of {self} at x: {reason}")
