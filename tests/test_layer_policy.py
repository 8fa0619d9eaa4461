"""One layer policy (tuckerman.layers) for every framework: the torch, JAX and geoopt layers
resolve the same rank arguments to the same ranks, initialize with the same statistics and
refuse the same bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuckerman.layers import (
    check_adaptive_modes,
    count_parameters,
    init_core_std,
    orthonormal_columns,
    resolve_ranks,
    tucker_of_dense,
)

LINEAR_RANKS = [None, 3, 0.5, 1.0, (4, 4), 0.05]
CONV_RANKS = [None, 2, 0.5, (3, 2), (3, 2, 3, 3), (3, 2, 2, 3)]


def _torch_ranks(shape, ranks):
    torch = pytest.importorskip("torch")
    from tuckerman.integrations.torch import TuckerConv2d, TuckerLinear

    torch.manual_seed(0)
    if len(shape) == 2:
        return TuckerLinear(shape[1], shape[0], ranks=ranks).ranks
    return TuckerConv2d(shape[1], shape[0], shape[2:], ranks=ranks).ranks


def _jax_ranks(shape, ranks):
    jax = pytest.importorskip("jax")
    from tuckerman.integrations.jax import init_tucker_conv, init_tucker_dense

    key = jax.random.key(0)
    if len(shape) == 2:
        return init_tucker_dense(key, shape[1], shape[0], ranks=ranks)["weight"].ranks
    return init_tucker_conv(key, shape[1], shape[0], shape[2:], ranks=ranks)["weight"].ranks


def _geoopt_ranks(shape, ranks):
    pytest.importorskip("geoopt")
    from tuckerman.integrations.geoopt import GeooptTuckerLinear

    return GeooptTuckerLinear(shape[1], shape[0], rank=ranks, key=0).manifold.ranks


@pytest.mark.parametrize("ranks", LINEAR_RANKS, ids=str)
def test_linear_layers_resolve_ranks_alike(ranks):
    shape = (6, 9)
    want = resolve_ranks(shape, ranks)
    assert _torch_ranks(shape, ranks) == _jax_ranks(shape, ranks) == want
    assert tuple(_geoopt_ranks(shape, ranks)) == want


@pytest.mark.parametrize("ranks", CONV_RANKS, ids=str)
def test_conv_layers_resolve_ranks_alike(ranks):
    shape = (5, 4, 3, 3)
    want = resolve_ranks(shape, ranks)
    assert _torch_ranks(shape, ranks) == _jax_ranks(shape, ranks) == want


@pytest.mark.parametrize("bad, error", [((4, 3), ValueError), (0, ValueError), (1.5, ValueError),
                                        ("4", TypeError), (True, TypeError)])  # fmt: skip
def test_bad_rank_arguments_are_refused_alike(bad, error):
    shape = (6, 9)
    with pytest.raises(error):
        resolve_ranks(shape, bad)
    for build in (_torch_ranks, _jax_ranks, _geoopt_ranks):
        with pytest.raises(error):
            build(shape, bad)


def test_resolve_ranks_rules():
    assert resolve_ranks((64, 32, 3, 3), 0.25) == (16, 8, 3, 3)
    assert resolve_ranks((10, 20), 50, clip=True) == (10, 10)
    assert resolve_ranks((3, 100), (3, 3)) == (3, 3)
    with pytest.raises(ValueError, match=r"infeasible ranks \(2, 3\).*row and column ranks"):
        resolve_ranks((10, 20), (2, 3))
    with pytest.raises(ValueError, match="2 \\(the channel modes\\) or 4"):
        resolve_ranks((5, 4, 3, 3), (1, 2, 3))
    assert check_adaptive_modes((3, 0, 3), 4) == (0, 3)
    with pytest.raises(ValueError, match=r"modes in \[0, 2\)"):
        check_adaptive_modes((2,), 2)


def test_initialization_statistics_match_the_dense_layers():
    """‖W‖² of a random Tucker layer has the expectation of torch's default dense layer,
    prod(shape) / (3 fan_in), in every framework."""
    shape, ranks, fan_in = (40, 30, 3, 3), (10, 8, 3, 3), 30 * 9
    std = init_core_std(shape, ranks, fan_in)
    assert math.isclose(std**2 * math.prod(ranks), math.prod(shape) / (3 * fan_in))
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from tuckerman.integrations.jax import init_tucker_conv
    from tuckerman.integrations.torch import TuckerConv2d

    want = math.prod(shape) / (3 * fan_in)
    torch.manual_seed(0)
    t = np.mean([TuckerConv2d(30, 40, 3, ranks=(10, 8)).core.square().sum().item()
                 for _ in range(40)])  # fmt: skip
    j = np.mean([float((init_tucker_conv(jax.random.key(i), 30, 40, 3, ranks=(10, 8))["weight"]
                        .core ** 2).sum()) for i in range(40)])  # fmt: skip
    assert abs(t - want) < 0.1 * want and abs(j - want) < 0.1 * want
    q = orthonormal_columns(np.random.default_rng(0).standard_normal((7, 4)))
    assert np.allclose(q.T @ q, np.eye(4))


def test_tucker_of_dense_and_counts():
    w = np.random.default_rng(0).standard_normal((6, 8))
    assert np.allclose(tucker_of_dense(w, (6, 6)).to_dense(), w)
    x = tucker_of_dense(w, (6, 6), tau=0.5)
    assert np.linalg.norm(x.to_dense() - w) <= 0.5 * np.linalg.norm(w)
    assert count_parameters((10, 20), (4, 4), bias=True) == 16 + 40 + 80 + 10
    with pytest.raises(ValueError, match="tau must be finite and >= 0"):
        tucker_of_dense(w, (6, 6), tau=-1.0)
