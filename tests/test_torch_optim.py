"""The TDLRT torch optimizer: agrees with the core step and with torch's SGD/Adam, two gradient
evaluations, refuses non-finite steps without changing anything, survives checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from tuckerman.integrations.torch import TuckerConv2d, TuckerLinear  # noqa: E402
from tuckerman.integrations.torch._optim import TDLRT  # noqa: E402

import tuckerman as tm  # noqa: E402

DT = torch.float64


def _closure(opt, model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def test_tucker_layer_step_equals_core_tdlrt_step():
    torch.manual_seed(0)
    layer = TuckerLinear(9, 7, bias=False, ranks=(4, 4), dtype=DT)
    A = torch.randn(7, 9, dtype=DT)
    x0 = tm.TuckerTensor(layer.core.detach().clone(), [u.detach().clone() for u in layer.factors])
    opt = TDLRT(layer, lr=0.3, tau=0.05)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((layer.dense_weight() - A) ** 2).sum()
        loss.backward()
        return loss

    ref = x0
    for _ in range(5):
        opt.step(closure)
        ref = tm.tdlrt_step(ref, lambda y: y.to_dense() - A, lr=0.3, tau=0.05)
        assert layer.ranks == ref.ranks
        assert torch.allclose(layer.dense_weight().detach(), ref.to_dense(), atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, reference",
    [
        (dict(inner="sgd"), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            dict(inner="sgd", momentum=0.9, weight_decay=1e-2),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        ),
        (
            dict(inner="sgd", momentum=0.9, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        ),
        (dict(inner="adam"), lambda p: torch.optim.Adam(p, lr=0.1)),
    ],
)
def test_dense_parameters_follow_torch_optimizers(kwargs, reference):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 5, dtype=DT), torch.randn(16, 2, dtype=DT)
    opt = TDLRT(model, lr=0.1, **kwargs)
    ref = reference(twin.parameters())
    for _ in range(4):
        opt.step(_closure(opt, model, x, y))
        ref.step(_closure(ref, twin, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        TuckerConv2d(2, 6, 3, padding=1, ranks=(4, 2), dtype=DT),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(6 * 5 * 5, 3, ranks=(3, 3), dtype=DT),
    )


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 5, 5, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_two_evaluations_ranks_change_and_loss_falls(inner):
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.4, inner=inner, momentum=0.9 if inner == "sgd" else 0.0)
    calls = []
    first = None
    for _ in range(15):
        before = len(calls)
        loss = opt.step(_closure(opt, model, x, y, calls))
        assert len(calls) - before == 2
        first = loss if first is None else first
    assert loss.item() < first.item()
    assert len(opt.rank_history) == 15
    assert any(h != {"0": (4, 2, 3, 3), "3": (3, 3)} for h in opt.rank_history)  # ranks moved


def test_one_pass_variant_uses_one_evaluation():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.1, one_pass=True)
    calls = []
    losses = [float(opt.step(_closure(opt, model, x, y, calls))) for _ in range(15)]
    assert len(calls) == 15
    assert losses[-1] < losses[0]
    # without a closure, after the user's own backward
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_fixed_rank_mode_keeps_ranks_and_bounds_hold():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, fixed_rank=True)
    ranks = [m.ranks for m in model.modules() if hasattr(m, "ranks")]
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    assert [m.ranks for m in model.modules() if hasattr(m, "ranks")] == ranks
    model = _cnn()
    opt = TDLRT(model, lr=0.05, tau=1e-12, max_rank=3)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    for m in model.modules():
        if isinstance(m, TuckerConv2d):
            assert max(m.ranks[:2]) <= 3 and m.ranks[2:] == (3, 3)


def _state_values(opt):
    return {
        k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in opt.state_dict()["state"].items()
    }


@pytest.mark.parametrize("where", ["current point", "augmented bases"])
def test_non_finite_steps_change_nothing(where):
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.2, momentum=0.9)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    objects = [id(p) for p in model.parameters()]
    state = _state_values(opt)
    calls = []

    def bad():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if (where == "current point") or len(calls) == 2:
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match=where):
        opt.step(bad)
    assert [id(p) for p in model.parameters()] == objects
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    after = _state_values(opt)
    assert after.keys() == state.keys()
    for k in state:
        for n, v in state[k].items():
            assert torch.equal(after[k][n], v) if torch.is_tensor(v) else after[k][n] == v
    skip = TDLRT(model, lr=0.05, tau=0.2, on_nonfinite="skip")
    calls.clear()
    skip.step(bad)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("failure", ["closure", "truncation"])
def test_an_exception_inside_the_step_changes_nothing(failure, monkeypatch):
    """An error in the second evaluation or in the truncation (e.g. LAPACK) is re-raised with the
    parameters (same objects, same values) and the optimizer state as before the step."""
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.2, momentum=0.9)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    objects = [id(p) for p in model.parameters()]
    ranks = [m.ranks for m in model if hasattr(m, "ranks")]
    state = _state_values(opt)
    calls = []

    def closure():
        calls.append(1)
        if failure == "closure" and len(calls) == 2:
            raise RuntimeError("out of memory in the augmented bases")
        return _closure(opt, model, x, y)()

    if failure == "truncation":
        import tuckerman.integrations.torch._optim as optim_module

        def broken(*args, **kwargs):
            raise RuntimeError("linalg.svd: the algorithm failed to converge")

        monkeypatch.setattr(optim_module.engine, "truncate", broken)
    with pytest.raises(RuntimeError):
        opt.step(closure)
    assert [id(p) for p in model.parameters()] == objects
    assert [m.ranks for m in model if hasattr(m, "ranks")] == ranks
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    after = _state_values(opt)
    assert after.keys() == state.keys()
    for k in state:
        for n, v in state[k].items():
            assert torch.equal(after[k][n], v) if torch.is_tensor(v) else after[k][n] == v


def test_checkpoint_after_rank_changes_continues_identically():
    x, y = _data()

    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(_closure(opt, model, x, y))

    model = _cnn()
    opt = TDLRT(model, lr=0.05, tau=0.4, momentum=0.9)
    run(model, opt, 6)
    assert opt.rank_history[-1] != {"0": (4, 2, 3, 3), "3": (3, 3)}  # ranks changed
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, 6)  # the uninterrupted run

    fresh = _cnn(seed=123)  # different initial weights and ranks are overwritten by the load
    buf.seek(0)
    ckpt = torch.load(buf)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = TDLRT(fresh, lr=0.05, tau=0.4, momentum=0.9)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert len(fresh_opt.rank_history) == 6
    run(fresh, fresh_opt, 6)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert fresh_opt.rank_history == opt.rank_history


def test_lr_scheduler_drives_the_step():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.1, tau=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(opt, model, x, y))
    sched.step()
    assert all(g["lr"] == pytest.approx(0.05) for g in opt.param_groups)


def test_bad_arguments():
    model = _cnn()
    with pytest.raises(TypeError, match="needs the model"):
        TDLRT(list(model.parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"lr must be finite and > 0, got -1.0"):
        TDLRT(model, lr=-1.0)
    with pytest.raises(ValueError, match=r"tau must be finite and >= 0, got -0.5"):
        TDLRT(model, lr=0.1, tau=-0.5)
    with pytest.raises(
        ValueError, match=r"inner must be one of \('sgd', 'adam', 'adamw'\), got 'rmsprop'"
    ):
        TDLRT(model, lr=0.1, inner="rmsprop")
    with pytest.raises(ValueError, match="nesterov needs"):
        TDLRT(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"min_rank\[0\] must be a positive integer"):
        TDLRT(model, lr=0.1, min_rank=0)
    opt = TDLRT(model, lr=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    _ = np  # numpy imported for parity with other test modules
