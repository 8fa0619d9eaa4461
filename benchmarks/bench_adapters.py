"""Tucker adapters trained by TDLRT against LoRA, PEFT's LoRA and AdaLoRA, and full fine-tuning.

Two tasks, both on the bundled MNIST digits (``tuckerman.datasets.load_mnist``): a model is
pretrained on the digits 0-4 of the training split, then adapted to the digits 5-9, relabelled
0-4 (same 5-way head; the last 15% of the 5-9 training digits are the validation split, the
test split's 5-9 the test set):

- ``lenet``: LeNet5; adapters on both convolutions and both linear layers.
- ``vit``: the compact :class:`~tuckerman.integrations.torch.VisionTransformer` (7×7 patches,
  4 blocks of width 64, 4 heads), pretrained here with AdamW (no downloaded weights; the base
  is regenerated deterministically per seed, in seconds); adapters on every attention
  projection (the fused ``qkv``, one update over the fused weight as PEFT does, or one per
  q/k/v slice with ``--vit-split-qkv``; ``proj``), both MLP layers and the head.

Methods, all on the same layers of the same pretrained model, the same batches and epochs:

- ``tucker-<inner>``: :func:`~tuckerman.integrations.torch.add_tucker_adapters` (zero update,
  initial ranks ``--rank0``) trained by ``TDLRT(model, lr, tau, inner=<inner>)`` at each
  ``--taus``; ``--tucker-inner sgd adam adamw`` chooses the inner optimizers (``adamw`` needs a
  TDLRT that has it), ``--tucker-kwargs '{"max_rank": 16}'`` passes more options.
- ``lora``: ``W₀ + B·A`` (``B = 0``, ``A`` Kaiming-uniform; for a convolution ``A`` a ``k×k`` conv
  to ``r`` channels and ``B`` a 1×1 conv), trained by Adam, at each rank of ``--ranks``.
- ``peft-lora`` and ``peft-adalora``: PEFT's ``LoraConfig`` (``lora_alpha = r``: scale 1, as the
  others) and ``AdaLoraConfig`` (``init_r ≈ 1.5 target_r``, budget schedule over the run,
  ``update_and_allocate`` after every step, PEFT's orthogonality penalty added to the loss),
  trained by Adam, at each rank (AdaLoRA: ``target_r``) of ``--ranks``.
- ``full``: every parameter fine-tuned by Adam.

Every method's learning rate is chosen from a grid (``GRIDS``) by the accuracy on the validation
split (seed 0; Tucker at ``tau = 0.1``, the LoRA family at rank 4), never on the test digits.
Reported over ``--seeds`` seeds (pretraining included): test accuracy mean ± std; trainable
parameters at the end and at the peak during training (Tucker: the augmented bases inside a
step; AdaLoRA: the allocated ``init_r`` triplets, the end count being the unmasked ones); the
LoRA rank closest in parameters to each Tucker row and the parameter ratio at equal accuracy
(Tucker's count over the LoRA count that reaches Tucker's accuracy, interpolated on the LoRA
curve); and the accuracy at 10× each method's chosen learning rate. A step whose loss or
gradient is not finite is skipped by every method alike (counted as ``skipped_steps``).

Results go to ``--out`` (default ``benchmarks/results/adapters.json``; an existing file is never
replaced without ``--overwrite``). Each finished run is appended to ``<out>.partial.jsonl``, so
a killed run resumes where it stopped (same settings; ``--fresh`` discards it). Plots:
``docs/img/benchmarks/adapters*.png``.

Run from the repository root (about 30-60 minutes per task on 2 shared CPU cores)::

    nice -n 5 python benchmarks/bench_adapters.py --tucker-inner sgd adam
    python benchmarks/bench_adapters.py --quick --out /tmp/adapters.json   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import torch
import torch.nn.functional as F
from _common import CpuMonitor  # noqa: E402
from torch import nn
from tuckerman.integrations.torch import (
    TDLRT,
    AbstractTuckerLayer,
    TuckerAdapterConfig,
    VisionTransformer,
    ViTConfig,
    adapter_report,
    add_tucker_adapters,
    build_model,
)

from tuckerman.datasets import load_mnist
from tuckerman.layers import count_parameters

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "adapters.json"
DEFAULT_PLOTS = ROOT / "docs" / "img" / "benchmarks"
TASKS = ("lenet", "vit")
# adapted layers, as PEFT target_modules (names or dotted suffixes) and for LoRA below
TARGETS = {
    "lenet": ["features.0", "features.3", "classifier.1", "classifier.3"],
    "vit": ["qkv", "proj", "fc1", "fc2", "head"],
}
GRIDS = {
    "tucker-sgd": [0.05, 0.1, 0.2],
    "tucker-adam": [1e-3, 3e-3, 1e-2, 3e-2],
    "tucker-adamw": [1e-3, 3e-3, 1e-2, 3e-2],
    "lora": [1e-3, 3e-3, 1e-2, 3e-2],
    "peft-lora": [1e-3, 3e-3, 1e-2, 3e-2],
    "peft-adalora": [3e-3, 1e-2, 3e-2, 1e-1],
    "full": [3e-4, 1e-3, 3e-3],
}
TUNE_TAU, TUNE_RANK = 0.1, 4


# --------------------------------------------------------------------------- data and models
def split_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits 0-4 for pretraining; digits 5-9 (relabelled 0-4) split train / val / test."""
    xtr, ytr = (torch.from_numpy(a) for a in load_mnist("train"))
    xte, yte = (torch.from_numpy(a) for a in load_mnist("test"))
    low_tr, high_tr, low_te, high_te = ytr < 5, ytr >= 5, yte < 5, yte >= 5
    xa, ya = xtr[high_tr], ytr[high_tr] - 5
    n_val = int(0.15 * len(ya))
    return {
        "pretrain": (xtr[low_tr], ytr[low_tr]),
        "pretrain_test": (xte[low_te], yte[low_te]),
        "adapt": (xa[:-n_val], ya[:-n_val]),
        "val": (xa[-n_val:], ya[-n_val:]),
        "test": (xte[high_te], yte[high_te] - 5),
    }


def new_model(task: str) -> nn.Module:
    if task == "lenet":
        return build_model("lenet5", 1, 5, 28)
    return VisionTransformer(ViTConfig(num_classes=5))


def batches(n: int, batch: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    correct = sum(
        int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
        for i in range(0, len(y), 500)
    )
    model.train()
    return correct / len(y)


def pretrain(task: str, data: dict, args: argparse.Namespace, seed: int) -> nn.Module:
    """Deterministic for a seed and thread count: the same base on every (resumed) run."""
    torch.manual_seed(seed)
    model = new_model(task)
    x, y = data["pretrain"]
    if task == "lenet":
        epochs = args.pretrain_epochs
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = None
    else:
        epochs = args.vit_pretrain_epochs
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        steps = epochs * (len(y) // args.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for idx in batches(len(y), args.batch, epochs, seed):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def in_step_tucker_parameters(model: nn.Module) -> int:
    """Trainable entries inside a TDLRT step: every Tucker layer at its augmented ranks
    (``min(2 r_k, n_k)`` in each adaptive mode, the bases TDLRT's Galerkin step trains before it
    truncates), every other trainable parameter as it is. This is the transient peak; the count
    between steps is :func:`~tuckerman.integrations.torch.adapter_report`'s."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, AbstractTuckerLayer):
            shape = m.weight_shape
            ranks = [
                min(2 * r, n) if k in m.adaptive_modes else r
                for k, (r, n) in enumerate(zip(m.ranks, shape))
            ]
            total += count_parameters(shape, ranks, bias=False)
            seen.update(id(p) for p in (m.core, *m.factors))
    return total + sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in seen
    )


# --------------------------------------------------------------------------- LoRA (own)
class LoRA(nn.Module):
    """``base(x) + scale · B(A(x))`` on a frozen ``nn.Linear`` / ``nn.Conv2d`` (Hu et al. 2021).

    For a convolution ``A`` is a ``k×k`` convolution ``C_in → r`` with the base stride, padding
    and dilation and ``B`` a 1×1 convolution ``r → C_out``. ``B = 0`` at the start."""

    def __init__(self, base: nn.Module, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base, self.rank, self.scale = base, rank, scale
        for p in base.parameters():
            p.requires_grad_(False)
        if isinstance(base, nn.Conv2d):
            self.A = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size))
            self.B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))
        else:
            self.A = nn.Parameter(torch.empty(rank, base.in_features))
            self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.Conv2d):
            h = F.conv2d(x, self.A, None, b.stride, b.padding, b.dilation)
            return b(x) + self.scale * F.conv2d(h, self.B)
        return b(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def matching_names(model: nn.Module, targets: list[str]) -> list[str]:
    """PEFT's rule: a module whose name equals a target or ends with ``"." + target``."""
    return [
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Linear, nn.Conv2d) and any(n == t or n.endswith("." + t) for t in targets)
    ]


def add_lora(model: nn.Module, targets: list[str], rank: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in matching_names(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRA(getattr(parent, child), rank))
    return model


def lora_parameters(model: nn.Module, targets: list[str], rank: int) -> int:
    """LoRA parameters at ``rank``: ``rank · Σ (fan_in + C_out)`` over the target layers."""
    total = 0
    for name in matching_names(model, targets):
        w = model.get_submodule(name).weight
        total += math.prod(w.shape[1:]) + w.shape[0]
    return rank * total


# --------------------------------------------------------------------------- PEFT
def peft_model(base: nn.Module, targets: list[str], rank: int, kind: str, total_steps: int):
    import peft

    if kind == "lora":
        cfg: Any = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    else:
        cfg = peft.AdaLoraConfig(
            init_r=max(rank + 1, round(1.5 * rank)),
            target_r=rank,
            lora_alpha=rank,
            target_modules=targets,
            tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps // 5),
            deltaT=5,
            total_step=total_steps,
        )
    return peft.get_peft_model(base, cfg)


def adalora_orth_penalty(model: nn.Module) -> torch.Tensor:
    """PEFT's AdaLoRA regularizer (added by PEFT only to transformers outputs with a loss)."""
    terms = []
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in n or "lora_B" in n):
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean()


def adalora_parameters(model: nn.Module) -> tuple[int, int]:
    """(allocated, kept): AdaLoRA's triplets ``(A row, E entry, B column)`` over its layers."""
    allocated = kept = 0
    for n, p in model.named_parameters():
        if "lora_E" in n:
            prefix = n.rsplit("lora_E", 1)[0]
            a = model.get_parameter(n.replace("lora_E", "lora_A"))
            b = model.get_parameter(n.replace("lora_E", "lora_B"))
            per = a.shape[1] + b.shape[0] + 1
            allocated += p.numel() * per
            kept += int((p != 0).sum()) * per
            del prefix
    return allocated, kept


# --------------------------------------------------------------------------- training
def finite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    if not bool(torch.isfinite(loss)):
        return False
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def train_adam(
    model: nn.Module,
    data: tuple,
    args: argparse.Namespace,
    lr: float,
    seed: int,
    after_step: Callable[[int], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x, y = data
    skipped = 0
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(y), args.batch, args.epochs, seed)):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + 0.5 * penalty()
        loss.backward()
        if finite(loss, params):
            opt.step()
        else:
            skipped += 1
        if after_step is not None:
            after_step(step)
    return {"seconds": time.perf_counter() - start, "skipped_steps": skipped}


def train_tucker(
    model: nn.Module,
    data: tuple,
    args: argparse.Namespace,
    inner: str,
    lr: float,
    tau: float,
    seed: int,
) -> dict:
    opt = TDLRT(model, lr=lr, tau=tau, inner=inner, on_nonfinite="skip", **args.tucker_kwargs)
    x, y = data
    history, peak = [], 0
    start = time.perf_counter()
    steps = 0

    def closure_for(xb: torch.Tensor, yb: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        return closure

    for idx in batches(len(y), args.batch, args.epochs, seed):
        peak = max(peak, in_step_tucker_parameters(model))  # this step's augmented bases
        opt.step(closure_for(x[idx], y[idx]))
        steps += 1
        history.append(adapter_report(model)["adapter_parameters"])  # at the true ranks
    return {
        "seconds": time.perf_counter() - start,
        "skipped_steps": steps - len(opt.rank_history),
        "peak_trainable_parameters": max(peak, *history),  # inside a step: augmented
        "peak_between_steps": max(history),
        "parameter_history": history,
    }


def run_one(
    task: str,
    base: nn.Module,
    data: dict,
    args,
    method: str,
    lr: float,
    seed: int,
    tau: float | None = None,
    rank: int | None = None,
) -> dict:
    """Adapt a copy of ``base`` by one method; accuracy, parameters, time."""
    targets = TARGETS[task]
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    steps = args.epochs * (len(data["adapt"][1]) // args.batch)
    out: dict[str, Any] = {"method": method, "lr": lr, "seed": seed, "tau": tau, "rank": rank}
    if method.startswith("tucker-"):
        splits = {"qkv": 3} if task == "vit" and args.vit_split_qkv else {}
        cfg = TuckerAdapterConfig(targets, ranks=args.rank0, fused_splits=splits)
        model = add_tucker_adapters(model, cfg)
        out.update(train_tucker(model, data["adapt"], args, method[7:], lr, tau, seed))
        report = adapter_report(model)
        out["trainable_parameters"] = report["adapter_parameters"]
        out["ranks"] = {layer["name"]: layer["ranks"] for layer in report["layers"]}
    elif method == "lora":
        model = add_lora(model, targets, rank)
        out.update(train_adam(model, data["adapt"], args, lr, seed))
        out["trainable_parameters"] = out["peak_trainable_parameters"] = trainable(model)
    elif method in ("peft-lora", "peft-adalora"):
        kind = method[5:]
        model = peft_model(model, targets, rank, kind, steps)
        hook = penalty = None
        if kind == "adalora":
            hook = model.base_model.update_and_allocate

            def penalty():
                return adalora_orth_penalty(model)

        out.update(train_adam(model, data["adapt"], args, lr, seed, hook, penalty))
        if kind == "adalora":
            allocated, kept = adalora_parameters(model)
            out["trainable_parameters"], out["peak_trainable_parameters"] = kept, allocated
            out["allocated_parameters"] = trainable(model)
        else:
            out["trainable_parameters"] = out["peak_trainable_parameters"] = trainable(model)
    elif method == "full":
        out.update(train_adam(model, data["adapt"], args, lr, seed))
        out["trainable_parameters"] = out["peak_trainable_parameters"] = trainable(model)
    else:
        raise ValueError(f"unknown method {method!r}")
    out["val_accuracy"] = accuracy(model, data["val"])
    out["test_accuracy"] = accuracy(model, data["test"])
    return out


# --------------------------------------------------------------------------- resumable runs
# the settings a finished run depends on: a resumed study reuses runs whose key (task, kind,
# method, lr, tau, rank, seed) it needs when these agree (more seeds, taus or ranks may be added)
RESULT_SETTINGS = (
    "epochs", "batch", "rank0", "pretrain_epochs", "vit_pretrain_epochs", "vit_split_qkv",
    "threads", "tucker_kwargs",
)  # fmt: skip


def _run_key(key: str) -> str:
    """A run is its task, method, lr, tau, rank and seed: the tuning run of the chosen lr is
    also the seed-0 main run (keys written with the kind, ``/tune/`` etc., are read as well)."""
    return re.sub(r"/(tune|main|robust)/", "/", key, count=1)


class Progress:
    """Finished runs, appended one JSON line each to ``<out>.partial.jsonl`` (resume)."""

    def __init__(self, path: Path, settings: dict, fresh: bool, dry: bool = False) -> None:
        self.path, self.done, self.dry = path, {}, dry
        if dry and not path.exists():
            raise SystemExit(f"--from-partial: {path} does not exist")
        if path.exists() and fresh:
            path.unlink()
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            saved = lines[0].get("settings", {}) if lines else {}
            if any(saved.get(k) != settings.get(k) for k in RESULT_SETTINGS):
                raise SystemExit(
                    f"{path} holds runs made with other {RESULT_SETTINGS}; pass --fresh to "
                    "discard them, or the same settings to resume"
                )
            self.done = {_run_key(line["key"]): line["result"] for line in lines[1:]}
            print(f"resuming: {len(self.done)} runs already in {path}", flush=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def get(self, key: str, compute: Callable[[], dict]) -> dict | None:
        """The stored result, else ``compute()``'s (stored); None in a dry (report-only) run."""
        if key not in self.done and self.dry:
            return None
        if key not in self.done:
            result = compute()
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "result": result}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.done[key] = result
        return self.done[key]


# --------------------------------------------------------------------------- the study
def methods(args) -> list[str]:
    return [f"tucker-{i}" for i in args.tucker_inner] + [
        m for m in ("lora", "peft-lora", "peft-adalora", "full") if m in args.methods
    ]


def fmt(run: dict) -> str:
    return (
        f"test {100 * run['test_accuracy']:.2f}%  val {100 * run['val_accuracy']:.2f}%  "
        f"params {run['trainable_parameters']:,} (peak {run['peak_trainable_parameters']:,})  "
        f"{run['seconds']:.1f} s"
        + (f"  skipped {run['skipped_steps']}" if run["skipped_steps"] else "")
    )


def study(task: str, data: dict, args, progress: Progress) -> dict:
    """Tuning, then per seed the main runs and the 10x-lr runs (so a stopped study has whole
    seeds); in a dry run (``--from-partial``) only the runs already done."""
    bases: dict[int, nn.Module] = {}
    seconds: dict[int, float] = {}

    def base(seed: int) -> nn.Module:
        if seed not in bases:
            start = time.perf_counter()
            bases[seed] = pretrain(task, data, args, seed)
            seconds[seed] = time.perf_counter() - start
        return bases[seed]

    def pretrain_stats(seed: int) -> dict:
        model = base(seed)
        return {
            "seed": seed,
            "seconds": seconds[seed],
            "accuracy_0_4": accuracy(model, data["pretrain_test"]),
            "zero_shot_accuracy_5_9": accuracy(model, data["test"]),
        }

    def run(kind: str, method: str, lr: float, seed: int, tau=None, rank=None) -> dict | None:
        key = f"{task}/{method}/lr={lr:g}/tau={tau}/rank={rank}/seed={seed}"
        result = progress.get(
            key,
            lambda: run_one(task, base(seed), data, args, method, lr, 1000 + seed, tau, rank),
        )
        if result is not None:
            print(
                f"[{task}] {kind} {method} lr={lr:g} tau={tau} r={rank} seed={seed}: {fmt(result)}",
                flush=True,
            )
        return result

    def shape(method: str) -> dict:
        if method.startswith("tucker-"):
            return {"tau": TUNE_TAU}
        return {"rank": TUNE_RANK} if method != "full" else {}

    best: dict[str, float] = {}
    grid: dict[str, list] = {}
    for method in methods(args):
        if args.no_tune:
            best[method] = args.lr[method]
            continue
        rows = [run("tune", method, lr, 0, **shape(method)) for lr in args.grids[method]]
        done = [r for r in rows if r is not None]
        if len(done) < len(rows):
            print(f"[{task}] {method}: learning-rate grid unfinished, left out", flush=True)
            continue
        grid[method] = [(r["lr"], r["val_accuracy"], r["trainable_parameters"]) for r in done]
        best[method] = max(done, key=lambda r: r["val_accuracy"])["lr"]
    print(f"[{task}] learning rates chosen on the validation split: {best}", flush=True)

    runs, robust, pretraining = [], [], []
    for seed in range(args.seeds):
        stats = progress.get(f"{task}/pretrain/seed={seed}", lambda seed=seed: pretrain_stats(seed))
        if stats is not None:
            pretraining.append(stats)
            print(f"[{task}] pretrained seed {seed}: {stats}", flush=True)
        for method in best:
            if method.startswith("tucker-"):
                runs += [run("main", method, best[method], seed, tau=tau) for tau in args.taus]
            elif method == "full":
                runs.append(run("main", method, best[method], seed))
            else:
                ranks = args.method_ranks.get(method, args.ranks)
                runs += [run("main", method, best[method], seed, rank=r) for r in ranks]
        if not args.no_robustness:
            for method in [m for m in best if m not in args.no_robustness_for]:
                robust.append(run("robust", method, 10 * best[method], seed, **shape(method)))
    runs = [r for r in runs if r is not None]
    robust = [r for r in robust if r is not None]
    full_model = trainable(new_model(task))
    return {
        "task": task,
        "targets": TARGETS[task],
        "model_parameters": full_model,
        "pretraining": pretraining,
        "learning_rates": best,
        "learning_rate_grid": grid,
        "runs": runs,
        "robustness_runs": robust,
        "summary": summarize(runs, robust, full_model),
    }


# --------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> dict:
    acc = mean_std([r["test_accuracy"] for r in rows])
    params = mean_std([float(r["trainable_parameters"]) for r in rows])
    peak = mean_std([float(r["peak_trainable_parameters"]) for r in rows])
    secs = mean_std([r["seconds"] for r in rows])
    return {
        "test_accuracy_mean": acc[0],
        "test_accuracy_std": acc[1],
        "val_accuracy_mean": mean_std([r["val_accuracy"] for r in rows])[0],
        "trainable_parameters_mean": params[0],
        "trainable_parameters_std": params[1],
        "peak_trainable_parameters_mean": peak[0],
        "peak_between_steps_over_final_max": max(
            r.get("peak_between_steps", r["peak_trainable_parameters"]) / r["trainable_parameters"]
            for r in rows
        ),
        "peak_over_final_max": max(
            r["peak_trainable_parameters"] / r["trainable_parameters"] for r in rows
        ),
        "seconds_mean": secs[0],
        "seconds_std": secs[1],
        "skipped_steps": sum(r["skipped_steps"] for r in rows),
        "n": len(rows),
    }


def params_at_accuracy(curve: list[dict], acc: float) -> dict:
    """The LoRA-family parameter count that reaches ``acc``: on the curve's upper envelope (the
    best accuracy at no more parameters), log-linear between sweep points."""
    pts, best = [], -1.0
    for c in sorted(curve, key=lambda c: c["trainable_parameters_mean"]):
        best = max(best, c["test_accuracy_mean"])
        pts.append((c["trainable_parameters_mean"], best))
    if not pts:
        return {"parameters": None, "note": "no curve"}
    if pts[0][1] >= acc:
        return {"parameters": pts[0][0], "note": "its smallest rank reaches it: ratio >= this"}
    for (p0, a0), (p1, a1) in zip(pts, pts[1:]):
        if a1 >= acc > a0:
            t = (acc - a0) / (a1 - a0)
            log_p = math.log(p0) + t * (math.log(p1) - math.log(p0))
            return {"parameters": math.exp(log_p), "note": "interpolated"}
    return {"parameters": pts[-1][0], "note": "no rank of the sweep reaches it: ratio <= this"}


def summarize(runs: list[dict], robust: list[dict], model_params: int) -> dict:
    rows = []
    order = [*GRIDS]  # tucker first, then the LoRA family, then full fine-tuning
    keys = sorted(
        {(r["method"], r["tau"], r["rank"]) for r in runs},
        key=lambda k: (order.index(k[0]), k[1] or 0.0, k[2] or 0),
    )
    for method, tau, rank in keys:
        sel = [r for r in runs if (r["method"], r["tau"], r["rank"]) == (method, tau, rank)]
        row = {"method": method, "tau": tau, "rank": rank, **aggregate(sel)}
        row["final_over_model"] = row["trainable_parameters_mean"] / model_params
        rows.append(row)
    curves = {
        m: [r for r in rows if r["method"] == m] for m in ("lora", "peft-lora", "peft-adalora")
    }
    for row in rows:
        if not row["method"].startswith("tucker-"):
            continue
        comparisons = {}
        for m, curve in curves.items():
            if not curve:
                continue
            closest = min(
                curve,
                key=lambda c: abs(
                    math.log(c["trainable_parameters_mean"] / row["trainable_parameters_mean"])
                ),
            )
            equal = params_at_accuracy(curve, row["test_accuracy_mean"])
            comparisons[m] = {
                "closest_rank": closest["rank"],
                "closest_parameters": closest["trainable_parameters_mean"],
                "closest_test_accuracy_mean": closest["test_accuracy_mean"],
                "closest_test_accuracy_std": closest["test_accuracy_std"],
                "accuracy_difference": row["test_accuracy_mean"] - closest["test_accuracy_mean"],
                "parameters_at_equal_accuracy": equal["parameters"],
                "parameter_ratio_at_equal_accuracy": (
                    None
                    if equal["parameters"] is None
                    else row["trainable_parameters_mean"] / equal["parameters"]
                ),
                "note": equal["note"],
            }
        row["vs"] = comparisons
    robustness = []
    for method in sorted({r["method"] for r in robust}):
        sel = [r for r in robust if r["method"] == method]
        robustness.append({"method": method, "lr": sel[0]["lr"], **aggregate(sel)})
    return {"rows": rows, "robustness": robustness}


def print_summary(result: dict) -> None:
    task, model_params = result["task"], result["model_parameters"]
    print(f"\n== {task}: {model_params:,} parameters; chosen lr {result['learning_rates']}")
    head = (
        f"{'method':<13} {'tau':>5} {'r':>3} {'test acc (%)':>14} {'final params':>17} "
        f"{'% model':>8} {'peak/final':>10} {'time (s)':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in result["summary"]["rows"]:
        print(
            f"{r['method']:<13} {'' if r['tau'] is None else r['tau']:>5} "
            f"{'' if r['rank'] is None else r['rank']:>3} "
            f"{100 * r['test_accuracy_mean']:>7.2f} ± {100 * r['test_accuracy_std']:<4.2f} "
            f"{r['trainable_parameters_mean']:>9,.0f} ± {r['trainable_parameters_std']:<6,.0f} "
            f"{100 * r['final_over_model']:>7.2f}% {r['peak_over_final_max']:>10.2f} "
            f"{r['seconds_mean']:>9.1f}"
        )
        for m, c in r.get("vs", {}).items():
            ratio = c["parameter_ratio_at_equal_accuracy"]
            print(
                f"    vs {m:<12} closest r={c['closest_rank']}: "
                f"{100 * c['accuracy_difference']:+.2f} pts; params ratio at equal accuracy "
                f"{ratio:.2f} ({c['note']})"
            )
    print("robustness at 10x the chosen learning rate:")
    for r in result["summary"]["robustness"]:
        print(
            f"  {r['method']:<13} lr={r['lr']:g}: {100 * r['test_accuracy_mean']:.2f} ± "
            f"{100 * r['test_accuracy_std']:.2f}%  skipped steps {r['skipped_steps']}"
        )


LABEL = {
    "tucker-sgd": "Tucker, TDLRT (SGD)",
    "tucker-adam": "Tucker, TDLRT (geometric Adam)",
    "tucker-adamw": "Tucker, TDLRT (geometric AdamW)",
    "lora": "LoRA (Adam)",
    "peft-lora": "PEFT LoRA (Adam)",
    "peft-adalora": "PEFT AdaLoRA (Adam)",
    "full": "full fine-tuning (Adam)",
}


def markdown(result: dict) -> str:
    """The docs' tables for one task (``--markdown``)."""
    model = result["model_parameters"]
    lines = [
        f"**{result['task']}** ({model:,} parameters; learning rates chosen on validation: "
        + ", ".join(f"{m} {lr:g}" for m, lr in result["learning_rates"].items())
        + ")",
        "",
        "| method | `tau` / rank | test accuracy (%) | final trainable | % of model "
        "| peak / final (in a step) | peak / final (between steps) | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]["rows"]:
        what = (
            f"τ = {r['tau']:g}"
            if r["tau"] is not None
            else ("" if r["rank"] is None else f"r = {r['rank']}")
        )
        lines.append(
            f"| {LABEL[r['method']]} | {what} | {100 * r['test_accuracy_mean']:.2f} ± "
            f"{100 * r['test_accuracy_std']:.2f} | {r['trainable_parameters_mean']:,.0f} | "
            f"{100 * r['final_over_model']:.2f} | {r['peak_over_final_max']:.2f} | "
            f"{r['peak_between_steps_over_final_max']:.2f} | "
            f"{r['seconds_mean']:.0f} |"
        )
    lines += [
        "",
        "| Tucker row | against | closest rank (params) | accuracy difference (points) "
        "| parameter ratio at equal accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in result["summary"]["rows"]:
        for m, c in r.get("vs", {}).items():
            ratio = c["parameter_ratio_at_equal_accuracy"]
            lines.append(
                f"| {LABEL[r['method']]}, τ = {r['tau']:g} | {LABEL[m]} | r = {c['closest_rank']} "
                f"({c['closest_parameters']:,.0f}) | {100 * c['accuracy_difference']:+.2f} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({c['note']}) |"
            )
    lines += [
        "",
        "| method, at 10× its chosen learning rate | lr | test accuracy (%) | skipped steps |",
        "|---|---|---|---|",
    ]
    for r in result["summary"]["robustness"]:
        lines.append(
            f"| {LABEL[r['method']]} | {r['lr']:g} | {100 * r['test_accuracy_mean']:.2f} ± "
            f"{100 * r['test_accuracy_std']:.2f} | {r['skipped_steps']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
STYLE = {
    "tucker-sgd": ("o-", "Tucker (TDLRT, SGD)"),
    "tucker-adam": ("o--", "Tucker (TDLRT, inner Adam)"),
    "tucker-adamw": ("o-.", "Tucker (TDLRT, inner AdamW)"),
    "lora": ("s-", "LoRA (Adam)"),
    "peft-lora": ("x:", "PEFT LoRA (Adam)"),
    "peft-adalora": ("d-", "PEFT AdaLoRA (Adam)"),
}


def decorate(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: list[dict], plot_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.3), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = res["summary"]["rows"]
        for method, (style, label) in STYLE.items():
            sel = sorted(
                (r for r in rows if r["method"] == method),
                key=lambda r: r["trainable_parameters_mean"],
            )
            if sel:
                ax.errorbar(
                    [r["trainable_parameters_mean"] for r in sel],
                    [100 * r["test_accuracy_mean"] for r in sel],
                    yerr=[100 * r["test_accuracy_std"] for r in sel],
                    fmt=style,
                    capsize=3,
                    label=label,
                )
        for r in rows:
            if r["method"] == "full":
                ax.errorbar(
                    [r["trainable_parameters_mean"]],
                    [100 * r["test_accuracy_mean"]],
                    yerr=[100 * r["test_accuracy_std"]],
                    fmt="k^",
                    capsize=3,
                    label="full fine-tuning",
                )
        accs = [100 * r["test_accuracy_mean"] for r in rows]
        good = [a for a in accs if a >= 60] or accs
        ax.set_ylim(math.floor(min(good) - 1), 100)
        ax.set_xscale("log")
        decorate(ax, "trainable parameters at the end", "test accuracy, digits 5-9 (%)",
              f"{res['task']}: MNIST 0-4 → 5-9, mean ± std over seeds")  # fmt: skip
    main = save(fig, plot_dir / f"{stem}.png")

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        for r in res["runs"]:
            if r["method"].startswith("tucker-") and r["seed"] == 1000 and r["tau"] == TUNE_TAU:
                ax.plot(r["parameter_history"], label=f"{r['method']}, τ = {r['tau']:g}")
        ax.set_yscale("log")
        decorate(ax, "TDLRT step", "adapter parameters",
              f"{res['task']}: Tucker adapter size during training (seed 0)")  # fmt: skip
    ranks = save(fig, plot_dir / f"{stem}_ranks.png")
    return [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in (main, ranks)]


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--tucker-inner",
        nargs="+",
        choices=("sgd", "adam", "adamw"),
        default=["sgd"],
        help="TDLRT inner optimizers (inner=...)",
    )
    parser.add_argument(
        "--tucker-kwargs",
        type=json.loads,
        default={},
        help="more TDLRT options, as JSON (e.g. '{\"max_rank\": 16}')",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "peft-lora", "peft-adalora", "full"],
        choices=("lora", "peft-lora", "peft-adalora", "full"),
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="LoRA / PEFT LoRA ranks and AdaLoRA target ranks",
    )
    parser.add_argument("--rank0", type=int, default=8, help="initial Tucker channel ranks")
    parser.add_argument("--epochs", type=int, default=3, help="adaptation epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="LeNet5 pretraining")
    parser.add_argument("--vit-pretrain-epochs", type=int, default=10)
    parser.add_argument(
        "--vit-split-qkv",
        action="store_true",
        help="one Tucker update per q/k/v slice of the fused projection",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="skip the learning-rate grids; use --lr METHOD=VALUE (default: the "
        "grid's second entry)",
    )
    parser.add_argument("--lr", nargs="*", default=[], help="METHOD=VALUE with --no-tune")
    parser.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="METHOD=LR1,LR2,... replaces a learning-rate grid (default: GRIDS)",
    )
    parser.add_argument(
        "--method-ranks",
        nargs="*",
        default=[],
        help="METHOD=R1,R2,... replaces --ranks for one LoRA-family method",
    )
    parser.add_argument("--no-robustness", action="store_true")
    parser.add_argument(
        "--no-robustness-for", nargs="*", default=[], help="methods left out of the 10x-lr runs"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 1 tau, ranks 2 4, 1 epoch, no grids",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--fresh", action="store_true", help="discard <out>.partial.jsonl")
    parser.add_argument(
        "--from-partial",
        action="store_true",
        help="write the report from the runs already in <out>.partial.jsonl (a stopped study: "
        "whole seeds; the file is kept so that the study can be resumed)",
    )
    parser.add_argument("--plot-dir", type=Path, default=DEFAULT_PLOTS)
    parser.add_argument("--plot-stem", default="adapters")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw from the JSON at --out")
    parser.add_argument(
        "--markdown", action="store_true", help="print the docs' tables from the JSON at --out"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.taus, args.ranks, args.epochs = 1, args.taus[:1], [2, 4], 1
        args.pretrain_epochs, args.vit_pretrain_epochs, args.no_tune = 1, 2, True
    if args.replot or args.markdown:
        report = json.loads(args.out.read_text())
        for res in report["tasks"]:  # from the runs, with this version's summary
            res["summary"] = summarize(res["runs"], res["robustness_runs"], res["model_parameters"])
        if args.markdown:
            print("\n\n".join(markdown(res) for res in report["tasks"]))
        else:
            print(plot(report["tasks"], args.plot_dir, args.plot_stem))
        return 0
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it, or another --out")
    lrs = {m: g[1] for m, g in GRIDS.items()}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in GRIDS or not value:
            parser.error(f"--lr takes METHOD=VALUE with METHOD in {sorted(GRIDS)}, got {item!r}")
        lrs[method] = float(value)
    args.lr = lrs
    grids = dict(GRIDS)
    for item in args.grid:
        method, _, values = item.partition("=")
        try:
            grids[method] = [float(v) for v in values.split(",")]
        except ValueError:
            grids[method] = []
        if method not in GRIDS or not grids[method]:
            parser.error(
                f"--grid takes METHOD=LR1,LR2 with METHOD in {sorted(GRIDS)}, got {item!r}"
            )
    args.grids = grids
    method_ranks = {}
    for item in args.method_ranks:
        method, _, values = item.partition("=")
        try:
            method_ranks[method] = [int(v) for v in values.split(",")]
        except ValueError:
            method_ranks[method] = []
        if method not in ("lora", "peft-lora", "peft-adalora") or not method_ranks[method]:
            parser.error(f"--method-ranks takes METHOD=R1,R2 for a LoRA method, got {item!r}")
    args.method_ranks = method_ranks
    torch.set_num_threads(args.threads)
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("out", "overwrite", "fresh", "plot_dir", "plot_stem", "no_plot", "replot")
    }
    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    progress = Progress(partial, settings, args.fresh, dry=args.from_partial)
    data = split_data()
    print(
        f"pretrain on {len(data['pretrain'][1])} digits 0-4; adapt on {len(data['adapt'][1])} "
        f"digits 5-9 (val {len(data['val'][1])}, test {len(data['test'][1])})",
        flush=True,
    )
    monitor = CpuMonitor()
    start = time.perf_counter()
    results = [study(task, data, args, progress) for task in args.tasks]
    for res in results:
        print_summary(res)
    plots = [] if args.no_plot or args.quick else plot(results, args.plot_dir, args.plot_stem)
    import peft

    report = {
        "benchmark": "adapters",
        "description": __doc__.split("\n\n")[0],
        "settings": settings,
        "environment": _common.environment(
            torch=torch.__version__,
            peft=peft.__version__,
            torch_num_threads=torch.get_num_threads(),
        ),
        "load": monitor.report(),
        "total_seconds_this_process": time.perf_counter() - start,
        "complete": not args.from_partial,
        "tasks": results,
        "plots": plots,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    if not args.from_partial:
        progress.path.unlink()
    print(f"wrote {args.out}" + (f" and {', '.join(plots)}" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
