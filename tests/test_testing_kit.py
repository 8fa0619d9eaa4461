"""The public testing kit: strategies draw what they promise, and every conformance check
catches a broken manifold (a check that cannot fail would prove nothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tuckerman as tm
from tuckerman.testing import checks
from tuckerman.testing import strategies as tst

SHAPE, RANKS = (5, 6, 7), (2, 3, 2)


@given(tst.shapes_and_ranks(min_order=2, max_order=4, max_size=6))
def test_shapes_and_ranks_are_feasible(shape_ranks):
    shape, ranks = shape_ranks
    assert 2 <= len(shape) <= 4
    for k, (n, r) in enumerate(zip(shape, ranks)):
        assert 1 <= r <= n
        assert r <= math.prod(ranks[:k] + ranks[k + 1 :])
    tm.FixedRankTucker(shape, ranks)  # accepted


@given(st.data())
def test_points_have_requested_conditioning(data):
    M = data.draw(tst.manifolds(max_order=3, max_size=6))
    x = data.draw(tst.points(M, min_decay=1e-8))
    assert M.check_point(x)
    assert tm.core_condition(x) < 1e10
    v = data.draw(tst.tangent_vectors(M, x))
    assert M.check_tangent(x, v)
    z = data.draw(tst.ambient_tensors(M, x))
    assert z.shape == M.shape and z.dtype == x.dtype


def test_conditioned_point_spread():
    M = tm.FixedRankTucker((6, 7, 8), (3, 4, 5))
    x = tm.testing.conditioned_point(M, 0, decay=1e-12)
    assert 1e11 < tm.core_condition(x) < 1e13
    assert M.check_point(x)


class _Broken(tm.FixedRankTucker):
    """A manifold with one operation broken at a time."""

    def __init__(self, what):
        super().__init__(SHAPE, RANKS)
        self.what = what

    def project(self, x, z):
        v = super().project(x, z)
        if self.what == "project":  # not idempotent, leaves the tangent space's complement
            return 1.1 * v
        if self.what == "gauge":  # depends on the representative
            return tm.TangentVector(v.dcore + x.core * 0.01, v.dfactors)
        return v

    def inner(self, x, u, v):
        ip = super().inner(x, u, v)
        return ip * 1.01 if self.what == "inner" else ip

    def retract(self, x, v):
        if self.what == "retract":  # wrong first-order term: R(x, tv) - x - tv = O(t)
            return super().retract(x, 1.1 * v)
        if self.what == "retract_zero":
            return super().retract(x, v + self.random_tangent(x, key=9) * 1e-3)
        return super().retract(x, v)

    def transport(self, x, y, v):
        w = super().transport(x, y, v)
        return 0.5 * w if self.what == "transport" else w

    def ehess_to_rhess(self, x, egrad, ehess_v, v):
        if self.what == "hessian":  # drop the Weingarten term
            return self.project(x, ehess_v)
        return super().ehess_to_rhess(x, egrad, ehess_v, v)


def _problem(M):
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)

    def cost(y):
        Y = y.to_dense()
        return np.sum(A * Y) ** 2 / 2 + np.sum(B * Y**3) / 3

    def egrad(y):
        Y = y.to_dense()
        return np.sum(A * Y) * A + B * Y**2

    def ehess(y, d):
        return np.sum(A * d) * A + 2 * B * y.to_dense() * d

    return cost, egrad, ehess


def test_checks_pass_on_the_real_manifold():
    M = tm.FixedRankTucker(SHAPE, RANKS)
    x = M.random_point(key=0)
    checks.check_manifold(M, x, key=1)
    cost, egrad, ehess = _problem(M)
    checks.check_gradient(M, cost, egrad, x)
    checks.check_hessian(M, egrad, ehess, x)


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("project", "projection"),
        ("gauge", "depends on the gauge|projection"),
        ("inner", "inner product|norm"),
        ("retract", "first order"),
        ("retract_zero", "at zero"),
        ("transport", "transport"),
    ],
)
def test_check_manifold_catches_broken_operations(what, match):
    M = _Broken(what)
    x = M.random_point(key=0)
    with pytest.raises(AssertionError, match=match):
        checks.check_manifold(M, x, key=1)


def test_check_gradient_catches_wrong_gradient():
    M = tm.FixedRankTucker(SHAPE, RANKS)
    x = M.random_point(key=0)
    cost, egrad, _ = _problem(M)
    with pytest.raises(AssertionError, match="gradient check failed"):
        checks.check_gradient(M, cost, lambda y: 1.05 * egrad(y), x)


def test_check_hessian_catches_missing_weingarten_term():
    M = _Broken("hessian")
    x = M.random_point(key=0)
    _, egrad, ehess = _problem(M)
    with pytest.raises(AssertionError, match="Hessian"):
        checks.check_hessian(M, egrad, ehess, x)


def test_loglog_slope():
    ts = np.logspace(-1, -4, 7)
    assert checks.loglog_slope(ts, ts**2) == pytest.approx(2.0)
    assert checks.loglog_slope(ts, ts) == pytest.approx(1.0)
    assert checks.loglog_slope(ts, np.full(7, 1e-20), floor=1e-16) == math.inf
