"""Solvers (tuckerman.solvers): low-rank approximation on every backend and dtype, RCG against
RGD on an ill-conditioned instance, superlinear trust region, Armijo monotonicity, autodiff
gradients, stopping rules, the rank-adaptive solver and bad input."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from helpers import host, library_of, rel

import tuckerman as tm
from tuckerman._compat import namespace_from_name
from tuckerman.solvers import (
    LogEntry,
    Problem,
    Result,
    TuckerDomain,
    rank_adaptive,
    rcg,
    rgd,
    rgrad_from_factor_grads,
    trust_region,
)
from tuckerman.testing import conditioned_point

SOLVERS = {"rgd": rgd, "rcg": rcg, "trust_region": trust_region}
AUTODIFF = ("torch", "jax")


# --------------------------------------------------------------------------- helpers
def _small(backend) -> bool:
    """JAX runs op by op outside jit (slow on tiny arrays): smaller problems there."""
    return backend.library == "jax"


def _eps(dtype, xp) -> float:
    return float(xp.finfo(dtype).eps)


def _gtol(xp, dtype) -> float:
    """Gradient tolerance: 1e-4 in float32, 5e-9 in float64 (targets of norm 1)."""
    return 0.3 * math.sqrt(_eps(dtype, xp))


def _target(shape, ranks, *, seed=0, noise=0.0, decay=1.0):
    """A numpy float64 tensor of norm ~1: an exact rank-``ranks`` signal plus ``noise``."""
    M = tm.FixedRankTucker(shape, ranks)
    signal = conditioned_point(M, seed, decay=decay).to_dense()
    signal = signal / np.linalg.norm(signal)
    if noise:
        n = np.random.default_rng(seed + 100).standard_normal(shape)
        signal = signal + noise * n / np.linalg.norm(n)
    return signal


def _approximation(M, A, xp, *, weights=None, hessian=True):
    """f(X) = ||W^(1/2) (X - A)||² / 2 with diagonal weights W (1 when None)."""
    if weights is None:

        def cost(x):
            return 0.5 * xp.sum((x.to_dense() - A) ** 2)

        return Problem(
            M,
            cost,
            egrad=lambda x: x.to_dense() - A,
            ehess=(lambda x, d: d) if hessian else None,
        )
    return Problem(
        M,
        lambda x: 0.5 * xp.sum(weights * (x.to_dense() - A) ** 2),
        egrad=lambda x: weights * (x.to_dense() - A),
        ehess=(lambda x, d: weights * d.to_dense()) if hessian else None,
    )


def _check_result(result, x0, M, backend, dtype):
    assert isinstance(result, Result)
    assert library_of(result.point.core) == backend.library
    assert result.point.dtype == dtype
    assert M.check_point(result.point, explain=True) == (True, None)
    assert result.iterations == result.log[-1].iteration
    assert [e.iteration for e in result.log] == list(range(len(result.log)))
    assert result.cost == result.log[-1].cost and result.grad_norm == result.log[-1].grad_norm
    assert math.isnan(result.log[0].step_size)
    for e in result.log:
        assert isinstance(e, LogEntry)
        assert type(e.cost) is float and type(e.grad_norm) is float
        assert type(e.step_size) is float and type(e.time) is float
        assert e.ranks == M.ranks
    times = [e.time for e in result.log]
    assert times == sorted(times) and result.time >= times[-1]


# --------------------------------------------------------------------------- (1) solve
@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_recover_an_exact_low_rank_tensor(backend, dtype, xp, make, name):
    shape, ranks = ((8, 8, 8), (2, 2, 2)) if _small(backend) else ((10, 10, 10), (3, 3, 3))
    M = tm.FixedRankTucker(shape, ranks)
    A = make(_target(shape, ranks))
    x0 = M.random_point(key=1, xp=backend.library, dtype=dtype, device=backend.device)
    gtol = _gtol(xp, dtype)
    result = SOLVERS[name](_approximation(M, A, xp), x0, min_grad_norm=gtol, max_iter=200)
    _check_result(result, x0, M, backend, dtype)
    assert result.stop_reason == "min_grad_norm", result.log[-3:]
    assert result.grad_norm <= gtol
    assert result.cost <= gtol**2
    assert rel(result.point.to_dense(), host(A)) <= 10 * gtol
    print(f"\n{name} {backend.value} {dtype}: {result.iterations} iterations")


def _ill_conditioned(backend, dtype, make, *, kappa=100.0):
    """Weighted approximation f = ||W^(1/2)(X - A)||²/2 with weights from 1 down to 1/kappa
    along mode 0 and a noisy target: a Hessian with condition number ~ kappa."""
    shape, ranks = ((8, 8, 8), (2, 2, 2)) if _small(backend) else ((10, 10, 10), (3, 3, 3))
    M = tm.FixedRankTucker(shape, ranks)
    A = make(_target(shape, ranks, noise=0.05, decay=0.3))
    w = np.broadcast_to(np.logspace(0, -np.log10(kappa), shape[0])[:, None, None], shape).copy()
    return M, A, make(w)


def test_rcg_needs_fewer_iterations_than_rgd_when_ill_conditioned(backend, dtype, xp, make):
    M, A, w = _ill_conditioned(backend, dtype, make)
    problem = _approximation(M, A, xp, weights=w)
    x0 = M.random_point(key=2, xp=backend.library, dtype=dtype, device=backend.device)
    gtol = 1e-3 if _eps(dtype, xp) > 1e-10 else 1e-6
    cap = 150 if _small(backend) else 400
    cg = rcg(problem, x0, min_grad_norm=gtol, max_iter=cap)
    gd = rgd(problem, x0, min_grad_norm=gtol, max_iter=cap)
    print(
        f"\nill-conditioned {backend.value} {dtype}: rcg {cg.iterations} ({cg.stop_reason}), "
        f"rgd {gd.iterations} ({gd.stop_reason})"
    )
    assert cg.stop_reason == "min_grad_norm", cg.log[-3:]
    assert cg.iterations < gd.iterations


def test_trust_region_converges_superlinearly(backend, dtype, xp, make):
    """From the HOSVD start, a few Newton-like steps; the last contractions are far below the
    linear rate of gradient descent."""
    M, A, w = _ill_conditioned(backend, dtype, make, kappa=10.0)
    problem = _approximation(M, A, xp, weights=w)
    x0 = tm.hosvd(A, ranks=M.ranks)
    gtol = _gtol(xp, dtype)
    result = trust_region(problem, x0, min_grad_norm=gtol, max_iter=30)
    _check_result(result, x0, M, backend, dtype)
    norms = [e.grad_norm for e in result.log if e.extra.get("accepted", True)]
    print(
        f"\ntrust region {backend.value} {dtype}: {result.iterations} iterations, "
        f"gradient norms {[f'{g:.1e}' for g in norms]}"
    )
    assert result.stop_reason == "min_grad_norm"
    assert result.iterations <= 8
    # superlinear: g_{k+1} <= C g_k^1.5 on the last step above the noise floor
    g0, g1 = norms[-2], norms[-1]
    if g0 > 1e3 * gtol:
        assert g1 <= g0**1.5, norms
    gd = rgd(problem, x0, min_grad_norm=gtol, max_iter=result.iterations)
    assert gd.grad_norm > result.grad_norm


def test_trust_region_with_finite_difference_hessian(backend, dtype, xp, make):
    shape, ranks = (8, 8, 8), (2, 2, 2)
    M = tm.FixedRankTucker(shape, ranks)
    A = make(_target(shape, ranks, noise=0.05))
    problem = _approximation(M, A, xp, hessian=False)
    x0 = M.random_point(key=3, xp=backend.library, dtype=dtype, device=backend.device)
    gtol = 3 * _gtol(xp, dtype)
    result = trust_region(problem, x0, min_grad_norm=gtol, max_iter=60)
    assert result.stop_reason == "min_grad_norm", result.log[-3:]
    exact = trust_region(_approximation(M, A, xp), x0, min_grad_norm=gtol, max_iter=60)
    assert abs(result.cost - exact.cost) <= 1e-3 * exact.cost


# --------------------------------------------------------------------------- (2) Armijo
@pytest.mark.parametrize("name", ["rgd", "rcg"])
def test_armijo_line_search_decreases_monotonically(backend, dtype, xp, make, name):
    """A non-quadratic cost: ||X - A||²/2 + sum(X⁴)/4 (steps 1 are too long at first)."""
    shape, ranks = (8, 8, 8), (2, 2, 2)
    M = tm.FixedRankTucker(shape, ranks)
    A = make(3.0 * _target(shape, ranks, noise=0.2))
    problem = Problem(
        M,
        lambda x: 0.5 * xp.sum((x.to_dense() - A) ** 2) + 0.25 * xp.sum(x.to_dense() ** 4),
        egrad=lambda x: x.to_dense() - A + x.to_dense() ** 3,
    )
    x0 = M.random_point(key=4, xp=backend.library, dtype=dtype, device=backend.device)
    x0 = tm.scale(x0, 3.0)
    iters = 15 if _small(backend) else 40
    # step0 = 10 is far too long at first: the search must backtrack
    result = SOLVERS[name](problem, x0, max_iter=iters, min_grad_norm=None, step0=10.0)
    costs = [e.cost for e in result.log]
    assert all(b < a for a, b in zip(costs, costs[1:])), costs
    if name == "rgd":  # the Armijo condition itself, with the logged step
        for prev, e in zip(result.log, result.log[1:]):
            assert e.cost <= prev.cost - 1e-4 * e.extra["alpha"] * prev.grad_norm**2 * (1 - 1e-6)
    assert result.log[1].extra["backtracks"] > 0
    assert result.stop_reason in ("max_iter", "line_search_failed", "min_step")


# --------------------------------------------------------------------------- (3) autodiff
def _factor_grads(G, x):
    """∂f/∂C and ∂f/∂U_k of f(X) = <G, X> for a dense G (numpy float64)."""
    d = x.ndim
    U = [host(u) for u in x.factors]
    C = host(x.core)
    dcore = tm.multi_mode_product(G, U, transpose=True)
    dfactors = []
    for k in range(d):
        others = [j for j in range(d) if j != k]
        t = tm.multi_mode_product(G, [U[j] for j in others], others, transpose=True)
        dfactors.append(tm.unfold(t, k) @ tm.unfold(C, k).T)
    return dcore, dfactors


def test_rgrad_from_factor_grads_equals_projection(backend, dtype, xp, make, rtol):
    M = tm.FixedRankTucker((8, 8, 8), (2, 3, 2))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    G = np.random.default_rng(1).standard_normal(M.shape)
    dcore, dfactors = _factor_grads(G, x)
    g = rgrad_from_factor_grads(M, x, make(dcore), [make(f) for f in dfactors])
    assert isinstance(g, tm.TangentVector) and library_of(g.dcore) == backend.library
    assert g.dcore.dtype == dtype
    assert M.check_tangent(x, g)
    ref = M.egrad_to_rgrad(x, make(G))
    assert rel(M.tangent_to_dense(x, g), host(M.tangent_to_dense(x, ref))) <= rtol


@pytest.fixture(
    params=[(lib, dt) for lib in AUTODIFF for dt in ("float32", "float64")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def autodiff(request):
    """(library, xp, dtype, make) for the autodiff tests: torch and jax arrays only."""
    library, dtype_name = request.param
    pytest.importorskip(library)
    xp = namespace_from_name(library)
    dtype = getattr(xp, dtype_name)
    return library, xp, dtype, lambda a: xp.asarray(np.asarray(a), dtype=dtype)


def test_autodiff_gives_the_riemannian_gradient(autodiff):
    library, xp, dtype, make = autodiff
    rtol = 1e3 * _eps(dtype, xp)
    M = tm.FixedRankTucker((8, 8, 8), (2, 3, 2))
    At = make(_target(M.shape, (3, 2, 3), noise=0.1))
    x = M.random_point(key=5, xp=library, dtype=dtype)
    explicit = Problem(
        M, lambda y: 0.5 * xp.sum((y.to_dense() - At) ** 2), egrad=lambda y: y.to_dense() - At
    )
    dense = Problem(M, lambda y: 0.5 * xp.sum((y.to_dense() - At) ** 2), autodiff=library)
    ref = M.tangent_to_dense(x, explicit.rgrad(x))
    g = dense.rgrad(x)
    assert library_of(g.dcore) == library and g.dcore.dtype == dtype
    assert M.check_tangent(x, g)
    assert rel(M.tangent_to_dense(x, g), host(ref)) <= rtol * tm.core_condition(x)
    # a cost in Tucker form that never forms a dense tensor: ||X||²/2 - <X, B> with B Tucker
    B = M.random_point(key=6, xp=library, dtype=dtype)
    structured = Problem(M, lambda y: 0.5 * tm.inner(y, y) - tm.inner(y, B), autodiff=library)
    ref2 = M.egrad_to_rgrad(x, x.to_dense() - B.to_dense())
    assert rel(
        M.tangent_to_dense(x, structured.rgrad(x)), host(M.tangent_to_dense(x, ref2))
    ) <= rtol * tm.core_condition(x)


def test_solvers_with_autodiff(autodiff):
    library, xp, dtype, make = autodiff
    shape, ranks = (8, 8, 8), (2, 2, 2)
    M = tm.FixedRankTucker(shape, ranks)
    A = make(_target(shape, ranks))
    problem = Problem(M, lambda y: 0.5 * xp.sum((y.to_dense() - A) ** 2), autodiff=library)
    x0 = M.random_point(key=7, xp=library, dtype=dtype)
    gtol = 3 * _gtol(xp, dtype)
    for solver in (rcg, trust_region):
        result = solver(problem, x0, min_grad_norm=gtol, max_iter=100)
        assert result.stop_reason == "min_grad_norm", (solver.__name__, result.log[-3:])
        assert result.cost <= gtol**2


def test_autodiff_needs_matching_arrays():
    M = tm.FixedRankTucker((5, 6, 7), 2)
    x = M.random_point(key=0)  # numpy
    p = Problem(M, lambda y: tm.norm(y), autodiff="torch")
    with pytest.raises(TypeError, match="autodiff='torch' needs torch arrays"):
        rgd(p, x)


# --------------------------------------------------------------------------- (4) stopping rules
def _quick_problem(backend, dtype, xp, make):
    shape, ranks = (8, 8, 8), (2, 2, 2)
    M = tm.FixedRankTucker(shape, ranks)
    A = make(_target(shape, ranks, noise=0.1))
    x0 = M.random_point(key=8, xp=backend.library, dtype=dtype, device=backend.device)
    return M, _approximation(M, A, xp), x0


@pytest.mark.parametrize("name", list(SOLVERS))
def test_stopping_rules(backend, dtype, xp, make, name):
    M, problem, x0 = _quick_problem(backend, dtype, xp, make)
    solve = SOLVERS[name]
    r = solve(problem, x0, max_iter=3, min_grad_norm=None)
    assert (r.stop_reason, r.iterations, len(r.log)) == ("max_iter", 3, 4)
    g0 = r.log[0].grad_norm
    r = solve(problem, x0, min_grad_norm=0.5 * g0, max_iter=100)
    assert r.stop_reason == "min_grad_norm" and r.grad_norm <= 0.5 * g0
    assert all(e.grad_norm > 0.5 * g0 for e in r.log[:-1])
    r = solve(problem, x0, max_time=1e-9, max_iter=100)
    assert r.stop_reason == "max_time" and r.iterations == 0
    r = solve(problem, x0, min_step=1e3, min_grad_norm=None, max_iter=100)
    assert r.stop_reason == "min_step" and r.iterations == 1
    assert r.log[-1].step_size <= 1e3


def test_progress_bar(monkeypatch, capsys):
    M = tm.FixedRankTucker((6, 6, 6), 2)
    A = _target(M.shape, (2, 2, 2))
    problem = _approximation(M, A, np)
    pytest.importorskip("tqdm")
    r = rgd(problem, M.random_point(key=0), max_iter=5, min_grad_norm=None, progress=True)
    assert r.iterations == 5
    assert "rgd" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="progress=True needs tqdm"):
        rgd(problem, M.random_point(key=0), progress=True)


# --------------------------------------------------------------------------- (5) rank-adaptive
def _has_tdlrt() -> None:
    if not hasattr(tm, "tdlrt_step"):
        pytest.skip("tuckerman.tdlrt_step is not available")


def test_rank_adaptive_discovers_the_true_ranks(backend, dtype, xp, make):
    _has_tdlrt()
    shape, ranks = ((8, 8, 8), (2, 3, 2)) if _small(backend) else ((20, 20, 20), (5, 5, 5))
    A = make(_target(shape, ranks))
    problem = Problem(
        TuckerDomain(shape, max_rank=shape[0] // 2 + 2),
        lambda x: 0.5 * xp.sum((x.to_dense() - A) ** 2),
        egrad=lambda x: x.to_dense() - A,
    )
    gtol = _gtol(xp, dtype)
    for start in (1, 5) if _small(backend) else (1, 8):
        x0 = tm.FixedRankTucker(shape, start).random_point(
            key=9, xp=backend.library, dtype=dtype, device=backend.device
        )
        tau = 10 * _eps(dtype, xp) ** 0.5
        result = rank_adaptive(problem, x0, lr=1.0, tau=tau, min_grad_norm=gtol, max_iter=40)
        print(
            f"\nrank-adaptive {backend.value} {dtype} from rank {start}: "
            f"{result.iterations} iterations, ranks {[e.ranks for e in result.log]}"
        )
        assert result.point.ranks == ranks, [e.ranks for e in result.log]
        assert result.stop_reason == "min_grad_norm", result.log[-3:]
        assert rel(result.point.to_dense(), host(A)) <= 10 * gtol
        assert result.log[0].ranks == (start,) * 3
        assert library_of(result.point.core) == backend.library
        assert result.point.dtype == dtype


def test_rank_adaptive_respects_bounds_and_accepts_cost_egrad_pair():
    _has_tdlrt()
    shape = (10, 10, 10)
    A = _target(shape, (4, 4, 4))
    x0 = tm.FixedRankTucker(shape, 1).random_point(key=0)
    pair = (lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2), lambda x: x.to_dense() - A)
    r = rank_adaptive(pair, x0, lr=1.0, tau=1e-8, max_rank=3, max_iter=10, min_grad_norm=None)
    assert all(max(e.ranks) <= 3 for e in r.log)
    assert r.point.ranks == (3, 3, 3)
    domain = Problem(TuckerDomain(shape, max_rank=2), pair[0], egrad=pair[1])
    r = rank_adaptive(domain, x0, lr=1.0, tau=1e-8, max_iter=5, min_grad_norm=None)
    assert r.point.ranks == (2, 2, 2) and r.stop_reason == "max_iter" and len(r.log) == 6
    r = rank_adaptive(domain, x0, lr=1.0, tau=1e-8, max_time=1e-9)
    assert r.stop_reason == "max_time"
    with pytest.raises(ValueError, match="outside the rank bounds"):
        rank_adaptive(domain, tm.FixedRankTucker(shape, 3).random_point(key=0), lr=1.0, tau=0.1)
    for bad, error in [
        (dict(lr=0.0, tau=0.1), ValueError),
        (dict(lr=1.0, tau=-1.0), ValueError),
        (dict(lr="a", tau=0.1), TypeError),
    ]:
        with pytest.raises(error):
            rank_adaptive(domain, x0, **bad)


def test_rank_adaptive_with_autodiff_matches_explicit_gradient(autodiff):
    _has_tdlrt()
    library, xp, dtype, make = autodiff
    shape = (8, 8, 8)
    A = make(_target(shape, (2, 3, 2)))
    cost = lambda x: 0.5 * xp.sum((x.to_dense() - A) ** 2)  # noqa: E731
    explicit = Problem(TuckerDomain(shape), cost, egrad=lambda x: x.to_dense() - A)
    auto = Problem(TuckerDomain(shape), cost, autodiff=library)
    x0 = tm.FixedRankTucker(shape, 1).random_point(key=3, xp=library, dtype=dtype)
    kw = dict(lr=0.5, tau=1e-2, max_iter=2 if library == "jax" else 4, min_grad_norm=None)
    r1, r2 = rank_adaptive(explicit, x0, **kw), rank_adaptive(auto, x0, **kw)
    assert [e.ranks for e in r1.log] == [e.ranks for e in r2.log]
    assert max(r2.log[1].ranks) > 1
    # lr = 0.5: the iterates have not converged, so they are compared, not just their limit
    tol = math.sqrt(_eps(dtype, xp))
    assert rel(r2.point.to_dense(), host(r1.point.to_dense())) <= tol
    for e1, e2 in zip(r1.log, r2.log):
        assert abs(e1.cost - e2.cost) <= tol * r1.log[0].cost
        assert abs(e1.grad_norm - e2.grad_norm) <= tol * r1.log[0].grad_norm


# --------------------------------------------------------------------------- domains, sparse
def test_fixed_rank_solvers_on_a_tucker_domain():
    A = _target((8, 8, 8), (2, 3, 2))
    D = TuckerDomain(A.shape, max_rank=4)
    problem = Problem(
        D, lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2), egrad=lambda x: x.to_dense() - A
    )
    x0 = tm.FixedRankTucker(A.shape, (2, 3, 2)).random_point(key=0)
    r = rcg(problem, x0, min_grad_norm=1e-10)
    assert r.point.ranks == (2, 3, 2) and r.cost <= 1e-18
    assert problem.manifold_at(x0) == tm.FixedRankTucker(A.shape, (2, 3, 2))
    with pytest.raises(ValueError, match="outside the rank bounds"):
        rgd(problem, tm.FixedRankTucker(A.shape, 5).random_point(key=0))


@pytest.mark.parametrize("name", ["rcg", "trust_region"])
def test_completion_with_sparse_gradients(backend, dtype, xp, make, name):
    """Tensor completion: the gradient and the Hessian-vector products are SparseTensors of the
    observed entries; the start is the HOSVD of the rescaled zero-filled observations."""
    if not hasattr(tm, "SparseTensor"):
        pytest.skip("tuckerman.SparseTensor is not available")
    if name == "rcg" and _small(backend):
        pytest.skip("JAX: the trust region covers the sparse path (compiling each shape is slow)")
    shape, ranks = (10, 10, 10), (2, 2, 2)
    M = tm.FixedRankTucker(shape, ranks)
    A = _target(shape, ranks)
    idx = np.unique(np.random.default_rng(0).integers(0, 10, size=(500, 3)), axis=0)
    kw = {} if backend.device is None else {"device": backend.device}
    indices = xp.asarray(idx, dtype=xp.int64, **kw)
    values = make(A[tuple(idx.T)])

    def residual(x):
        return tm.entries(x, indices) - values

    problem = Problem(
        M,
        lambda x: 0.5 * xp.sum(residual(x) ** 2),
        egrad=lambda x: tm.SparseTensor(indices, residual(x), shape),
        ehess=lambda x, d: tm.SparseTensor(indices, tm.entries(d, indices), shape),
    )
    zero_filled = np.zeros(shape)
    zero_filled[tuple(idx.T)] = A[tuple(idx.T)] * (A.size / len(idx))
    x0 = tm.hosvd(make(zero_filled), ranks)
    gtol = _gtol(xp, dtype)
    if _small(backend):  # JAX: a few steps through the sparse path
        r = SOLVERS[name](problem, x0, max_iter=3, min_grad_norm=gtol)
        assert r.cost <= 0.5 * r.log[0].cost
        return
    r = SOLVERS[name](problem, x0, max_iter=80, min_grad_norm=gtol)
    print(f"\ncompletion {name} {backend.value} {dtype}: {r.iterations} iterations")
    assert r.stop_reason == "min_grad_norm", r.log[-3:]
    assert rel(r.point.to_dense(), A) <= 1e3 * gtol


# --------------------------------------------------------------------------- bad input
def _np_problem():
    M = tm.FixedRankTucker((6, 7, 8), 2)
    A = _target(M.shape, (2, 2, 2))
    return M, _approximation(M, A, np), M.random_point(key=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_iter=0), ValueError, "max_iter must be a positive integer, got 0"),
        (dict(max_iter=2.5), TypeError, "max_iter must be a positive integer"),
        (dict(min_grad_norm=0.0), ValueError, "min_grad_norm must be positive"),
        (dict(min_grad_norm=-1e-3), ValueError, "min_grad_norm must be positive"),
        (dict(min_step=float("nan")), ValueError, "min_step must be positive"),
        (dict(max_time=0), ValueError, "max_time must be positive"),
        (dict(max_time="1s"), TypeError, "max_time must be a positive number or None"),
    ],
)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_stopping_parameters(kwargs, error, match, name):
    _, problem, x0 = _np_problem()
    with pytest.raises(error, match=match):
        SOLVERS[name](problem, x0, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("rgd", dict(step0=0.0), ValueError, "step0 must be positive"),
        ("rgd", dict(step0=-1), ValueError, "step0 must be positive"),
        ("rgd", dict(armijo=1.0), ValueError, r"armijo must lie in \(0, 1\)"),
        ("rcg", dict(shrink=0.0), ValueError, r"shrink must lie in \(0, 1\)"),
        ("rcg", dict(beta="XX"), ValueError, "beta must be one of"),
        ("rcg", dict(restart_every=0), ValueError, "restart_every must be a positive integer"),
        ("rcg", dict(max_backtracks=0), ValueError, "max_backtracks must be a positive"),
        ("trust_region", dict(radius0=-1.0), ValueError, "radius0 must be positive"),
        ("trust_region", dict(radius0=2.0, max_radius=1.0), ValueError, "exceeds max_radius"),
        ("trust_region", dict(rho_prime=0.3), ValueError, "rho_prime must lie in"),
        ("trust_region", dict(max_inner=0), ValueError, "max_inner must be a positive"),
    ],
)
def test_bad_solver_parameters(name, kwargs, error, match):
    _, problem, x0 = _np_problem()
    with pytest.raises(error, match=match):
        SOLVERS[name](problem, x0, **kwargs)


def test_bad_starting_points_and_costs():
    M, problem, x0 = _np_problem()
    not_orthonormal = tm.TuckerTensor(x0.core, [2.0 * u for u in x0.factors])
    with pytest.raises(ValueError, match="x0 is not a point of .*not orthonormal"):
        rgd(problem, not_orthonormal)
    with pytest.raises(ValueError, match=r"x0 has shape \(6, 7, 8\) and ranks \(3, 3, 3\)"):
        rgd(problem, tm.FixedRankTucker(M.shape, 3).random_point(key=0))
    with pytest.raises(TypeError, match="x0 must be a TuckerTensor"):
        rcg(problem, x0.to_dense())
    with pytest.raises(TypeError, match="problem must be a tuckerman.solvers.Problem"):
        rgd(lambda x: 0.0, x0)
    vector_cost = Problem(M, lambda x: x.core, egrad=lambda x: x.to_dense())
    with pytest.raises(TypeError, match=r"cost\(x0\) must be a scalar .* shape \(2, 2, 2\)"):
        rgd(vector_cost, x0)
    nan_cost = Problem(M, lambda x: np.asarray(np.nan), egrad=lambda x: x.to_dense())
    with pytest.raises(ValueError, match=r"cost\(x0\) must be finite, got nan"):
        trust_region(nan_cost, x0)
    with pytest.raises(TypeError, match="a scalar"):
        rgd(Problem(M, lambda x: "zero", egrad=lambda x: x.to_dense()), x0)
    bad_grad = Problem(M, lambda x: np.sum(x.core), egrad=lambda x: np.ones((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        rgd(bad_grad, x0)


def test_bad_problems():
    M = tm.FixedRankTucker((6, 7, 8), 2)
    cost = lambda x: tm.norm(x)  # noqa: E731
    with pytest.raises(ValueError, match="needs a gradient"):
        Problem(M, cost)
    with pytest.raises(ValueError, match="autodiff must be one of"):
        Problem(M, cost, autodiff="tensorflow")
    with pytest.raises(ValueError, match="either autodiff or egrad"):
        Problem(M, cost, egrad=lambda x: x, autodiff="torch")
    with pytest.raises(TypeError, match="egrad must be callable"):
        Problem(M, cost, egrad=3)
    with pytest.raises(TypeError, match="manifold must be a FixedRankTucker"):
        Problem((6, 7, 8), cost, egrad=lambda x: x)
    with pytest.raises(ValueError, match="min_rank\\[0\\] = 3 exceeds max_rank\\[0\\] = 2"):
        TuckerDomain((6, 7, 8), min_rank=3, max_rank=2)
