"""The rank-adaptive solver: repeated TDLRT steps (:func:`tuckerman.tdlrt_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tuckerman._kernels import _mp
from tuckerman._manifold import FixedRankTucker
from tuckerman._tdlrt import augment_basis, galerkin_step, truncate_core
from tuckerman._tucker import TuckerTensor, add, scale
from tuckerman.solvers._autodiff import rgrad_from_factor_grads, value_and_factor_grads
from tuckerman.solvers._problem import Problem, TuckerDomain
from tuckerman.solvers._result import (
    Monitor,
    Result,
    as_float,
    finite_float,
    host_float,
    positive_float,
    stopping,
)
from tuckerman.validation import check_tol

__all__ = ["rank_adaptive"]


def _tdlrt_step() -> Callable:
    import tuckerman

    step = getattr(tuckerman, "tdlrt_step", None)
    if step is None:
        raise NotImplementedError(
            "rank_adaptive needs tuckerman.tdlrt_step, which this version of tuckerman lacks"
        )
    return step


def _distance(a: TuckerTensor, b: TuckerTensor) -> float:
    """``‖a - b‖_F`` accurate to ``eps ‖a‖`` (not ``sqrt(eps) ‖a‖`` as ``norm(a - b)`` through
    inner products): the difference's core expressed in orthonormal bases of ``[U_a, U_b]``."""
    d = add(a, scale(b, -1.0))
    xp = d._namespace()
    core = d.core
    for k, u in enumerate(d.factors):
        _, r = xp.linalg.qr(u)
        core = _mp(xp, core, r, k)
    return host_float(xp.linalg.vector_norm(core))


def _compact(ranks: tuple | None) -> Any:
    """One int when every mode has the same bound (the simplest form for the step)."""
    if ranks is None or len(set(ranks)) > 1:
        return ranks
    return ranks[0]


def _as_problem(problem: Any, x0: Any) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, (tuple, list)) and len(problem) == 2 and all(map(callable, problem)):
        if not isinstance(x0, TuckerTensor):
            raise TypeError(f"x0 must be a TuckerTensor, got {type(x0).__name__}")
        cost, egrad = problem
        return Problem(TuckerDomain(x0.shape), cost, egrad=egrad)
    raise TypeError(
        "problem must be a tuckerman.solvers.Problem or a pair (cost, egrad) of callables, "
        f"got {type(problem).__name__}"
    )


def rank_adaptive(
    problem: Problem | tuple,
    x0: TuckerTensor,
    *,
    lr: float,
    tau: float,
    min_rank: Any = None,
    max_rank: Any = None,
    absolute: bool = False,
    adaptive_modes: Any = None,
    max_iter: int = 1000,
    min_grad_norm: float | None = 1e-6,
    min_step: float | None = 1e-10,
    max_time: float | None = None,
    progress: bool = False,
) -> Result:
    """Rank-adaptive optimization by TDLRT steps (Zangrando et al., NeurIPS 2024).

    Each iteration is one :func:`tuckerman.tdlrt_step`: a basis step on every mode from one
    gradient, augmentation of the bases to rank ``<= 2r``, a Galerkin step on the core from a
    second gradient, and truncation of the core to the smallest ranks whose discarded singular
    values have norm ``<= tau`` (relative to the core's norm unless ``absolute``), within the
    rank bounds. The ranks of the iterates change from step to step; the log records them.
    There is no line search: ``lr`` is a fixed learning rate, and the cost decreases up to
    ``O(tau)`` per step for ``lr`` below the inverse Lipschitz constant of the gradient.

    Parameters
    ----------
    problem : Problem or (cost, egrad)
        The problem, usually on a :class:`~tuckerman.solvers.TuckerDomain` (its rank bounds are
        the defaults for ``min_rank`` / ``max_rank``); a ``FixedRankTucker`` contributes only
        its shape. A pair of callables is a shorthand for
        ``Problem(TuckerDomain(x0.shape), cost, egrad=egrad)``. With ``autodiff`` the step is
        assembled from the same parts (:func:`~tuckerman.augment_basis`,
        :func:`~tuckerman.galerkin_step`, :func:`~tuckerman.truncate_core`): the factor
        gradients ``∂f/∂U_k`` augment the bases (they span the same space as the K-step), and
        the Galerkin step takes the core gradient at the augmented point; no dense gradient
        and no inverse of the core's Gram matrices. ``ehess`` is not used.
    x0 : TuckerTensor
        Starting point: orthonormal factors and a core of full multilinear rank, any ranks
        within the bounds.
    lr : float
        Learning rate (> 0).
    tau : float
        Truncation tolerance (>= 0).
    min_rank, max_rank : int or sequence of int, optional
        Rank bounds (default: those of a ``TuckerDomain``, else 1 and none).
    absolute : bool, optional
        ``tau`` is an absolute threshold instead of relative to ``‖core‖``.
    adaptive_modes : sequence of int, optional
        Modes whose rank may change (default all); passed to :func:`tuckerman.tdlrt_step`.
    max_iter, min_grad_norm, min_step, max_time, progress
        As in :func:`~tuckerman.solvers.rgd`. The gradient norm is that of the Riemannian
        gradient on the manifold of the current ranks; the step size is ``‖x_k - x_{k-1}‖_F``.

    Returns
    -------
    Result
        ``log[k].ranks`` traces the ranks.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import Problem, TuckerDomain, rank_adaptive
    >>> A = tm.FixedRankTucker((12, 12, 12), (3, 4, 3)).random_point(key=0).to_dense()
    >>> problem = Problem(TuckerDomain(A.shape, max_rank=8),
    ...                   lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2),
    ...                   egrad=lambda x: x.to_dense() - A)
    >>> x0 = tm.FixedRankTucker(A.shape, 1).random_point(key=1)
    >>> result = rank_adaptive(problem, x0, lr=1.0, tau=1e-6, max_iter=50)
    >>> result.point.ranks
    (3, 4, 3)
    """
    problem = _as_problem(problem, x0)
    step_fn = _tdlrt_step()
    rules = stopping(max_iter, min_grad_norm, min_step, max_time)
    lr = positive_float(lr, "lr")  # type: ignore[assignment]
    tau = check_tol(tau, "tau")  # type: ignore[assignment]
    if tau is None:
        raise TypeError("tau must be a non-negative number, got None")
    if not isinstance(x0, TuckerTensor):
        raise TypeError(f"x0 must be a TuckerTensor, got {type(x0).__name__}")
    domain = problem.manifold
    if isinstance(domain, TuckerDomain):
        min_rank = domain.min_rank if min_rank is None else min_rank
        max_rank = domain.max_rank if max_rank is None else max_rank
    min_rank = 1 if min_rank is None else min_rank
    bounds = TuckerDomain(problem.shape, min_rank=min_rank, max_rank=max_rank)
    if x0.shape != bounds.shape:
        raise ValueError(f"x0 has shape {x0.shape}, but the problem has shape {bounds.shape}")
    M = bounds.manifold_at(x0)
    ok, reason = M.check_point(x0, explain=True)
    if not ok:
        raise ValueError(f"x0 is not a point of {M}: {reason}")
    finite_float(problem.cost(x0), "cost(x0)")

    options = dict(
        lr=lr,
        tau=tau,
        min_rank=_compact(bounds.min_rank),
        max_rank=_compact(bounds.max_rank),
        absolute=absolute,
        adaptive_modes=adaptive_modes,
    )
    cache: dict = {}

    def egrad(point: TuckerTensor) -> Any:
        # the step's first call is at the current point, whose gradient the log already has
        hit = cache.get("point")
        if hit is not None and (
            point is hit
            or (point.core is hit.core and all(a is b for a, b in zip(point.factors, hit.factors)))
        ):
            return cache.pop("grad")
        return problem.egrad(point)  # type: ignore[misc]

    def state(x: TuckerTensor) -> tuple[float, float]:
        """Cost and gradient norm at x; the gradient is kept for the next step."""
        Mx = FixedRankTucker(x.shape, x.ranks)
        cache.clear()
        cache["point"] = x
        if problem.autodiff is None:
            f = problem.cost_value(x)
            cache["grad"] = problem.egrad(x)  # type: ignore[misc]
            g = Mx.egrad_to_rgrad(x, cache["grad"])
        else:
            value, dcore, dfactors = value_and_factor_grads(problem.autodiff, problem.cost, x)
            f = as_float(value, "cost(x)")
            cache["grad"] = dfactors
            g = rgrad_from_factor_grads(Mx, x, dcore, dfactors)
        return f, host_float(Mx.norm(x, g))

    def step(x: TuckerTensor) -> TuckerTensor:
        if problem.autodiff is None:
            return step_fn(x, egrad, **options)
        # the same step from autodiff: span[U_k, K_k^new] = span[U_k, ∂f/∂U_k], so the factor
        # gradients augment the bases; the Galerkin step needs only the core gradient there
        x_aug, _ = augment_basis(x, cache.pop("grad"))
        _, dcore, _ = value_and_factor_grads(problem.autodiff, problem.cost, x_aug, core_only=True)
        x_gal = galerkin_step(x_aug, dcore, lr=lr)
        kw = {k: options[k] for k in ("tau", "min_rank", "max_rank", "absolute", "adaptive_modes")}
        return truncate_core(x_gal, ranks=x.ranks, **kw)[0]

    monitor = Monitor("rank_adaptive", rules, progress)
    try:
        x = x0
        f, gn = state(x)
        if not math.isfinite(gn):
            raise ValueError(f"the Riemannian gradient at x0 is not finite (norm {gn})")
        monitor.record(0, f, gn, float("nan"), x.ranks)
        it, step_len = 0, None
        while (reason := monitor.check(it, gn, step_len)) is None:
            x_new = step(x)
            it += 1
            step_len = _distance(x_new, x)
            x = x_new
            f, gn = state(x)
            if not (math.isfinite(f) and math.isfinite(gn)):
                raise FloatingPointError(
                    f"the cost ({f}) or the gradient norm ({gn}) is not finite after {it} "
                    f"rank-adaptive steps with lr={lr}: the learning rate is too large"
                )
            monitor.record(it, f, gn, step_len, x.ranks)
        return monitor.finish(x, f, gn, it, reason)
    finally:
        monitor.close()
