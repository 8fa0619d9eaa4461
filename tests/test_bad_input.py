"""Bad input is refused with TypeError/ValueError naming the value and the expectation, and no
input is modified."""

from __future__ import annotations

import numpy as np
import pytest

import tuckerman as tm

M = tm.FixedRankTucker((5, 6, 7), (2, 3, 2))


@pytest.mark.parametrize(
    ("shape", "ranks", "error", "match"),
    [
        ((5, 6, 7), (6, 3, 2), ValueError, r"ranks\[0\] = 6 exceeds the mode size shape\[0\] = 5"),
        ((5, 6, 7), (4, 1, 2), ValueError, r"ranks\[0\] = 4 exceeds the product of the other"),
        ((5, 0, 7), (1, 1, 1), ValueError, r"shape\[1\] must be positive, got 0"),
        ((5, -2, 7), (1, 1, 1), ValueError, r"shape\[1\] must be positive, got -2"),
        ((5, 6.0, 7), (1, 1, 1), TypeError, r"shape\[1\] must be an integer, got 6.0"),
        ((5, 6, 7), (1, 0, 1), ValueError, r"ranks\[1\] must be positive, got 0"),
        ((5, 6, 7), (1, 1.5, 1), TypeError, r"ranks\[1\] must be an integer, got 1.5"),
        ((5, 6, 7), (1, True, 1), TypeError, r"ranks\[1\] must be an integer, got True"),
        ((5, 6, 7), (1, 1), ValueError, r"ranks has 2 entries \(1, 1\) but the tensor has 3 modes"),
        ((5,), (1,), ValueError, r"at least 2 modes"),
        ("abc", (1,), TypeError, r"shape must be a sequence of positive integers"),
    ],
)
def test_manifold_construction(shape, ranks, error, match):
    with pytest.raises(error, match=match):
        tm.FixedRankTucker(shape, ranks)


def test_tucker_tensor_structure():
    with pytest.raises(ValueError, match=r"factors\[1\] has shape \(6, 2\) but the core has 3"):
        tm.TuckerTensor(np.ones((2, 3, 2)), [np.ones((5, 2)), np.ones((6, 2)), np.ones((7, 2))])
    with pytest.raises(ValueError, match=r"core has 3 modes .* but 2 factors"):
        tm.TuckerTensor(np.ones((2, 3, 2)), [np.ones((5, 2)), np.ones((6, 3))])
    with pytest.raises(TypeError, match=r"must share one dtype, got float64, float32"):
        tm.TuckerTensor(np.ones((2, 2)), [np.ones((5, 2)), np.ones((6, 2), dtype=np.float32)])
    with pytest.raises(TypeError, match=r"real floating dtype .* got int64"):
        tm.TuckerTensor(np.ones((2, 2), dtype=np.int64), [np.ones((5, 2), dtype=np.int64)] * 2)


def test_mixed_libraries_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different libraries cannot be mixed: got numpy, torch"):
        tm.TuckerTensor(np.ones((2, 2)), [torch.ones(5, 2, dtype=torch.float64), np.ones((6, 2))])
    x = M.random_point(key=0)
    with pytest.raises(TypeError, match=r"different libraries"):
        M.project(x, torch.ones(M.shape, dtype=torch.float64))
    xt = M.random_point(key=0, xp=torch, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"different libraries"):
        M.inner(xt, M.random_tangent(x, key=1), M.random_tangent(x, key=1))


def test_mixed_devices_are_refused():
    strict = pytest.importorskip("array_api_strict")
    d1, d2 = strict.Device("CPU_DEVICE"), strict.Device("device1")
    core = strict.ones((2, 2), dtype=strict.float64, device=d1)
    with pytest.raises(ValueError, match=r"different devices"):
        tm.TuckerTensor(
            core,
            [
                strict.ones((5, 2), dtype=strict.float64, device=d2),
                strict.ones((6, 2), dtype=strict.float64, device=d1),
            ],
        )
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"different devices: cpu, meta"):
        tm.TuckerTensor(torch.ones(2, 2), [torch.ones(5, 2), torch.ones(6, 2, device="meta")])


def test_points_and_vectors_of_another_manifold():
    other = tm.FixedRankTucker((5, 6, 7), (2, 2, 2))
    x, y = M.random_point(key=0), other.random_point(key=0)
    with pytest.raises(
        ValueError, match=r"x has shape \(5, 6, 7\) and ranks \(2, 2, 2\), but this"
    ):
        M.project(y, np.ones(M.shape))
    v = other.random_tangent(y, key=1)
    with pytest.raises(ValueError, match=r"v has dcore shape \(2, 2, 2\)"):
        M.retract(x, v)
    with pytest.raises(TypeError, match=r"x must be a TuckerTensor, got ndarray"):
        M.project(np.ones(M.shape), np.ones(M.shape))
    with pytest.raises(TypeError, match=r"v must be a TangentVector, got TuckerTensor"):
        M.retract(x, x)
    assert M.check_point(y, explain=True)[0] is False
    assert "ranks (2, 2, 2)" in M.check_point(y, explain=True)[1]
    with pytest.raises(ValueError, match=r"not a point of FixedRankTucker"):
        M.assert_point(y)


def test_wrong_ambient_shapes_and_dtypes():
    x = M.random_point(key=0)
    with pytest.raises(ValueError, match=r"z has shape \(5, 6, 8\), expected \(5, 6, 7\)"):
        M.project(x, np.ones((5, 6, 8)))
    with pytest.raises(ValueError, match=r"z is a TuckerTensor of shape \(5, 6, 8\)"):
        M.project(x, tm.hosvd(np.ones((5, 6, 8)), 1))
    with pytest.raises(TypeError, match=r"x and z must share one dtype, got float64, float32"):
        M.project(x, np.ones(M.shape, dtype=np.float32))
    with pytest.raises(
        TypeError, match=r"z must be a dense array, a TuckerTensor, a SparseTensor or a Tangent"
    ):
        M.project(x, [[1.0]])
    v = M.random_tangent(x, key=1)
    with pytest.raises(ValueError, match=r"egrad has shape \(5, 6\)"):
        M.ehess_to_rhess(x, np.ones((5, 6)), np.ones(M.shape), v)


def test_negative_or_bad_tolerances_and_ranks():
    a = np.ones((4, 5, 6))
    with pytest.raises(ValueError, match=r"tol must be finite and >= 0, got -0.1"):
        tm.hosvd(a, tol=-0.1)
    with pytest.raises(ValueError, match=r"tol must be finite and >= 0, got nan"):
        tm.hosvd(a, tol=float("nan"))
    with pytest.raises(TypeError, match=r"tol must be a non-negative real number"):
        tm.hosvd(a, tol="small")
    with pytest.raises(ValueError, match=r"ranks\[0\] must be positive, got 0"):
        tm.hosvd(a, ranks=(0, 1, 1))
    x = tm.hosvd(a, 1)
    with pytest.raises(ValueError, match=r"tol must be finite and >= 0, got -1.0"):
        tm.truncate(x, tol=-1.0)
    with pytest.raises(ValueError, match=r"ranks has 2 entries"):
        tm.truncate(x, ranks=(1, 1))
    with pytest.raises(ValueError, match=r"at least 2 modes, got shape \(4,\)"):
        tm.hosvd(np.ones(4))
    with pytest.raises(TypeError, match=r"real floating dtype .* got int64"):
        tm.hosvd(np.ones((3, 3), dtype=np.int64))


def test_mode_products_and_folding():
    with pytest.raises(
        ValueError, match=r"matrix of shape \(3, 4\) cannot act on mode 1 .* \(m, 6\)"
    ):
        tm.mode_product(np.ones((5, 6, 7)), np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match=r"mode 3 is out of range for a tensor with 3 modes"):
        tm.unfold(np.ones((5, 6, 7)), 3)
    with pytest.raises(ValueError, match=r"cannot fold a matrix of shape \(5, 41\)"):
        tm.fold(np.ones((5, 41)), 0, (5, 6, 7))
    with pytest.raises(ValueError, match=r"got 2 matrices for 1 modes"):
        tm.multi_mode_product(np.ones((5, 6)), [np.ones((2, 5)), np.ones((2, 6))], modes=[0])


def test_tangent_vector_structure_and_scalars():
    x = M.random_point(key=0)
    u = M.random_tangent(x, key=1)
    w = tm.FixedRankTucker((5, 6, 7), (2, 2, 2)).random_tangent(
        tm.FixedRankTucker((5, 6, 7), (2, 2, 2)).random_point(key=0), key=1
    )
    with pytest.raises(ValueError, match=r"different structure: dcore shapes \(2, 3, 2\) and"):
        u + w
    with pytest.raises(TypeError, match=r"expected a scalar"):
        u * np.ones(3)
    with pytest.raises(TypeError):
        u + 1.0


def test_failed_calls_leave_inputs_unchanged():
    x = M.random_point(key=0)
    snapshot = [np.copy(x.core)] + [np.copy(u) for u in x.factors]
    v = M.random_tangent(x, key=1)
    vs = [np.copy(v.dcore)] + [np.copy(u) for u in v.dfactors]
    for call in (
        lambda: M.project(x, np.ones((5, 6, 8))),
        lambda: M.ehess_to_rhess(x, np.ones(M.shape), np.ones((1, 1)), v),
        lambda: tm.truncate(x, tol=-1),
    ):
        with pytest.raises((TypeError, ValueError)):
            call()
    for before, after in zip(snapshot, [x.core, *x.factors]):
        assert np.array_equal(before, after)
    for before, after in zip(vs, [v.dcore, *v.dfactors]):
        assert np.array_equal(before, after)


def test_tolerance_ranks_under_jit_raise_clearly():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    a = jnp.ones((3, 4, 5))
    with pytest.raises(TypeError, match=r"choosing ranks by tolerance needs concrete values"):
        jax.jit(lambda t: tm.hosvd(t, tol=0.1).core)(a)
