"""geoopt's generic manifold checks, run on the Tucker bridge.

geoopt tests every manifold it ships with one parametrized set of checks (its
``tests/test_manifold_basic.py``): each case is a point ``x`` built in closed form from an
ambient tensor ``ex`` (so that ``projx(ex)`` must give ``x``), and a tangent vector ``v`` built in
closed form from an ambient ``ev`` (so that ``proju(x, ev)`` must give ``v``); the checks then run
with seeds 1-5 in float64 and compare every map on a stack of four points with the same map
point by point. This module builds the Tucker cases the same way and runs the same checks, written
for this harness. It skips exactly where geoopt's own checks skip: the reversibility check for a
manifold whose ``reversible`` is False, and the log-map check when ``logmap`` raises
``NotImplementedError`` (the fixed-rank manifold has no closed-form logarithm or distance).

The closed forms, independent of the bridge and of the core:

- point: per factor the Cholesky QR ``A_k = Q_k R_k`` (``R_k`` the transposed Cholesky factor of
  ``A_kᵀA_k``, positive diagonal), ``U_k = Q_k``, core ``C ×_k R_k`` (same tensor);
- tangent vector: the gauge representative ``U̇_k − U_k A_k``, ``Ċ + Σ_k C ×_k A_k`` with
  ``A_k = U_kᵀ U̇_k`` (same tangent tensor, ``U_kᵀ U̇_k = 0``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
geoopt = pytest.importorskip("geoopt")
from tuckerman.integrations.geoopt import TuckerManifold  # noqa: E402

torch.set_num_threads(1)

# (shape, ranks): an order-3 and an order-4 case with unequal ranks
CASES = {"order3": ((5, 6, 7), (2, 3, 2)), "order4": ((3, 4, 3, 2), (2, 3, 2, 2))}


class UnaryCase(NamedTuple):
    shape: tuple[int, ...]  # shape of one packed tensor
    x: torch.Tensor  # a point
    ex: torch.Tensor  # an ambient packed tensor with projx(ex) = x
    v: torch.Tensor  # a tangent vector at x
    ev: torch.Tensor  # an ambient packed vector with proju(x, ev) = v
    manifold: TuckerManifold


def _mode(core: torch.Tensor, matrix: torch.Tensor, k: int) -> torch.Tensor:
    """``core ×_k matrix`` by moving axis k to the front (written here, not the library's)."""
    moved = torch.movedim(core, k, 0)
    out = torch.tensordot(matrix, moved, dims=([1], [0]))
    return torch.movedim(out, 0, k)


def _pieces(M: TuckerManifold, packed: torch.Tensor):
    sizes = [math.prod(M.ranks)] + [n * r for n, r in zip(M.shape, M.ranks)]
    parts = list(torch.split(packed, sizes))
    core = parts[0].reshape(M.ranks)
    return core, [p.reshape(n, r) for p, n, r in zip(parts[1:], M.shape, M.ranks)]


def _packed(core: torch.Tensor, factors) -> torch.Tensor:
    return torch.cat([core.reshape(-1), *(f.reshape(-1) for f in factors)])


def tucker_case(name: str) -> UnaryCase:
    shape, ranks = CASES[name]
    manifold = TuckerManifold(shape, ranks)
    generator = torch.Generator().manual_seed(42)
    size = manifold.packed_size
    ex = torch.randn(size, generator=generator, dtype=torch.float64)
    ev = torch.randn(size, generator=generator, dtype=torch.float64)

    core, factors = _pieces(manifold, ex)
    orthonormal = []
    for k, a in enumerate(factors):
        r = torch.linalg.cholesky(a.T @ a).T  # upper triangular, positive diagonal
        orthonormal.append(torch.linalg.solve_triangular(r, a, upper=True, left=False))
        core = _mode(core, r, k)
    x = _packed(core, orthonormal)

    dcore, dfactors = _pieces(manifold, ev)
    gauged = []
    for k, (u, du) in enumerate(zip(orthonormal, dfactors)):
        a = u.T @ du
        gauged.append(du - u @ a)
        dcore = dcore + _mode(core, a, k)
    v = _packed(dcore, gauged)
    return UnaryCase((size,), geoopt.ManifoldTensor(x, manifold=manifold), ex, v, ev, manifold)


@pytest.fixture(autouse=True, params=[1, 2, 3, 4, 5])
def seed(request):
    torch.manual_seed(request.param)


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module", params=sorted(CASES))
def unary_case(request) -> UnaryCase:
    return tucker_case(request.param)


def _close(actual, desired, atol):
    np.testing.assert_allclose(actual.detach().numpy(), desired.detach().numpy(), atol=atol)


def _stack(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t] * 4)


def test_projection_identity(unary_case):
    _close(unary_case.manifold.projx(unary_case.x), unary_case.x, atol=1e-6)


def test_projection_via_assert(unary_case):
    px = unary_case.manifold.projx(unary_case.ex)
    unary_case.manifold.assert_check_point_on_manifold(px)
    _close(px, unary_case.x, atol=1e-6)


def test_vector_projection_via_assert(unary_case):
    pv = unary_case.manifold.proju(unary_case.x, unary_case.ev)
    unary_case.manifold.assert_check_vector_on_tangent(unary_case.x, pv)
    _close(pv, unary_case.v, atol=1e-6)


def test_broadcast_projx(unary_case):
    M = unary_case.manifold
    X = _stack(unary_case.ex)
    pX = M.projx(X)
    assert pX.shape == X.shape
    M.assert_check_point_on_manifold(pX)
    for x, px in zip(X, pX):
        M.assert_check_point_on_manifold(px)
        _close(px, M.projx(x), atol=1e-7)


def test_broadcast_proju(unary_case):
    M = unary_case.manifold
    pX, U = _stack(unary_case.x), _stack(unary_case.v)
    pU = M.proju(pX, U)
    M.assert_check_vector_on_tangent(pX, pU)
    for px, u, pu in zip(pX, U, pU):
        M.assert_check_vector_on_tangent(px, pu, atol=1e-5)
        _close(pu, M.proju(px, u), atol=1e-5)


def test_broadcast_retr(unary_case):
    M = unary_case.manifold
    pX = _stack(unary_case.x)
    pU = M.proju(pX, _stack(unary_case.v))
    Y = M.retr(pX, pU)
    M.assert_check_point_on_manifold(Y)
    for px, pu, y in zip(pX, pU, Y):
        M.assert_check_point_on_manifold(y)
        _close(y, M.retr(px, pu), atol=1e-5)


def test_broadcast_transp(unary_case):
    M = unary_case.manifold
    pX = _stack(unary_case.x)
    pU = M.proju(pX, _stack(unary_case.v))
    pV = M.proju(pX, torch.randn(4, *unary_case.shape, dtype=unary_case.x.dtype))
    Y = M.retr(pX, pU)
    Q = M.transp_follow_retr(pX, pU, pV)
    M.assert_check_vector_on_tangent(Y, Q)
    for px, pu, pv, y, q in zip(pX, pU, pV, Y, Q):
        M.assert_check_vector_on_tangent(y, q)
        _close(q, M.transp_follow_retr(px, pu, pv), atol=1e-5)


def test_reversibility(unary_case):
    M = unary_case.manifold
    if not M.reversible:
        pytest.skip(f"{M} is not reversible (geoopt checks reversible manifolds only)")
    pX = _stack(unary_case.x)
    U = M.proju(pX, torch.randn(4, *unary_case.shape, dtype=unary_case.x.dtype) / 3)
    Z, Q = M.retr_transp(pX, U, U)
    X1, U1 = M.retr_transp(Z, -Q, Q)
    _close(X1, pX, atol=1e-5)
    _close(U1, U, atol=1e-5)


def test_logmap(unary_case):
    M = unary_case.manifold
    pX = _stack(unary_case.x)
    # one vector against a stack of points: broadcast over the batch dimension
    U = M.proju(pX, torch.randn(*unary_case.shape, dtype=unary_case.x.dtype))
    Y = M.expmap(pX, U)
    try:
        Uh = M.logmap(pX, Y)
    except NotImplementedError:
        pytest.skip(f"{M} has no closed-form logmap")
    _close(M.expmap(pX, Uh), Y, atol=1e-6)
