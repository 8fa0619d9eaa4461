"""The JAX integration: layers equal their dense references, the jitted TDLRT step equals the
core's ``tm.tdlrt_step`` and the torch optimizer (with rank-bucket padding active), it compiles
once per bucket, fixed-rank Riemannian optax transformations, vmap, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from tuckerman.integrations.jax import (  # noqa: E402
    TDLRT,
    apply_updates,
    init_tucker_conv,
    init_tucker_dense,
    riemannian_gradient,
    riemannian_sgd,
    stack_points,
    tucker_conv,
    tucker_dense,
    tucker_from_dense,
    unstack_points,
)

import tuckerman as tm  # noqa: E402

DTYPES = [jnp.float32, jnp.float64]


def _tol(dtype):
    return 1e3 * float(jnp.finfo(dtype).eps)


def _to_jax(x: tm.TuckerTensor, dtype=jnp.float64) -> tm.TuckerTensor:
    return tm.TuckerTensor(
        jnp.asarray(np.asarray(x.core), dtype),
        [jnp.asarray(np.asarray(u), dtype) for u in x.factors],
    )


def _dense(x: tm.TuckerTensor) -> np.ndarray:
    return np.asarray(x.to_dense(), dtype=np.float64)


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_tucker_dense_equals_dense_reference(dtype):
    p = init_tucker_dense(jax.random.key(0), 9, 7, ranks=3, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (4, 5, 9), dtype=dtype)
    w = np.asarray(p["weight"].to_dense(), np.float64)
    ref = np.asarray(x, np.float64) @ w.T + np.asarray(p["bias"], np.float64)
    out = tucker_dense(p, x)
    assert out.dtype == dtype and out.shape == (4, 5, 7)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_allclose(
        np.asarray(tucker_dense({"weight": p["weight"], "bias": None}, x)),
        ref - np.asarray(p["bias"], np.float64),
        atol=_tol(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(
    "strides, padding, dilation",
    [(1, "VALID", 1), (2, "SAME", 1), ((1, 2), ((2, 1), (0, 3)), (2, 1)), (1, 1, 2)],
)
def test_tucker_conv_equals_lax_conv(dtype, strides, padding, dilation):
    p = init_tucker_conv(jax.random.key(0), 3, 6, (3, 2), ranks=(4, 2, 2, 2), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3), dtype=dtype)
    out = tucker_conv(p, x, strides=strides, padding=padding, dilation=dilation)
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    w = p["weight"].to_dense().astype(jnp.float64)  # (C_out, C_in, k_h, k_w)
    st = (strides, strides) if isinstance(strides, int) else strides
    dl = (dilation, dilation) if isinstance(dilation, int) else dilation
    ref = lax.conv_general_dilated(
        x.astype(jnp.float64),
        w,
        st,
        pad,
        rhs_dilation=dl,
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
    ) + p["bias"].astype(jnp.float64)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), atol=_tol(dtype))


def test_initializers_and_from_dense():
    p = init_tucker_conv(jax.random.key(3), 6, 8, 3, ranks=(4, 3))
    w = p["weight"]
    assert w.ranks == (4, 3, 3, 3) and w.shape == (8, 6, 3, 3)
    for u in w.factors:
        u = np.asarray(u, np.float64)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
    # the dense weight has torch's default entry variance 1 / (3 fan_in) in expectation
    var = float(np.sum(np.asarray(w.core, np.float64) ** 2)) / (8 * 6 * 9)
    assert 0.5 < var * 3 * 6 * 9 < 2.0
    dense = np.random.default_rng(0).standard_normal((6, 4))
    q = tucker_from_dense(jnp.asarray(dense), ranks=3, bias=jnp.zeros(6))
    u, s, vt = np.linalg.svd(dense)
    np.testing.assert_allclose(_dense(q["weight"]), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-10)


# --------------------------------------------------------------------------- fixed-rank ops
def test_jitted_manifold_ops_equal_numpy():
    M = tm.FixedRankTucker((6, 7, 5), (2, 3, 2))
    x, y = M.random_point(key=0), M.random_point(key=1)
    z = np.random.default_rng(2).standard_normal(M.shape)
    xj, yj, zj = _to_jax(x), _to_jax(y), jnp.asarray(z)

    @jax.jit
    def ops(x, y, z):
        v = M.project(x, z)
        return v, M.retract(x, 0.1 * v), M.inner(x, v, v), M.transport(x, y, v)

    v, r, ip, t = ops(xj, yj, zj)
    v_np = M.project(x, z)
    np.testing.assert_allclose(
        np.asarray(M.tangent_to_dense(xj, v)), M.tangent_to_dense(x, v_np), atol=1e-12
    )
    np.testing.assert_allclose(_dense(r), M.retract(x, 0.1 * v_np).to_dense(), atol=1e-12)
    np.testing.assert_allclose(float(ip), float(M.inner(x, v_np, v_np)), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(M.tangent_to_dense(yj, t)),
        M.tangent_to_dense(y, M.transport(x, y, v_np)),
        atol=1e-12,
    )
    step = jax.jit(lambda x: tm.fixed_rank_step(x, lambda p: p.to_dense() - zj, lr=0.3))
    ref = tm.fixed_rank_step(x, lambda p: p.to_dense() - z, lr=0.3)
    np.testing.assert_allclose(_dense(step(xj)), ref.to_dense(), atol=1e-12)


def test_vmap_manifold_ops_equal_python_loop():
    M = tm.FixedRankTucker((6, 5, 4), (2, 2, 3))
    xs = [_to_jax(M.random_point(key=i)) for i in range(3)]
    zs = jnp.asarray(np.random.default_rng(0).standard_normal((3, *M.shape)))
    bx = stack_points(xs)

    def ops(x, z):
        v = M.project(x, z)
        y = M.retract(x, 0.2 * v)
        return v, y, M.inner(x, v, v), M.transport(x, y, v)

    bv, by, bip, bt = jax.jit(jax.vmap(ops))(bx, zs)
    single = jax.jit(ops)
    for i, (v, y, t) in enumerate(zip(unstack_points(bv), unstack_points(by), unstack_points(bt))):
        rv, ry, rip, rt = single(xs[i], zs[i])
        for got, ref in [(v, rv), (y, ry), (t, rt)]:  # the same representations
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)
        np.testing.assert_allclose(float(bip[i]), float(rip), rtol=1e-12)
    # and the single-point results are right: against NumPy
    v_np = M.project(
        tm.TuckerTensor(*jax.device_get((xs[0].core, xs[0].factors))), np.asarray(zs[0])
    )
    np.testing.assert_allclose(np.asarray(unstack_points(bv)[0].dcore), v_np.dcore, atol=1e-12)


# --------------------------------------------------------------------------- the TDLRT step
def _target(shape, ranks, key, noise=0.05):
    a = tm.FixedRankTucker(shape, ranks).random_point(key=key).to_dense()
    return a + noise * np.random.default_rng(key).standard_normal(shape)


def _w_loss(p, a):
    return 0.5 * jnp.sum((p["w"].to_dense() - a) ** 2)


def test_tdlrt_step_equals_core_tdlrt_step():
    shape = (9, 8, 7)
    a = _target(shape, 2, 1)
    x = tm.FixedRankTucker(shape, 3).random_point(key=0)
    tx = TDLRT(0.3, tau=0.05)  # buckets 4, 8, ...: the ranks are padded
    params = {"w": _to_jax(x)}
    state = tx.init(params)
    padded = False
    for _ in range(6):
        params, state, loss = tx.step(params, state, _w_loss, jnp.asarray(a))
        x_ref = x
        x = tm.tdlrt_step(x, lambda y: y.to_dense() - a, lr=0.3, tau=0.05)
        assert tx.ranks(state) == [x.ranks]
        padded |= params["w"].ranks != x.ranks
        np.testing.assert_allclose(_dense(params["w"]), x.to_dense(), atol=1e-12)
        np.testing.assert_allclose(float(loss), 0.5 * np.sum((x_ref.to_dense() - a) ** 2))
    assert x.ranks != (3, 3, 3)  # the ranks moved
    assert padded
    compact = tx.compact(params, state)["w"]
    assert compact.ranks == x.ranks
    np.testing.assert_allclose(_dense(compact), x.to_dense(), atol=1e-12)


# Adam's eps=1e-3: with the default 1e-8 the update m / (sqrt(v) + eps) turns moment entries
# that are pure rounding noise (1e-17) into 1e-10 steps, and the two frameworks round their
# second gradient evaluation differently (live block vs padded arrays); with a larger eps every
# formula (moments, their transport, bias correction) is still compared to 1e-10.
@pytest.mark.parametrize(
    "kwargs, dense",
    [
        (dict(momentum=0.9), "sgd"),
        (dict(inner="adam", weight_decay=1e-2, eps=1e-3), "adam"),
        (dict(inner="adamw", weight_decay=1e-1, eps=1e-3), "adam"),
        (dict(momentum=0.9, one_pass=True), "sgd"),
        (dict(momentum=0.9, augment_every=2), "sgd"),
    ],
    ids=["momentum", "adam", "adamw", "one_pass", "augment_every"],
)
def test_tdlrt_with_optimizer_state_equals_torch_tdlrt(kwargs, dense):
    torch = pytest.importorskip("torch")
    from tuckerman.integrations.torch import TDLRT as TorchTDLRT
    from tuckerman.integrations.torch import TuckerLinear

    torch.manual_seed(0)
    layer = TuckerLinear(9, 7, ranks=(3, 3), dtype=torch.float64)
    xb = torch.randn(20, 9, dtype=torch.float64)
    yb = torch.randn(20, 7, dtype=torch.float64)
    params = {
        "fc": {
            "weight": tm.TuckerTensor(
                jnp.asarray(layer.core.detach().numpy()),
                [jnp.asarray(u.detach().numpy()) for u in layer.factors],
            ),
            "bias": jnp.asarray(layer.bias.detach().numpy()),
        }
    }
    lr = 0.05 if dense == "adam" else 0.3
    opt = TorchTDLRT(layer, lr=lr, tau=0.1, **kwargs)
    tx = TDLRT(lr, tau=0.1, **kwargs)  # default dense: optax sgd / adam with the same settings
    state = tx.init(params)
    batch = (jnp.asarray(xb.numpy()), jnp.asarray(yb.numpy()))

    def loss_fn(p, b):
        return jnp.mean((tucker_dense(p["fc"], b[0]) - b[1]) ** 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(xb), yb)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
        params, state, _ = tx.step(params, state, loss_fn, batch)
        assert tx.ranks(state) == [layer.ranks]
        w = layer.dense_weight().detach().numpy()
        np.testing.assert_allclose(_dense(params["fc"]["weight"]), w, atol=1e-10)
        np.testing.assert_allclose(
            np.asarray(params["fc"]["bias"]), layer.bias.detach().numpy(), atol=1e-10
        )


def test_compilations_bounded_by_buckets_over_200_steps():
    shape = (12, 10, 8)
    targets = [jnp.asarray(_target(shape, r, k, noise=0.0)) for k, r in enumerate([2, 5, 3, 7, 1])]
    tx = TDLRT(1.0, tau=1e-3)
    params = {"w": _to_jax(tm.FixedRankTucker(shape, 2).random_point(key=9))}
    state = tx.init(params)
    for s in range(200):
        params, state, _ = tx.step(params, state, _w_loss, targets[(s // 20) % len(targets)])
    distinct_ranks = {tuple(h[0]) for h in tx.rank_history}
    assert tx.compilations <= len(tx.capacities_visited)
    assert len(distinct_ranks) > tx.compilations  # rank changes inside a bucket cost nothing
    assert (1, 1, 1) in distinct_ranks and any(r[0] >= 7 for r in distinct_ranks)
    # without buckets every new rank configuration compiles: the counter does count
    tx_exact = TDLRT(1.0, tau=1e-3, capacity=None)
    params = {"w": _to_jax(tm.FixedRankTucker(shape, 2).random_point(key=9))}
    state = tx_exact.init(params)
    for s in range(9):
        params, state, _ = tx_exact.step(params, state, _w_loss, targets[(s // 3) % 3])
    assert tx_exact.compilations == len(tx_exact.capacities_visited) >= 3


@pytest.mark.parametrize("variant", ["fixed_rank", "adaptive_modes"])
def test_fixed_rank_and_adaptive_modes_equal_core(variant):
    shape = (8, 7, 6)
    a = _target(shape, 3, 4)
    x = tm.FixedRankTucker(shape, 2).random_point(key=5)
    if variant == "fixed_rank":
        tx = TDLRT(0.4, fixed_rank=True)

        def ref_step(x):
            return tm.fixed_rank_step(x, lambda y: y.to_dense() - a, lr=0.4)
    else:
        tx = TDLRT(0.4, tau=0.05, adaptive_modes=(0, 2))

        def ref_step(x):
            return tm.tdlrt_step(
                x, lambda y: y.to_dense() - a, lr=0.4, tau=0.05, adaptive_modes=(0, 2)
            )

    params = {"w": _to_jax(x)}
    state = tx.init(params)
    for _ in range(3):
        params, state, _ = tx.step(params, state, _w_loss, jnp.asarray(a))
        x = ref_step(x)
        assert tx.ranks(state) == [x.ranks]
    assert x.ranks[1] == 2 and (variant == "fixed_rank") == (x.ranks == (2, 2, 2))
    np.testing.assert_allclose(_dense(params["w"]), x.to_dense(), atol=1e-12)


def test_nonfinite_step_is_refused_without_changes():
    x = _to_jax(tm.FixedRankTucker((6, 5, 4), 2).random_point(key=0))
    bad = jnp.full((6, 5, 4), jnp.nan)
    tx = TDLRT(0.1, tau=0.1, momentum=0.9)
    params = {"w": x}
    state = tx.init(params)
    with pytest.raises(FloatingPointError, match="non-finite"):
        tx.step(params, state, _w_loss, bad)
    skip = TDLRT(0.1, tau=0.1, on_nonfinite="skip")
    state = skip.init(params)
    p2, s2, _ = skip.step(params, state, _w_loss, bad)
    w = p2["w"]  # held at the capacity: the live block is the old point, bit for bit
    np.testing.assert_array_equal(np.asarray(w.core)[:2, :2, :2], np.asarray(x.core))
    for u, u0 in zip(w.factors, x.factors):
        np.testing.assert_array_equal(np.asarray(u)[:, :2], np.asarray(u0))
    assert skip.ranks(s2) == [(2, 2, 2)] and int(s2.count) == 0


def test_an_inner_update_that_overflows_is_refused():
    """Finite gradients, a new core that overflows float32: refused, not passed to the SVDs."""
    x = _to_jax(tm.FixedRankTucker((6, 5, 4), 2).random_point(key=0), jnp.float32)
    a = jnp.ones((6, 5, 4), jnp.float32)
    params = {"w": x}
    tx = TDLRT(1e38, tau=0.1)
    with pytest.raises(FloatingPointError, match="overflowed"):
        tx.step(params, tx.init(params), _w_loss, a)
    skip = TDLRT(1e38, tau=0.1, on_nonfinite="skip")
    p2, s2, _ = skip.step(params, skip.init(params), _w_loss, a)
    w = p2["w"]  # held at the capacity: the live block is the old point, bit for bit
    np.testing.assert_array_equal(np.asarray(w.core)[:2, :2, :2], np.asarray(x.core))
    for u, u0 in zip(w.factors, x.factors):
        np.testing.assert_array_equal(np.asarray(u)[:, :2], np.asarray(u0))
    assert skip.ranks(s2) == [(2, 2, 2)] and int(s2.count) == 0


# --------------------------------------------------------------------------- optax composition
def test_riemannian_transforms_compose_with_optax_chain():
    M = tm.FixedRankTucker((7, 6, 5), 2)
    x = M.random_point(key=0)
    a = _target(M.shape, 3, 1)
    b0 = np.arange(3.0)
    params = {"w": _to_jax(x), "b": jnp.asarray(b0)}

    def loss(p):
        return 0.5 * jnp.sum((p["w"].to_dense() - a) ** 2) + 0.5 * jnp.sum(p["b"] ** 2)

    # a schedule in the chain: lr 0.5 then 0.25
    tx = optax.chain(riemannian_gradient(), optax.scale_by_schedule(lambda c: -0.5 / (1 + c)))
    state = tx.init(params)
    step = jax.jit(
        lambda p, s: (lambda u, s: (apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p))
    )
    ref, b = x, b0
    for lr in (0.5, 0.25):
        params, state = step(params, state)
        ref = M.retract(ref, -lr * M.project(ref, ref.to_dense() - a))  # dense projection
        b = b - lr * b
    np.testing.assert_allclose(_dense(params["w"]), ref.to_dense(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(params["b"]), b, atol=1e-14)

    # transported heavy-ball momentum against a hand-written NumPy loop
    params = {"w": _to_jax(x), "b": jnp.asarray(b0)}
    tx = riemannian_sgd(0.3, momentum=0.8)
    state = tx.init(params)
    step = jax.jit(
        lambda p, s: (lambda u, s: (apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p))
    )
    ref, buf, prev = x, M.zero_tangent(x), x
    for _ in range(4):
        params, state = step(params, state)
        buf = 0.8 * M.transport(prev, ref, buf) + M.project(ref, ref.to_dense() - a)
        prev, ref = ref, M.retract(ref, -0.3 * buf)
    np.testing.assert_allclose(_dense(params["w"]), ref.to_dense(), atol=1e-11)


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_rejected_clearly():
    p = init_tucker_dense(jax.random.key(0), 8, 6, ranks=3)
    with pytest.raises(ValueError, match=r"\(5, 7\).*\(\.\.\., 8\)"):
        tucker_dense(p, jnp.ones((5, 7)))
    c = init_tucker_conv(jax.random.key(0), 3, 4, 3, ranks=2)
    with pytest.raises(ValueError, match=r"NHWC \(N, H, W, 3\)"):
        tucker_conv(c, jnp.ones((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="padding"):
        tucker_conv(c, jnp.ones((1, 8, 8, 3)), padding="FULL")
    with pytest.raises(ValueError, match="strides"):
        tucker_conv(c, jnp.ones((1, 8, 8, 3)), strides=0)
    with pytest.raises(ValueError, match=r"infeasible ranks \(3, 2\)"):
        init_tucker_dense(jax.random.key(0), 8, 6, ranks=(3, 2))
    with pytest.raises(TypeError, match="TuckerTensor of order 2"):
        tucker_dense({"weight": jnp.ones((6, 8))}, jnp.ones((2, 8)))
    for kwargs, err, match in [
        (dict(learning_rate=-1.0), ValueError, "learning_rate"),
        (dict(learning_rate=0.1, tau=-0.5), ValueError, "tau"),
        (dict(learning_rate=0.1, inner="rmsprop"), ValueError, "rmsprop"),
        (dict(learning_rate=0.1, capacity=(4, 0)), ValueError, "capacity"),
        (dict(learning_rate=0.1, dense=optax.sgd), TypeError, "GradientTransformation"),
        (dict(learning_rate=0.1, momentum=1.5), ValueError, "momentum"),
    ]:
        with pytest.raises(err, match=match):
            TDLRT(**kwargs)
    tx = TDLRT(0.1, max_rank=2)
    with pytest.raises(ValueError, match="no TuckerTensor"):
        tx.init({"b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"ranks\[0\] = 3 exceeds max_rank 2"):
        tx.init({"fc": p})
    skewed = {"weight": tm.TuckerTensor(p["weight"].core, [2 * u for u in p["weight"].factors])}
    with pytest.raises(ValueError, match="not orthonormal"):
        TDLRT(0.1).init({"fc": skewed})
    tx = TDLRT(0.1)
    state = tx.init({"fc": p})
    with pytest.raises(TypeError, match="loss_fn"):
        tx.step({"fc": p}, state, "mse", None)
    with pytest.raises(ValueError, match="2 Tucker weights but the state was made for 1"):
        tx.step({"fc": p, "g": p}, state, lambda q, b: 0.0, None)
    with pytest.raises(ValueError, match="needs params"):
        riemannian_gradient().update({"w": p["weight"]}, optax.EmptyState())
    with pytest.raises(TypeError, match="TangentVector"):
        apply_updates({"w": p["weight"]}, {"w": p["weight"]})


@pytest.mark.parametrize("inner", ["adam", "adamw"])
def test_adam_with_a_fixed_basis_equals_optax_on_the_core(inner):
    """Full rank, fixed ranks: the step is the inner optimizer on the core, optax's own."""
    x = tm.FixedRankTucker((5, 5), 5).random_point(key=0)
    a = jnp.asarray(_target((5, 5), 2, 3))
    tx = TDLRT(0.01, inner=inner, weight_decay=0.1, fixed_rank=True)
    params = {"w": _to_jax(x)}
    state = tx.init(params)
    if inner == "adam":
        ref_tx = optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))
    else:
        ref_tx = optax.adamw(0.01, weight_decay=0.1)
    core, factors = jnp.asarray(x.core), [jnp.asarray(u) for u in x.factors]
    ref_state = ref_tx.init(core)

    def core_loss(c):
        return 0.5 * jnp.sum((tm.TuckerTensor(c, factors).to_dense() - a) ** 2)

    for _ in range(5):
        params, state, _ = tx.step(params, state, _w_loss, a)
        updates, ref_state = ref_tx.update(jax.grad(core_loss)(core), ref_state, core)
        core = optax.apply_updates(core, updates)
        np.testing.assert_allclose(np.asarray(params["w"].core), np.asarray(core), atol=1e-13)
        for u, f in zip(params["w"].factors, factors):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(f))
