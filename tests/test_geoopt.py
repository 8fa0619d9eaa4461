"""The geoopt bridge: every TuckerManifold method against the core and against dense / autograd
references; geoopt's RiemannianSGD (with and without momentum) and RiemannianAdam reach the
optimum while staying on the manifold; checkpoints continue identically; deepcopy and pickling
keep the manifold; bad packed tensors are refused with their shape and dtype."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
geoopt = pytest.importorskip("geoopt")
from torch import nn  # noqa: E402
from tuckerman.integrations.geoopt import (  # noqa: E402
    GeooptTuckerLinear,
    TuckerManifold,
    load_optimizer_state,
)

import tuckerman as tm  # noqa: E402
from tuckerman.solvers import Problem, rgd  # noqa: E402

torch.set_num_threads(1)

SHAPE, RANKS = (5, 6, 7), (2, 3, 2)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dt(request):
    return request.param


def _tol(dt):
    return 1e3 * torch.finfo(dt).eps


def _randn(n, seed, dt):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dt)


def _dphi(M, x, u):
    """Reference for the tangent tensor of a packed vector: the JVP of the parametrization
    ``p -> dense(unpack(p))`` at ``x`` along ``u`` (autograd, independent of the core)."""
    return torch.func.jvp(lambda p: M.unpack(p).to_dense(), (x,), (u,))[1]


def _gauge_error(M, x, u):
    point, v = M.unpack(x), M.unpack_tangent(u)
    return max(float(abs(a.T @ b).max()) for a, b in zip(point.factors, v.dfactors))


# --------------------------------------------------------------------------- packing
def test_pack_unpack_round_trip(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.tucker.random_point(key=0, xp=torch, dtype=dt)
    p = M.pack(x)
    assert p.shape == (M.packed_size,) == (12 + 10 + 18 + 14,)
    y = M.unpack(p)
    assert torch.equal(y.core, x.core)
    assert all(torch.equal(a, b) for a, b in zip(y.factors, x.factors))
    assert torch.equal(M.pack(y), p)
    v = M.tucker.random_tangent(x, key=1)
    w = M.unpack_tangent(M.pack_tangent(v))
    assert torch.equal(w.dcore, v.dcore) and all(
        torch.equal(a, b) for a, b in zip(w.dfactors, v.dfactors)
    )
    # unpack gives views: autograd reaches the packed parameter with the core / factor grads
    q = p.clone().requires_grad_()
    t = M.unpack(q)
    (t.core.sum() + 2 * t.factors[1].sum()).backward()
    g = M.unpack_tangent(q.grad)
    assert torch.equal(g.dcore, torch.ones_like(g.dcore))
    assert torch.equal(g.dfactors[1], 2 * torch.ones_like(g.dfactors[1]))
    assert torch.equal(g.dfactors[0], torch.zeros_like(g.dfactors[0]))
    assert M.manifold_dim == M.tucker.dim == 12 + (10 - 4) + (18 - 9) + (14 - 4)
    assert repr(M) == "Tucker(shape=(5, 6, 7), ranks=(2, 3, 2)) manifold"


def test_bad_packed_tensors_are_refused():
    M = TuckerManifold(SHAPE, RANKS)
    n = M.packed_size
    with pytest.raises(ValueError, match=r"shape \(53,\).*\(54,\)"):
        geoopt.ManifoldParameter(torch.zeros(n - 1), manifold=M)
    with pytest.raises(ValueError, match=r"shape \(2, 53\)"):
        geoopt.ManifoldParameter(torch.zeros(2, n - 1), manifold=M)
    # a stack of points is one tensor (geoopt's batch convention); unpack takes one point
    stack = geoopt.ManifoldParameter(torch.zeros(2, n), manifold=M)
    with pytest.raises(ValueError, match=r"shape \(2, 54\): a stack of 2"):
        M.unpack(stack)
    with pytest.raises(ValueError, match=r"do not broadcast"):
        M.proju(torch.zeros(2, n), torch.zeros(3, n))
    with pytest.raises(TypeError, match="int64"):
        geoopt.ManifoldParameter(torch.zeros(n, dtype=torch.int64), manifold=M)
    with pytest.raises(TypeError, match="float16"):
        M.unpack(torch.zeros(n, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"shape \(55,\)"):
        M.unpack(torch.zeros(n + 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        M.unpack(np.zeros(n))
    x = M.random(key=0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"u has shape \(7,\)"):
        M.proju(x, torch.zeros(7, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32.*float64"):
        M.retr(x, torch.zeros(n, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"shape \(5, 6, 8\)"):
        M.pack(tm.FixedRankTucker((5, 6, 8), RANKS).random_point(key=0, xp=torch))
    with pytest.raises(TypeError, match="torch"):
        M.pack(M.tucker.random_point(key=0))  # NumPy arrays
    with pytest.raises(ValueError, match=r"size \(3,\)"):
        M.random(3)
    with pytest.raises(ValueError, match="infeasible"):
        TuckerManifold((5, 6), (2, 3))
    with pytest.raises(NotImplementedError, match="logarithmic"):
        M.logmap(x, x)
    with pytest.raises(NotImplementedError, match="distance"):
        M.dist(x, x)
    ok, reason = M.check_point_on_manifold(torch.stack([x, torch.zeros_like(x)]), explain=True)
    assert not ok and reason.startswith("at batch index (1,)")
    ok, reason = M.check_point(torch.zeros(3), explain=True)
    assert not ok and "(3,)" in reason and "(54,)" in reason
    with pytest.raises(ValueError, match=r"ranks\[1\] = 5 exceeds the mode size"):
        GeooptTuckerLinear(4, 6, rank=5)


# --------------------------------------------------------------------------- points
def test_random_origin_projx(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.random(key=3, dtype=dt)
    assert isinstance(x, geoopt.ManifoldTensor) and x.manifold is M and x.dtype == dt
    assert M.check_point_on_manifold(x)
    assert M.tucker.check_point(M.unpack(x))
    assert torch.equal(M.random(key=3, dtype=dt), x)
    torch.manual_seed(0)
    a = M.random(dtype=dt)
    torch.manual_seed(0)
    assert torch.equal(M.random(dtype=dt), a)  # None draws its seed from torch's generator
    assert torch.equal(M.origin(dtype=dt), M.origin(dtype=dt))
    assert M.check_point_on_manifold(M.origin(M.packed_size, dtype=dt))

    # projx: any packed tensor of full multilinear rank -> same tensor, on the manifold
    z = _randn(M.packed_size, 4, dt)
    assert not M.check_point_on_manifold(z)
    y = M.projx(z)
    assert M.check_point_on_manifold(y)
    ref = M.unpack(z).to_dense()
    assert torch.allclose(M.unpack(y).to_dense(), ref, atol=_tol(dt) * float(abs(ref).max()))
    assert torch.allclose(M.projx(y), y, atol=_tol(dt) * float(abs(y).max()))
    # a point keeps its coordinates (geoopt's stabilize re-reads buffers there), in any gauge
    point = M.unpack(x)
    rotations = [
        torch.linalg.qr(_randn(r * r, 10 + k, dt).reshape(r, r))[0] for k, r in enumerate(RANKS)
    ]
    turned = M.pack(
        tm.TuckerTensor(
            tm.multi_mode_product(point.core, rotations, transpose=True),
            [u @ q for u, q in zip(point.factors, rotations)],
        )
    )
    assert M.check_point_on_manifold(turned)
    assert torch.allclose(M.projx(turned), turned, atol=_tol(dt))
    # membership checks say why
    ok, reason = M.check_point_on_manifold(z, explain=True)
    assert not ok and "orthonormal" in reason
    bad = M.unpack(x)
    flat = M.pack(tm.TuckerTensor(torch.zeros_like(bad.core), bad.factors))
    ok, reason = M.check_point_on_manifold(flat, explain=True)
    assert not ok and "multilinear rank" in reason


# --------------------------------------------------------------------------- tangent vectors
def test_inner_is_the_dense_frobenius_product(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.random(key=0, dtype=dt)
    u, v = _randn(M.packed_size, 1, dt), _randn(M.packed_size, 2, dt)  # off the gauge
    du, dv = _dphi(M, x, u), _dphi(M, x, v)
    for a, b, da, db in [(u, v, du, dv), (M.proju(x, u), M.proju(x, v), du, dv)]:
        ref = (da * db).sum()
        assert torch.isclose(M.inner(x, a, b), ref, rtol=_tol(dt), atol=_tol(dt))
        assert M.inner(x, a, b).shape == ()
        assert M.inner(x, a, b, keepdim=True).shape == (1,)
        assert torch.allclose(M.component_inner(x, a), M.inner(x, a, a).reshape(1))
        assert torch.isclose(M.norm(x, a), torch.linalg.vector_norm(da), rtol=_tol(dt))
    # the Euclidean product of packed vectors is something else
    assert not torch.isclose(M.inner(x, u, v), (u * v).sum(), rtol=1e-2)


def test_proju_idempotent_orthogonal_same_tensor(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.random(key=0, dtype=dt)
    u = _randn(M.packed_size, 1, dt)
    p = M.proju(x, u)
    assert _gauge_error(M, x, u) > 0.1 and _gauge_error(M, x, p) < _tol(dt)
    assert M.check_vector_on_tangent(x, p) and not M.check_vector_on_tangent(x, u)
    assert torch.allclose(M.proju(x, p), p, atol=_tol(dt))
    # same tangent tensor; the discarded part is the zero tensor, orthogonal to everything
    du = _dphi(M, x, u)
    assert torch.allclose(_dphi(M, x, p), du, atol=_tol(dt) * float(abs(du).max()))
    assert float(M.norm(x, u - p)) < _tol(dt) * float(M.norm(x, u))
    w = M.proju(x, _randn(M.packed_size, 2, dt))
    assert abs(float(M.inner(x, u - p, w))) < _tol(dt) * float(M.norm(x, u) * M.norm(x, w))
    # agrees with the core's projection of the dense tangent tensor
    ref = M.pack_tangent(M.tucker.project(M.unpack(x), du))
    assert torch.allclose(p, ref, atol=_tol(dt) * float(abs(ref).max()))


def test_egrad2rgrad_is_the_projected_dense_gradient(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.random(key=0, dtype=dt)
    a = _randn(5 * 6 * 7, 9, dt).reshape(SHAPE)

    def f(dense):
        return (torch.sin(dense) * a).sum() + 0.25 * (dense**4).sum()

    q = x.detach().clone().requires_grad_()
    f(M.unpack(q).to_dense()).backward()
    g = M.egrad2rgrad(x, q.grad)
    dense = M.unpack(x).to_dense().requires_grad_()
    f(dense).backward()
    ref = M.tucker.project(M.unpack(x), dense.grad)
    assert torch.allclose(
        M.tangent_to_dense(x, g),
        M.tucker.tangent_to_dense(M.unpack(x), ref),
        atol=_tol(dt) * float(abs(dense.grad).max()),
    )
    assert M.check_vector_on_tangent(x, g)
    # and it is the gradient in the embedded metric: <g, v> = D f(x)[v]
    v = M.proju(x, _randn(M.packed_size, 3, dt))
    directional = (dense.grad * _dphi(M, x, v)).sum()
    assert torch.isclose(M.inner(x, g, v), directional, rtol=10 * _tol(dt))


def test_retraction_transport(dt):
    M = TuckerManifold(SHAPE, RANKS)
    x = M.random(key=0, dtype=dt)
    v = M.proju(x, _randn(M.packed_size, 1, dt))
    v = v / M.norm(x, v)
    dense_x, dv = M.unpack(x).to_dense(), _dphi(M, x, v)
    assert torch.allclose(M.unpack(M.retr(x, 0 * v)).to_dense(), dense_x, atol=_tol(dt))
    # first-order agreement: ||R(x, t v) - (X + t v)|| = O(t^2)
    errs = []
    for t in (1e-1, 1e-2):
        y = M.retr(x, t * v)
        assert M.check_point_on_manifold(y)
        errs.append(float(torch.linalg.vector_norm(M.unpack(y).to_dense() - dense_x - t * dv)))
    assert errs[1] < 0.02 * errs[0]
    # any packed vector retracts along its tangent tensor; expmap is the retraction
    u = _randn(M.packed_size, 2, dt) * 0.1
    assert torch.allclose(
        M.unpack(M.retr(x, u)).to_dense(),
        M.unpack(M.retr(x, M.proju(x, u))).to_dense(),
        atol=_tol(dt),
    )
    assert torch.equal(M.expmap(x, u), M.retr(x, u))
    # transport: the projection of the dense tangent tensor at the new point, in its gauge
    y = M.retr(x, 0.3 * v)
    w = M.proju(x, _randn(M.packed_size, 3, dt))
    tw = M.transp(x, y, w)
    assert M.check_vector_on_tangent(y, tw)
    ref = M.tucker.project(M.unpack(y), _dphi(M, x, w))
    assert torch.allclose(
        M.tangent_to_dense(y, tw),
        M.tucker.tangent_to_dense(M.unpack(y), ref),
        atol=_tol(dt) * float(abs(M.tangent_to_dense(x, w)).max()),
    )
    y2, tw2 = M.retr_transp(x, 0.3 * v, w)
    assert torch.equal(y2, y) and torch.equal(tw2, tw)
    assert torch.equal(M.transp_follow_retr(x, 0.3 * v, w), tw)
    assert torch.equal(M.transp_follow_expmap(x, 0.3 * v, w), tw)


# --------------------------------------------------------------------------- optimizers
def _approximation_run(M, opt_factory, dt, steps, gamma=1.0):
    target = M.unpack(M.random(key=5, dtype=dt)).to_dense()
    x = geoopt.ManifoldParameter(M.random(key=1, dtype=dt), manifold=M)
    opt = opt_factory([x])
    # geoopt's optimizers are torch optimizers: torch's schedulers drive them
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=gamma)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((M.unpack(x).to_dense() - target) ** 2).sum()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        ok, reason = M.check_point_on_manifold(x, explain=True)
        assert ok, reason
    return x, target, losses


@pytest.mark.parametrize(
    "name, factory, steps, gamma",
    [
        ("sgd", lambda p: geoopt.optim.RiemannianSGD(p, lr=0.5), 60, 1.0),
        (
            "momentum",
            lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.5, stabilize=5),
            60,
            1.0,
        ),
        (
            "nesterov",
            lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3, momentum=0.5, nesterov=True),
            60,
            1.0,
        ),
        ("adam", lambda p: geoopt.optim.RiemannianAdam(p, lr=0.3, stabilize=10), 150, 0.5),
    ],
    ids=["sgd", "momentum", "nesterov", "adam"],
)
def test_optimizers_reach_the_rank_r_target(name, factory, steps, gamma, dt):
    """½‖X − A‖² with A of rank r: the optimum is A itself (loss 0). RiemannianAdam's steps
    have length about lr (one second-moment scalar), so it needs a decaying learning rate."""
    M = TuckerManifold(SHAPE, RANKS)
    x, target, losses = _approximation_run(M, factory, dt, steps, gamma)
    final = torch.linalg.vector_norm(M.unpack(x).to_dense() - target).item()
    start = (2 * losses[0]) ** 0.5
    if name == "adam":
        assert final < 1e-3 * start
    else:
        assert final < (1e-5 if dt == torch.float32 else 1e-7) * start


def _momentum_sgd_and_adam(sgd_lr, momentum, adam_lr):
    """Parametrize ``factory`` over RiemannianSGD with momentum and RiemannianAdam."""
    return pytest.mark.parametrize(
        "factory",
        [
            lambda p: geoopt.optim.RiemannianSGD(p, lr=sgd_lr, momentum=momentum),
            lambda p: geoopt.optim.RiemannianAdam(p, lr=adam_lr),
        ],
        ids=["sgd-momentum", "adam"],
    )


@_momentum_sgd_and_adam(sgd_lr=0.3, momentum=0.5, adam_lr=0.3)
def test_a_stack_of_points_steps_like_separate_parameters(factory):
    """One ManifoldParameter holding a stack of three points (geoopt's batch convention) takes
    the same steps as three parameters optimized side by side: every map, including Adam's
    one-scalar-per-point second moment, acts point by point."""
    dt = torch.float64
    M = TuckerManifold(SHAPE, RANKS)
    start = M.random(3, M.packed_size, key=7, dtype=dt)
    assert start.shape == (3, M.packed_size) and M.check_point_on_manifold(start)
    targets = [M.unpack(M.random(key=20 + i, dtype=dt)).to_dense() for i in range(3)]
    stacked = geoopt.ManifoldParameter(start.clone(), manifold=M)
    single = [geoopt.ManifoldParameter(start[i].clone(), manifold=M) for i in range(3)]
    opt_stacked, opt_single = factory([stacked]), factory(single)

    def loss(points):
        return sum(0.5 * ((M.unpack(p).to_dense() - a) ** 2).sum() for p, a in zip(points, targets))

    for _ in range(15):
        for opt, points in ((opt_stacked, list(stacked.unbind(0))), (opt_single, single)):
            opt.zero_grad()
            loss(points).backward()
            opt.step()
        assert torch.allclose(stacked, torch.stack(single), atol=1e-10)
    assert M.check_point_on_manifold(stacked)
    assert float(loss(list(stacked.unbind(0)))) < 0.8 * float(loss(list(start.unbind(0))))


def test_sgd_matches_the_core_rgd_optimum(dt):
    """Best rank-(1,2,1) approximation of a rank-(2,3,2) tensor: geoopt's RiemannianSGD and
    tuckerman's rgd (Armijo) reach the same cost and tensor from the same start."""
    M = TuckerManifold(SHAPE, (1, 2, 2))
    g = torch.Generator().manual_seed(0)
    target = tm.hosvd(torch.randn(SHAPE, generator=g, dtype=torch.float64), ranks=RANKS)
    a = target.to_dense()
    x0 = M.tucker.random_point(key=2, xp=torch, dtype=torch.float64)
    problem = Problem(
        M.tucker,
        cost=lambda x: 0.5 * float(((x.to_dense() - a) ** 2).sum()),
        egrad=lambda x: x.to_dense() - a,
    )
    ref = rgd(problem, x0, max_iter=300, min_grad_norm=1e-10)
    p = geoopt.ManifoldParameter(M.pack(x0).to(dt), manifold=M)
    opt = geoopt.optim.RiemannianSGD([p], lr=0.5)
    a_dt = a.to(dt)
    for _ in range(150):
        opt.zero_grad()
        loss = 0.5 * ((M.unpack(p).to_dense() - a_dt) ** 2).sum()
        loss.backward()
        opt.step()
    ref_dense = ref.point.to_dense()
    assert abs(loss.item() - ref.cost) < 1e2 * torch.finfo(dt).eps ** 0.5 * ref.cost
    assert torch.allclose(
        M.unpack(p).to_dense().double(), ref_dense, atol=10 * torch.finfo(dt).eps ** 0.5
    )


def test_weight_decay_is_the_gradient_of_half_the_squared_norm():
    dt = torch.float64
    M = TuckerManifold(SHAPE, RANKS)
    target = _randn(5 * 6 * 7, 9, dt).reshape(SHAPE)
    x0 = M.random(key=1, dtype=dt)
    a = geoopt.ManifoldParameter(x0.clone(), manifold=M)
    b = geoopt.ManifoldParameter(x0.clone(), manifold=M)
    opt_a = geoopt.optim.RiemannianSGD([a], lr=0.1, weight_decay=0.3)
    opt_b = geoopt.optim.RiemannianSGD([b], lr=0.1)
    for _ in range(3):
        for p, opt, wd in ((a, opt_a, 0.0), (b, opt_b, 0.3)):
            opt.zero_grad()
            dense = M.unpack(p).to_dense()
            loss = 0.5 * ((dense - target) ** 2).sum() + 0.5 * wd * (dense**2).sum()
            loss.backward()
            opt.step()
    assert torch.allclose(M.unpack(a).to_dense(), M.unpack(b).to_dense(), atol=1e-12)


def _regression_data(dt):
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(6, 3, generator=g, dtype=dt) @ torch.randn(3, 10, generator=g, dtype=dt)
    inputs = torch.randn(64, 10, generator=g, dtype=dt)
    return inputs, inputs @ w_true.T + 0.5, w_true


@pytest.mark.parametrize(
    "name, factory, gamma",
    [
        ("momentum", lambda p: geoopt.optim.RiemannianSGD(p, lr=0.05, momentum=0.9), 1.0),
        ("adam", lambda p: geoopt.optim.RiemannianAdam(p, lr=0.5), 0.3),
    ],
    ids=["momentum", "adam"],
)
def test_regression_with_a_tucker_weight(name, factory, gamma, dt):
    """A rank-3 6×10 weight and a bias fitted to noise-free data (optimum: loss 0 at the true
    weight). RiemannianAdam keeps one second-moment scalar for the packed weight (see
    component_inner) and converges more slowly than SGD with momentum here."""
    inputs, outputs, w_true = _regression_data(dt)
    layer = GeooptTuckerLinear(10, 6, rank=3, key=0, dtype=dt)
    assert layer.manifold.check_point_on_manifold(layer.weight)
    w0 = layer.dense_weight()
    assert torch.isclose((w0**2).sum(), torch.tensor(6 / 3, dtype=dt))  # nn.Linear's E‖W‖²
    assert torch.linalg.matrix_rank(w0) == 3
    # the forward pass equals nn.Linear with the dense weight, without forming it
    dense = nn.functional.linear(inputs, layer.dense_weight(), layer.bias)
    assert torch.allclose(layer(inputs), dense, atol=_tol(dt) * dense.detach().abs().max().item())
    opt = factory(layer.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=gamma)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(inputs), outputs)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        assert layer.manifold.check_point_on_manifold(layer.weight)
    strict = name == "momentum"
    assert losses[-1] < (1e-7 if strict else 2e-3) * losses[0]
    tol = 1e-3 if strict else 0.3  # the true weight has entries up to about 5
    assert torch.allclose(layer.dense_weight(), w_true, atol=tol)
    assert torch.allclose(layer.bias, torch.full_like(layer.bias, 0.5), atol=tol)


# --------------------------------------------------------------------------- persistence
def _train(model, opt, inputs, outputs, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(inputs), outputs).backward()
        opt.step()


@_momentum_sgd_and_adam(sgd_lr=0.05, momentum=0.9, adam_lr=0.02)
def test_checkpoint_round_trip_continues_identically(factory):
    dt = torch.float64
    inputs, outputs, _ = _regression_data(dt)
    model = GeooptTuckerLinear(10, 6, rank=3, key=0, dtype=dt)
    opt = factory(model.parameters())
    _train(model, opt, inputs, outputs, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors: the safe loader accepts it

    twin = GeooptTuckerLinear(10, 6, rank=3, key=1, dtype=dt)  # a different start
    twin_opt = factory(twin.parameters())
    twin.load_state_dict(saved["model"])
    load_optimizer_state(twin_opt, saved["opt"])
    assert isinstance(twin.weight, geoopt.ManifoldParameter)
    assert twin.weight.manifold is twin.manifold
    assert torch.equal(twin.weight, model.weight)
    _train(model, opt, inputs, outputs, 5)
    _train(twin, twin_opt, inputs, outputs, 5)
    assert torch.equal(twin.weight, model.weight) and torch.equal(twin.bias, model.bias)


def test_deepcopy_and_pickle_keep_the_manifold():
    M = TuckerManifold(SHAPE, RANKS)
    p = geoopt.ManifoldParameter(M.random(key=0, dtype=torch.float64), manifold=M)
    q = copy.deepcopy(p)
    assert isinstance(q, geoopt.ManifoldParameter) and q.requires_grad
    assert isinstance(q.manifold, TuckerManifold)
    assert (q.manifold.shape, q.manifold.ranks) == (M.shape, M.ranks)
    assert torch.equal(q, p) and q.data_ptr() != p.data_ptr()
    assert q.manifold.check_point_on_manifold(q)
    # a deep-copied model shares one manifold between the module and its parameter
    layer = GeooptTuckerLinear(10, 6, rank=3, key=0, dtype=torch.float64)
    twin = copy.deepcopy(layer)
    assert twin.weight.manifold is twin.manifold and twin.manifold is not layer.manifold
    x = torch.ones(2, 10, dtype=torch.float64)
    assert torch.equal(twin(x), layer(x))
    # whole-object pickling (torch.save of the parameter, trusted loader)
    buffer = io.BytesIO()
    torch.save(p, buffer)
    buffer.seek(0)
    r = torch.load(buffer, weights_only=False)
    assert isinstance(r, geoopt.ManifoldParameter) and isinstance(r.manifold, TuckerManifold)
    assert r.manifold.ranks == RANKS and torch.equal(r, p)


def test_the_old_name_of_the_core_manifold_warns():
    M = TuckerManifold((5, 4, 3), (2, 2, 2))
    with pytest.warns(DeprecationWarning, match="use TuckerManifold.tucker"):
        assert M.fixed_rank is M.tucker
