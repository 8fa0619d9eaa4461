"""Riemannian nonlinear conjugate gradients with vector transport and restarts."""

from __future__ import annotations

import math
from typing import Any

from tuckerman._tucker import TuckerTensor
from tuckerman.solvers._linesearch import armijo_options, backtrack, check_step0, next_alpha
from tuckerman.solvers._problem import Problem, check_start
from tuckerman.solvers._result import Monitor, Result, host_float, positive_int, stopping

__all__ = ["rcg", "BETA_RULES"]

#: The β rules of :func:`rcg`.
BETA_RULES = ("HS-DY", "HZ", "PR+", "FR")


def _beta(rule: str, M: Any, x: Any, g: Any, gn: float, g_old_t: Any, gn_old: float, d_t: Any):
    """β for the new gradient ``g`` at ``x``, from the transported old gradient and direction."""
    inner = M.inner
    if rule == "FR":
        return gn**2 / gn_old**2
    y = g - g_old_t
    if rule == "PR+":
        return max(0.0, host_float(inner(x, g, y)) / gn_old**2)
    dy = host_float(inner(x, d_t, y))
    if not dy != 0.0 or not math.isfinite(dy):
        return 0.0
    if rule == "HS-DY":
        hs = host_float(inner(x, g, y)) / dy
        dy_ = gn**2 / dy
        return max(0.0, min(hs, dy_))
    # Hager-Zhang (2005) with its lower bound eta_k = -1 / (||d|| min(eta, ||g_old||)), eta = 0.01
    yy = host_float(inner(x, y, y))
    beta = (host_float(inner(x, g, y)) - 2.0 * yy * host_float(inner(x, g, d_t)) / dy) / dy
    dn = host_float(M.norm(x, d_t))
    lower = -1.0 / (dn * min(0.01, gn_old)) if dn > 0 else -math.inf
    return max(beta, lower)


def rcg(
    problem: Problem,
    x0: TuckerTensor,
    *,
    beta: str = "HS-DY",
    restart_every: int | None = None,
    refine: bool = True,
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
    """Riemannian nonlinear conjugate gradients with Armijo backtracking.

    Directions ``d_{k+1} = -grad f(x_{k+1}) + β_k T(d_k)``, where ``T`` is the vector transport
    (projection onto the new tangent space). The direction restarts at ``-grad f`` when it is
    not a descent direction, every ``restart_every`` iterations, and when the line search
    fails along a conjugate direction (the solver stops with ``"line_search_failed"`` only when
    it fails along ``-grad f`` too). The first trial step is ``step0``, then the minimizer along
    the new direction of the quadratic fitted to the last accepted step (its curvature), so that
    the searches are nearly exact on quadratic costs.

    Parameters
    ----------
    problem : Problem
        Cost and gradient.
    x0 : TuckerTensor
        Starting point on the problem's manifold.
    beta : {"HS-DY", "HZ", "PR+", "FR"}, optional
        The β rule, with ``y = g_{k+1} - T g_k`` and ``T`` the transport: ``"HS-DY"`` the
        hybrid ``max(0, min(β_HS, β_DY))`` of Hestenes–Stiefel and Dai–Yuan (default),
        ``"HZ"`` Hager–Zhang with its lower bound, ``"PR+"`` Polak–Ribière clipped at 0,
        ``"FR"`` Fletcher–Reeves (poor without a strong Wolfe line search).
    restart_every : int or None, optional
        Restart along ``-grad f`` every so many iterations (None: only when needed).
    refine : bool, optional
        When the first trial step satisfies the Armijo condition, also try the minimizer of the
        quadratic through the cost at 0 and at the trial and the slope at 0, when they differ by
        more than 20% (one more cost evaluation), and keep the lower cost. Near-exact line
        searches keep the directions conjugate; ``refine=False`` is plain backtracking.
    max_iter, min_grad_norm, min_step, max_time, step0, armijo, shrink, max_backtracks, progress
        As in :func:`~tuckerman.solvers.rgd`.

    Returns
    -------
    Result
        ``log[k].extra`` holds ``alpha``, ``backtracks``, ``beta`` (used for the direction of
        the next step) and ``restart`` (whether the step just taken was along ``-grad f``).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import Problem, rcg
    >>> M = tm.FixedRankTucker((10, 10, 10), 3)
    >>> A = M.random_point(key=0).to_dense()
    >>> problem = Problem(M, lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2),
    ...                   egrad=lambda x: x.to_dense() - A)
    >>> result = rcg(problem, M.random_point(key=1), min_grad_norm=1e-10)
    >>> result.stop_reason, result.cost < 1e-18
    ('min_grad_norm', True)
    """
    if beta not in BETA_RULES:
        raise ValueError(f"beta must be one of {BETA_RULES}, got {beta!r}")
    if not isinstance(refine, bool):
        raise TypeError(f"refine must be a bool, got {refine!r}")
    if restart_every is not None:
        restart_every = positive_int(restart_every, "restart_every")
    rules = stopping(max_iter, min_grad_norm, min_step, max_time)
    opts = armijo_options(armijo, shrink, max_backtracks)
    step0 = check_step0(step0)
    M, at = check_start(problem, x0)
    monitor = Monitor("rcg", rules, progress)
    try:
        x, f, g = x0, at.cost, at.rgrad
        gn = host_float(M.norm(x, g))
        monitor.record(0, f, gn, float("nan"), x.ranks)
        d, slope, is_gradient = -g, -(gn**2), True
        alpha0, since_restart = step0, 0
        it, step_len = 0, None
        while (reason := monitor.check(it, gn, step_len)) is None:
            step = backtrack(problem, M, x, f, d, slope, alpha0, opts, refine=refine)
            if step.point is None and not is_gradient:  # restart along -grad f
                d, slope, is_gradient = -g, -(gn**2), True
                step = backtrack(problem, M, x, f, d, slope, step0, opts, refine=refine)
            if step.point is None:
                reason = "line_search_failed"
                break
            it += 1
            since_restart = 0 if is_gradient else since_restart + 1
            y = step.point
            dnorm = gn if is_gradient else host_float(M.norm(x, d))
            step_len = step.alpha * dnorm
            at = problem.evaluate(M, y)
            g_new = at.rgrad
            gn_new = host_float(M.norm(y, g_new))
            d_t = M.transport(x, y, d)
            b = 0.0
            if gn_new > 0:
                b = _beta(beta, M, y, g_new, gn_new, M.transport(x, y, g), gn, d_t)
            due = restart_every is not None and since_restart + 1 >= restart_every
            took_gradient = is_gradient
            d_new = -g_new if (due or b == 0.0) else -g_new + d_t * b
            slope_new = -(gn_new**2) if (due or b == 0.0) else host_float(M.inner(y, g_new, d_new))
            is_gradient = due or b == 0.0
            if not slope_new < 0:  # not a descent direction
                d_new, slope_new, is_gradient, b = -g_new, -(gn_new**2), True, 0.0
            monitor.record(
                it,
                at.cost,
                gn_new,
                step_len,
                y.ranks,
                alpha=step.alpha,
                backtracks=step.backtracks,
                beta=b,
                restart=took_gradient,
            )
            dnorm_new = gn_new if is_gradient else host_float(M.norm(y, d_new))
            alpha0 = next_alpha(step, f, slope, dnorm, slope_new, dnorm_new)
            x, f, g, gn, d, slope = y, at.cost, g_new, gn_new, d_new, slope_new
        return monitor.finish(x, f, gn, it, reason)
    finally:
        monitor.close()
