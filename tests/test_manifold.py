"""The fixed-rank Tucker manifold: conformance properties on every backend and dtype, dense and
independent references, second-order geometry, jit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import host, library_of, rel
from hypothesis import given, settings
from hypothesis import strategies as st

import tuckerman as tm
from tuckerman.testing import checks, conditioned_point
from tuckerman.testing import strategies as tst


def _dense_problem(M, x, seed=0):
    """f(X) = <A, X>^2 / 2 + sum(B * X^3) / 3: non-quadratic, so the Weingarten term matters."""
    rng = np.random.default_rng(seed)
    xp = x._namespace()
    kw = {} if (d := x.device) is None or library_of(x.core) == "jax" else {"device": d}
    A = xp.asarray(rng.standard_normal(M.shape), dtype=x.dtype, **kw)
    B = xp.asarray(rng.standard_normal(M.shape), dtype=x.dtype, **kw)

    def cost(y):
        Y = y.to_dense()
        return xp.sum(A * Y) ** 2 / 2 + xp.sum(B * Y**3) / 3

    def egrad(y):
        Y = y.to_dense()
        return xp.sum(A * Y) * A + B * Y**2

    def ehess(y, d):
        return xp.sum(A * d) * A + 2 * B * y.to_dense() * d

    return cost, egrad, ehess


# --------------------------------------------------------------------------- conformance
def _examples(backend) -> int:
    """JAX dispatches op by op outside jit (slow for tiny arrays): fewer examples there."""
    return 6 if backend.library == "jax" else settings.default.max_examples


def test_conformance_any_order(backend, dtype, min_decay):
    """Projection, inner product, transport and gauge invariance, cores down to 1e-12."""

    @settings(max_examples=_examples(backend))
    @given(data=st.data())
    def run(data):
        M = data.draw(tst.manifolds(max_order=4, max_size=6))
        x = data.draw(
            tst.points(
                M, xp=backend.library, dtype=dtype, device=backend.device, min_decay=min_decay
            )
        )
        z = data.draw(tst.ambient_tensors(M, x))
        key = data.draw(st.integers(0, 1000))
        checks.check_projection(M, x, z, key=key)
        u = data.draw(tst.tangent_vectors(M, x))
        v = data.draw(tst.tangent_vectors(M, x))
        checks.check_inner(M, x, u, v)
        y = M.retract(x, 0.01 * u / M.norm(x, u))
        checks.check_transport(M, x, y, v)
        checks.check_gauge_invariance(M, x, z, key=key)
        for out in (M.project(x, z), y):
            assert library_of(out[0]) == backend.library
            assert out[0].dtype == dtype

    run()


def test_retraction_properties(backend, dtype):
    @settings(max_examples=_examples(backend))
    @given(data=st.data())
    def run(data):
        M = data.draw(tst.manifolds(max_order=4, max_size=6))
        x = data.draw(
            tst.points(M, xp=backend.library, dtype=dtype, device=backend.device, min_decay=1e-1)
        )
        v = M.random_tangent(x, key=data.draw(st.integers(0, 1000)))
        checks.check_retraction(M, x, v)

    run()


def test_ill_conditioned_core_retraction_stays_on_manifold(backend, dtype, min_decay):
    M = tm.FixedRankTucker((8, 9, 10), (3, 4, 5))
    x = conditioned_point(
        M, 0, decay=min_decay, xp=backend.library, dtype=dtype, device=backend.device
    )
    assert M.check_point(x)
    v = M.project(
        x, tst.backends.normal(x._namespace(), M.shape, key=1, dtype=dtype, device=backend.device)
    )
    step = min_decay * 1e-2 / float(host(M.norm(x, v)))
    y = M.retract(x, step * v)
    assert M.check_point(y, explain=True) == (True, None)
    vd = host(M.tangent_to_dense(x, v))
    assert np.all(np.isfinite(vd))
    eps = float(x._namespace().finfo(dtype).eps)
    err = np.linalg.norm(host(y.to_dense()) - host(x.to_dense()) - step * vd)
    assert err <= 1e3 * eps * np.linalg.norm(host(x.to_dense())) + step * np.linalg.norm(vd) * 1e-2


def test_gradient_and_hessian_finite_differences(backend, dtype):
    if float(tm._compat.namespace_from_name(backend.library).finfo(dtype).eps) > 1e-10:
        ts = np.logspace(-1, -2.5, 6)
    else:
        ts = None
    for shape, ranks in [((6, 7, 8), (2, 3, 4)), ((5, 6), (2, 2)), ((4, 5, 3, 4), (2, 2, 3, 2))]:
        M = tm.FixedRankTucker(shape, ranks)
        x = M.random_point(key=3, xp=backend.library, dtype=dtype, device=backend.device)
        cost, egrad, ehess = _dense_problem(M, x)
        checks.check_gradient(M, cost, egrad, x, key=4, ts=ts)
        checks.check_hessian(M, egrad, ehess, x, key=5, ts=ts, rtol=None if ts is None else 1e-3)


def test_tucker_ambient_projection_and_hessian_never_densify(backend, dtype, rtol):
    """Projecting a TuckerTensor equals projecting its dense form; same for the Hessian."""
    M = tm.FixedRankTucker((6, 7, 8), (2, 3, 2))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    other = tm.FixedRankTucker((6, 7, 8), (3, 2, 4)).random_point(
        key=1, xp=backend.library, dtype=dtype, device=backend.device
    )
    dense = other.to_dense()
    assert (
        rel(
            M.tangent_to_dense(x, M.project(x, other)),
            host(M.tangent_to_dense(x, M.project(x, dense))),
        )
        <= rtol
    )
    v = M.random_tangent(x, key=2)
    h_t = M.ehess_to_rhess(x, other, M.tangent_to_tucker(x, v), v)
    h_d = M.ehess_to_rhess(x, dense, M.tangent_to_dense(x, v), v)
    assert rel(M.tangent_to_dense(x, h_t), host(M.tangent_to_dense(x, h_d))) <= rtol


def test_sparse_ambient_projection_and_hessian(backend, dtype, rtol):
    """A SparseTensor gradient gives what its dense form gives, for project and the Hessian."""
    M = tm.FixedRankTucker((6, 7, 8), (2, 3, 2))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    rng = np.random.default_rng(1)
    xp = x._namespace()
    kw = {} if backend.device is None else {"device": backend.device}
    idx = xp.asarray(np.stack([rng.integers(0, n, 40) for n in M.shape], axis=1), **kw)
    vals = xp.asarray(rng.standard_normal(40), dtype=dtype, **kw)
    S = tm.SparseTensor(idx, vals, M.shape)
    dense = S.to_dense()
    assert (
        rel(
            M.tangent_to_dense(x, M.project(x, S)), host(M.tangent_to_dense(x, M.project(x, dense)))
        )
        <= rtol
    )
    v = M.random_tangent(x, key=2)
    h_s = M.ehess_to_rhess(x, S, S, v)
    h_d = M.ehess_to_rhess(x, dense, dense, v)
    assert rel(M.tangent_to_dense(x, h_s), host(M.tangent_to_dense(x, h_d))) <= rtol


# --------------------------------------------------------------------------- references
class FixedRankMatrixReference:
    """Independent dense implementation of the fixed-rank matrix manifold (embedded geometry of
    Vandereycken 2013; Weingarten map of Absil, Mahony & Trumpf 2013)."""

    def __init__(self, U, S, V):
        self.U, self.S, self.V = U, S, V
        self.X = U @ S @ V.T
        self.PU, self.PV = U @ U.T, V @ V.T

    def project(self, Z):
        return self.PU @ Z + Z @ self.PV - self.PU @ Z @ self.PV

    def retract(self, xi, r):
        w, s, vt = np.linalg.svd(self.X + xi)
        return (w[:, :r] * s[:r]) @ vt[:r]

    def rhess(self, egrad, ehess_xi, xi):
        n = egrad - self.project(egrad)
        xpinv_t = np.linalg.pinv(self.X).T
        return self.project(ehess_xi) + n @ xi.T @ xpinv_t + xpinv_t @ xi.T @ n


def test_order_two_agrees_with_fixed_rank_matrix_manifold(rtol, make, dtype, backend):
    m, n, r = 9, 7, 3
    M = tm.FixedRankTucker((m, n), (r, r))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    U, V, S = host(x.factors[0]), host(x.factors[1]), host(x.core)
    ref = FixedRankMatrixReference(U, S, V)
    assert M.dim == (m + n - r) * r
    rng = np.random.default_rng(1)
    Z, E = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    xi = M.project(x, make(Z))
    xid = ref.project(Z)
    cond = np.linalg.cond(S)
    assert rel(M.tangent_to_dense(x, xi), xid) <= rtol * cond
    assert rel(M.retract(x, 0.3 * xi).to_dense(), ref.retract(0.3 * xid, r)) <= rtol * cond
    h = M.ehess_to_rhess(x, make(E), make(xid), xi)
    assert rel(M.tangent_to_dense(x, h), ref.rhess(E, xid, xid)) <= rtol * cond**2


def test_dimension_equals_rank_of_projection():
    """dim is the rank of the projection operator assembled column by column (numpy)."""
    for shape, ranks in [((3, 4, 5), (2, 2, 3)), ((4, 3), (2, 2)), ((2, 3, 2, 3), (2, 2, 1, 2))]:
        M = tm.FixedRankTucker(shape, ranks)
        x = M.random_point(key=0)
        N = math.prod(shape)
        cols = [
            host(M.tangent_to_dense(x, M.project(x, np.eye(N)[i].reshape(shape)))).ravel()
            for i in range(N)
        ]
        P = np.stack(cols, axis=1)
        assert np.allclose(P, P.T, atol=1e-12)  # orthogonal projector
        assert np.allclose(P @ P, P, atol=1e-12)
        assert np.linalg.matrix_rank(P, tol=1e-8) == M.dim


# --------------------------------------------------------------------------- tangent vectors
def test_tangent_vector_arithmetic(backend, dtype, rtol):
    M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    xp = x._namespace()
    u, v = M.random_tangent(x, key=1), M.random_tangent(x, key=2)
    ud, vd = host(M.tangent_to_dense(x, u)), host(M.tangent_to_dense(x, v))
    zero_d = xp.asarray(
        2.0, dtype=dtype, **({} if backend.device is None else {"device": backend.device})
    )
    cases = {
        "add": (u + v, ud + vd),
        "sub": (u - v, ud - vd),
        "neg": (-u, -ud),
        "int_left": (3 * u, 3 * ud),
        "float_right": (u * 0.5, 0.5 * ud),
        "np_scalar_left": (np.float64(2.0) * u, 2 * ud),
        "np_scalar_right": (u * np.float32(2), 2 * ud),
        "np_0d_left": (np.asarray(2.0) * u, 2 * ud),
        "array_0d_right": (u * zero_d, 2 * ud),
        "div": (u / 4, ud / 4),
        "div_0d": (u / zero_d, ud / 2),
    }
    if backend.library != "array_api_strict":
        # array_api_strict's Array.__mul__ raises TypeError instead of returning NotImplemented,
        # so Python never reaches TangentVector.__rmul__ for a strict 0-d array on the left
        cases["array_0d_left"] = (zero_d * u, 2 * ud)
    for name, (w, ref) in cases.items():
        assert isinstance(w, tm.TangentVector), name
        assert w.dcore.dtype == dtype, name
        assert library_of(w.dcore) == backend.library, name
        assert rel(M.tangent_to_dense(x, w), ref) <= rtol, name
    assert float(host(M.norm(x, M.zero_tangent(x)))) == 0.0


def test_project_tangent_vector_regauges(backend, dtype, rtol):
    M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))
    x = M.random_point(key=0, xp=backend.library, dtype=dtype, device=backend.device)
    v = M.random_tangent(x, key=1)
    # leave the gauge: add U_k W_k to dU_k (the same tangent vector up to the core part)
    rng = np.random.default_rng(2)
    xp = x._namespace()
    kw = {} if backend.device is None else {"device": backend.device}
    off = tm.TangentVector(
        v.dcore,
        [
            du + u @ xp.asarray(rng.standard_normal((r, r)), dtype=dtype, **kw)
            for u, du, r in zip(x.factors, v.dfactors, M.ranks)
        ],
    )
    assert not M.check_tangent(x, off)
    w = M.project(x, off)
    assert M.check_tangent(x, w)
    assert rel(M.tangent_to_dense(x, w), host(M.tangent_to_dense(x, off))) <= rtol


# --------------------------------------------------------------------------- jit
def test_jax_jit_fixed_rank_operations_equal_numpy():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    M = tm.FixedRankTucker((6, 7, 8), (2, 3, 2))
    x_np = M.random_point(key=0)
    z_np = np.random.default_rng(1).standard_normal(M.shape)
    x = jax.tree_util.tree_map(jnp.asarray, x_np)
    z = jnp.asarray(z_np)

    project = jax.jit(M.project)
    retract = jax.jit(M.retract)
    transport = jax.jit(M.transport)
    inner = jax.jit(M.inner)
    hess = jax.jit(M.ehess_to_rhess)

    v, v_np = project(x, z), M.project(x_np, z_np)
    assert rel(M.tangent_to_dense(x, v), M.tangent_to_dense(x_np, v_np)) <= 1e-12
    y, y_np = retract(x, 0.1 * v), M.retract(x_np, 0.1 * v_np)
    assert rel(y.to_dense(), y_np.to_dense()) <= 1e-12
    w, w_np = transport(x, y, v), M.transport(x_np, y_np, v_np)
    assert rel(M.tangent_to_dense(y, w), M.tangent_to_dense(y_np, w_np)) <= 1e-10
    assert abs(float(inner(x, v, v)) - float(M.inner(x_np, v_np, v_np))) <= 1e-10
    vd, vd_np = M.tangent_to_dense(x, v), M.tangent_to_dense(x_np, v_np)
    h, h_np = hess(x, z, vd, v), M.ehess_to_rhess(x_np, z_np, vd_np, v_np)
    assert rel(M.tangent_to_dense(x, h), M.tangent_to_dense(x_np, h_np)) <= 1e-10
    # a whole RGD step compiles once and reproduces the numpy step
    step = jax.jit(lambda p, g: M.retract(p, -0.05 * M.project(p, g)))
    s1 = step(x, z)
    assert rel(s1.to_dense(), M.retract(x_np, -0.05 * v_np).to_dense()) <= 1e-12


def test_random_point_keys(backend, dtype):
    M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))
    kw = dict(xp=backend.library, dtype=dtype, device=backend.device)
    a, b = M.random_point(key=7, **kw), M.random_point(key=7, **kw)
    assert np.array_equal(host(a.core), host(b.core))
    c = M.random_point(key=8, **kw)
    assert not np.array_equal(host(a.core), host(c.core))
    assert M.check_point(a)
    assert library_of(a.core) == backend.library and a.dtype == dtype


def test_random_point_framework_generators():
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(M.random_point(key=g1, xp=torch).core, M.random_point(key=g2, xp=torch).core)
    k = jax.random.key(0)
    import jax.numpy as jnp

    assert bool(jnp.all(M.random_point(key=k, xp=jnp).core == M.random_point(key=k, xp=jnp).core))
    rng = np.random.default_rng(0)
    assert M.check_point(M.random_point(key=rng))
    # default: numpy float64
    assert M.random_point(key=0).dtype == np.float64
