"""Armijo backtracking along a tangent direction (shared by RGD and RCG)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tuckerman.solvers._result import in_open_unit_interval, positive_float, positive_int


class Armijo(NamedTuple):
    c: float
    shrink: float
    max_backtracks: int


def armijo_options(armijo: Any, shrink: Any, max_backtracks: Any) -> Armijo:
    return Armijo(
        in_open_unit_interval(armijo, "armijo"),
        in_open_unit_interval(shrink, "shrink"),
        positive_int(max_backtracks, "max_backtracks"),
    )


class Step(NamedTuple):
    point: Any  # None when the search failed
    cost: float
    alpha: float
    backtracks: int


def backtrack(
    problem: Any,
    M: Any,
    x: Any,
    f0: float,
    d: Any,
    slope: float,
    alpha: float,
    opts: Armijo,
    *,
    refine: bool = False,
) -> Step:
    """First ``alpha · shrink^j`` with ``f(R_x(alpha d)) <= f0 + c · alpha · slope``.

    ``slope = <grad f(x), d>`` must be negative. The decrease must also be strict in floating
    point (``f < f0``: a step below the rounding level of ``f`` fails), and non-finite trial
    costs count as failures.
    With ``refine``, a first trial that is accepted is compared with the minimizer of the
    quadratic through ``f0``, ``slope`` and the trial (one more cost evaluation when the two
    differ by more than 20%); the lower cost that satisfies the Armijo condition wins.
    """
    for j in range(opts.max_backtracks + 1):
        y = M.retract(x, d * alpha)
        fy = problem.cost_value(y)
        if math.isfinite(fy) and fy <= f0 + opts.c * alpha * slope and fy < f0:
            if refine and j == 0:
                return _refine(problem, M, x, f0, d, slope, Step(y, fy, alpha, 0), opts)
            return Step(y, fy, alpha, j)
        alpha *= opts.shrink
    return Step(None, f0, alpha, opts.max_backtracks)


def _refine(problem: Any, M: Any, x: Any, f0: float, d: Any, slope: float, step: Step, opts):
    excess = step.cost - f0 - step.alpha * slope
    if not excess > 0:
        return step
    alpha_q = -slope * step.alpha**2 / (2.0 * excess)
    if 0.8 <= alpha_q / step.alpha <= 1.25 or not math.isfinite(alpha_q):
        return step
    y = M.retract(x, d * alpha_q)
    fy = problem.cost_value(y)
    if math.isfinite(fy) and fy < step.cost and fy <= f0 + opts.c * alpha_q * slope:
        return Step(y, fy, alpha_q, 0)
    return step


def next_alpha(
    step: Step, f0: float, slope: float, dnorm: float, slope_next: float, dnorm_next: float
) -> float:
    """First trial step for the next search, from the curvature seen along the accepted step.

    The quadratic through ``f0``, ``slope`` and ``f(alpha)`` has curvature
    ``c = 2 (f(alpha) - f0 - alpha slope) / (alpha ‖d‖)²`` per unit length²; its minimizer along
    the next direction is ``-slope_next / (c ‖d_next‖²)``. The step length may at most grow
    fourfold; without positive curvature it doubles.
    """
    length = step.alpha * dnorm
    if not (dnorm_next > 0 and length > 0):
        return step.alpha
    growth = 4.0 * length / dnorm_next
    curvature = 2.0 * (step.cost - f0 - step.alpha * slope) / length**2
    if curvature > 0 and math.isfinite(curvature):
        return min(-slope_next / (curvature * dnorm_next**2), growth)
    return 0.5 * growth


def check_step0(step0: Any) -> float:
    return positive_float(step0, "step0")  # type: ignore[return-value]
