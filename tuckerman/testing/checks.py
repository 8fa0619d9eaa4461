"""Conformance checks for manifolds with the :class:`~tuckerman.FixedRankTucker` API.

Each check raises ``AssertionError`` with the measured numbers when a property fails, and
returns ``None`` otherwise, so they can be called from any test runner. They need only the
manifold methods (``project``, ``retract``, ``transport``, ``inner``, ``norm``,
``tangent_to_dense``, ``random_tangent``, ``check_point``, ``check_tangent``, ``egrad_to_rgrad``,
``ehess_to_rhess``) and compare against dense computations, so they suit small sizes.

Tolerances default to multiples of the dtype's machine epsilon.

Examples
--------
>>> import tuckerman as tm
>>> from tuckerman.testing import checks
>>> M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))
>>> x = M.random_point(key=0)
>>> checks.check_manifold(M, x, key=1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tuckerman.backends as backends
from tuckerman._compat import namespace_of
from tuckerman._kernels import _mp, _unfold
from tuckerman._manifold import core_condition
from tuckerman._tucker import TuckerTensor

__all__ = [
    "default_rtol",
    "check_projection",
    "check_inner",
    "check_retraction",
    "check_transport",
    "check_gauge_invariance",
    "check_gradient",
    "check_hessian",
    "check_manifold",
    "loglog_slope",
]


# --------------------------------------------------------------------------- helpers
def _eps(x: TuckerTensor) -> float:
    return float(x._namespace().finfo(x.dtype).eps)


def default_rtol(x: TuckerTensor) -> float:
    """Default relative tolerance for dense comparisons at point ``x``: ``1000 * eps(dtype)``."""
    return 1e3 * _eps(x)


def _factor_rtol(x: TuckerTensor, rtol: float) -> float:
    """Tolerance for quantities computed from the factor form (inner products in the gauge),
    whose error grows like ``eps * cond(core)``."""
    return rtol * core_condition(x)


def _host(a: Any) -> np.ndarray:
    return backends.to_numpy(a).astype(np.float64)


def _rel(a: Any, b: Any) -> float:
    a, b = _host(a), _host(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def _fail(what: str, **numbers: Any) -> AssertionError:
    details = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
    )
    return AssertionError(f"{what} ({details})")


def _default_ts(x: TuckerTensor) -> np.ndarray:
    """Step sizes for slope tests, scaled by the smallest singular value of the core's
    unfoldings: the manifold's curvature radius at ``x``, where second-order terms take over."""
    xp = x._namespace()
    smin = min(float(_host(xp.linalg.svdvals(_unfold(xp, x.core, k)))[-1]) for k in range(x.ndim))
    base = np.logspace(-1, -4, 7) if _eps(x) < 1e-10 else np.logspace(-1, -2.5, 6)
    return smin * base


def loglog_slope(ts: Sequence[float], errors: Sequence[float], floor: float = 0.0) -> float:
    """Observed order of ``error(t)``: the median of the log-log slopes between consecutive
    step sizes, over errors above ``floor``.

    The median ignores the pre-asymptotic large steps and the noisy smallest ones. Returns
    ``inf`` when fewer than three errors are above the floor (the error is at noise level,
    which passes any slope test).

    Examples
    --------
    >>> from tuckerman.testing.checks import loglog_slope
    >>> round(loglog_slope([1e-1, 1e-2, 1e-3], [1e-2, 1e-4, 1e-6]), 6)
    2.0
    """
    pairs = [(t, e) for t, e in zip(ts, errors) if e > floor]
    if len(pairs) < 3:
        return math.inf
    lt = np.log([p[0] for p in pairs])
    le = np.log([p[1] for p in pairs])
    return float(np.median(np.diff(le) / np.diff(lt)))


# --------------------------------------------------------------------------- checks
def check_projection(manifold: Any, x: Any, z: Any, *, key: Any = 0, rtol: float | None = None):
    """Projection: lands in the gauge, is idempotent, fixes tangent vectors and leaves a
    residual ``z - P z`` orthogonal to the tangent space."""
    rtol = default_rtol(x) if rtol is None else rtol
    v = manifold.project(x, z)
    ok, reason = manifold.check_tangent(x, v, explain=True)
    if not ok:
        raise AssertionError(f"projection is not a tangent vector: {reason}")
    vd = manifold.tangent_to_dense(x, v)
    err = _rel(manifold.tangent_to_dense(x, manifold.project(x, vd)), vd)
    if not err <= rtol:
        raise _fail("projection is not idempotent: ||P(Pz) - Pz|| / ||Pz||", error=err, rtol=rtol)
    w = manifold.random_tangent(x, key=key)
    wd = manifold.tangent_to_dense(x, w)
    err = _rel(manifold.tangent_to_dense(x, manifold.project(x, wd)), wd)
    if not err <= rtol:
        raise _fail("projection does not fix tangent vectors: ||P w - w|| / ||w||", error=err)
    resid = _host(z) - _host(vd)
    cos = abs(float(np.sum(resid * _host(wd)))) / max(
        np.linalg.norm(_host(z)) * np.linalg.norm(_host(wd)), np.finfo(np.float64).tiny
    )
    if not cos <= rtol:
        raise _fail("residual z - Pz is not orthogonal to the tangent space", cosine=cos, rtol=rtol)


def check_inner(manifold: Any, x: Any, u: Any, v: Any, *, rtol: float | None = None):
    """Inner product: symmetric, equal to the dense Frobenius product, consistent with ``norm``.

    The default tolerance is ``1000 eps cond(core)``: the gauge formula works on the factors."""
    rtol = _factor_rtol(x, default_rtol(x)) if rtol is None else rtol
    uv = float(_host(manifold.inner(x, u, v)))
    vu = float(_host(manifold.inner(x, v, u)))
    ud, vd = _host(manifold.tangent_to_dense(x, u)), _host(manifold.tangent_to_dense(x, v))
    scale = max(np.linalg.norm(ud) * np.linalg.norm(vd), np.finfo(np.float64).tiny)
    if not abs(uv - vu) <= rtol * scale:
        raise _fail("inner product is not symmetric", uv=uv, vu=vu)
    dense = float(np.sum(ud * vd))
    if not abs(uv - dense) <= rtol * scale:
        raise _fail("inner product differs from the dense Frobenius product", inner=uv, dense=dense)
    nv = float(_host(manifold.norm(x, v)))
    nd = float(np.linalg.norm(vd))
    if not abs(nv - nd) <= rtol * max(nd, 1e-300):
        raise _fail("norm differs from the dense Frobenius norm", norm=nv, dense=nd)


def check_retraction(
    manifold: Any,
    x: Any,
    v: Any,
    *,
    ts: Sequence[float] | None = None,
    rtol: float | None = None,
    min_slope: float = 1.9,
):
    """Retraction: identity at zero, lands on the manifold, first-order agreement.

    The error ``||R_x(t v) - x - t v||`` must decay with log-log slope >= ``min_slope``
    (2 for a retraction) over the step sizes ``ts``.
    """
    rtol = default_rtol(x) if rtol is None else rtol
    ts = [float(t) for t in (_default_ts(x) if ts is None else ts)]
    xd = _host(x.to_dense())
    y0 = manifold.retract(x, 0.0 * v)
    err = _rel(y0.to_dense(), xd)
    if not err <= rtol:
        raise _fail("retraction at zero is not the identity", error=err, rtol=rtol)
    vd = _host(manifold.tangent_to_dense(x, v))
    vn = max(float(np.linalg.norm(vd)), float(np.finfo(np.float64).tiny))
    errors = []
    for t in ts:
        y = manifold.retract(x, float(t) * v)
        ok, reason = manifold.check_point(y, explain=True)
        if not ok:
            raise AssertionError(f"retraction with step t={t:g} left the manifold: {reason}")
        errors.append(float(np.linalg.norm(_host(y.to_dense()) - xd - t * vd)) / vn)
    floor = 100 * _eps(x) * (float(np.linalg.norm(xd)) + vn) / vn
    slope = loglog_slope(ts, errors, floor)
    if not slope >= min_slope:
        raise _fail(
            "retraction does not agree with x + t v to first order",
            slope=slope,
            min_slope=min_slope,
            errors=[f"{e:.2e}" for e in errors],
        )


def check_transport(manifold: Any, x: Any, y: Any, v: Any, *, rtol: float | None = None):
    """Transport lands in ``T_y`` and equals the projection of (dense) ``v`` onto ``T_y``."""
    rtol = default_rtol(x) if rtol is None else rtol
    w = manifold.transport(x, y, v)
    ok, reason = manifold.check_tangent(y, w, explain=True)
    if not ok:
        raise AssertionError(f"transported vector is not tangent at y: {reason}")
    ref = manifold.tangent_to_dense(y, manifold.project(y, manifold.tangent_to_dense(x, v)))
    err = _rel(manifold.tangent_to_dense(y, w), ref)
    if not err <= rtol:
        raise _fail("transport differs from the projection of v onto T_y", error=err, rtol=rtol)


def _random_orthogonal(xp: Any, r: int, rng: np.random.Generator, like: Any) -> Any:
    q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    kwargs = {"device": x_device} if (x_device := _device(like)) is not None else {}
    return xp.asarray(q, dtype=like.dtype, **kwargs)


def _device(a: Any) -> Any:
    from tuckerman._compat import _device_or_none

    return _device_or_none(a)


def check_gauge_invariance(
    manifold: Any, x: Any, z: Any, *, key: int = 0, rtol: float | None = None, step: float = 0.1
):
    """Invariance under the Tucker gauge ``U_k -> U_k Q_k``, ``C -> C ×_k Q_kᵀ``.

    The dense point, the dense projection of ``z``, the norm of the projection and the dense
    retraction along it must not depend on the representative.
    """
    rtol = default_rtol(x) if rtol is None else rtol
    xp = namespace_of(x.core)
    rng = np.random.default_rng(key)
    qs = [_random_orthogonal(xp, r, rng, x.core) for r in x.ranks]
    core = x.core
    for k, q in enumerate(qs):
        core = _mp(xp, core, q.mT, k)
    x2 = TuckerTensor(core, [u @ q for u, q in zip(x.factors, qs)])
    # the rotated core is no longer all-orthogonal: factor-form errors grow like eps cond(core)
    rtol = _factor_rtol(x, rtol)
    err = _rel(x2.to_dense(), x.to_dense())
    if not err <= rtol:
        raise _fail("re-gauged point differs densely", error=err)
    v1, v2 = manifold.project(x, z), manifold.project(x2, z)
    err = _rel(manifold.tangent_to_dense(x2, v2), manifold.tangent_to_dense(x, v1))
    if not err <= rtol:
        raise _fail("projection depends on the gauge", error=err, rtol=rtol)
    n1, n2 = float(_host(manifold.norm(x, v1))), float(_host(manifold.norm(x2, v2)))
    if not abs(n1 - n2) <= rtol * max(n1, 1e-300):
        raise _fail("norm depends on the gauge", norm=n1, norm_regauged=n2)
    y1, y2 = manifold.retract(x, step * v1), manifold.retract(x2, step * v2)
    err = _rel(y2.to_dense(), y1.to_dense())
    if not err <= rtol:
        raise _fail("retraction depends on the gauge", error=err, rtol=rtol)


def check_gradient(
    manifold: Any,
    cost: Callable[[Any], Any],
    egrad: Callable[[Any], Any],
    x: Any,
    v: Any = None,
    *,
    key: Any = 0,
    ts: Sequence[float] | None = None,
    min_slope: float = 1.9,
):
    """Finite-difference test of a Riemannian gradient obtained from ``egrad``.

    ``cost(y)`` returns a scalar for a point ``y``; ``egrad(y)`` the Euclidean gradient (dense
    array or TuckerTensor). The residual ``|f(R_x(t v)) - f(x) - t <grad f(x), v>|`` must fall
    with log-log slope >= ``min_slope`` (2 for a correct gradient).
    """
    v = manifold.random_tangent(x, key=key) if v is None else v
    ts = [float(t) for t in (_default_ts(x) if ts is None else ts)]
    g = manifold.egrad_to_rgrad(x, egrad(x))
    ok, reason = manifold.check_tangent(x, g, explain=True)
    if not ok:
        raise AssertionError(f"the Riemannian gradient is not a tangent vector: {reason}")
    f0 = float(_host(cost(x)))
    slope0 = float(_host(manifold.inner(x, g, v)))
    residuals = [
        abs(float(_host(cost(manifold.retract(x, float(t) * v)))) - f0 - t * slope0) for t in ts
    ]
    floor = 100 * _eps(x) * max(abs(f0), 1.0)
    slope = loglog_slope(ts, residuals, floor)
    if not slope >= min_slope:
        raise _fail(
            "gradient check failed: the first-order model is not accurate to second order",
            slope=slope,
            residuals=[f"{r:.2e}" for r in residuals],
        )


def check_hessian(
    manifold: Any,
    egrad: Callable[[Any], Any],
    ehess: Callable[[Any, Any], Any],
    x: Any,
    v: Any = None,
    *,
    key: Any = 0,
    ts: Sequence[float] | None = None,
    rtol: float | None = None,
    min_slope: float = 1.9,
):
    """Finite-difference test of ``ehess_to_rhess``.

    ``egrad(y)`` gives the Euclidean gradient at a point, ``ehess(y, d)`` the Euclidean Hessian
    at ``y`` applied to a dense direction ``d``. Checks that the Riemannian Hessian is tangent,
    linear and symmetric, and that ``P_x[(grad f(R_x(t v)) - grad f(R_x(-t v))) / 2t]``
    converges to it with log-log slope >= ``min_slope`` (2 for a symmetric difference).
    """
    rtol = default_rtol(x) if rtol is None else rtol
    v = manifold.random_tangent(x, key=key) if v is None else v
    w = manifold.random_tangent(x, key=(key + 1) if isinstance(key, int) else None)
    ts = [float(t) for t in (_default_ts(x) if ts is None else ts)]
    gx = egrad(x)

    def hess(u: Any) -> Any:
        return manifold.ehess_to_rhess(x, gx, ehess(x, manifold.tangent_to_dense(x, u)), u)

    hv, hw = hess(v), hess(w)
    ok, reason = manifold.check_tangent(x, hv, explain=True)
    if not ok:
        raise AssertionError(f"the Riemannian Hessian is not a tangent vector: {reason}")
    hvd = _host(manifold.tangent_to_dense(x, hv))
    hn = max(float(np.linalg.norm(hvd)), float(np.finfo(np.float64).tiny))
    err = _rel(
        manifold.tangent_to_dense(x, hess(2.0 * v + w)),
        2.0 * hvd + _host(manifold.tangent_to_dense(x, hw)),
    )
    if not err <= rtol:
        raise _fail("the Riemannian Hessian is not linear", error=err, rtol=rtol)
    a = float(_host(manifold.inner(x, hv, w)))
    b = float(_host(manifold.inner(x, v, hw)))
    scale = max(hn, float(np.linalg.norm(_host(manifold.tangent_to_dense(x, hw)))))
    if not abs(a - b) <= 10 * rtol * scale:
        raise _fail("the Riemannian Hessian is not symmetric", hv_w=a, v_hw=b)

    def rgrad_dense(y: Any) -> np.ndarray:
        return _host(manifold.tangent_to_dense(y, manifold.egrad_to_rgrad(y, egrad(y))))

    xp = namespace_of(x.core)
    errors = []
    for t in ts:
        diff = rgrad_dense(manifold.retract(x, t * v)) - rgrad_dense(manifold.retract(x, -t * v))
        fd = xp.asarray(diff / (2 * t), dtype=x.dtype, **_device_kwargs(x))
        errors.append(_rel(manifold.tangent_to_dense(x, manifold.project(x, fd)), hvd))
    slope = loglog_slope(ts, errors, floor=100 * rtol)
    if not slope >= min_slope:
        raise _fail(
            "Hessian check failed: finite differences of the Riemannian gradient do not converge "
            "to ehess_to_rhess at second order",
            slope=slope,
            errors=[f"{e:.2e}" for e in errors],
        )


def _device_kwargs(x: TuckerTensor) -> dict:
    d = _device(x.core)
    return {} if d is None else {"device": d}


def check_manifold(manifold: Any, x: Any, *, key: int = 0, rtol: float | None = None) -> None:
    """Run every structural check above at ``x`` with random data drawn from ``key``.

    Covers projection, inner product, retraction, transport and gauge invariance (gradient and
    Hessian checks need a cost function: call :func:`check_gradient` / :func:`check_hessian`).
    """
    ok, reason = manifold.check_point(x, explain=True)
    if not ok:
        raise AssertionError(f"x is not a point of {manifold}: {reason}")
    xp = namespace_of(x.core)
    z = backends.normal(xp, manifold.shape, key=key, dtype=x.dtype, device=_device(x.core))
    check_projection(manifold, x, z, key=key + 1, rtol=rtol)
    u = manifold.random_tangent(x, key=key + 2)
    v = manifold.random_tangent(x, key=key + 3)
    check_inner(manifold, x, u, v, rtol=rtol)
    check_retraction(manifold, x, v, rtol=rtol)
    y = manifold.retract(x, 0.1 * u)
    check_transport(manifold, x, y, v, rtol=rtol)
    check_gauge_invariance(manifold, x, z, key=key + 4, rtol=rtol)
