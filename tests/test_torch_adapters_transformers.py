"""Tucker adapters on transformer models: PEFT-style targets from a config, fused projections
(one update, or one per slice), embedding tables, principal initialization, exact merging, and
safetensors checkpoints that survive rank changes (bit for bit) and interrupted saves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tuckerman.integrations.torch import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TDLRT,
    TuckerAdapter,
    TuckerAdapterConfig,
    TuckerLinear,
    VisionTransformer,
    ViTConfig,
    adapter_report,
    adapter_state_dict,
    add_tucker_adapters,
    load_adapter_state_dict,
    merge_adapters,
    unmerge_adapters,
)

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.float64]
SMALL = ViTConfig(image_size=8, patch_size=4, dim=12, depth=2, heads=2, mlp_dim=16, num_classes=3)


def _tol(dtype: torch.dtype) -> float:
    return 200 * torch.finfo(dtype).eps


def _vit(dtype=torch.float64, seed=0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(SMALL, dtype=dtype)


def _images(n=4, dtype=torch.float64, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randomize(model: nn.Module, seed: int) -> None:
    """Random non-zero cores, so that comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TuckerAdapter):
                for d in m.deltas:
                    c = d.core
                    c.copy_(torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype))


def _names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, TuckerAdapter)]


def _fit(model, opt, x, y, loss_fn, steps: int) -> tuple[float, float]:
    """``steps`` optimizer steps on ``loss_fn(model(x), y)``; (first loss, last loss)."""

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    last = first
    for _ in range(steps):
        last = float(opt.step(closure).detach())
    return first, last


# --------------------------------------------------------------------------- the ViT
def test_vit_forward_and_bad_input():
    vit = _vit()
    assert vit(_images()).shape == (4, 3)
    assert type(vit.blocks[0].attn.qkv) is nn.Linear
    assert vit.blocks[0].attn.qkv.weight.shape == (36, 12)
    with pytest.raises(ValueError, match=r"images of shape \(batch, 1, 8, 8\), got \(4, 1, 9, 8\)"):
        vit(torch.zeros(4, 1, 9, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="image_size=10 is not a multiple of patch_size=4"):
        ViTConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="dim=10 is not a multiple of heads=4"):
        ViTConfig(dim=10, heads=4)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        ViTConfig(num_classes=1)
    with pytest.raises(TypeError, match="expects a ViTConfig"):
        VisionTransformer({"dim": 8})


def test_vit_attention_equals_a_hand_written_softmax_attention():
    """The block's attention against softmax(q kᵀ / √d) v written out per head."""
    vit = _vit()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(12, dim=-1)

    def heads(t):
        return t.reshape(2, 5, 2, 6).transpose(1, 2)

    w = torch.softmax(heads(q) @ heads(k).mT / 6**0.5, dim=-1)
    y = (w @ heads(v)).transpose(1, 2).reshape(2, 5, 12)
    assert torch.allclose(attn(x), attn.proj(y), atol=1e-12)


# --------------------------------------------------------------------------- targets
def test_targets_by_suffix_glob_and_regex():
    cfg = TuckerAdapterConfig(["qkv", "head"], ranks=2)
    assert _names(add_tucker_adapters(_vit(), cfg)) == [
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
        "head",
    ]
    glob = add_tucker_adapters(_vit(), "blocks.1.*", ranks=2)  # the norms are passed over
    assert _names(glob) == [
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    compiled = add_tucker_adapters(_vit(), re.compile(r"blocks\.\d\.mlp\.fc[12]"), ranks=2)
    as_text = add_tucker_adapters(_vit(), r"re:blocks\.\d\.mlp\.fc[12]", ranks=2)
    assert (
        _names(compiled)
        == _names(as_text)
        == [
            "blocks.0.mlp.fc1",
            "blocks.0.mlp.fc2",
            "blocks.1.mlp.fc1",
            "blocks.1.mlp.fc2",
        ]
    )
    # exclusion and per-layer ranks
    cfg = TuckerAdapterConfig(
        ["qkv", "proj", "patch_embed", "pos_embed"],
        ranks=3,
        rank_pattern={"blocks.1.attn.proj": 1, "re:.*_embed": 2},
        exclude_modules="blocks.0.*",
    )
    vit = add_tucker_adapters(_vit(), cfg)
    ranks = {layer["name"]: layer["ranks"] for layer in adapter_report(vit)["layers"]}
    assert ranks == {
        "patch_embed": [2, 1, 4, 4],
        "pos_embed": [2, 2],
        "blocks.1.attn.qkv": [3, 3],
        "blocks.1.attn.proj": [1, 1],
    }


def test_target_errors_name_the_offender_and_change_nothing():
    vit = _vit()
    snapshot = repr(vit)
    flags = [p.requires_grad for p in vit.parameters()]
    with pytest.raises(
        TypeError, match=r"target 'blocks.0.attn' \(matched by 'attn'\) is a _Attention"
    ):
        add_tucker_adapters(vit, ["qkv", "attn"])
    with pytest.raises(ValueError, match="target 'q_proj' matches no module.*'blocks.0.attn.qkv'"):
        add_tucker_adapters(vit, ["qkv", "q_proj"])
    with pytest.raises(ValueError, match=r"pattern re.compile\('norm.\*'\) matches no adaptable"):
        add_tucker_adapters(vit, re.compile("norm.*"))
    with pytest.raises(ValueError, match=r"'re:blocks\[' is not a valid regular expression"):
        TuckerAdapterConfig("re:blocks[")
    with pytest.raises(ValueError, match="every layer the targets match is excluded"):
        add_tucker_adapters(vit, TuckerAdapterConfig("qkv", exclude_modules="*"))
    with pytest.raises(ValueError, match="fused_splits entry 'fc1' matches none of the adapted"):
        add_tucker_adapters(vit, TuckerAdapterConfig("qkv", fused_splits={"fc1": 2}))
    with pytest.raises(ValueError, match="out_features=36 cannot be split into 5 equal slices"):
        add_tucker_adapters(vit, TuckerAdapterConfig("qkv", fused_splits={"qkv": 5}))
    with pytest.raises(
        ValueError, match=r"slice sizes \(12, 12\) add up to 24, not out_features=36"
    ):
        add_tucker_adapters(vit, TuckerAdapterConfig("qkv", fused_splits={"qkv": (12, 12)}))
    with pytest.raises(ValueError, match="fused_splits applies to nn.Linear projections.*Conv2d"):
        add_tucker_adapters(
            vit, TuckerAdapterConfig("patch_embed", fused_splits={"patch_embed": 2})
        )
    with pytest.raises(ValueError, match="a number of equal slices.*got 1"):
        TuckerAdapterConfig("qkv", fused_splits={"qkv": 1})
    with pytest.raises(ValueError, match="init must be one of"):
        TuckerAdapterConfig("qkv", init="gaussian")
    with pytest.raises(TypeError, match="rank_pattern\\['head'\\] must be an int"):
        TuckerAdapterConfig("qkv", rank_pattern={"head": "two"})
    with pytest.raises(TypeError, match="give either a TuckerAdapterConfig or options.*'ranks'"):
        add_tucker_adapters(vit, TuckerAdapterConfig("qkv"), ranks=4)
    with pytest.raises(TypeError, match="needs target_modules"):
        add_tucker_adapters(vit)
    with pytest.raises(ValueError, match=r"ranks must be positive, got ranks\[0\] = 0"):
        add_tucker_adapters(vit, ["proj", "qkv"], ranks=(0, 2))
    assert repr(vit) == snapshot
    assert [p.requires_grad for p in vit.parameters()] == flags


def test_config_json_round_trip():
    cfg = TuckerAdapterConfig(
        ["qkv", re.compile(r"blocks\.\d\.mlp\..*")],
        ranks=(3, 2),
        rank_pattern={"head": 1},
        exclude_modules=["blocks.1.*"],
        init="principal",
        scale=0.5,
        adaptive_modes=(0,),
        fused_splits={"qkv": (12, 12, 12)},
        freeze_model=False,
    )
    text = json.dumps(cfg.to_dict())
    again = TuckerAdapterConfig.from_dict(json.loads(text))
    assert again.to_dict() == cfg.to_dict()
    assert again.ranks == (3, 2) and again.fused_splits == {"qkv": (12, 12, 12)}
    a = add_tucker_adapters(_vit(seed=3), cfg)
    b = add_tucker_adapters(_vit(seed=3), again)
    assert adapter_report(a) == adapter_report(b)
    with pytest.raises(ValueError, match="unknown keys \\['rank'\\]"):
        TuckerAdapterConfig.from_dict({"target_modules": "qkv", "rank": 2})
    with pytest.raises(ValueError, match="callable ranks cannot be saved"):
        TuckerAdapterConfig("qkv", ranks=lambda n, m: 2).to_dict()
    with pytest.raises(ValueError, match="has flags"):
        TuckerAdapterConfig(re.compile("qkv", re.IGNORECASE)).to_dict()


# --------------------------------------------------------------------------- fused projections
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 3, (12, 8, 16)])
def test_fused_projection_update_equals_the_dense_update(dtype, splits):
    """One update over the fused weight, or one per slice: the output is the layer with weight
    ``W₀ + ΔW`` where ``ΔW`` stacks the slices' updates."""
    torch.manual_seed(0)
    base = nn.Linear(12, 36, dtype=dtype)
    adapter = TuckerAdapter(base, ranks=2, splits=splits, scale=0.7)
    expected = (
        [(36, 12)] if splits is None else [(s, 12) for s in ((12,) * 3 if splits == 3 else splits)]
    )
    assert [d.weight_shape for d in adapter.deltas] == expected
    _randomize(adapter, 4)
    x = torch.randn(2, 5, 12, dtype=dtype)
    w = base.weight.detach().double() + adapter.delta_weight().detach().double()
    ref = F.linear(x.double(), w, base.bias.detach().double())
    y = adapter(x)
    assert torch.allclose(y.double(), ref, atol=_tol(dtype) * float(ref.abs().max()), rtol=0)
    if splits is not None:  # each slice of the output sees only its own update
        rows = 0
        for d in adapter.deltas:
            n = d.weight_shape[0]
            block = (
                base.weight.detach().double()[rows : rows + n]
                + 0.7 * d.dense_weight().detach().double()
            )
            part = F.linear(x.double(), block, base.bias.detach().double()[rows : rows + n])
            assert torch.allclose(y[..., rows : rows + n].double(), part, atol=_tol(dtype) * 10)
            rows += n


def test_split_slices_get_their_own_ranks_from_tdlrt():
    """A fused target whose q, k and v updates have ranks 1, 2 and 3: TDLRT finds each."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 24, dtype=torch.float64)
    blocks = [
        torch.randn(8, r, generator=g, dtype=torch.float64)
        @ torch.randn(r, 16, generator=g, dtype=torch.float64)
        for r in (1, 2, 3)
    ]
    target = torch.cat(blocks, 0) / 4
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = base(x) + x @ target.mT
    model = add_tucker_adapters(
        nn.Sequential(base), TuckerAdapterConfig("0", ranks=4, fused_splits={"0": 3})
    )
    opt = TDLRT(model, lr=1.0, tau=0.02)
    first, last = _fit(model, opt, x, y, F.mse_loss, 80)
    assert last < 1e-3 * first
    assert [d.ranks for d in model[0].deltas] == [(1, 1), (2, 2), (3, 3)]
    assert set(opt.rank_history[-1]) == {"0.delta.0", "0.delta.1", "0.delta.2"}


# --------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_update_equals_the_dense_table(dtype, padding_idx, monkeypatch):
    torch.manual_seed(0)
    base = nn.Embedding(11, 6, padding_idx=padding_idx, dtype=dtype)
    adapter = TuckerAdapter(base, ranks=3, scale=0.5)
    assert adapter.delta.weight_shape == (11, 6) and adapter.delta.ranks == (3, 3)
    _randomize(adapter, 5)
    idx = torch.tensor([[0, 2, 5], [10, 2, 1]])
    table = adapter.delta_weight().detach()
    ref = F.embedding(idx, base.weight.detach().double() + table.double())
    if padding_idx is not None:  # the padding row keeps W₀'s (zero) embedding
        assert not table[padding_idx].any() and table.abs().sum() > 0
    monkeypatch.setattr(TuckerLinear, "dense_weight", _forbidden)  # never formed in forward
    y = adapter(idx)
    assert torch.allclose(y.double(), ref, atol=_tol(dtype) * float(ref.abs().max()), rtol=0)
    y.sum().backward()  # gradients reach the core and the row factor
    assert adapter.delta.core.grad.abs().max() > 0


def _forbidden(self):
    raise AssertionError("the dense update was formed in the forward pass")


def test_embedding_refusals():
    with pytest.raises(ValueError, match="max_norm=1.0 / sparse=False is not supported"):
        TuckerAdapter(nn.Embedding(5, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="sparse=True is not supported"):
        TuckerAdapter(nn.Embedding(5, 4, sparse=True))


def test_tdlrt_trains_an_embedding_update_and_finds_its_rank():
    """Targets: the table differs from W₀ by a rank-2 update; regression of looked-up rows."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    base = nn.Embedding(40, 10, dtype=torch.float64)
    delta = torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 10, generator=g, dtype=torch.float64
    )
    idx = torch.arange(40).repeat(4)
    with torch.no_grad():
        y = base(idx) + delta[idx]
    model = add_tucker_adapters(nn.Sequential(base), "0", ranks=1)
    opt = TDLRT(model, lr=0.01, tau=0.02)

    def loss_fn(pred, target):
        return F.mse_loss(pred, target, reduction="sum")

    first, last = _fit(model, opt, idx, y, loss_fn, 100)
    assert last < 1e-3 * first
    assert model[0].delta.ranks == (2, 2)
    assert not model[0].base.weight.requires_grad


# --------------------------------------------------------------------------- initialization
def _st_hosvd_factors(w: torch.Tensor, ranks) -> list[torch.Tensor]:
    """Reference ST-HOSVD (modes in order): SVD of each unfolding of the partly projected
    tensor."""
    factors = []
    for k, r in enumerate(ranks):
        unfolded = torch.movedim(w, k, 0).reshape(w.shape[k], -1)
        u = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :r]
        factors.append(u)
        w = torch.movedim(torch.tensordot(u.mT, torch.movedim(w, k, 0), dims=1), 0, k)
    return factors


@pytest.mark.parametrize("dtype", DTYPES)
def test_principal_init_spans_the_base_weights_leading_subspaces(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, dtype=dtype)
    lin = nn.Linear(12, 36, dtype=dtype)
    for base, splits in ((conv, None), (lin, None), (lin, 3)):
        adapter = TuckerAdapter(base, ranks=3, init="principal", splits=splits)
        rows = 0
        for d in adapter.deltas:
            assert not d.core.any()  # ΔW = 0: the model is unchanged
            w = base.weight.detach().double()[rows : rows + d.weight_shape[0]]
            rows += d.weight_shape[0]
            reference = _st_hosvd_factors(w, d.ranks)
            for k, (u, top) in enumerate(zip(d.factors, reference)):
                u = u.detach().double()
                # the same subspace: equal orthogonal projectors
                tol = 1e3 * torch.finfo(dtype).eps
                assert torch.allclose(u @ u.mT, top @ top.mT, atol=tol), (type(base), k)
    x = torch.randn(2, 6, 5, 5, dtype=dtype)
    assert torch.equal(TuckerAdapter(conv, ranks=3, init="principal")(x), conv(x))


# --------------------------------------------------------------------------- merging
def _full_config(**kw) -> TuckerAdapterConfig:
    return TuckerAdapterConfig(
        ["patch_embed", "pos_embed", "qkv", "proj", "fc1", "fc2", "head"],
        ranks=3,
        fused_splits={"blocks.0.attn.qkv": 3},
        **kw,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_and_unmerge_are_exact_on_a_vision_transformer(dtype):
    vit = add_tucker_adapters(_vit(dtype), _full_config(scale=0.3))
    _randomize(vit, 7)
    kinds = {type(a.base).__name__ for a in vit.modules() if isinstance(a, TuckerAdapter)}
    assert kinds == {"Conv2d", "Embedding", "Linear"}
    w0 = {n: p.detach().clone() for n, p in vit.named_parameters() if ".base." in n}
    x = _images(dtype=dtype)
    before = vit(x).detach()
    merge_adapters(vit)
    merged = vit(x)
    assert torch.allclose(merged, before, atol=_tol(dtype) * 10 * float(before.abs().max()), rtol=0)
    for name, a in vit.named_modules():
        if isinstance(a, TuckerAdapter):
            expected = w0[f"{name}.base.weight"] + a.delta_weight().detach()
            assert torch.equal(a.base.weight, expected), name  # W₀ + ΔW, as computed
    unmerge_adapters(vit)
    for n, p in vit.named_parameters():
        if n in w0:
            assert torch.equal(p, w0[n]), n  # bit for bit
    assert torch.equal(vit(x), before)


# --------------------------------------------------------------------------- checkpoints
def _train_a_few_steps(vit: nn.Module, steps: int = 4) -> TDLRT:
    x = _images(16, torch.float32, seed=2)
    y = torch.arange(16) % 3
    opt = TDLRT(vit, lr=0.5, tau=0.2)
    _fit(vit, opt, x, y, F.cross_entropy, steps)
    return opt


def test_save_and_load_are_bit_exact_after_rank_changes(tmp_path):
    pytest.importorskip("safetensors")
    from tuckerman.integrations.torch import load_adapters, save_adapters

    pretrained = _vit(torch.float32).state_dict()

    def fresh_base():
        vit = VisionTransformer(SMALL)
        vit.load_state_dict(pretrained)
        return vit

    vit = add_tucker_adapters(fresh_base(), _full_config())
    initial = {
        n: [d.ranks for d in a.deltas]
        for n, a in vit.named_modules()
        if isinstance(a, TuckerAdapter)
    }
    opt = _train_a_few_steps(vit)
    ranks = {
        n: [d.ranks for d in a.deltas]
        for n, a in vit.named_modules()
        if isinstance(a, TuckerAdapter)
    }
    assert ranks != initial and len(opt.rank_history) == 4
    folder = save_adapters(vit, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    record = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert [layer["name"] for layer in record["layers"]] == _names(vit)
    assert {
        layer["name"]: [tuple(r) for r in layer["ranks"]] for layer in record["layers"]
    } == ranks
    assert record["configs"] == [_full_config().to_dict()]

    loaded = load_adapters(fresh_base(), folder)
    x = _images(5, torch.float32, seed=9)
    assert torch.equal(loaded(x), vit(x))
    saved, again = adapter_state_dict(vit), adapter_state_dict(loaded)
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) and saved[k].dtype == again[k].dtype for k in saved)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".delta." in n for n in trainable)
    _train_a_few_steps(loaded, 1)  # an optimizer built after loading trains on

    # never overwrite silently; nothing changes when loading fails
    with pytest.raises(FileExistsError, match="already exist; pass overwrite=True"):
        save_adapters(vit, folder)
    other = VisionTransformer(ViTConfig(**{**SMALL.__dict__, "dim": 16, "heads": 2}))
    snapshot = repr(other)
    with pytest.raises(
        ValueError, match="'patch_embed' is a Conv2d with weight shape \\(16, 1, 4, 4\\)"
    ):
        load_adapters(other, folder)
    with pytest.raises(ValueError, match="already has a Tucker adapter"):
        load_adapters(loaded, folder)
    assert repr(other) == snapshot
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(fresh_base(), tmp_path / "nowhere")
    blob = bytearray((folder / ADAPTER_WEIGHTS_NAME).read_bytes())
    blob[-1] ^= 1
    (folder / ADAPTER_WEIGHTS_NAME).write_bytes(bytes(blob))
    base = fresh_base()
    with pytest.raises(ValueError, match="does not match .*interrupted or mixed save"):
        load_adapters(base, folder)
    assert not any(isinstance(m, TuckerAdapter) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


def test_an_interrupted_save_is_detected_not_loaded(tmp_path):
    """A save killed (SIGKILL) between writing the new weights and the new description leaves
    the old description next to new weights: loading refuses, naming the mismatch."""
    pytest.importorskip("safetensors")
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        from torch import nn
        from tuckerman.integrations.torch import add_tucker_adapters, save_adapters
        torch.manual_seed(0)
        net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 5)), "0", ranks=2)
        save_adapters(net, {str(tmp_path)!r})
        with torch.no_grad():
            net[0].delta.core.fill_(1.0)
        real = os.replace
        def slow(src, dst):
            real(src, dst)
            if str(dst).endswith(".safetensors"):
                print("weights replaced", flush=True)
                time.sleep(60)
        os.replace = slow
        save_adapters(net, {str(tmp_path)!r}, overwrite=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "weights replaced"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    from tuckerman.integrations.torch import load_adapters

    with pytest.raises(ValueError, match="interrupted or mixed save"):
        load_adapters(nn.Sequential(nn.Linear(6, 5)), tmp_path)


def test_load_adapter_state_dict_handles_split_updates():
    vit = add_tucker_adapters(_vit(), _full_config())
    _randomize(vit, 3)
    state = adapter_state_dict(vit)
    assert (
        "blocks.0.attn.qkv.delta.2.factors.1" in state and "blocks.1.attn.qkv.delta.core" in state
    )
    other = add_tucker_adapters(
        _vit(),
        TuckerAdapterConfig(
            ["patch_embed", "pos_embed", "qkv", "proj", "fc1", "fc2", "head"],
            ranks=1,
            fused_splits={"blocks.0.attn.qkv": 3},
        ),
    )
    load_adapter_state_dict(other, state)
    x = _images()
    assert torch.equal(other(x), vit(x))
    bad = dict(state)
    del bad["blocks.0.attn.qkv.delta.1.core"]
    with pytest.raises(KeyError, match=r"missing keys \['blocks.0.attn.qkv.delta.1.core'\]"):
        load_adapter_state_dict(other, bad)
