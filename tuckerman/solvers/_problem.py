"""Optimization problems on Tucker tensors: a domain, a cost and its derivatives."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from tuckerman._manifold import FixedRankTucker, TangentVector
from tuckerman._tucker import TuckerTensor
from tuckerman.solvers._autodiff import (
    AUTODIFF,
    rgrad_from_factor_grads,
    value_and_factor_grads,
)
from tuckerman.solvers._result import as_float, finite_float, host_float
from tuckerman.validation import as_ranks, as_shape, feasible_ranks_error

__all__ = ["Problem", "TuckerDomain"]


class TuckerDomain:
    """All tensors of ``shape`` in Tucker format with ranks between ``min_rank`` and ``max_rank``.

    The domain of a rank-adaptive problem (:func:`~tuckerman.solvers.rank_adaptive`): a union of
    fixed-rank manifolds. The fixed-rank solvers accept it too and work on the manifold of the
    starting point's ranks (:meth:`manifold_at`).

    Parameters
    ----------
    shape : sequence of int
        Tensor shape, d >= 2.
    min_rank : int or sequence of int, optional
        Lower rank bound per mode (default 1).
    max_rank : int or sequence of int, optional
        Upper rank bound per mode (default: none but ``shape``).

    Examples
    --------
    >>> import tuckerman as tm
    >>> from tuckerman.solvers import TuckerDomain
    >>> D = TuckerDomain((20, 20, 20), max_rank=8)
    >>> x = tm.FixedRankTucker(D.shape, 3).random_point(key=0)
    >>> D.manifold_at(x)
    FixedRankTucker(shape=(20, 20, 20), ranks=(3, 3, 3))
    """

    def __init__(self, shape: Any, *, min_rank: Any = 1, max_rank: Any = None) -> None:
        self._shape = as_shape(shape)
        d = len(self._shape)
        self._min_rank = as_ranks(min_rank, d, "min_rank")
        self._max_rank = None if max_rank is None else as_ranks(max_rank, d, "max_rank")
        if self._max_rank is not None:
            for k, (lo, hi) in enumerate(zip(self._min_rank, self._max_rank)):
                if lo > hi:
                    raise ValueError(
                        f"min_rank[{k}] = {lo} exceeds max_rank[{k}] = {hi} "
                        f"(min_rank {self._min_rank}, max_rank {self._max_rank})"
                    )
        for k, (lo, n) in enumerate(zip(self._min_rank, self._shape)):
            if lo > n:
                raise ValueError(f"min_rank[{k}] = {lo} exceeds the mode size {n}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor shape."""
        return self._shape

    @property
    def ndim(self) -> int:
        """Tensor order d."""
        return len(self._shape)

    @property
    def min_rank(self) -> tuple[int, ...]:
        """Lower rank bounds."""
        return self._min_rank

    @property
    def max_rank(self) -> tuple[int, ...] | None:
        """Upper rank bounds (None: only the shape bounds them)."""
        return self._max_rank

    def __repr__(self) -> str:
        return (
            f"TuckerDomain(shape={self._shape}, min_rank={self._min_rank}, "
            f"max_rank={self._max_rank})"
        )

    def manifold_at(self, x: TuckerTensor) -> FixedRankTucker:
        """The fixed-rank manifold through ``x`` (a ValueError when its ranks are out of bounds)."""
        if not isinstance(x, TuckerTensor):
            raise TypeError(f"x must be a TuckerTensor, got {type(x).__name__}")
        if x.shape != self._shape:
            raise ValueError(f"x has shape {x.shape}, but {self} has shape {self._shape}")
        ranks = x.ranks
        low = any(r < lo for r, lo in zip(ranks, self._min_rank))
        high = self._max_rank is not None and any(r > hi for r, hi in zip(ranks, self._max_rank))
        if low or high:
            raise ValueError(f"x has ranks {ranks}, outside the rank bounds of {self}")
        reason = feasible_ranks_error(self._shape, ranks)
        if reason is not None:
            raise ValueError(f"x has infeasible ranks: {reason}")
        return FixedRankTucker(self._shape, ranks)


class Evaluation(NamedTuple):
    """Cost and gradient at a point, as the solvers use them."""

    cost: float
    rgrad: TangentVector
    egrad: Any  # the ambient Euclidean gradient, None on the autodiff path


class Problem:
    """A cost function on Tucker tensors with its derivatives, for the solvers.

    Parameters
    ----------
    manifold : FixedRankTucker or TuckerDomain
        Where to optimize: one fixed-rank manifold, or a rank-adaptive domain (the fixed-rank
        solvers then keep the ranks of ``x0``).
    cost : callable
        ``cost(x)`` for a :class:`~tuckerman.TuckerTensor` ``x``; returns a scalar (a 0-d array
        of ``x``'s library, or a number).
    egrad : callable, optional
        ``egrad(x)``: the Euclidean gradient of the cost at ``x``, as a dense array of
        ``shape``, a :class:`~tuckerman.TuckerTensor` (projected without densifying) or a sparse
        tensor that the manifold's ``project`` accepts. Required unless ``autodiff`` is given.
    ehess : callable, optional
        ``ehess(x, direction)``: the Euclidean Hessian at ``x`` applied to ``direction``, a
        tangent vector given as a :class:`~tuckerman.TuckerTensor` of rank ``<= 2r``
        (``M.tangent_to_tucker(x, v)``; call ``direction.to_dense()`` for small problems).
        Returns an ambient tensor like ``egrad``. Needs ``egrad`` (the Riemannian Hessian's
        Weingarten term uses the Euclidean gradient). Without it, the Hessian is approximated
        by finite differences of the Riemannian gradient (:meth:`rhess`).
    autodiff : {"torch", "jax"}, optional
        Differentiate ``cost`` with that library instead of calling ``egrad``: the gradients
        with respect to the core and the factors of ``cost(TuckerTensor(core, factors))`` give
        the Riemannian gradient (:func:`~tuckerman.solvers.rgrad_from_factor_grads`); the dense
        tensor is never formed unless ``cost`` forms it. The points must hold that library's
        arrays. Cannot be combined with ``egrad`` or ``ehess``.

    Examples
    --------
    Best approximation of rank (2, 2, 2) of a tensor ``A``: ``f(X) = ||X - A||² / 2``,
    ``egrad(X) = X - A`` and ``ehess(X)[D] = D``.

    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import Problem
    >>> A = np.random.default_rng(0).standard_normal((6, 7, 8))
    >>> M = tm.FixedRankTucker(A.shape, 2)
    >>> problem = Problem(
    ...     M,
    ...     cost=lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2),
    ...     egrad=lambda x: x.to_dense() - A,
    ...     ehess=lambda x, d: d,
    ... )
    >>> x = M.random_point(key=1)
    >>> M.check_tangent(x, problem.rgrad(x))
    True
    """

    def __init__(
        self,
        manifold: Any,
        cost: Callable[[TuckerTensor], Any],
        *,
        egrad: Callable[[TuckerTensor], Any] | None = None,
        ehess: Callable[[TuckerTensor, TuckerTensor], Any] | None = None,
        autodiff: str | None = None,
    ) -> None:
        if not isinstance(manifold, TuckerDomain):
            missing = [
                m
                for m in ("project", "retract", "transport", "inner", "norm", "check_point")
                if not callable(getattr(manifold, m, None))
            ]
            if missing:
                raise TypeError(
                    "manifold must be a FixedRankTucker, a TuckerDomain or an object with the "
                    f"FixedRankTucker API; {type(manifold).__name__} lacks {', '.join(missing)}"
                )
        for name, f in (("cost", cost), ("egrad", egrad), ("ehess", ehess)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        if cost is None:
            raise TypeError("cost must be callable, got None")
        if autodiff is not None:
            if autodiff not in AUTODIFF:
                raise ValueError(f"autodiff must be one of {AUTODIFF} or None, got {autodiff!r}")
            if egrad is not None or ehess is not None:
                raise ValueError(
                    "pass either autodiff or egrad/ehess: with autodiff the gradient comes from "
                    f"{autodiff}"
                )
        elif egrad is None:
            raise ValueError(
                "the problem needs a gradient: pass egrad=..., or autodiff='torch' / 'jax' to "
                "differentiate the cost"
            )
        if ehess is not None and egrad is None:
            raise ValueError(
                "ehess needs egrad (the Riemannian Hessian uses the Euclidean gradient)"
            )
        self._manifold = manifold
        self._cost = cost
        self._egrad = egrad
        self._ehess = ehess
        self._autodiff = autodiff

    # ----------------------------------------------------------------- description
    @property
    def manifold(self) -> Any:
        """The manifold or :class:`TuckerDomain` given."""
        return self._manifold

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor shape."""
        return tuple(self._manifold.shape)

    @property
    def cost(self) -> Callable:
        """The cost function."""
        return self._cost

    @property
    def egrad(self) -> Callable | None:
        """The Euclidean gradient function (None with autodiff)."""
        return self._egrad

    @property
    def ehess(self) -> Callable | None:
        """The Euclidean Hessian-vector product (None: finite differences)."""
        return self._ehess

    @property
    def autodiff(self) -> str | None:
        """``"torch"``, ``"jax"`` or None."""
        return self._autodiff

    def __repr__(self) -> str:
        how = f"autodiff={self._autodiff!r}" if self._autodiff else "egrad"
        hess = ", ehess" if self._ehess is not None else ""
        return f"Problem({self._manifold}, {how}{hess})"

    def manifold_at(self, x: TuckerTensor) -> Any:
        """The fixed-rank manifold the solvers use at ``x``."""
        if isinstance(self._manifold, TuckerDomain):
            return self._manifold.manifold_at(x)
        return self._manifold

    # ----------------------------------------------------------------- public derivatives
    def rgrad(self, x: TuckerTensor) -> TangentVector:
        """The Riemannian gradient at ``x`` (from ``egrad``, or by autodiff).

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> from tuckerman.solvers import Problem
        >>> M = tm.FixedRankTucker((5, 6, 7), 2)
        >>> p = Problem(M, lambda x: tm.norm(x) ** 2 / 2, egrad=lambda x: x)
        >>> x = M.random_point(key=0)
        >>> bool(np.allclose(M.tangent_to_dense(x, p.rgrad(x)), x.to_dense()))
        True
        """
        return self.evaluate(self.manifold_at(x), x).rgrad

    def rhess(self, x: TuckerTensor, v: TangentVector) -> TangentVector:
        """The Riemannian Hessian at ``x`` applied to the tangent vector ``v``.

        With ``ehess``: ``M.ehess_to_rhess(x, egrad(x), ehess(x, M.tangent_to_tucker(x, v)), v)``,
        exact. Without: the forward difference
        ``(T_{y→x} grad f(y) − grad f(x)) / t`` along ``y = R_x(t v)``, with
        ``t ‖v‖ = sqrt(eps)·max(1, ‖x‖)``, transport by projection; it costs one gradient and
        agrees with the Hessian to ``O(sqrt(eps))`` relative at critical points, where the
        trust-region method needs it (elsewhere it is the derivative of the gradient along the
        retraction, which is a valid model Hessian for convergence).

        Examples
        --------
        >>> import numpy as np, tuckerman as tm
        >>> from tuckerman.solvers import Problem
        >>> M = tm.FixedRankTucker((5, 6, 7), 2)
        >>> A = M.random_point(key=1).to_dense()
        >>> cost = lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2)
        >>> exact = Problem(M, cost, egrad=lambda x: x.to_dense() - A, ehess=lambda x, d: d)
        >>> fd = Problem(M, cost, egrad=lambda x: x.to_dense() - A)
        >>> x = M.random_point(key=2)
        >>> v = M.random_tangent(x, key=3)
        >>> h1, h2 = exact.rhess(x, v), fd.rhess(x, v)
        >>> err = np.linalg.norm(M.tangent_to_dense(x, h1 - h2)) / float(M.norm(x, h1))
        >>> bool(err < 1e-5)
        True
        """
        M = self.manifold_at(x)
        return self.hess(M, x, v, self.evaluate(M, x))

    # ----------------------------------------------------------------- what the solvers call
    def cost_value(self, x: TuckerTensor) -> float:
        """The cost as a Python float (nan or inf pass through; a TypeError if not a scalar)."""
        return as_float(self._cost(x), "cost(x)")

    def evaluate(self, M: Any, x: TuckerTensor) -> Evaluation:
        """Cost, Riemannian gradient and (without autodiff) the Euclidean gradient at ``x``."""
        if self._autodiff is not None:
            value, dcore, dfactors = value_and_factor_grads(self._autodiff, self._cost, x)
            g = rgrad_from_factor_grads(M, x, dcore, dfactors)
            return Evaluation(as_float(value, "cost(x)"), g, None)
        value = self.cost_value(x)
        eg = self._egrad(x)  # type: ignore[misc]
        return Evaluation(value, M.egrad_to_rgrad(x, eg), eg)

    def hess(self, M: Any, x: TuckerTensor, v: TangentVector, at_x: Evaluation) -> TangentVector:
        """Riemannian Hessian-vector product given the evaluation ``at_x`` at ``x``."""
        if self._ehess is not None:
            ev = self._ehess(x, M.tangent_to_tucker(x, v))
            return M.ehess_to_rhess(x, at_x.egrad, ev, v)
        nv = host_float(M.norm(x, v))
        if nv == 0.0:
            return v * 0.0
        xp = x._namespace()
        eps = float(xp.finfo(x.dtype).eps)
        scale = max(1.0, host_float(xp.linalg.vector_norm(x.core)))
        t = math.sqrt(eps) * scale / nv
        y = M.retract(x, v * t)
        gy = self.evaluate(M, y).rgrad
        return (M.transport(y, x, gy) - at_x.rgrad) * (1.0 / t)


def check_start(problem: Any, x0: Any) -> tuple[Any, Evaluation]:
    """Validate a solver's inputs and evaluate at ``x0``: (manifold, evaluation)."""
    if not isinstance(problem, Problem):
        raise TypeError(
            f"problem must be a tuckerman.solvers.Problem, got {type(problem).__name__}"
        )
    if not isinstance(x0, TuckerTensor):
        raise TypeError(f"x0 must be a TuckerTensor, got {type(x0).__name__}")
    M = problem.manifold_at(x0)
    if x0.shape != tuple(M.shape) or x0.ranks != tuple(M.ranks):
        raise ValueError(
            f"x0 has shape {x0.shape} and ranks {x0.ranks}, but the problem's manifold {M} has "
            f"shape {tuple(M.shape)} and ranks {tuple(M.ranks)}"
        )
    ok, reason = M.check_point(x0, explain=True)
    if not ok:
        raise ValueError(f"x0 is not a point of {M}: {reason}")
    finite_float(problem.cost(x0), "cost(x0)")
    at = problem.evaluate(M, x0)
    gn = host_float(M.norm(x0, at.rgrad))
    if not math.isfinite(gn):
        raise ValueError(f"the Riemannian gradient at x0 is not finite (norm {gn})")
    return M, at
