"""The device-grade step (tuckerman.engine) against the literal, unpadded TDLRT building blocks:
padding is exact, decisions on the device equal the host decisions, batching changes nothing,
and the composition jit-compiles under JAX."""

from __future__ import annotations

import numpy as np
import pytest
import tuckerman.backends  # noqa: F401
from helpers import host, library_of, rel
from hypothesis import given
from hypothesis import strategies as st

import tuckerman as tm
from tuckerman import engine
from tuckerman.engine import PaddedTucker


def _factor_grads(G, core, factors):
    """∂L/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ of f(C ×_k U_k) with ∇f = G (any library)."""
    d = core.ndim
    out = []
    for k in range(d):
        others = [j for j in range(d) if j != k]
        t = tm.multi_mode_product(G, [factors[j] for j in others], others, transpose=True)
        out.append(tm.unfold(t, k) @ tm.unfold(core, k).mT)
    return out


def _engine_step(x, egrad, *, lr, config, capacity, adaptive_modes=None, fixed=False, **bounds):
    """TDLRT through the engine: pad, augment, second gradient, update, truncate."""
    lay = engine.make_layout(x.shape, capacity, adaptive_modes=adaptive_modes, **bounds)
    p = PaddedTucker.from_tucker(x, capacity)
    G = egrad(tm.TuckerTensor(p.core, p.factors))
    (a,), (maps,) = engine.augment([lay], [p], [_factor_grads(G, p.core, p.factors)])
    G2 = egrad(tm.TuckerTensor(a.core, a.factors))  # the padded augmented point, exactly
    gc = tm.multi_mode_product(G2, a.factors, transpose=True)
    c, _ = engine.inner_update(config, a.core, gc, engine.init_state(config, a.core), 1, lr)
    (y,), _, (w,) = engine.truncate(
        [lay], config, [a._replace(core=c)], [p.ranks], fixed_rank=fixed
    )
    return y, host(w).astype(int)


def _problem(make, shape, seed=2):
    A = tm.FixedRankTucker(shape, 2).random_point(key=1).to_dense()
    A = A + 0.1 * np.random.default_rng(seed).standard_normal(shape)
    A_b = make(A)
    return lambda y: y.to_dense() ** 3 - A_b  # non-quadratic: the two gradients differ


@pytest.mark.parametrize(
    "shape, ranks, capacity, modes",
    [
        ((7, 8, 9), (3, 2, 4), (4, 4, 4), None),  # padded in every mode
        ((7, 8, 9), (3, 2, 4), (3, 2, 4), None),  # no padding
        ((9, 6), (3, 3), (5, 4), None),  # a matrix: one SVD for both modes
        ((6, 5, 3, 3), (3, 2, 3, 3), (4, 4, 3, 3), (0, 1)),  # a conv kernel: window modes skipped
        ((5, 6, 4, 3), (2, 3, 2, 2), (2, 4, 2, 2), (1,)),  # fixed modes below full rank
    ],
)
def test_padded_step_equals_the_literal_step(
    backend, dtype, rtol, make, shape, ranks, capacity, modes
):
    x = tm.FixedRankTucker(shape, ranks).random_point(
        key=0, xp=backend.library, dtype=dtype, device=backend.device
    )
    egrad = _problem(make, shape)
    cfg = engine.Config(tau=0.1)
    y, wanted = _engine_step(x, egrad, lr=0.05, config=cfg, capacity=capacity, adaptive_modes=modes)
    ref = tm.tdlrt_step(x, egrad, lr=0.05, tau=0.1, adaptive_modes=modes)
    assert y.host_ranks() == ref.ranks == tuple(wanted)
    assert rel(y.to_dense(), ref.to_dense()) <= 10 * rtol
    assert library_of(y.core) == backend.library and y.core.dtype == dtype
    assert y.capacity == engine.make_layout(shape, capacity, adaptive_modes=modes).workspace
    _assert_padding_is_zero(y)
    z = y.to_tucker()
    assert tm.FixedRankTucker(shape, z.ranks).check_point(z)


def _assert_padding_is_zero(p):
    r = p.host_ranks()
    core = host(p.core)
    live = np.zeros(core.shape, bool)
    live[tuple(slice(0, k) for k in r)] = True
    assert not np.any(core[~live])
    for u, k in zip(p.factors, r):
        assert not np.any(host(u)[:, k:])


def test_fixed_rank_step_equals_core_fixed_rank_step(backend, dtype, rtol, make):
    shape, ranks = (7, 8, 9), (3, 2, 4)
    x = tm.FixedRankTucker(shape, ranks).random_point(
        key=0, xp=backend.library, dtype=dtype, device=backend.device
    )
    egrad = _problem(make, shape)
    cfg = engine.Config()
    y, _ = _engine_step(
        x, egrad, lr=0.05, config=cfg, capacity=ranks, adaptive_modes=(), fixed=True
    )
    ref = tm.fixed_rank_step(x, egrad, lr=0.05)
    assert y.host_ranks() == ranks
    assert rel(y.to_dense(), ref.to_dense()) <= 10 * rtol


def test_rank_bounds_and_absolute_tolerance_equal_truncate_core(backend, dtype, rtol):
    x = tm.FixedRankTucker((8, 9, 10), (6, 5, 6)).random_point(
        key=3, xp=backend.library, dtype=dtype, device=backend.device
    )
    for kwargs in [
        dict(tau=0.3, absolute=False),
        dict(tau=0.4, absolute=True),
        dict(tau=0.9, min_rank=3),
        dict(tau=1e-9, max_rank=(4, 5, 3)),
    ]:
        bounds = {k: kwargs.pop(k) for k in ("min_rank", "max_rank") if k in kwargs}
        cfg = engine.Config(**kwargs)
        lay = engine.make_layout(x.shape, (8, 8, 8), **bounds)
        p = PaddedTucker.from_tucker(x, lay.capacity)
        (y,), _, _ = engine.truncate([lay], cfg, [p], [p.ranks])
        ref, _ = tm.truncate_core(x, ranks=x.ranks, **kwargs, **bounds)
        assert y.host_ranks() == ref.ranks, kwargs
        assert rel(y.to_dense(), ref.to_dense()) <= 10 * rtol


@given(
    ranks=st.lists(st.integers(1, 6), min_size=3, max_size=3),
    tau=st.floats(0.0, 0.9),
    decay=st.floats(0.05, 1.0),
)
def test_device_rank_decision_equals_host_decision(ranks, tau, decay):
    """Rank by tolerance and feasibility lowering on the device equal truncate_core's."""
    shape = (7, 7, 7)
    ranks = tm.feasible_ranks(ranks)
    rng = np.random.default_rng(sum(ranks))
    core = rng.standard_normal(ranks)
    for k in range(3):  # decaying mode spectra
        u, _, vt = np.linalg.svd(tm.unfold(core, k), full_matrices=False)
        s = decay ** np.arange(u.shape[1])
        core = tm.fold(u * s @ vt, k, core.shape)
    factors = [np.linalg.qr(rng.standard_normal((n, r)))[0] for n, r in zip(shape, ranks)]
    x = tm.TuckerTensor(core, factors)
    lay = engine.make_layout(shape, (7, 7, 7))
    p = PaddedTucker.from_tucker(x, (7, 7, 7))
    (y,), _, (w,) = engine.truncate([lay], engine.Config(tau=tau), [p], [p.ranks])
    ref, _ = tm.truncate_core(x, tau=tau, ranks=x.ranks)
    assert y.host_ranks() == ref.ranks == tuple(int(v) for v in w)


def test_svd_all_handles_entries_near_the_dtype_limit(xp, dtype, rtol, make):
    """Matrices of a diverging run (entries near the largest float) keep their SVDs: the
    singular values scale exactly, nothing overflows into the norms or LAPACK."""
    rng = np.random.default_rng(3)
    base = [rng.standard_normal(s) for s in [(3, 7), (5, 2), (4, 4), (6, 3)]]
    big = float(xp.finfo(dtype).max) / 1e3
    scaled = [make(b / np.abs(b).max() * big) for b in base]
    small = [make(b) for b in base]
    for (u, s, vh), (u1, s1, vh1), b in zip(
        engine.svd_all(xp, scaled), engine.svd_all(xp, small), base
    ):
        assert np.all(np.isfinite(host(s)))
        assert rel(host(s) / big * np.abs(b).max(), s1) <= rtol
        assert rel(np.abs(host(u).T @ host(u1)), np.eye(len(host(s1)))) <= 10 * rtol
        assert rel(np.abs(host(vh) @ host(vh1).T), np.eye(len(host(s1)))) <= 10 * rtol


def test_many_weights_in_one_call_equal_one_at_a_time(backend, dtype, rtol, make):
    """Batched QR and SVD over weights of equal shapes change nothing."""
    shapes = [(6, 5, 3, 3), (6, 5, 3, 3), (8, 6), (6, 7, 3, 3)]
    ranks = [(3, 2, 3, 3), (2, 2, 3, 3), (3, 3), (3, 3, 3, 3)]
    caps = [(4, 4, 3, 3), (4, 4, 3, 3), (4, 4), (4, 4, 3, 3)]
    lays = [engine.make_layout(s, c, adaptive_modes=(0, 1)) for s, c in zip(shapes, caps)]
    rng = np.random.default_rng(0)
    points, grads = [], []
    for i, (s, r, c) in enumerate(zip(shapes, ranks, caps)):
        x = tm.FixedRankTucker(s, r).random_point(
            key=i, xp=backend.library, dtype=dtype, device=backend.device
        )
        p = PaddedTucker.from_tucker(x, c)
        G = make(rng.standard_normal(s))
        points.append(p)
        grads.append(_factor_grads(G, p.core, p.factors))
    cfg = engine.Config(tau=0.2)
    batched, bmaps = engine.augment(lays, points, grads)
    single = [engine.augment([lay], [p], [g]) for lay, p, g in zip(lays, points, grads)]
    for a, (s, _) in zip(batched, single):
        assert rel(a.to_dense(), s[0].to_dense()) <= rtol
    tb, _, wb = engine.truncate(lays, cfg, batched, [p.ranks for p in points])
    for lay, a, p, t, w in zip(lays, batched, points, tb, wb):
        (t1,), _, (w1,) = engine.truncate([lay], cfg, [a], [p.ranks])
        assert host(w).tolist() == host(w1).tolist()
        assert rel(t.to_dense(), t1.to_dense()) <= rtol


def test_momentum_and_adam_state_follow_the_bases(backend, dtype, rtol, make):
    """State transported through augmentation and truncation represents the same tensor as the
    literal transport of the unpadded state."""
    x = tm.FixedRankTucker((7, 8, 9), (3, 2, 4)).random_point(
        key=0, xp=backend.library, dtype=dtype, device=backend.device
    )
    rng = np.random.default_rng(5)
    state = make(rng.standard_normal(x.ranks))
    lay = engine.make_layout(x.shape, (4, 4, 4))
    p = PaddedTucker.from_tucker(x, lay.capacity)
    G = make(rng.standard_normal(x.shape))
    dU = _factor_grads(G, p.core, p.factors)
    (a,), (maps,) = engine.augment([lay], [p], [dU])
    padded_state = engine.pad_array(tm._compat.namespace_of(state), state, lay.capacity)
    moved = engine.transport(padded_state, maps)
    ref_x, ref_maps = tm.augment_basis(
        x, [g[:, :r] for g, r in zip(_factor_grads(G, x.core, x.factors), x.ranks)]
    )
    ref = tm.transport_core_state(state, ref_maps)
    # the same tensor in the (sign-equivalent) augmented bases: compare S ×_k Û_k
    assert (
        rel(
            tm.TuckerTensor(moved, a.factors).to_dense(),
            tm.TuckerTensor(ref, ref_x.factors).to_dense(),
        )
        <= 10 * rtol
    )
    v = make(rng.random(x.ranks))
    v_pad = engine.pad_array(tm._compat.namespace_of(v), v, lay.capacity)
    v_moved = engine.transport(v_pad, maps, second_moment=True)
    assert float(host(v_moved).min()) >= 0.0
    assert abs(float(host(v_moved).sum()) - float(host(v).sum())) <= 1e2 * rtol * float(
        host(v).sum()
    )


def test_one_pass_gradient_equals_projected_riemannian_gradient(backend, dtype, rtol, make):
    x = tm.FixedRankTucker((7, 8, 9), (3, 2, 4)).random_point(
        key=0, xp=backend.library, dtype=dtype, device=backend.device
    )
    M = tm.FixedRankTucker(x.shape, x.ranks)
    lay = engine.make_layout(x.shape, (4, 3, 5))
    p = PaddedTucker.from_tucker(x, lay.capacity)
    G = make(np.random.default_rng(3).standard_normal(x.shape))
    dC = tm.multi_mode_product(G, p.factors, transpose=True)
    dU = _factor_grads(G, p.core, p.factors)
    (a,), (maps,) = engine.augment([lay], [p], [dU])
    (g,) = engine.tangent_core_gradients([lay], [p], [a], [maps], [dC], [dU])
    xi = M.tangent_to_dense(x, M.egrad_to_rgrad(x, G))
    ref = tm.multi_mode_product(xi, a.factors, transpose=True)
    assert rel(g, ref) <= 1e2 * rtol


def test_inner_update_equals_torch_optimizers():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    c0 = torch.tensor(rng.standard_normal((3, 4)))
    grads = [torch.tensor(rng.standard_normal((3, 4))) for _ in range(4)]
    cases = [
        (engine.Config(inner="sgd"), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            engine.Config(inner="sgd", momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        (
            engine.Config(inner="adam", weight_decay=0.01),
            lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
        ),
        (
            engine.Config(inner="adamw", weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        ),
    ]
    for cfg, make_opt in cases:
        c, state = c0.clone(), engine.init_state(cfg, c0)
        p = torch.nn.Parameter(c0.clone())
        opt = make_opt([p])
        for i, g in enumerate(grads):
            c, state = engine.inner_update(cfg, c, g, state, i + 1, 0.1)
            p.grad = g.clone()
            opt.step()
        assert torch.allclose(c, p.detach(), atol=1e-13, rtol=0), cfg


def test_the_composed_step_jit_compiles_under_jax():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    shape, ranks, cap = (7, 8, 9), (3, 2, 4), (4, 4, 4)
    x = tm.FixedRankTucker(shape, ranks).random_point(key=0, xp="jax.numpy", dtype=jnp.float64)
    A = jnp.asarray(np.random.default_rng(2).standard_normal(shape))
    egrad = lambda y: y.to_dense() - A  # noqa: E731
    cfg = engine.Config(tau=0.1)
    lay = engine.make_layout(shape, cap)
    traces = []

    @jax.jit
    def step(p):
        traces.append(1)
        G = egrad(tm.TuckerTensor(p.core, p.factors))
        (a,), _ = engine.augment([lay], [p], [_factor_grads(G, p.core, p.factors)])
        gc = tm.multi_mode_product(
            egrad(tm.TuckerTensor(a.core, a.factors)), a.factors, transpose=True
        )
        c, _ = engine.inner_update(cfg, a.core, gc, (), 1, 0.05)
        (y,), _, (w,) = engine.truncate(
            [lay], cfg, [a._replace(core=c)], [p.ranks], out_capacity=[cap]
        )
        return y, w

    p = PaddedTucker.from_tucker(x, cap)
    y, w = step(p)
    y2, _ = step(p._replace(ranks=p.ranks))
    ref = tm.tdlrt_step(x, egrad, lr=0.05, tau=0.1)
    assert len(traces) == 1
    assert y.host_ranks() == ref.ranks
    assert rel(y.to_dense(), ref.to_dense()) <= 1e-10


def test_capacity_policy_and_padding_helpers():
    assert engine.capacity_sizes("pow2", 20) == (4, 8, 16, 20)
    assert engine.capacity_sizes("pow2", 3) == (3,)
    assert engine.capacity_sizes(None, 20) is None
    assert engine.capacity_of((4, 8, 16, 20), 17) == 20
    assert engine.capacity_of((4, 8, 16, 20), 99) == 20
    with pytest.raises(ValueError, match="capacity policy must be one of"):
        engine.check_capacity_policy("fib")
    with pytest.raises(ValueError, match="capacity sizes must be positive ints, got 0"):
        engine.check_capacity_policy((4, 0))
    x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    with pytest.raises(ValueError, match=r"need ranks\[0\] = 2 <= capacity\[0\] = 1"):
        PaddedTucker.from_tucker(x, (1, 2, 2))
    p = PaddedTucker.from_tucker(x, (3, 4, 2))
    q = p.with_capacity((2, 5, 3))
    assert q.capacity == (2, 5, 3) and np.allclose(q.to_dense(), x.to_dense())
    with pytest.raises(ValueError, match="cannot hold the ranks"):
        p.with_capacity((1, 2, 2))


def test_layout_validation_and_skipped_modes():
    lay = engine.make_layout((64, 32, 3, 3), (16, 8, 3, 3), adaptive_modes=(0, 1))
    assert lay.skip == (False, False, True, True)
    # a 1x3 kernel: the width mode could be lowered by feasibility when the channel ranks are 1
    lay = engine.make_layout((8, 8, 1, 3), (4, 4, 1, 3), adaptive_modes=(0, 1))
    assert lay.skip == (False, False, True, False)
    lay = engine.make_layout((8, 8, 1, 3), (4, 4, 1, 3), adaptive_modes=(0, 1), min_rank=3)
    assert lay.skip == (False, False, True, True)
    with pytest.raises(ValueError, match=r"adaptive_modes entries must be modes in \[0, 2\)"):
        engine.make_layout((4, 4), (2, 2), adaptive_modes=(2,))
    with pytest.raises(ValueError, match=r"min_rank\[1\] must be a positive integer"):
        engine.make_layout((4, 4), (2, 2), min_rank=(1, 0))
    with pytest.raises(ValueError, match="must lie in"):
        engine.make_layout((4, 4), (5, 2))
    with pytest.raises(ValueError, match="inner must be one of"):
        engine.Config(inner="rmsprop").checked()
    with pytest.raises(ValueError, match=r"momentum must be finite and >= 0 and < 1, got 1.5"):
        engine.Config(momentum=1.5).checked()
    with pytest.raises(ValueError, match="nesterov needs"):
        engine.Config(nesterov=True).checked()


def test_adam_moments_are_transported_exactly_by_signed_permutations(backend, dtype, make):
    """For maps that permute and flip basis vectors (the common case for kept directions) the
    first moment moves like the core and the second moment is permuted, both exactly."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((3, 4, 2))
    v = rng.random((3, 4, 2))
    maps, perms, signs = [], [], []
    for n in m.shape:
        p = rng.permutation(n)
        s = rng.choice([-1.0, 1.0], n)
        maps.append(make(np.eye(n)[p] * s[:, None]))
        perms.append(p)
        signs.append(s)
    cfg = engine.Config(inner="adam").checked()
    m2, v2 = engine.transport_state(cfg, (make(m), make(v)), maps)
    ref_m, ref_v = m, v
    for k, (p, s) in enumerate(zip(perms, signs)):
        ref_m = np.moveaxis(
            np.moveaxis(ref_m, k, 0)[p] * s.reshape(-1, *([1] * (m.ndim - 1))), 0, k
        )
        ref_v = np.moveaxis(np.moveaxis(ref_v, k, 0)[p], 0, k)
    got_m, got_v = tm.backends.to_numpy(m2), tm.backends.to_numpy(v2)
    assert np.array_equal(got_m, ref_m.astype(got_m.dtype))
    assert np.array_equal(got_v, ref_v.astype(got_v.dtype))


def test_the_gradient_rank_rule_decides_on_the_gradient_step_and_cuts_the_update():
    """truncate(decide=...) takes the ranks from the decision cores' spectra and truncates the
    points in their own singular bases: equal to truncate_core at those ranks."""
    x = tm.FixedRankTucker((8, 9, 10), (6, 5, 6)).random_point(key=3)
    rng = np.random.default_rng(4)
    grad = rng.standard_normal(x.ranks)
    cfg = engine.Config(inner="adam", tau=0.2).checked()
    new, _ = engine.inner_update(cfg, x.core, grad, engine.init_state(cfg, x.core), 1, 0.05)
    (dec,) = engine.decision_cores(cfg, [x.core], [new], [grad])
    assert np.isclose(np.linalg.norm(dec - x.core), np.linalg.norm(new - x.core))
    lay = engine.make_layout(x.shape, (8, 8, 8))
    y = tm.TuckerTensor(new, x.factors)
    p = PaddedTucker.from_tucker(y, lay.capacity)
    (t,), _, (w,) = engine.truncate(
        [lay], cfg, [p], [p.ranks], decide=[engine.pad_array(np, dec, lay.capacity)]
    )
    ranks_dec, _ = tm.truncate_core(tm.TuckerTensor(dec, x.factors), tau=0.2)
    ref, _ = tm.truncate_core(y, ranks=ranks_dec.ranks)
    assert t.host_ranks() == ranks_dec.ranks == tuple(int(r) for r in w)
    assert np.allclose(t.to_dense(), ref.to_dense(), atol=1e-12)
