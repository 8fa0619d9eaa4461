"""TDLRT under DistributedDataParallel: two gloo processes on CPU train a small Tucker CNN while
ranks change; replicas stay bit-identical and match a one-process run on the global batch.

The two-process test runs its workers with ``torch.multiprocessing`` (spawn, loopback TCP store on
a free port) under a deadline: a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch builds without distributed support
    pytest.skip("torch.distributed is not available", allow_module_level=True)
from torch import nn  # noqa: E402
from tuckerman.integrations.torch import (  # noqa: E402
    TDLRT,
    ReplicaSync,
    TuckerConv2d,
    TuckerDDP,
    TuckerLinear,
)

DT = torch.float64
WORLD = 2
PER_RANK = 8  # samples per replica and step; the global batch is WORLD * PER_RANK
DEADLINE_S = 150.0

# name -> (steps, TDLRT keyword arguments); "perturbed": rank 1 uses another tau (its own
# decisions would differ; rank 0's are broadcast), "nonfinite": rank 1 reports a NaN loss at
# step 2 (its gradients stay finite), so every replica must skip that step. Adam normalizes
# gradient entries that are pure rounding noise to O(lr) steps, so it amplifies the rounding
# differences of a split batch: a shorter run and a looser match to the one-process run.
SCENARIOS = {
    "two_pass": (100, dict(lr=0.1, tau=0.15, momentum=0.9)),
    "one_pass": (100, dict(lr=0.1, tau=0.15, momentum=0.9, one_pass=True)),
    "adam": (30, dict(lr=0.01, tau=0.15, inner="adam")),
    "perturbed": (30, dict(lr=0.1, tau=0.15, momentum=0.9)),
    "nonfinite": (5, dict(lr=0.1, tau=0.15, momentum=0.9, on_nonfinite="skip")),
}
NAN_STEP = 2


# --------------------------------------------------------------------------- model and data
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TuckerConv2d(1, 6, 3, stride=2, padding=1, ranks=(5, 1), dtype=DT),
        nn.ReLU(),
        TuckerConv2d(6, 8, 3, stride=2, padding=1, ranks=(6, 5), dtype=DT),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(8 * 4 * 4, 10, ranks=(8, 8), dtype=DT),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """128 real MNIST digits, average-pooled to 14 x 14, in float64."""
    from tuckerman.datasets import load_mnist

    images, labels = load_mnist("train")
    x = torch.from_numpy(images[:128]).to(DT)
    return nn.functional.avg_pool2d(x, 2), torch.from_numpy(labels[:128])


def _batch(data, step: int, lo: int = 0, hi: int = WORLD * PER_RANK):
    """Samples ``lo:hi`` of the global batch of ``step``."""
    x, y = data
    start = (step * WORLD * PER_RANK) % len(x)
    idx = (torch.arange(start + lo, start + hi)) % len(x)
    return x[idx], y[idx]


def _capacities(model) -> tuple:
    return tuple(m.capacity for m in model.modules() if hasattr(m, "capacity"))


def _train(model, opt, forward, data, steps, lo, hi, nan_at=None):
    """Train ``steps`` steps; returns the layers' capacities before each step's forward pass."""
    seen = []
    for step in range(steps):
        seen.append(_capacities(model))
        x, y = _batch(data, step, lo, hi)

        def closure(x=x, y=y, step=step):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            return loss * float("nan") if step == nan_at else loss

        if opt.one_pass and nan_at is None:  # the closure-free form: backward, then step()
            closure()
            opt.step()
        else:
            opt.step(closure)
    return seen


def _snapshot(model, opt) -> dict:
    state = opt.state_dict()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "state": {
            (i, k): v.clone()
            for i, s in state["state"].items()
            for k, v in s.items()
            if isinstance(v, torch.Tensor)
        },
        "scalars": {
            (i, k): v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, int)
        },
        "ranks": [dict(h) for h in opt.rank_history],
    }


# --------------------------------------------------------------------------- the workers
def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        data = _data()
        lo, hi = rank * PER_RANK, (rank + 1) * PER_RANK
        for name, (steps, kwargs) in SCENARIOS.items():
            kwargs = dict(kwargs)
            if name == "perturbed" and rank == 1:
                kwargs["tau"] = 0.5 * kwargs["tau"]
            model = _cnn()
            ddp = TuckerDDP(model)
            built = _capacities(model)
            first_build = ddp.rebuild_seconds  # includes waiting for the other replica
            opt = TDLRT(ddp, **kwargs)
            start = time.perf_counter()
            nan_at = NAN_STEP if name == "nonfinite" and rank == 1 else None
            seen = _train(model, opt, ddp, data, steps, lo, hi, nan_at=nan_at)
            out = _snapshot(model, opt)
            out.update(
                capacities=[built, *seen],
                seconds=time.perf_counter() - start,
                rebuilds=ddp.rebuilds,
                rebuild_seconds=ddp.rebuild_seconds - first_build,
                disagreements=opt._replicas.disagreements,
            )
            torch.save(out, os.path.join(outdir, f"{name}_{rank}.pt"))
    finally:
        # DDP reducers in reference cycles hold the group: free them before it (freeing gloo's
        # threads at interpreter exit occasionally aborts a process)
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Run the workers once (all scenarios), return ``{(scenario, rank): snapshot}``."""
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.start_processes(
        _worker, args=(_free_port(), outdir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    out = {
        (name, r): torch.load(os.path.join(outdir, f"{name}_{r}.pt"), weights_only=False)
        for name in SCENARIOS
        for r in range(WORLD)
    }
    for name in SCENARIOS:  # shown with -s: the cost of the DDP rebuilds
        r0 = out[name, 0]
        print(
            f"{name}: {r0['seconds']:.2f} s for {SCENARIOS[name][0]} steps, "
            f"{r0['rebuilds'] - 1} DDP rebuilds in {r0['rebuild_seconds']:.2f} s"
        )
    return out


def _single_process(name: str) -> dict:
    steps, kwargs = SCENARIOS[name]
    model = _cnn()
    opt = TDLRT(model, **kwargs)
    if name == "nonfinite":  # the NaN step is skipped: the reference leaves it out
        _train_skipping(model, opt, steps)
    else:
        _train(model, opt, model, _data(), steps, 0, WORLD * PER_RANK)
    return _snapshot(model, opt)


def _train_skipping(model, opt, steps):
    data = _data()
    for step in range(steps):
        if step == NAN_STEP:
            continue
        x, y = _batch(data, step)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a), "shapes differ"
    return max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replicas_identical_and_equal_to_one_process(replicas, name):
    r0, r1 = replicas[name, 0], replicas[name, 1]
    # identical on both replicas, bit for bit: parameters, optimizer state, ranks
    assert r0["ranks"] == r1["ranks"]
    assert _max_diff(r0["params"], r1["params"]) == 0.0
    assert _max_diff(r0["state"], r1["state"]) == 0.0
    assert r0["scalars"] == r1["scalars"]
    # equal to one process on the global batch, to float64 rounding
    ref = _single_process(name)
    assert r0["ranks"] == ref["ranks"]
    tol = 1e-7 if name == "adam" else 1e-10
    assert _max_diff(r0["params"], ref["params"]) < tol
    assert _max_diff(r0["state"], ref["state"]) < tol
    # rank 1's own decisions differed from rank 0's only where its tau did
    assert r0["disagreements"] == 0
    assert (r1["disagreements"] > 0) == (name == "perturbed")
    steps = SCENARIOS[name][0]
    assert len(r0["ranks"]) == (steps - 1 if name == "nonfinite" else steps)


@pytest.mark.parametrize("name", ["two_pass", "one_pass"])
def test_ranks_changed_and_ddp_was_rebuilt(replicas, name):
    r0 = replicas[name, 0]
    history = r0["ranks"]
    start = {"0": (5, 1, 3, 3), "2": (6, 5, 3, 3), "5": (8, 8)}
    changes = sum(a != b for a, b in zip([start, *history], history))
    assert changes >= 2, history[::10]
    # the parameters keep their identity inside a capacity: built once at construction, then
    # rebuilt only when a forward pass meets new parameters (a capacity changed), in both modes
    caps = r0["capacities"]
    moves = sum(a != b for a, b in zip(caps, caps[1:]))
    assert r0["rebuilds"] == 1 + moves
    assert moves < len(caps) // 4  # far fewer than the two rebuilds per step of replaced parameters


# --------------------------------------------------------------------------- one process, errors
@pytest.fixture
def group():
    """A one-process gloo group in this process (no network: an in-memory store)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _small():
    torch.manual_seed(0)
    return nn.Sequential(
        TuckerLinear(6, 5, ranks=3, dtype=DT), nn.Tanh(), nn.Linear(5, 2, dtype=DT)
    )


def test_rebuilt_only_when_parameters_change(group):
    model = _small()
    ddp = TuckerDDP(model)
    assert ddp.rebuilds == 1 and not ddp.is_stale()
    x = torch.randn(4, 6, dtype=DT)
    ddp(x).sum().backward()
    ddp(x).sum().backward()
    with ddp.no_sync():  # gradient accumulation between steps
        ddp(x).sum().backward()
    assert ddp.rebuilds == 1  # same parameters: no rebuild
    layer = model[0]
    layer.set_capacity((4, 4))  # same weight, new (padded) Parameter objects
    assert ddp.is_stale()
    with torch.no_grad():  # evaluation does not rebuild (no collective)
        assert torch.equal(ddp(x), model(x))
    assert ddp.rebuilds == 1
    ddp(x).sum().backward()
    assert ddp.rebuilds == 2 and not ddp.is_stale()
    assert layer.core.grad is not None  # the new parameters were hooked and reduced
    assert not model._forward_pre_hooks and not model[0]._forward_pre_hooks
    assert list(ddp.state_dict()) == [f"module.{k}" for k in model.state_dict()]


@pytest.mark.parametrize(
    "ddp_kwargs",
    [{}, {"find_unused_parameters": True}, {"gradient_as_bucket_view": True}],
    ids=["default", "find_unused", "bucket_view"],
)
def test_one_process_group_matches_plain_training(group, ddp_kwargs):
    model, twin = _small(), _small()
    ddp = TuckerDDP(model, **ddp_kwargs)
    built = model[0].capacity
    opt, ref = TDLRT(ddp, lr=0.2, tau=0.3, momentum=0.5), TDLRT(twin, lr=0.2, tau=0.3, momentum=0.5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)
    caps = [built]
    for _ in range(5):
        caps.append(model[0].capacity)
        for o, f in ((opt, ddp), (ref, twin)):

            def closure(o=o, f=f):
                o.zero_grad()
                loss = nn.functional.mse_loss(f(x), y)
                loss.backward()
                return loss

            o.step(closure)
    assert opt.rank_history == ref.rank_history
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # construction, then once per capacity change met by a forward pass (not twice per step)
    assert ddp.rebuilds == 1 + sum(a != b for a, b in zip(caps, caps[1:]))


def test_replica_sync_round_trip(group):
    sync = ReplicaSync(None, torch.device("cpu"))
    ranks = {"a": (3, 2, 3, 3), "b": (4, 4)}
    assert sync.agree_ranks(ranks) == ranks
    assert sync.any_rank(True) is True and sync.any_rank(False) is False


def test_plain_ddp_and_nesting_refused(group):
    from torch.nn.parallel import DistributedDataParallel

    model = _small()
    with pytest.raises(TypeError, match="plain DistributedDataParallel.*TuckerDDP"):
        TDLRT(DistributedDataParallel(model), lr=0.1)
    outer = nn.Sequential(DistributedDataParallel(_small()))
    with pytest.raises(TypeError, match="submodule '0' is a plain DistributedDataParallel"):
        TDLRT(outer, lr=0.1)
    with pytest.raises(TypeError, match="already wrapped by DistributedDataParallel"):
        TuckerDDP(DistributedDataParallel(_small()))
    with pytest.raises(TypeError, match="already wrapped by TuckerDDP"):
        TuckerDDP(TuckerDDP(_small()))
    with pytest.raises(TypeError, match="submodule '0' is a TuckerDDP"):
        TDLRT(nn.Sequential(TuckerDDP(_small())), lr=0.1)
    with pytest.raises(TypeError, match="mixed_precision"):
        TuckerDDP(_small(), mixed_precision=object())
    with pytest.raises(TypeError, match="broadcast_on_rebuild must be a bool"):
        TuckerDDP(_small(), broadcast_on_rebuild=1)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_refused(group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.raises(TypeError, match=r"wrapped by FullyShardedDataParallel \(FSDP\)"):
        TDLRT(FullyShardedDataParallel(_small(), device_id=torch.device("cpu")), lr=0.1)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        return
    from torch.distributed.device_mesh import init_device_mesh

    model = _small()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(TypeError, match="FSDP"):
        TDLRT(model, lr=0.1)
    with pytest.raises(TypeError, match="FSDP"):
        TuckerDDP(model)


def test_no_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="no default process group.*init_process_group"):
        TuckerDDP(_small())
    with pytest.raises(RuntimeError, match="no default process group"):
        ReplicaSync(None, torch.device("cpu"))


def test_plain_models_untouched_without_group():
    """Without a process group TDLRT on a plain model takes no collective."""
    model = _small()
    opt = TDLRT(model, lr=0.1, tau=0.2)
    assert opt._replicas is None
    x = torch.randn(4, 6, dtype=DT)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(opt.rank_history) == 1
    assert np.isfinite(closure().item())
