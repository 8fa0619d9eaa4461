"""Tucker layers for PyTorch: equivalence with nn.Conv2d / nn.Linear, conversion, checkpoints."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from tuckerman.integrations.torch import (  # noqa: E402
    AbstractTuckerLayer,
    TuckerConv2d,
    TuckerLinear,
    compression_report,
    format_report,
    tuckerize,
)

import tuckerman as tm  # noqa: E402

DTYPES = [torch.float32, torch.float64]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP barrier stalls on a busy
    machine (50x faster here), and the results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tol(dtype) -> float:
    """Relative (Frobenius) tolerance: 1000 eps of the dtype."""
    return 1e3 * torch.finfo(dtype).eps


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def dense_conv_like(layer: TuckerConv2d) -> nn.Conv2d:
    """nn.Conv2d with the same hyperparameters and the dense weight C ×_k U_k."""
    ref = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        dtype=layer.core.dtype,
    )
    with torch.no_grad():
        ref.weight.copy_(layer.dense_weight())
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


def dense_linear_like(layer: TuckerLinear) -> nn.Linear:
    ref = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.core.dtype
    )
    with torch.no_grad():
        ref.weight.copy_(layer.dense_weight())
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


def check_against_dense(layer, ref, x, dtype):
    """Outputs, input gradients and parameter gradients (chain rule through C ×_k U_k) agree."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y, y_ref = layer(x1), ref(x2)
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) <= tol(dtype)
    g = torch.randn_like(y_ref)
    layer.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    y.backward(g)
    y_ref.backward(g)
    assert rel(x1.grad, x2.grad) <= tol(dtype)
    params = [layer.core, *layer.factors]
    expected = torch.autograd.grad(layer.dense_weight(), params, grad_outputs=ref.weight.grad)
    for p, e in zip(params, expected):
        # a factor's gradient sums over the whole weight gradient, with cancellation
        # (a 1x1 kernel factor is one number): 10x looser
        assert rel(p.grad, e) <= 10 * tol(dtype)
    if layer.bias is not None:
        assert rel(layer.bias.grad, ref.bias.grad) <= tol(dtype)


# --------------------------------------------------------------------------- forward equivalence
CONV_RANKS = {1: (3, 3), 3: (3, 2), (3, 5): (3, 2, 2, 3), (2, 4): (2, 3, 2, 2)}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_matches_dense_conv_over_grid(dtype, padding_mode, bias):
    torch.manual_seed(0)
    kernels, strides = [1, 3, (3, 5), (2, 4)], [1, 2, (1, 2)]
    paddings, dilations = [0, 1, (2, 1), "same", "valid"], [1, 2, (2, 1)]
    count = 0
    for i, (k, s, p, d) in enumerate(itertools.product(kernels, strides, paddings, dilations)):
        if p == "same" and s != 1:
            continue
        layer = TuckerConv2d(
            5, 4, k, s, p, d, bias=bias, padding_mode=padding_mode, ranks=CONV_RANKS[k], dtype=dtype
        )
        x = torch.randn(1 + 2 * (i % 2), 5, 9, 10, dtype=dtype)  # batch 1 and 3
        check_against_dense(layer, dense_conv_like(layer), x, dtype)
        count += 1
    assert count == 4 * (3 * 3 * 4 + 1 * 3)  # every valid combination ran


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_channels_last_and_unbatched_inputs(dtype, padding_mode):
    torch.manual_seed(1)
    layer = TuckerConv2d(
        6, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode=padding_mode,
        ranks=(4, 3), dtype=dtype,
    )  # fmt: skip
    ref = dense_conv_like(layer)
    x = torch.randn(4, 6, 11, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
    check_against_dense(layer, ref, x, dtype)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)  # as nn.Conv2d does
    check_against_dense(layer, ref, torch.randn(6, 11, 8, dtype=dtype), dtype)
    x = torch.randn(3, 6, 16, 11, dtype=dtype)[:, :, ::2, 1:9]  # a non-contiguous view
    check_against_dense(layer, ref, x, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_matches_dense_linear(dtype, shape, bias):
    torch.manual_seed(2)
    layer = TuckerLinear(7, 6, bias=bias, ranks=3, dtype=dtype)
    check_against_dense(layer, dense_linear_like(layer), torch.randn(shape, dtype=dtype), dtype)


def test_dense_weight_layout_is_the_dense_layers():
    layer = TuckerConv2d(3, 5, (2, 4), ranks=(2, 3, 2, 2), dtype=torch.float64)
    w = layer.dense_weight()
    assert w.shape == (5, 3, 2, 4) == layer.weight_shape
    u = layer.factors
    expected = torch.einsum("abcd,ia,jb,kc,ld->ijkl", layer.core, *u)
    assert rel(w, expected) < 1e-14
    lin = TuckerLinear(4, 6, ranks=2, dtype=torch.float64)
    assert lin.dense_weight().shape == (6, 4)
    assert rel(lin.dense_weight(), lin.factors[0] @ lin.core @ lin.factors[1].T) < 1e-14


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bias_is_added_once(kind):
    if kind == "conv":
        layer = TuckerConv2d(3, 4, 3, padding=1, ranks=2)
        x = torch.randn(2, 3, 5, 5)
        expected_shape = (2, 4, 5, 5)
        b = layer.bias.view(1, 4, 1, 1)
    else:
        layer = TuckerLinear(3, 4, ranks=2)
        x = torch.randn(2, 3)
        expected_shape = (2, 4)
        b = layer.bias
    with torch.no_grad():
        layer.core.zero_()  # W = 0: the output is the bias alone
        layer.bias.copy_(torch.arange(1.0, 5.0))
    y = layer(x)
    assert y.shape == expected_shape
    assert torch.equal(y, b.expand(expected_shape))


# --------------------------------------------------------------------------- initialization
def test_random_init_orthonormal_factors_and_dense_variance():
    torch.manual_seed(3)
    layer = TuckerConv2d(64, 48, 3, ranks=(24, 16), dtype=torch.float64)
    for u in layer.factors:
        eye = torch.eye(u.shape[1], dtype=u.dtype)
        assert torch.allclose(u.T @ u, eye, atol=1e-12)
    fan_in = 64 * 9  # in_channels * k_h * k_w
    target = 1.0 / (3.0 * fan_in)  # variance of PyTorch's kaiming_uniform_(a=sqrt(5))
    var = float(layer.dense_weight().detach().pow(2).mean())
    assert abs(var / target - 1) < 0.1
    dense = nn.Conv2d(64, 48, 3, dtype=torch.float64)
    # the target is the dense layer's own variance
    assert abs(float(dense.weight.detach().var()) / target - 1) < 0.05
    bound = 1 / math.sqrt(fan_in)
    assert float(layer.bias.detach().abs().max()) <= bound
    lin = TuckerLinear(300, 200, ranks=50, dtype=torch.float64)
    assert abs(float(lin.dense_weight().detach().pow(2).mean()) * 3 * 300 - 1) < 0.1


def test_random_init_follows_torch_manual_seed():
    torch.manual_seed(4)
    a = TuckerConv2d(8, 8, 3, ranks=4)
    torch.manual_seed(4)
    b = TuckerConv2d(8, 8, 3, ranks=4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_ranks_specifications():
    assert TuckerConv2d(16, 32, 3, ranks=8).ranks == (8, 8, 3, 3)
    assert TuckerConv2d(16, 32, 3, ranks=(8, 4)).ranks == (8, 4, 3, 3)
    assert TuckerConv2d(16, 32, 3, ranks=(8, 4, 2, 3)).ranks == (8, 4, 2, 3)
    assert TuckerConv2d(64, 32, 3, ranks=0.25).ranks == (8, 16, 3, 3)
    assert TuckerConv2d(16, 32, 3, ranks=1.0).ranks == (32, 16, 3, 3)
    assert TuckerConv2d(3, 64, 3).ranks == (27, 3, 3, 3)  # full: r_out <= C_in k_h k_w
    assert TuckerConv2d(3, 64, 3, ranks=0.5).ranks == (14, 2, 3, 3)
    assert TuckerLinear(100, 40, ranks=0.5).ranks == (20, 20)
    assert TuckerLinear(100, 40).ranks == (40, 40)
    assert TuckerConv2d(4, 4, 1, ranks=3).ranks == (3, 3, 1, 1)


def test_kernel_modes_default_full_rank_and_not_adaptive():
    layer = TuckerConv2d(16, 16, (3, 5), ranks=4)
    assert layer.ranks[2:] == (3, 5)
    assert layer.adaptive_modes == (0, 1)
    assert TuckerConv2d(16, 16, 3, ranks=4, adaptive_modes=(3, 0, 1, 2)).adaptive_modes == (
        0,
        1,
        2,
        3,
    )
    assert TuckerLinear(5, 5, ranks=2).adaptive_modes == (0, 1)


# --------------------------------------------------------------------------- bad input
# fmt: off
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TuckerConv2d(8, 8, 3, groups=2), ValueError, r"groups=2.*block-diagonal"),
        (lambda: TuckerConv2d(8, 8, 3, groups=0), ValueError, r"groups must be a positive"),
        (lambda: TuckerLinear(5, 4, ranks=5), ValueError, r"ranks\[0\] = 5 exceeds.*shape\[0\] = 4"),
        (lambda: TuckerLinear(5, 4, ranks=(3, 2)), ValueError, r"infeasible ranks \(3, 2\).*equal"),
        (lambda: TuckerConv2d(64, 64, 3, ranks=(64, 4)), ValueError, r"ranks\[0\] = 64 exceeds the product"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=(4, 4, 4, 3)), ValueError, r"ranks\[2\] = 4 exceeds"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=(4, 4, 3)), ValueError, r"3 entries; expected 2 .* or 4"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=(4, 0)), ValueError, r"ranks\[1\] = 0"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=(4, 2.5)), TypeError, r"ranks\[1\] must be an integer"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=0.0), ValueError, r"fractional rank.*\(0, 1\].*0\.0"),
        (lambda: TuckerConv2d(8, 8, 3, ranks=1.5), ValueError, r"fractional rank.*1\.5"),
        (lambda: TuckerLinear(8, 8, ranks=-0.1), ValueError, r"fractional rank.*-0\.1"),
        (lambda: TuckerLinear(8, 8, ranks="4"), TypeError, r"ranks must be"),
        (lambda: TuckerLinear(8, 8, ranks=True), TypeError, r"ranks must be"),
        (lambda: TuckerLinear(0, 8), ValueError, r"in_features must be a positive integer, got 0"),
        (lambda: TuckerLinear(8, -3), ValueError, r"out_features must be a positive integer, got -3"),
        (lambda: TuckerConv2d(0, 8, 3), ValueError, r"in_channels must be a positive integer, got 0"),
        (lambda: TuckerConv2d(8, 8, 0), ValueError, r"kernel_size entries must be >= 1, got \(0, 0\)"),
        (lambda: TuckerConv2d(8, 8, 3, stride=0), ValueError, r"stride entries must be >= 1"),
        (lambda: TuckerConv2d(8, 8, 3, padding=-1), ValueError, r"padding entries must be >= 0"),
        (lambda: TuckerConv2d(8, 8, 3, dilation=(1, 0)), ValueError, r"dilation entries must be >= 1, got \(1, 0\)"),
        (lambda: TuckerConv2d(8, 8, 3, padding="full"), ValueError, r"'same' or 'valid', got 'full'"),
        (lambda: TuckerConv2d(8, 8, 3, stride=2, padding="same"), ValueError, r"strided.*\(2, 2\)"),
        (lambda: TuckerConv2d(8, 8, 3, padding_mode="zero"), ValueError, r"padding_mode must be one of.*'zero'"),
        (lambda: TuckerConv2d(8, 8, 3, dtype=torch.int64), TypeError, r"real floating"),
        (lambda: TuckerConv2d(8, 8, 3, adaptive_modes=(0, 4)), ValueError, r"adaptive_modes.*\[0, 4\)"),
        (lambda: TuckerConv2d(8, 8, (3, 3, 3)), TypeError, r"kernel_size must be an int or a pair"),
    ],
)
# fmt: on
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_wrong_input_channels_named():
    layer = TuckerConv2d(8, 4, 3, ranks=2)
    with pytest.raises(ValueError, match=r"\(N, 8, H, W\).*\(2, 5, 9, 9\)"):
        layer(torch.randn(2, 5, 9, 9))


def test_groups_refused_everywhere():
    grouped = nn.Conv2d(8, 8, 3, groups=4)
    with pytest.raises(ValueError, match="groups=4"):
        TuckerConv2d.from_dense(grouped)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), grouped, nn.Conv2d(8, 8, 1))
    tuckerize(net, ranks=2)
    assert net[1] is grouped  # left dense, never silently mis-computed
    assert isinstance(net[2], TuckerConv2d)


def test_abstract_layer_cannot_be_instantiated():
    with pytest.raises(TypeError):
        AbstractTuckerLayer((2, 2), (1, 1), (0, 1), True, None, torch.float32)


# --------------------------------------------------------------------------- from_dense
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_dense_full_rank_reproduces_conv(dtype):
    torch.manual_seed(5)
    dense = nn.Conv2d(6, 5, (3, 2), stride=2, padding=(1, 2), dilation=(2, 1), dtype=dtype,
                      padding_mode="reflect")  # fmt: skip
    layer = TuckerConv2d.from_dense(dense)
    assert layer.ranks == (5, 6, 3, 2)
    assert (layer.stride, layer.padding, layer.dilation, layer.padding_mode) == (
        (2, 2), (1, 2), (2, 1), "reflect",
    )  # fmt: skip
    assert layer.core.dtype == dtype
    assert rel(layer.dense_weight(), dense.weight) <= tol(dtype)
    assert torch.equal(layer.bias, dense.bias)
    x = torch.randn(2, 6, 9, 8, dtype=dtype)
    assert rel(layer(x), dense(x)) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_dense_full_rank_reproduces_linear(dtype):
    torch.manual_seed(6)
    dense = nn.Linear(9, 4, dtype=dtype)
    layer = TuckerLinear.from_dense(dense)
    assert layer.ranks == (4, 4)
    x = torch.randn(3, 9, dtype=dtype)
    assert rel(layer(x), dense(x)) <= tol(dtype)
    assert rel(layer.dense_weight(), dense.weight) <= tol(dtype)


def test_from_dense_low_rank_is_the_hosvd_approximation():
    torch.manual_seed(7)
    dense = nn.Conv2d(12, 10, 3, bias=False, dtype=torch.float64)
    layer = TuckerConv2d.from_dense(dense, ranks=(4, 5))
    assert layer.ranks == (4, 5, 3, 3)
    assert layer.bias is None
    expected = tm.hosvd(dense.weight.detach(), (4, 5, 3, 3)).to_dense()
    assert rel(layer.dense_weight(), expected) < 1e-12
    for u in layer.factors:
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12)
    lin = nn.Linear(30, 20, dtype=torch.float64)
    approx = TuckerLinear.from_dense(lin, ranks=5)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    assert rel(approx.dense_weight(), best) < 1e-12  # Eckart-Young: the truncated SVD


def test_from_dense_tolerance_cuts_only_adaptive_modes():
    torch.manual_seed(8)
    lowrank = tm.FixedRankTucker((16, 12, 3, 3), (5, 4, 3, 3)).random_point(
        key=0, xp="torch", dtype=torch.float64
    )
    dense = nn.Conv2d(12, 16, 3, dtype=torch.float64)
    with torch.no_grad():
        w = lowrank.to_dense()
        dense.weight.copy_(w + 1e-6 * torch.randn_like(w) * float(w.norm()) / w.numel() ** 0.5)
    layer = TuckerConv2d.from_dense(dense, tau=1e-3)
    assert layer.ranks == (5, 4, 3, 3)
    assert rel(layer.dense_weight(), dense.weight) <= 1e-3
    capped = TuckerConv2d.from_dense(dense, tau=1e-3, ranks=(3, 12))
    assert capped.ranks == (3, 4, 3, 3)
    loose = TuckerConv2d.from_dense(dense, tau=0.5)
    assert loose.ranks[2:] == (3, 3)  # the kernel modes are not adaptive: never cut
    assert rel(loose.dense_weight(), dense.weight) <= 0.5
    lin = nn.Linear(20, 20, dtype=torch.float64)
    for tau in (0.1, 0.5, 0.9):
        approx = TuckerLinear.from_dense(lin, tau=tau)
        assert rel(approx.dense_weight(), lin.weight) <= tau


def test_from_dense_copies_requires_grad_and_training_flag():
    dense = nn.Linear(6, 6)
    dense.weight.requires_grad_(False)
    dense.eval()
    layer = TuckerLinear.from_dense(dense, ranks=2)
    assert not layer.core.requires_grad and not any(u.requires_grad for u in layer.factors)
    assert layer.bias.requires_grad
    assert not layer.training


# --------------------------------------------------------------------------- set_tucker / memory
def test_tucker_is_a_view_of_the_parameters():
    layer = TuckerConv2d(8, 6, 3, ranks=(3, 2))
    x = layer.tucker()
    assert isinstance(x, tm.TuckerTensor)
    assert x.shape == layer.weight_shape and x.ranks == layer.ranks
    assert x.core.data_ptr() == layer.core.data_ptr()
    assert all(a.data_ptr() == u.data_ptr() for a, u in zip(x.factors, layer.factors))
    assert not x.core.requires_grad


def test_set_tucker_keeps_the_parameters_and_set_capacity_shrinks_memory():
    torch.manual_seed(9)
    layer = TuckerConv2d(32, 32, 3, padding=1, ranks=16)
    before = layer.num_parameters()
    assert before == sum(p.numel() for p in layer.parameters())
    old = [layer.core, *layer.factors]
    y, _ = tm.truncate_core(layer.tucker(), ranks=(4, 6, 3, 3))
    layer.set_tucker(y)  # smaller ranks: written into the same parameters, zero padding
    assert layer.ranks == (4, 6, 3, 3) and layer.capacity == (16, 16, 3, 3)
    assert layer.rank_vector.tolist() == [4, 6, 3, 3]
    assert all(p is q for p, q in zip([layer.core, *layer.factors], old))  # same objects
    assert layer.num_parameters() < before == layer.num_parameters_stored()
    check_against_dense(layer, dense_conv_like(layer), torch.randn(2, 32, 6, 6), torch.float32)
    assert not torch.any(layer.core[4:]) and not torch.any(layer.factors[1][:, 6:])
    layer.set_capacity(layer.ranks)  # memory follows the rank: new, smaller parameters
    assert tuple(layer.core.shape) == (4, 6, 3, 3)
    assert [tuple(u.shape) for u in layer.factors] == [(32, 4), (32, 6), (3, 3), (3, 3)]
    after = sum(p.numel() for p in layer.parameters())
    assert after == layer.num_parameters() == layer.num_parameters_stored() < before
    assert all(p is not q for p, q in zip([layer.core, *layer.factors], old))  # new objects
    assert all(p.requires_grad for p in layer.parameters())
    check_against_dense(layer, dense_conv_like(layer), torch.randn(2, 32, 6, 6), torch.float32)
    with pytest.raises(ValueError, match=r"capacity \(3, 6, 3, 3\) must hold the ranks"):
        layer.set_capacity((3, 6, 3, 3))
    bigger, _ = tm.augment_basis(layer.tucker(), [torch.randn(n, 2) for n in layer.weight_shape])
    layer.set_tucker(bigger)  # larger ranks than the capacity: new parameters at those ranks
    assert layer.capacity == layer.ranks == (6, 8, 3, 3)


def test_padded_forward_and_gradients_equal_the_true_rank_layer():
    """At a capacity larger than the ranks the forward pass, with the ranks known on the host
    (live block) or not (whole capacity), and the gradients equal an unpadded layer's."""
    torch.manual_seed(3)
    for layer in (TuckerConv2d(6, 5, 3, padding=1, ranks=(3, 2), dtype=torch.float64),
                  TuckerLinear(7, 5, ranks=3, dtype=torch.float64)):  # fmt: skip
        twin = copy.deepcopy(layer)
        layer.set_capacity([min(r + 2, n) for r, n in zip(layer.ranks, layer.weight_shape)])
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64) if layer.core.ndim == 4 else torch.randn(
            4, 7, dtype=torch.float64
        )
        for host_known in (True, False):
            layer._host_ranks = layer.ranks if host_known else None
            for p in (*layer.parameters(), *twin.parameters()):
                p.grad = None
            layer(x).square().sum().backward()
            twin(x).square().sum().backward()
            assert torch.allclose(layer(x), twin(x), atol=1e-13, rtol=0)
            r = twin.ranks
            live = tuple(slice(0, k) for k in r)
            assert torch.allclose(layer.core.grad[live], twin.core.grad, atol=1e-12, rtol=0)
            assert torch.count_nonzero(layer.core.grad) == torch.count_nonzero(layer.core.grad[live])
            for u, v, k in zip(layer.factors, twin.factors, r):
                assert torch.allclose(u.grad[:, :k], v.grad, atol=1e-12, rtol=0)
                assert not torch.any(u.grad[:, k:])


def test_set_tucker_accepts_an_augmented_point_exactly():
    torch.manual_seed(10)
    layer = TuckerLinear(20, 12, ranks=3, dtype=torch.float64)
    w = layer.dense_weight().detach()
    x = torch.randn(4, 20, dtype=torch.float64)
    y0 = layer(x).detach()
    dirs = [torch.randn(n, 3, dtype=torch.float64) for n in layer.weight_shape]
    bigger, _ = tm.augment_basis(layer.tucker(), dirs)
    layer.set_tucker(bigger)
    assert layer.ranks == (6, 6)
    assert rel(layer.dense_weight(), w) < 1e-13
    assert rel(layer(x), y0) < 1e-13


def test_set_tucker_casts_and_copies():
    layer = TuckerLinear(6, 5, ranks=2)
    x = tm.hosvd(torch.randn(5, 6, dtype=torch.float64), 3)
    layer.set_tucker(x)
    assert layer.core.dtype == torch.float32 and layer.ranks == (3, 3)
    assert layer.core.data_ptr() != x.core.data_ptr()


def test_set_tucker_rejects_wrong_input():
    layer = TuckerLinear(6, 5, ranks=2)
    with pytest.raises(TypeError, match="TuckerTensor"):
        layer.set_tucker((layer.core, tuple(layer.factors)))
    with pytest.raises(ValueError, match=r"shape \(6, 5\).*\(5, 6\)"):
        layer.set_tucker(tm.hosvd(torch.randn(6, 5), 2))
    import numpy as np

    with pytest.raises(TypeError, match="torch tensors"):
        layer.set_tucker(tm.hosvd(np.ones((5, 6)), 2))


# --------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_at_a_changed_rank():
    torch.manual_seed(11)
    layer = TuckerConv2d(16, 12, 3, padding=1, ranks=8)
    layer.set_tucker(tm.truncate_core(layer.tucker(), ranks=(5, 3, 3, 3))[0])
    state = layer.state_dict()
    fresh = TuckerConv2d(16, 12, 3, padding=1, ranks=8)
    assert fresh.ranks != layer.ranks
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.ranks == (5, 3, 3, 3)
    for (name, p), (name2, q) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert name == name2 and torch.equal(p, q)
    x = torch.randn(2, 16, 7, 7)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_round_trip_inside_a_model_and_through_a_file(tmp_path):
    torch.manual_seed(12)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), TuckerConv2d(8, 8, 3, ranks=6), nn.Flatten(),
                             TuckerLinear(8 * 4 * 4, 10, ranks=5))  # fmt: skip

    net = make()
    net[1].set_tucker(tm.truncate_core(net[1].tucker(), ranks=(2, 3, 3, 3))[0])
    net[3].set_tucker(tm.truncate_core(net[3].tucker(), ranks=(4, 4))[0])
    torch.save(net.state_dict(), tmp_path / "net.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "net.pt"))
    assert fresh[1].ranks == (2, 3, 3, 3) and fresh[3].ranks == (4, 4)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), net(x))


def test_state_dict_of_another_layer_shape_still_fails():
    state = TuckerConv2d(16, 12, 3, ranks=4).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        TuckerConv2d(10, 12, 3, ranks=4).load_state_dict(state)


# --------------------------------------------------------------------------- tuckerize
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def test_tuckerize_replaces_the_right_layers():
    torch.manual_seed(13)
    net = Net()
    out = tuckerize(net, ranks=8)
    assert out is net
    f, c = net.features, net.classifier
    assert type(f[0]) is nn.Conv2d  # first conv skipped
    assert isinstance(f[2], TuckerConv2d) and f[2].ranks == (8, 8, 3, 3)
    assert type(f[4]) is nn.Conv2d  # grouped: left dense
    assert isinstance(c[1], TuckerLinear) and c[1].ranks == (8, 8)
    assert type(c[3]) is nn.Linear  # last linear skipped
    net(torch.randn(2, 3, 8, 8))


def test_tuckerize_options():
    net = tuckerize(Net(), ranks=4, skip_first_conv=False, skip_last_linear=False)
    assert isinstance(net.features[0], TuckerConv2d)
    assert net.features[0].ranks == (4, 3, 3, 3)  # the int is lowered to C_in = 3
    assert isinstance(net.classifier[3], TuckerLinear)
    net = tuckerize(Net(), ranks=4, include="classifier.*")
    assert type(net.features[2]) is nn.Conv2d and isinstance(net.classifier[1], TuckerLinear)
    net = tuckerize(Net(), ranks=4, exclude=["classifier.*"])
    assert isinstance(net.features[2], TuckerConv2d) and type(net.classifier[1]) is nn.Linear
    net = tuckerize(Net(), ranks=lambda name, m: 2 if name.startswith("features") else 6)
    assert net.features[2].ranks[:2] == (2, 2) and net.classifier[1].ranks == (6, 6)
    net = tuckerize(Net(), ranks=0.25, init="random")
    assert net.features[2].ranks == (8, 4, 3, 3)
    with pytest.raises(ValueError, match="init must be one of"):
        tuckerize(Net(), init="svd")
    with pytest.raises(ValueError, match="tau=0.1.*init='hosvd'"):
        tuckerize(Net(), tau=0.1, init="random")
    with pytest.raises(TypeError, match="include must be"):
        tuckerize(Net(), include=3)


def test_tuckerize_full_rank_hosvd_keeps_the_function():
    torch.manual_seed(14)
    net = Net().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    before = net(x)
    tuckerize(net)
    assert isinstance(net.features[2], TuckerConv2d)
    assert rel(net(x), before) < 1e-12


def test_tuckerize_shared_module_and_bare_layer():
    shared = nn.Linear(6, 6)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 2))
    tuckerize(net, ranks=2)
    assert isinstance(net[0], TuckerLinear) and net[0] is net[2]
    layer = tuckerize(nn.Linear(6, 6), ranks=2, skip_last_linear=False)
    assert isinstance(layer, TuckerLinear)


# --------------------------------------------------------------------------- compression report
def test_compression_report_by_hand_count():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        TuckerConv2d(8, 16, 3, ranks=(4, 2)),
        nn.Flatten(),
        TuckerLinear(32, 10, bias=False, ranks=3),
    )
    report = compression_report(net)
    conv, lin = report["layers"]
    # conv: core 4*2*3*3 + U_1 16*4 + U_2 8*2 + U_3, U_4 3*3 each + bias 16
    assert conv["parameters"] == 72 + 64 + 16 + 9 + 9 + 16 == 186
    assert conv["dense_parameters"] == 16 * 8 * 9 + 16 == 1168
    assert conv["ranks"] == [4, 2, 3, 3] and conv["weight_shape"] == [16, 8, 3, 3]
    assert conv["name"] == "1" and conv["type"] == "TuckerConv2d"
    assert conv["compression_rate"] == pytest.approx(1 - 186 / 1168)
    # linear: core 3*3 + U_1 10*3 + U_2 32*3, no bias
    assert lin["parameters"] == 9 + 30 + 96 == 135
    assert lin["dense_parameters"] == 320
    assert report["parameters"] == 186 + 135
    assert report["dense_parameters"] == 1168 + 320
    assert report["compression_rate"] == pytest.approx(1 - 321 / 1488)
    first_conv = 8 * 3 * 9 + 8
    assert report["model_parameters"] == first_conv + 321
    assert report["model_parameters"] == sum(p.numel() for p in net.parameters())
    assert report["model_dense_parameters"] == first_conv + 1488
    json.dumps(report)  # plain Python values
    text = format_report(report)
    assert "TuckerConv2d" in text and "16x8x3x3" in text and "4x2x3x3" in text
    assert f"{100 * (1 - 321 / 1488):.2f}%" in text
    assert compression_report(nn.Linear(3, 3))["compression_rate"] == 0.0
