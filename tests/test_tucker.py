"""Tucker tensors: mode algebra, ST-HOSVD, truncation and factored arithmetic against dense
references, on every backend and dtype."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import host, library_of, rel

import tuckerman as tm

SHAPE = (5, 6, 7)


def _random_tucker(rng, make, shape=SHAPE, ranks=(2, 3, 4), orthonormal=False):
    core = rng.standard_normal(ranks)
    factors = [rng.standard_normal((n, r)) for n, r in zip(shape, ranks)]
    if orthonormal:
        factors = [np.linalg.qr(u)[0] for u in factors]
    return tm.TuckerTensor(make(core), [make(u) for u in factors]), core, factors


def test_unfold_fold_roundtrip_and_layout(make, backend):
    a = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    for k in range(4):
        m = tm.unfold(make(a), k)
        ref = np.moveaxis(a, k, 0).reshape(a.shape[k], -1)
        assert np.array_equal(host(m), ref)
        assert np.array_equal(host(tm.fold(m, k, a.shape)), a)


def test_mode_product_matches_einsum(make, rtol):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(SHAPE)
    m = rng.standard_normal((3, 6))
    out = tm.mode_product(make(a), make(m), 1)
    assert rel(out, np.einsum("ijk,aj->iak", a, m)) <= rtol
    mats = [rng.standard_normal((n, 2)) for n in SHAPE]
    out = tm.multi_mode_product(make(a), [make(u) for u in mats], transpose=True)
    assert rel(out, np.einsum("ijk,ia,jb,kc->abc", a, *mats)) <= rtol


def test_to_dense_matches_einsum(make, rtol):
    rng = np.random.default_rng(1)
    x, core, factors = _random_tucker(rng, make)
    ref = np.einsum("abc,ia,jb,kc->ijk", core, *factors)
    assert rel(x.to_dense(), ref) <= rtol
    assert x.shape == SHAPE and x.ranks == (2, 3, 4) and x.ndim == 3


def test_hosvd_exact_and_orthonormal(make, rtol, dtype):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(SHAPE)
    x = tm.hosvd(make(a))
    assert x.ranks == SHAPE
    assert rel(x.to_dense(), a) <= rtol
    for u in x.factors:
        assert np.abs(host(u.mT @ u) - np.eye(u.shape[1])).max() <= rtol
    assert x.dtype == dtype


def test_hosvd_ranks_recover_low_rank_tensor(make, rtol):
    rng = np.random.default_rng(3)
    _, core, factors = _random_tucker(rng, lambda a: a)
    a = np.einsum("abc,ia,jb,kc->ijk", core, *factors)
    x = tm.hosvd(make(a), ranks=(2, 3, 4))
    assert x.ranks == (2, 3, 4)
    assert rel(x.to_dense(), a) <= rtol
    # an int rank applies to every mode, capped by what is possible
    assert tm.hosvd(make(a), ranks=2).ranks == (2, 2, 2)
    assert tm.hosvd(make(a[:2]), ranks=5).ranks == (2, 5, 5)


@pytest.mark.parametrize("tol", [0.5, 0.1, 0.01])
def test_hosvd_tolerance_bound_and_minimality(make, tol, backend):
    rng = np.random.default_rng(4)
    # decaying spectrum so that the tolerance picks intermediate ranks
    a = np.einsum(
        "ijk,i,j,k->ijk", rng.standard_normal(SHAPE), *(0.5 ** np.arange(n) for n in SHAPE)
    )
    x = tm.hosvd(make(a), tol=tol)
    err = np.linalg.norm(host(x.to_dense()) - a)
    assert err <= tol * np.linalg.norm(a) * (1 + 1e-5)
    assert all(1 <= r <= n for r, n in zip(x.ranks, SHAPE))
    assert x.ranks != SHAPE  # something was discarded
    # ranks cap the tolerance choice
    assert all(r <= 2 for r in tm.hosvd(make(a), ranks=2, tol=tol).ranks)


def test_truncate_equals_hosvd_of_dense_and_never_needs_orthonormal_input(make, rtol):
    rng = np.random.default_rng(5)
    x, _, _ = _random_tucker(rng, make, ranks=(3, 4, 4))
    dense = host(x.to_dense())
    y = tm.truncate(x)
    assert rel(y.to_dense(), dense) <= rtol
    for u in y.factors:
        assert np.abs(host(u.mT @ u) - np.eye(u.shape[1])).max() <= rtol
    # truncation to lower rank: best-possible up to the ST-HOSVD quasi-optimality, and equal to
    # the dense ST-HOSVD route (same subspaces)
    z = tm.truncate(x, ranks=(2, 2, 2))
    ref = tm.hosvd(make(dense), ranks=(2, 2, 2))
    assert rel(z.to_dense(), host(ref.to_dense())) <= 10 * rtol**0.5


def test_truncate_tolerance(make):
    rng = np.random.default_rng(6)
    x, _, _ = _random_tucker(rng, make, ranks=(3, 4, 4))
    small = tm.scale(_random_tucker(rng, make, ranks=(1, 1, 1))[0], 1e-3)
    y = tm.truncate(x + small, tol=1e-2)
    assert y.ranks == (3, 4, 4)
    assert rel(y.to_dense(), host((x + small).to_dense())) <= 1e-2


def test_inner_norm_add_scale_match_dense(make, rtol):
    rng = np.random.default_rng(7)
    x, _, _ = _random_tucker(rng, make)
    y, _, _ = _random_tucker(rng, make, ranks=(3, 1, 2))
    xd, yd = host(x.to_dense()), host(y.to_dense())
    scale = np.linalg.norm(xd) * np.linalg.norm(yd)
    assert abs(float(host(tm.inner(x, y))) - np.sum(xd * yd)) <= rtol * scale
    assert abs(float(host(tm.norm(x))) - np.linalg.norm(xd)) <= rtol * np.linalg.norm(xd)
    s = tm.add(x, y)
    assert s.ranks == (5, 4, 6)
    assert rel(s.to_dense(), xd + yd) <= rtol
    assert rel((x - y).to_dense(), xd - yd) <= rtol
    assert rel((-x).to_dense(), -xd) <= rtol
    assert rel(tm.scale(x, 2.5).to_dense(), 2.5 * xd) <= rtol
    assert rel((np.float64(2.0) * x).to_dense(), 2 * xd) <= rtol
    assert rel((x * 3).to_dense(), 3 * xd) <= rtol
    assert rel((x / 4).to_dense(), xd / 4) <= rtol


def test_results_keep_library_dtype(make, dtype, backend):
    rng = np.random.default_rng(8)
    x, _, _ = _random_tucker(rng, make)
    for out in (tm.truncate(x, 2), tm.add(x, x), tm.hosvd(x.to_dense(), 2)):
        assert library_of(out.core) == backend.library
        assert out.dtype == dtype
        assert all(u.dtype == dtype for u in out.factors)


def test_jax_pytree_and_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(9)
    x, _, _ = _random_tucker(rng, lambda a: jnp.asarray(a, dtype=jnp.float64))
    leaves, treedef = jax.tree_util.tree_flatten(x)
    assert len(leaves) == 4
    y = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(y, tm.TuckerTensor)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, x)
    assert isinstance(doubled, tm.TuckerTensor)
    dense = jax.jit(lambda t: t.to_dense())(x)
    assert rel(dense, host(x.to_dense())) <= 1e-12
    trunc = jax.jit(lambda t: tm.truncate(t, (2, 2, 2)))(x)
    assert rel(trunc.to_dense(), host(tm.truncate(x, (2, 2, 2)).to_dense())) <= 1e-10


def test_torch_pytree():
    torch = pytest.importorskip("torch")
    from torch.utils import _pytree

    rng = np.random.default_rng(10)
    x, _, _ = _random_tucker(rng, lambda a: torch.as_tensor(a))
    leaves, spec = _pytree.tree_flatten(x)
    assert len(leaves) == 4
    y = _pytree.tree_unflatten([2 * a for a in leaves], spec)
    assert isinstance(y, tm.TuckerTensor)
    assert rel(y.to_dense(), 16 * host(x.to_dense())) <= 1e-12  # 2^4: multilinear
