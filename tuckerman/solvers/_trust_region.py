"""Riemannian trust-region method with the truncated conjugate-gradient (Steihaug–Toint) inner
solver (Absil, Baker & Gallivan 2007; the structure of Manopt's ``trustregions``)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tuckerman._tucker import TuckerTensor
from tuckerman.solvers._problem import Problem, check_start
from tuckerman.solvers._result import (
    Monitor,
    Result,
    host_float,
    in_open_unit_interval,
    positive_float,
    positive_int,
    stopping,
)

__all__ = ["trust_region"]


class _Inner(NamedTuple):
    eta: Any
    heta: Any
    iterations: int
    stop: str  # "negative_curvature", "boundary", "residual", "max_inner", "model_increase"
    at_boundary: bool


def _tcg(M, x, g, gn, hess, radius, kappa, theta, max_inner) -> _Inner:
    """Truncated CG on the model ``m(η) = <g, η> + <η, Hη>/2`` inside ``‖η‖ <= radius``."""
    eta = g * 0.0
    heta = eta
    if not gn > 0:
        return _Inner(eta, heta, 0, "residual", False)
    r, r_r = g, gn**2
    delta = -r
    e_pe, e_pd, d_pd = 0.0, 0.0, r_r
    norm_r0 = gn
    model = 0.0
    r2 = radius**2
    for j in range(1, max_inner + 1):
        hd = hess(delta)
        d_hd = host_float(M.inner(x, delta, hd))
        alpha = r_r / d_hd if d_hd != 0.0 else math.inf
        e_pe_new = e_pe + 2.0 * alpha * e_pd + alpha**2 * d_pd
        if not d_hd > 0 or e_pe_new >= r2 or not math.isfinite(e_pe_new):
            # go to the boundary along delta
            tau = (-e_pd + math.sqrt(max(e_pd**2 + d_pd * (r2 - e_pe), 0.0))) / d_pd
            stop = "negative_curvature" if not d_hd > 0 else "boundary"
            return _Inner(eta + delta * tau, heta + hd * tau, j, stop, True)
        new_eta = eta + delta * alpha
        new_heta = heta + hd * alpha
        new_model = host_float(M.inner(x, new_eta, g)) + 0.5 * host_float(
            M.inner(x, new_eta, new_heta)
        )
        if new_model >= model:  # rounding errors: keep the last model decrease
            return _Inner(eta, heta, j, "model_increase", False)
        eta, heta, model, e_pe = new_eta, new_heta, new_model, e_pe_new
        r = r + hd * alpha
        r_r_new = host_float(M.inner(x, r, r))
        norm_r = math.sqrt(max(r_r_new, 0.0))
        if norm_r <= norm_r0 * min(norm_r0**theta, kappa):
            return _Inner(eta, heta, j, "residual", False)
        b = r_r_new / r_r
        r_r = r_r_new
        delta = -r + delta * b
        e_pd = b * (e_pd + alpha * d_pd)
        d_pd = r_r + b**2 * d_pd
    return _Inner(eta, heta, max_inner, "max_inner", False)


def trust_region(
    problem: Problem,
    x0: TuckerTensor,
    *,
    radius0: float | None = None,
    max_radius: float | None = None,
    max_inner: int | None = None,
    kappa: float = 0.1,
    theta: float = 1.0,
    rho_prime: float = 0.1,
    max_iter: int = 200,
    min_grad_norm: float | None = 1e-6,
    min_step: float | None = 1e-10,
    max_time: float | None = None,
    progress: bool = False,
) -> Result:
    """Riemannian trust-region method (RTR) with a truncated-CG inner solver.

    Each iteration approximately minimizes the model
    ``m(η) = f(x) + <grad f, η> + <η, Hess f(x)[η]>/2`` over ``‖η‖ <= radius`` by truncated
    conjugate gradients (Steihaug–Toint: stops at the boundary, on negative curvature, or when
    the residual falls below ``‖g‖ min(‖g‖^theta, kappa)``), then accepts ``R_x(η)`` when the
    ratio ``rho`` of actual to predicted decrease exceeds ``rho_prime``. The radius shrinks by 4
    when ``rho < 1/4`` and doubles (up to ``max_radius``) when ``rho > 3/4`` and the step hit
    the boundary. Near a nondegenerate minimum the convergence is superlinear (quadratic with
    ``theta = 1`` and an exact Hessian).

    The Hessian comes from the problem's ``ehess`` through ``M.ehess_to_rhess``; without
    ``ehess`` (and always with ``autodiff``) it is approximated by finite differences of the
    Riemannian gradient (:meth:`Problem.rhess <tuckerman.solvers.Problem.rhess>`), one gradient
    evaluation per inner iteration.

    Parameters
    ----------
    problem : Problem
        Cost, gradient and optionally the Euclidean Hessian.
    x0 : TuckerTensor
        Starting point on the problem's manifold.
    radius0 : float, optional
        Initial trust-region radius (default ``max_radius / 8``).
    max_radius : float, optional
        Largest radius (default ``‖x0‖_F``, the scale of the manifold at ``x0``, which is a cone).
    max_inner : int, optional
        Most inner (tCG) iterations per step (default: the manifold dimension).
    kappa, theta : float, optional
        Inner stopping rule ``‖r‖ <= ‖r_0‖ min(‖r_0‖^theta, kappa)``.
    rho_prime : float, optional
        Acceptance threshold in (0, 1/4).
    max_iter, min_grad_norm, min_step, max_time, progress
        As in :func:`~tuckerman.solvers.rgd`; ``max_iter`` counts attempted steps, and
        ``min_step`` compares the length of the last (accepted or rejected) step.

    Returns
    -------
    Result
        ``log[k].extra`` holds ``radius`` (after the update), ``rho``, ``accepted``, ``inner``
        (tCG iterations) and ``inner_stop`` (``"residual"``, ``"boundary"``,
        ``"negative_curvature"``, ``"model_increase"`` or ``"max_inner"``).

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman.solvers import Problem, trust_region
    >>> M = tm.FixedRankTucker((10, 10, 10), 3)
    >>> A = M.random_point(key=0).to_dense()
    >>> problem = Problem(M, lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2),
    ...                   egrad=lambda x: x.to_dense() - A, ehess=lambda x, d: d)
    >>> result = trust_region(problem, M.random_point(key=1), min_grad_norm=1e-10)
    >>> result.stop_reason, result.cost < 1e-18
    ('min_grad_norm', True)
    """
    rules = stopping(max_iter, min_grad_norm, min_step, max_time)
    radius0 = positive_float(radius0, "radius0", allow_none=True)
    max_radius = positive_float(max_radius, "max_radius", allow_none=True)
    kappa = in_open_unit_interval(kappa, "kappa")
    theta = positive_float(theta, "theta")  # type: ignore[assignment]
    rho_prime = in_open_unit_interval(rho_prime, "rho_prime")
    if rho_prime >= 0.25:
        raise ValueError(f"rho_prime must lie in (0, 1/4), got {rho_prime}")
    if max_inner is not None:
        max_inner = positive_int(max_inner, "max_inner")
    M, at = check_start(problem, x0)
    xp = x0._namespace()
    if max_radius is None:
        max_radius = max(host_float(xp.linalg.vector_norm(x0.core)), 1e-300)
    if radius0 is None:
        radius0 = max_radius / 8.0
    elif radius0 > max_radius:
        raise ValueError(f"radius0 = {radius0} exceeds max_radius = {max_radius}")
    if max_inner is None:
        max_inner = int(getattr(M, "dim", 1000))
    eps = float(xp.finfo(x0.dtype).eps)
    monitor = Monitor("trust_region", rules, progress)
    try:
        x, f, g = x0, at.cost, at.rgrad
        gn = host_float(M.norm(x, g))
        radius = radius0
        monitor.record(0, f, gn, float("nan"), x.ranks, radius=radius)
        it, step_len = 0, None
        while (reason := monitor.check(it, gn, step_len)) is None:
            here = at

            def hess(v: Any, x: Any = x, here: Any = here) -> Any:
                return problem.hess(M, x, v, here)

            inner = _tcg(M, x, g, gn, hess, radius, kappa, theta, max_inner)
            eta = inner.eta
            step_len = host_float(M.norm(x, eta))
            x_new = M.retract(x, eta)
            f_new = problem.cost_value(x_new)
            predicted = -(
                host_float(M.inner(x, g, eta)) + 0.5 * host_float(M.inner(x, eta, inner.heta))
            )
            reg = max(1.0, abs(f)) * eps * 1e3  # Manopt's rho regularization
            rho = (f - f_new + reg) / (predicted + reg)
            decreased = predicted >= 0 and math.isfinite(f_new)
            if not decreased or not rho >= 0.25:
                radius /= 4.0
            elif rho > 0.75 and inner.at_boundary:
                radius = min(2.0 * radius, max_radius)
            accepted = decreased and rho > rho_prime
            it += 1
            if accepted:
                x = x_new
                at = problem.evaluate(M, x)
                f, g = at.cost, at.rgrad
                gn = host_float(M.norm(x, g))
            monitor.record(
                it,
                f,
                gn,
                step_len,
                x.ranks,
                radius=radius,
                rho=rho,
                accepted=accepted,
                inner=inner.iterations,
                inner_stop=inner.stop,
            )
        return monitor.finish(x, f, gn, it, reason)
    finally:
        monitor.close()
