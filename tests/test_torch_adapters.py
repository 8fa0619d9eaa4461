"""Tucker adapters: the factorized forward equals the dense update, the base stays frozen, TDLRT
trains the update with rank changes, merge/unmerge round trip exactly, the adapter checkpoint
survives rank changes, and bad input is refused before anything changes."""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tuckerman.integrations.torch import (  # noqa: E402
    TDLRT,
    TuckerAdapter,
    TuckerConv2d,
    TuckerLinear,
    adapter_report,
    adapter_state_dict,
    add_tucker_adapters,
    compression_report,
    load_adapter_state_dict,
    merge_adapters,
    remove_adapters,
    unmerge_adapters,
)

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.float64]


def _tol(dtype: torch.dtype) -> float:
    return 200 * torch.finfo(dtype).eps


def _randomize(adapter: TuckerAdapter, seed: int) -> None:
    """A non-zero update (random core) so that the comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = adapter.delta.core
        c.copy_(torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype))


def _dense_reference(adapter: TuckerAdapter, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + F.linear / F.conv2d(x, scale ΔW)`` with the dense update, in float64."""
    base = adapter.base
    w = adapter.delta_weight().detach().double()
    x = x.double()
    w0 = base.weight.detach().double()
    b = None if base.bias is None else base.bias.detach().double()
    if isinstance(base, nn.Linear):
        return F.linear(x, w0, b) + F.linear(x, w)
    if base.padding_mode != "zeros":
        pads = base._reversed_padding_repeated_twice
        x = F.pad(x, pads, mode=base.padding_mode)
        padding = 0
    else:
        padding = base.padding
    conv = dict(stride=base.stride, padding=padding, dilation=base.dilation)
    return F.conv2d(x, w0, b, **conv) + F.conv2d(x, w, None, **conv)


def _small_net(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5, dtype=dtype),
    )


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=1, bias=False),
    ],
)
def test_conv_adapter_equals_dense_update(dtype, conv):
    torch.manual_seed(0)
    base = nn.Conv2d(5, 7, dtype=dtype, **conv)
    adapter = TuckerAdapter(base, ranks=(3, 2), scale=0.7)
    _randomize(adapter, 1)
    x = torch.randn(2, 5, 9, 10, dtype=dtype)
    y = adapter(x)
    assert y.dtype == dtype
    ref = _dense_reference(adapter, x)
    assert y.shape == ref.shape
    assert torch.allclose(y.double(), ref, atol=_tol(dtype) * float(ref.abs().max()), rtol=0)
    # the update is genuinely there (not just the base)
    assert (y.double() - base(x).double()).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_adapter_equals_dense_update_on_batched_input(dtype):
    torch.manual_seed(0)
    adapter = TuckerAdapter(nn.Linear(11, 6, dtype=dtype), ranks=3)
    _randomize(adapter, 2)
    x = torch.randn(4, 3, 11, dtype=dtype)
    ref = _dense_reference(adapter, x)
    assert torch.allclose(
        adapter(x).double(), ref, atol=_tol(dtype) * float(ref.abs().max()), rtol=0
    )


def test_zero_initialized_adapter_leaves_the_model_unchanged():
    torch.manual_seed(0)
    net = _small_net()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    before = net(x)
    add_tucker_adapters(net, ["0", "2", "5"], ranks=4)
    assert all(isinstance(net[i], TuckerAdapter) for i in (0, 2, 5))
    for i in (0, 2, 5):
        delta = net[i].delta
        assert not delta.core.any()
        for u in delta.factors:  # random orthonormal bases
            gram = u.detach().mT @ u.detach()
            assert torch.allclose(gram, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12)
    assert torch.equal(net(x), before)


def test_the_forward_never_forms_the_dense_update(monkeypatch):
    adapter = TuckerAdapter(nn.Conv2d(4, 6, 3), ranks=2)

    def forbidden(self):
        raise AssertionError("dense_weight called in forward")

    monkeypatch.setattr(TuckerConv2d, "dense_weight", forbidden)
    adapter(torch.randn(1, 4, 6, 6))


def test_only_the_updates_require_grad_and_get_gradients():
    torch.manual_seed(0)
    net = add_tucker_adapters(_small_net(), ["2", "5"], ranks=2)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {
        "2.delta.core",
        *(f"2.delta.factors.{k}" for k in range(4)),
        "5.delta.core",
        "5.delta.factors.0",
        "5.delta.factors.1",
    }
    net(torch.randn(2, 2, 8, 8, dtype=torch.float64)).square().sum().backward()
    for n, p in net.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # the core gradient at ΔW = 0 is non-zero; the factor gradients vanish (C = 0)
    assert net[5].delta.core.grad.abs().max() > 0
    assert not net[5].delta.factors[0].grad.any()
    report = adapter_report(net)
    assert report["trainable_parameters"] == report["adapter_parameters"]
    assert report["adapter_parameters"] == sum(
        p.numel() for n, p in net.named_parameters() if n in trainable
    )
    assert report["model_parameters"] == sum(p.numel() for p in net.parameters())
    assert [layer["ranks"] for layer in report["layers"]] == [[2, 2, 3, 3], [2, 2]]


def test_freeze_model_false_freezes_only_the_wrapped_layers():
    net = add_tucker_adapters(_small_net(), "5", ranks=2, freeze_model=False)
    assert net[0].weight.requires_grad and net[2].bias.requires_grad
    assert not net[5].base.weight.requires_grad and not net[5].base.bias.requires_grad


# --------------------------------------------------------------------------- training
def _regression_task(seed: int, dtype=torch.float64, true_rank: int = 4):
    """A frozen random linear layer; the target layer differs by a rank-``true_rank`` update."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = 24, 20
    base = nn.Linear(n_in, n_out, dtype=dtype)
    a = torch.randn(n_out, true_rank, generator=g, dtype=dtype)
    b = torch.randn(true_rank, n_in, generator=g, dtype=dtype)
    x = torch.randn(256, n_in, generator=g, dtype=dtype)
    with torch.no_grad():
        y = base(x) + x @ (a @ b).mT / math.sqrt(n_in)
    return base, x, y


def _train(model, opt, x, y, steps):
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("dtype", DTYPES)
def test_tdlrt_grows_the_ranks_from_a_zero_update_and_fits(dtype):
    torch.manual_seed(0)
    base, x, y = _regression_task(0, dtype)
    model = nn.Sequential(base)
    add_tucker_adapters(model, "0", ranks=1)
    opt = TDLRT(model, lr=0.5, tau=0.02)
    losses = _train(model, opt, x, y, 80)
    history = [h["0.delta"] for h in opt.rank_history]
    assert history[0][0] <= 2  # the first step works inside the initial (doubled) bases
    assert max(r[0] for r in history) >= 4  # the ranks grew to the target update's rank
    assert losses[-1] < 1e-2 * losses[0]
    assert not model[0].base.weight.requires_grad
    assert model[0].delta.ranks == (4, 4)  # and settled at it


def test_tdlrt_prunes_the_ranks_with_a_loose_tolerance():
    torch.manual_seed(0)
    base, x, y = _regression_task(1, true_rank=2)
    model = add_tucker_adapters(nn.Sequential(base), "0", ranks=12)
    w0 = model[0].base.weight.detach().clone()
    opt = TDLRT(model, lr=0.5, tau=0.05)
    losses = _train(model, opt, x, y, 60)
    assert model[0].delta.ranks == (2, 2)  # the target update's rank
    assert losses[-1] < 0.05 * losses[0]
    assert torch.equal(model[0].base.weight, w0)  # W₀ is never touched


def test_tdlrt_trains_conv_adapters_in_a_network():
    torch.manual_seed(0)
    teacher = _small_net(torch.float32)
    student = _small_net(torch.float32)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # the teacher differs by a small change of the last two layers
        teacher[2].weight.add_(0.2 * torch.randn_like(teacher[2].weight))
        teacher[5].weight.add_(0.2 * torch.randn_like(teacher[5].weight))
    x = torch.randn(64, 2, 8, 8)
    with torch.no_grad():
        y = teacher(x)
    add_tucker_adapters(student, ["2", "5"], ranks=2)
    opt = TDLRT(student, lr=0.2, tau=0.05, momentum=0.9)
    losses = _train(student, opt, x, y, 40)
    assert losses[-1] < 0.3 * losses[0]
    assert set(opt.rank_history[-1]) == {"2.delta", "5.delta"}
    for name in ("2.delta", "5.delta"):  # the channel ranks moved away from the initial (2, 2)
        assert any(h[name][:2] != (2, 2) for h in opt.rank_history), name
    assert student[2].delta.ranks[2:] == (3, 3)  # window modes are not adaptive


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_gives_the_same_outputs_and_unmerge_restores_w0_exactly(dtype):
    torch.manual_seed(0)
    net = add_tucker_adapters(_small_net(dtype), ["0", "2", "5"], ranks=3, scale=0.5)
    for i, seed in zip((0, 2, 5), (1, 2, 3)):
        _randomize(net[i], seed)
    w0 = {i: net[i].base.weight.detach().clone() for i in (0, 2, 5)}
    x = torch.randn(3, 2, 8, 8, dtype=dtype)
    before = net(x).detach()
    merge_adapters(net)
    for i in (0, 2, 5):
        assert net[i].merged
        expected = w0[i] + net[i].delta_weight().detach()
        assert torch.allclose(net[i].base.weight, expected, atol=_tol(dtype), rtol=0)
    after = net(x)
    assert torch.allclose(after, before, atol=_tol(dtype) * float(before.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="already merged"):
        merge_adapters(net)
    unmerge_adapters(net)
    for i in (0, 2, 5):
        assert not net[i].merged
        assert torch.equal(net[i].base.weight, w0[i])
    assert torch.equal(net(x), before)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_adapters(net)


def test_merged_state_is_not_saved_with_the_model():
    net = add_tucker_adapters(_small_net(), "5", ranks=2)
    keys = set(net.state_dict())
    merge_adapters(net)
    assert set(net.state_dict()) == keys


@pytest.mark.parametrize("merge", [True, False])
def test_remove_adapters_leaves_plain_layers(merge):
    torch.manual_seed(0)
    net = _small_net()
    original = net[5]
    w0 = original.weight.detach().clone()
    add_tucker_adapters(net, ["2", "5"], ranks=2, freeze_model=False)
    _randomize(net[5], 4)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    adapted = net(x)
    dense_update = net[5].delta_weight().detach()
    remove_adapters(net, merge=merge)
    assert net[5] is original and type(net[2]) is nn.Conv2d
    assert original.weight.requires_grad  # flags from before wrapping
    if merge:
        assert torch.allclose(original.weight, w0 + dense_update, atol=1e-12)
        assert torch.allclose(net(x), adapted, atol=1e-12)
    else:
        assert torch.equal(original.weight, w0)
    with pytest.raises(ValueError, match="no Tucker adapters"):
        remove_adapters(net)


def test_adapter_on_the_root_module_and_shared_modules():
    root = add_tucker_adapters(nn.Linear(5, 4), "", ranks=2)
    assert isinstance(root, TuckerAdapter)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    add_tucker_adapters(net, "*", ranks=2)
    assert net[0] is net[2] and isinstance(net[0], TuckerAdapter)
    assert net[0].base is shared


# --------------------------------------------------------------------------- checkpoints
def test_adapter_state_round_trip_into_a_fresh_model_after_rank_changes():
    torch.manual_seed(0)
    teacher = _small_net(torch.float32)
    x = torch.randn(32, 2, 8, 8)
    with torch.no_grad():
        y = teacher(x) + 0.3 * torch.randn(32, 5)
    pretrained = _small_net(torch.float32).state_dict()

    def build():
        net = _small_net(torch.float32)
        net.load_state_dict(pretrained)
        return add_tucker_adapters(net, ["2", "5"], ranks=3)

    net = build()
    opt = TDLRT(net, lr=0.2, tau=0.1)
    _train(net, opt, x, y, 6)
    saved_ranks = {n: net[i].delta.ranks for n, i in (("2", 2), ("5", 5))}
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(net), buffer)
    assert all("base" not in k for k in adapter_state_dict(net))
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = build()
    assert {n: fresh[i].delta.ranks for n, i in (("2", 2), ("5", 5))} != saved_ranks
    load_adapter_state_dict(fresh, state)
    assert {n: fresh[i].delta.ranks for n, i in (("2", 2), ("5", 5))} == saved_ranks
    assert torch.equal(fresh(x), net(x))
    # the loaded model trains on: the optimizer built after loading sees the new parameters
    opt2 = TDLRT(fresh, lr=0.2, tau=0.1)
    _train(fresh, opt2, x, y, 1)
    # and the keys are the model's own: a plain load_state_dict(strict=False) works as well
    again = build()
    result = again.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(again(x), net(x))


def test_load_adapter_state_dict_errors_change_nothing():
    torch.manual_seed(0)
    net = add_tucker_adapters(_small_net(), ["2", "5"], ranks=2)
    good = adapter_state_dict(net)
    for i, seed in ((2, 5), (5, 6)):
        _randomize(net[i], seed)
    before = {k: v.clone() for k, v in adapter_state_dict(net).items()}

    def unchanged():
        now = adapter_state_dict(net)
        return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)

    missing = {k: v for k, v in good.items() if k != "5.delta.factors.1"}
    with pytest.raises(KeyError, match=r"missing keys \['5.delta.factors.1'\]"):
        load_adapter_state_dict(net, missing)
    with pytest.raises(KeyError, match="unexpected keys.*'2.base.weight'"):
        load_adapter_state_dict(net, {**good, "2.base.weight": torch.zeros(8, 6, 3, 3)})
    bad = dict(good, **{"5.delta.factors.0": torch.zeros(5, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"factors.0 has shape \(5, 3\); expected \(5, 2\)"):
        load_adapter_state_dict(net, bad)
    bad = dict(good, **{"2.delta.core": torch.zeros(2, 2, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"core has shape \(2, 2, 3\); expected a core of 4"):
        load_adapter_state_dict(net, bad)
    bad = dict(good, **{"5.delta.factors.1": 2 * good["5.delta.factors.1"]})
    with pytest.raises(ValueError, match="orthonormal columns"):
        load_adapter_state_dict(net, bad)
    bad = dict(good, **{"5.delta.core": torch.full((2, 2), float("nan"), dtype=torch.float64)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_adapter_state_dict(net, bad)
    bad = dict(good, **{"5.delta.core": torch.zeros(2, 2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="floating-point"):
        load_adapter_state_dict(net, bad)
    assert unchanged()
    # partial loading, not strict: the missing adapter keeps its update
    part = {k: v for k, v in good.items() if k.startswith("5.")}
    load_adapter_state_dict(net, {**part, "other": torch.zeros(1)}, strict=False)
    assert not net[5].delta.core.any()
    assert torch.equal(net[2].delta.core, before["2.delta.core"])
    merge_adapters(net)
    with pytest.raises(ValueError, match="merged; unmerge_adapters first"):
        load_adapter_state_dict(net, good)


# --------------------------------------------------------------------------- bad input
def test_add_tucker_adapters_bad_input_names_the_offender_and_changes_nothing():
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    snapshot = repr(net)
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match=r"target 'classifier\.\*' matches no module.*'2', '4'"):
        add_tucker_adapters(net, ["2", "classifier.*"])
    with pytest.raises(ValueError, match="target 'nope' matches no module"):
        add_tucker_adapters(net, "nope")
    with pytest.raises(TypeError, match="target '1' is a ReLU"):
        add_tucker_adapters(net, ["2", "1"])
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        add_tucker_adapters(net, "0")
    with pytest.raises(ValueError, match=r"pattern '\[13\]' matches no adaptable layer"):
        add_tucker_adapters(net, "[13]")
    with pytest.raises(TypeError, match="target_modules must be"):
        add_tucker_adapters(net, [])
    with pytest.raises(TypeError, match="target_modules must be"):
        add_tucker_adapters(net, 2)
    with pytest.raises(ValueError, match="scale must be finite and non-zero"):
        add_tucker_adapters(net, "2", scale=0.0)
    with pytest.raises(ValueError, match="ranks must be positive"):
        add_tucker_adapters(net, ["4", "2"], ranks=(0, 2))
    with pytest.raises(ValueError, match=r"adaptive_modes entries must be modes in \[0, 2\)"):
        add_tucker_adapters(net, "4", adaptive_modes=(0, 3))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        add_tucker_adapters("model", "2")
    assert repr(net) == snapshot
    assert [p.requires_grad for p in net.parameters()] == flags
    # a glob passes over the grouped conv and the ReLU
    add_tucker_adapters(net, "*", ranks=2)
    assert type(net[0]) is nn.Conv2d and isinstance(net[2], TuckerAdapter)
    # wrapping twice, by name, by a pattern reaching inside an adapter, or directly
    with pytest.raises(ValueError, match="'2', which already has a Tucker adapter"):
        add_tucker_adapters(net, "2")
    with pytest.raises(ValueError, match="already has a Tucker adapter"):
        add_tucker_adapters(net, "2.*")
    with pytest.raises(ValueError, match="already has a Tucker adapter"):
        TuckerAdapter(net[2])
    with pytest.raises(TypeError, match="can adapt nn.Linear, nn.Conv2d"):
        TuckerAdapter(TuckerLinear(3, 3))
    with pytest.raises(ValueError, match="no Tucker adapters"):
        merge_adapters(nn.Linear(2, 2))


def test_compression_report_sees_the_updates():
    net = add_tucker_adapters(nn.Sequential(nn.Linear(40, 30)), "0", ranks=3)
    report = compression_report(net)
    assert [layer["name"] for layer in report["layers"]] == ["0.delta"]
    assert report["parameters"] == 9 + 30 * 3 + 40 * 3
    assert report["dense_parameters"] == 40 * 30


def test_a_failing_target_leaves_earlier_layers_unfrozen():
    """Building adapters freezes each base layer; when a later target fails, the earlier bases
    get their requires_grad flags back and stay unwrapped."""
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))

    def ranks(name, module):
        if name == "1":
            raise ValueError("no ranks for layer 1")
        return 2

    with pytest.raises(ValueError, match="no ranks for layer 1"):
        add_tucker_adapters(net, ["0", "1"], ranks=ranks, freeze_model=False)
    assert [type(m) for m in net] == [nn.Linear, nn.Linear]
    assert all(p.requires_grad for p in net.parameters())
