"""The TDLRT torch optimizer: agrees with the core step and with torch's SGD/Adam, two gradient
evaluations, refuses non-finite steps without changing anything, survives checkpoints."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tuckerman.backends  # noqa: E402, F401
import tuckerman.integrations  # noqa: E402, F401
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


@pytest.mark.parametrize("second_pass", ["replay", "closure"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_two_evaluations_ranks_change_and_loss_falls(inner, second_pass):
    model = _cnn()
    x, y = _data()
    momentum = 0.9 if inner == "sgd" else 0.0
    opt = TDLRT(model, lr=0.05, tau=0.4, inner=inner, momentum=momentum, second_pass=second_pass)
    calls = []
    first = None
    for _ in range(15):
        before = len(calls)
        loss = opt.step(_closure(opt, model, x, y, calls))
        assert len(calls) - before == (2 if second_pass == "closure" else 1)
        first = loss if first is None else first
    assert loss.item() < first.item()
    assert len(opt.rank_history) == 15
    assert any(h != {"0": (4, 2, 3, 3), "3": (3, 3)} for h in opt.rank_history)  # ranks moved


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        TuckerConv2d(2, 6, 3, padding=1, ranks=(4, 2), dtype=DT),
        nn.BatchNorm2d(6, dtype=DT),
        nn.ReLU(),
        TuckerConv2d(6, 5, 3, stride=2, padding="same" if False else 1, ranks=(3, 4), dtype=DT,
                     padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(5 * 3 * 3, 3, ranks=(3, 3), dtype=DT),
    )  # fmt: skip


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_replayed_second_gradient_equals_the_second_closure_call(inner):
    """The augmented weights equal the current ones, so the network's activations and output
    gradients in the second evaluation are those of the first: replaying them gives the same
    gradient (batch norm in training mode, strided and reflect-padded convolutions, a model
    used twice per forward pass)."""
    x, y = _data()
    kw = dict(lr=0.05, tau=0.3, inner=inner, momentum=0.9 if inner == "sgd" else 0.0)
    if inner == "adam":  # eps 1e-8 turns rounding noise in the moments into 1e-10 steps
        kw["eps"] = 1e-3
    runs = []
    for second_pass in ("replay", "closure"):
        model = _bn_net()
        opt = TDLRT(model, second_pass=second_pass, **kw)
        for _ in range(6):

            def closure(model=model, opt=opt):
                opt.zero_grad()
                out = model(x) + 0.5 * model(x.flip(0))  # every layer used twice
                loss = nn.functional.mse_loss(out, y)
                loss.backward()
                return loss

            opt.step(closure)
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    assert oa.rank_history == ob.rank_history
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0), name


def test_replay_after_the_users_own_backward_and_its_errors():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.3)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # no closure: the recorded pass is replayed
    assert all(not m._records for m in model if hasattr(m, "_records"))  # consumed
    nn.functional.mse_loss(model(x), y).backward()
    opt.zero_grad()  # drops the gradients and the records
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs a closure: the Tucker layers recorded no"):
        opt.step()


def test_one_pass_variant_uses_one_evaluation():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.1, one_pass=True)
    calls = []
    losses = [opt.step(_closure(opt, model, x, y, calls)).item() for _ in range(15)]
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
    # a NaN in the second evaluation needs one: the closure called again
    opt = TDLRT(model, lr=0.05, tau=0.2, momentum=0.9, second_pass="closure")
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
    skip = TDLRT(model, lr=0.05, tau=0.2, on_nonfinite="skip", second_pass="closure")
    calls.clear()
    skip.step(bad)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("full", [True, False], ids=["augmenting", "core-only"])
def test_an_inner_update_that_overflows_is_refused(full):
    """Finite gradients, a learning rate that overflows the new core: the step is
    refused (raise names the cause; skip changes nothing) instead of reaching the SVDs with
    infinities (LAPACK's 'failed to converge')."""
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.2, augment_every=1 if full else 2)
    opt.step(_closure(opt, model, x, y))  # step 0 augments; with augment_every=2 step 1 does not
    params = [p.detach().clone() for p in model.parameters()]
    state = _state_values(opt)
    huge = torch.finfo(DT).max

    def steep(o):  # finite gradients with entries well above 1: lr * g overflows
        def closure():
            o.zero_grad()
            loss = 1e6 * nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return closure

    for g in opt.param_groups:
        g["lr"] = huge
    with pytest.raises(FloatingPointError, match="overflowed"):
        opt.step(steep(opt))
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    after = _state_values(opt)
    for k in state:
        for n, v in state[k].items():
            assert torch.equal(after[k][n], v) if torch.is_tensor(v) else after[k][n] == v
    skip = TDLRT(model, lr=huge, tau=0.2, on_nonfinite="skip", augment_every=1 if full else 2)
    if not full:
        skip._steps = 1  # the next step is a core-only one
    skip.step(steep(skip))
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    assert skip.rank_history == []


@pytest.mark.parametrize("failure", ["closure", "truncation"])
def test_an_exception_inside_the_step_changes_nothing(failure, monkeypatch):
    """An error in the second evaluation or in the truncation (e.g. LAPACK) is re-raised with the
    parameters (same objects, same values) and the optimizer state as before the step."""
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.2, momentum=0.9, second_pass="closure")
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


# --------------------------------------------------------------------------- the device step
def test_parameters_keep_their_identity_at_unchanged_ranks():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, fixed_rank=True, momentum=0.9)
    objects = [id(p) for p in model.parameters()]
    for _ in range(20):
        opt.step(_closure(opt, model, x, y))
    assert [id(p) for p in model.parameters()] == objects
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(objects)


def test_ranks_change_inside_the_capacity_without_new_parameters():
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.4, momentum=0.9, capacity="max")
    start = {"0": model[0].ranks, "3": model[3].ranks}
    objects = [id(p) for p in model.parameters()]
    caps = [m.capacity for m in model if hasattr(m, "capacity")]
    for _ in range(10):
        opt.step(_closure(opt, model, x, y))
    assert any(h != start for h in opt.rank_history)  # ranks moved
    assert [m.capacity for m in model if hasattr(m, "capacity")] == caps
    assert [id(p) for p in model.parameters()] == objects
    for m in model:
        if hasattr(m, "capacity"):
            r = m.ranks
            for u, k in zip(m.factors, r):
                assert not torch.any(u[:, k:])
            assert torch.count_nonzero(m.core) == torch.count_nonzero(
                m.core[tuple(slice(0, k) for k in r)]
            )


def test_no_host_read_with_the_largest_capacity_and_skip(monkeypatch):
    """capacity="max" with on_nonfinite="skip": the step reads nothing on the host, and a
    non-finite step is refused on the device (values selected), changing nothing."""
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.3, inner="adam", capacity="max", on_nonfinite="skip")
    opt.step(_closure(opt, model, x, y))
    reads, stepping = [], True
    ours = tuple(
        str(Path(m.__file__).parent) for m in (tm, tm.integrations, tm.backends)
    )  # torch's own Adam reads its CPU step counters (by design, no device sync): not counted

    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if stepping and caller.startswith(ours):
                reads.append((_name, caller))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    stepping = False
    params = [p.detach().clone() for p in model.parameters()]
    state = _state_values(opt)

    def bad():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * float("nan")
        loss.backward()
        return loss

    stepping = True
    opt.step(bad)
    assert reads == []
    monkeypatch.undo()
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    after = _state_values(opt)
    for k in state:
        for n, v in state[k].items():
            assert torch.equal(after[k][n], v) if torch.is_tensor(v) else after[k][n] == v
    assert len(opt.rank_history) == 5  # read lazily: the refused step's ranks are the old ones
    assert opt.rank_history[-1] == opt.rank_history[-2]


@pytest.mark.parametrize("one_pass", [False, True])
def test_amortized_augmentation_steps_only_the_cores_in_between(one_pass):
    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.3, momentum=0.9, augment_every=3, one_pass=one_pass)
    calls, losses = [], []
    for step in range(8):
        before = [p.detach().clone() for m in model if hasattr(m, "capacity") for p in m.factors]
        n = len(calls)
        losses.append(float(opt.step(_closure(opt, model, x, y, calls))))
        full = step % 3 == 0
        assert len(calls) - n == 1  # replay: the second evaluation needs no closure call
        after = [p.detach() for m in model if hasattr(m, "capacity") for p in m.factors]
        if not full:  # the bases (and ranks) stay
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            assert opt.rank_history[-1] == opt.rank_history[-2]
    assert losses[-1] < losses[0]
    # a core-only step (the ninth) needs no closure
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_frozen_tucker_layers_are_left_untouched():
    model = _cnn()
    x, y = _data()
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = TDLRT(model, lr=0.05, tau=0.4)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), frozen))
    assert list(opt.rank_history[-1]) == ["3"]
    model[3].factors[0].requires_grad_(False)
    with pytest.raises(ValueError, match="only some require gradients"):
        TDLRT(model, lr=0.05)


def test_deepcopy_and_pickle_continue_identically():
    import copy
    import pickle

    model = _cnn()
    x, y = _data()
    opt = TDLRT(model, lr=0.05, tau=0.4, momentum=0.9)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    for clone in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        twin_opt = clone(opt)
        twin = next(iter(twin_opt._layers.values())).__dict__  # the copy holds its own layers
        assert twin is not next(iter(opt._layers.values())).__dict__
    m2, o2 = copy.deepcopy((model, opt))
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
        o2.step(_closure(o2, m2, x, y))
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt.rank_history == o2.rank_history


def test_a_state_from_other_ranks_is_refused_at_load():
    x, y = _data()
    model = _cnn()
    opt = TDLRT(model, lr=0.05, tau=0.4, momentum=0.9)
    for _ in range(4):
        opt.step(_closure(opt, model, x, y))
    saved = opt.state_dict()
    fresh = _cnn()  # initial ranks: the saved model's ranks differ
    assert [m.ranks for m in fresh if hasattr(m, "ranks")] != [
        m.ranks for m in model if hasattr(m, "ranks")
    ]
    with pytest.raises(ValueError, match=r"saved state of Tucker layer '0' has ranks \(\d+, \d+"):
        TDLRT(fresh, lr=0.05, tau=0.4, momentum=0.9).load_state_dict(saved)


def test_checkpoints_hold_the_true_ranks_and_load_into_padded_or_exact_layers():
    x, y = _data()
    model = _cnn()
    opt = TDLRT(model, lr=0.05, tau=0.4, momentum=0.9, capacity="max")
    for _ in range(4):
        opt.step(_closure(opt, model, x, y))
    layer = model[0]
    assert layer.capacity != layer.ranks
    sd, osd = model.state_dict(), opt.state_dict()
    assert tuple(sd["0.core"].shape) == layer.ranks  # small files
    i = [id(p) for p in opt._tucker_params()].index(id(layer.core))
    assert tuple(osd["state"][i]["momentum_buffer"].shape) == layer.ranks
    exact = _cnn(seed=5)
    exact[0].set_tucker(tm.truncate_core(exact[0].tucker(), ranks=(2, 1, 3, 3))[0])
    exact[0].set_capacity((2, 1, 3, 3))
    exact.load_state_dict(sd)  # larger than the capacity: new parameters at the saved ranks
    assert exact[0].ranks == exact[0].capacity == layer.ranks
    padded = _cnn(seed=6)
    padded[0].set_capacity((6, 2, 3, 3))
    objects = [id(p) for p in padded.parameters()]
    padded.load_state_dict(sd)  # fits the capacity: same parameters, zero padding
    assert padded[0].ranks == layer.ranks and padded[0].capacity == (6, 2, 3, 3)
    assert [id(p) for p in padded.parameters()] == objects
    for m in (exact, padded):
        assert torch.allclose(m(x), model(x), atol=1e-13, rtol=0)


def test_hyperparameters_and_bounds_are_validated_before_anything_changes():
    model = _cnn()
    caps = [m.capacity for m in model if hasattr(m, "capacity")]
    with pytest.raises(ValueError, match=r"min_rank 4 exceeds max_rank 2"):
        TDLRT(model, lr=0.1, min_rank=4, max_rank=2)
    with pytest.raises(ValueError, match=r"momentum must be finite and >= 0 and < 1, got 1.5"):
        TDLRT(model, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="betas entries must be finite"):
        TDLRT(model, lr=0.1, inner="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="capacity policy must be one of"):
        TDLRT(model, lr=0.1, capacity="huge")
    with pytest.raises(ValueError, match="augment_every must be a positive integer, got 0"):
        TDLRT(model, lr=0.1, augment_every=0)
    assert [m.capacity for m in model if hasattr(m, "capacity")] == caps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_train_with_float32_linear_algebra(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        TuckerConv2d(2, 6, 3, padding=1, ranks=(4, 2), dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(6 * 5 * 5, 3, ranks=(3, 3), dtype=dtype),
    )
    x, y = _data()
    x, y = x.to(dtype), y.to(dtype)
    opt = TDLRT(model, lr=0.05, tau=0.3, inner="adam")
    losses = []
    for _ in range(10):
        losses.append(float(opt.step(_closure(opt, model, x, y))))
    assert losses[-1] < losses[0]
    assert all(p.dtype == dtype for p in model.parameters())
    for m in model:
        if hasattr(m, "ranks"):
            u = m.tucker().factors[0].float()
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=2e-2)


# --------------------------------------------------------------------------- geometric Adam
def _low_rank_fit(rank_rule, inner="adam", steps=60):
    """A zero-initialized 24x24 update (as an adapter starts) fitted to a rank-3 target plus a
    small full-rank remainder."""
    torch.manual_seed(0)
    layer = TuckerLinear(24, 24, bias=False, ranks=4, dtype=DT)
    layer.set_tucker(tm.TuckerTensor(torch.zeros(4, 4, dtype=DT), layer.tucker().factors))
    g = torch.Generator().manual_seed(1)
    target = torch.randn(24, 3, generator=g, dtype=DT) @ torch.randn(3, 24, generator=g, dtype=DT)
    target = target + 1e-2 * torch.randn(24, 24, generator=g, dtype=DT)  # a full-rank remainder
    x = torch.randn(256, 24, generator=g, dtype=DT)
    opt = TDLRT(layer, lr=0.02, tau=0.1, inner=inner, rank_rule=rank_rule)
    sizes, ranks = [], []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = ((layer(x) - x @ target.T) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        sizes.append(layer.num_parameters())
        ranks.append(layer.ranks[0])
    return loss.item(), sizes, ranks


@pytest.mark.parametrize("inner", ["adam", "adamw"])
def test_adam_ranks_stay_bounded_with_the_gradient_rank_rule(inner):
    """Adam's normalized step gives every new direction an O(lr) entry: with the rank decided
    on the updated core the ranks run to the maximum; decided on the gradient step of the same
    length they follow the target's rank, and the fit is as good."""
    loss_g, _, ranks_g = _low_rank_fit("gradient", inner)
    loss_u, _, ranks_u = _low_rank_fit("update", inner)
    assert max(ranks_u) >= 15  # the flat spectrum: the remainder's directions are kept
    assert ranks_g[-1] == ranks_u[-1] == 3  # both end at the target's rank
    assert max(ranks_g) <= 2 * ranks_g[-1]  # ... and the gradient rule never doubles it
    assert loss_g <= 1.01 * loss_u


def test_the_default_rank_rule_follows_the_inner_optimizer():
    model = _cnn()
    assert TDLRT(model, lr=0.1)._config.rank_rule == "update"
    assert TDLRT(model, lr=0.1, inner="adam")._config.rank_rule == "gradient"
    assert TDLRT(model, lr=0.1, inner="adamw", rank_rule="update")._config.rank_rule == "update"
    with pytest.raises(ValueError, match="rank_rule must be 'update', 'gradient' or None"):
        TDLRT(model, lr=0.1, rank_rule="spectrum")


@pytest.mark.parametrize("inner", ["adam", "adamw"])
def test_adam_with_a_fixed_basis_equals_torch_adam_on_the_core(inner):
    """At full rank with fixed ranks every basis is the whole space (nothing to augment or
    truncate): the step is the inner optimizer on the core, which must be torch's own."""
    torch.manual_seed(0)
    layer = TuckerLinear(5, 5, bias=False, ranks=5, dtype=DT)
    core = nn.Parameter(layer.core.detach().clone())
    factors = [u.detach().clone() for u in layer.factors]
    x, y = torch.randn(32, 5, dtype=DT), torch.randn(32, 5, dtype=DT)
    opt = TDLRT(layer, lr=0.01, inner=inner, weight_decay=0.1, fixed_rank=True)
    ref = (torch.optim.Adam if inner == "adam" else torch.optim.AdamW)(
        [core], lr=0.01, weight_decay=0.1
    )
    for _ in range(5):
        opt.step(_closure(opt, layer, x, y))
        ref.zero_grad()
        w = factors[0] @ core @ factors[1].T
        nn.functional.mse_loss(x @ w.T, y).backward()
        ref.step()
        assert torch.allclose(layer.core, core, atol=1e-13, rtol=0)
        assert all(torch.equal(u, f) for u, f in zip(layer.factors, factors))
