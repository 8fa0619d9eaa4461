"""Riemannian gradient descent with Armijo backtracking."""

from __future__ import annotations

from tuckerman._tucker import TuckerTensor
from tuckerman.solvers._linesearch import armijo_options, backtrack, check_step0, next_alpha
from tuckerman.solvers._problem import Problem, check_start
from tuckerman.solvers._result import Monitor, Result, host_float, stopping

__all__ = ["rgd"]


def rgd(
    problem: Problem,
    x0: TuckerTensor,
    *,
    max_iter: int = 1000,
    min_grad_norm: float | None = 1e-6,
    min_step: float | None = 1e-10,
    max_time: float | None = None,
    step0: float = 1.0,
    armijo: float = 1e-4,
    shrink: float = 0.5,
    max_backtracks: int = 30,
    progress: bool = False,
) -> Result:
    """Riemannian gradient descent with Armijo backtracking.

    Each iteration moves along ``-grad f(x)``: ``x ← R_x(-α grad f(x))`` with the first
    ``α = α_0 · shrink^j`` that satisfies the Armijo condition
    ``f(x_new) <= f(x) - armijo · α · ‖grad f(x)‖²``, so the cost decreases monotonically. The
    first trial is ``α_0 = step0``, then the minimizer of the quadratic fitted to the last
    accepted step (the curvature along it), applied to the new gradient; the step length grows
    at most fourfold from one iteration to the next.

    Parameters
    ----------
    problem : Problem
        Cost and gradient (see :class:`~tuckerman.solvers.Problem`).
    x0 : TuckerTensor
        Starting point on the problem's manifold (its library, dtype and device are kept).
    max_iter : int, optional
        Maximal number of steps.
    min_grad_norm : float or None, optional
        Stop when ``‖grad f(x)‖ <= min_grad_norm`` (None: never).
    min_step : float or None, optional
        Stop when the last step had length ``<= min_step`` (None: never).
    max_time : float or None, optional
        Stop after this many seconds (checked once per iteration; None: never).
    step0 : float, optional
        First trial step ``α`` (the step is ``-α grad f``). 1 suits costs whose Euclidean
        Hessian is about the identity, such as ``||X - A||² / 2``.
    armijo : float, optional
        Sufficient-decrease constant ``c`` in (0, 1).
    shrink : float, optional
        Backtracking factor in (0, 1).
    max_backtracks : int, optional
        The search fails (stop reason ``"line_search_failed"``, the point is kept) after this
        many reductions.
    progress : bool, optional
        Show a tqdm progress bar (needs ``tqdm``).

    Returns
    -------
    Result
        ``log[k].extra`` holds ``alpha`` (the accepted step) and ``backtracks``.

    Raises
    ------
    TypeError, ValueError
        Before iterating, for non-positive ``max_iter`` / tolerances / step parameters, an
        ``x0`` that is not on the manifold, or a cost that is not a finite scalar at ``x0``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import Problem, rgd
    >>> M = tm.FixedRankTucker((10, 10, 10), 3)
    >>> A = M.random_point(key=0).to_dense()
    >>> problem = Problem(M, lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2),
    ...                   egrad=lambda x: x.to_dense() - A)
    >>> result = rgd(problem, M.random_point(key=1), min_grad_norm=1e-10)
    >>> result.stop_reason, result.cost < 1e-18
    ('min_grad_norm', True)
    """
    rules = stopping(max_iter, min_grad_norm, min_step, max_time)
    opts = armijo_options(armijo, shrink, max_backtracks)
    alpha0 = check_step0(step0)
    M, at = check_start(problem, x0)
    monitor = Monitor("rgd", rules, progress)
    try:
        x, f, g = x0, at.cost, at.rgrad
        gn = host_float(M.norm(x, g))
        monitor.record(0, f, gn, float("nan"), x.ranks)
        it, step_len = 0, None
        while (reason := monitor.check(it, gn, step_len)) is None:
            step = backtrack(problem, M, x, f, -g, -(gn**2), alpha0, opts)
            if step.point is None:
                reason = "line_search_failed"
                break
            it += 1
            step_len = step.alpha * gn
            x = step.point
            at = problem.evaluate(M, x)
            f_old, gn_old = f, gn
            f, g = at.cost, at.rgrad
            gn = host_float(M.norm(x, g))
            monitor.record(
                it, f, gn, step_len, x.ranks, alpha=step.alpha, backtracks=step.backtracks
            )
            alpha0 = next_alpha(step, f_old, -(gn_old**2), gn_old, -(gn**2), gn)
        return monitor.finish(x, f, gn, it, reason)
    finally:
        monitor.close()
