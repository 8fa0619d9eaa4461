"""Tucker adapters trained by TDLRT against LoRA and full fine-tuning (LeNet5, MNIST 0-4 → 5-9).

Task: LeNet5 is pretrained on the bundled MNIST digits 0-4 (``tuckerman.datasets.load_mnist``,
training split), then adapted to the digits 5-9, relabelled 0-4 (same 5-way head). Three ways
to adapt, all on the same four layers (both convolutions and both linear layers) of the same
pretrained model:

- ``tucker``: :func:`~tuckerman.integrations.torch.add_tucker_adapters` (zero-initialized
  Tucker updates, initial channel ranks ``--rank0``) trained by the rank-adaptive ``TDLRT``
  optimizer (inner SGD) at each tolerance ``--taus``; the base weights stay frozen.
- ``lora``: ``W₀ + B·A`` on the same layers (``B = 0`` at the start, ``A`` Kaiming-uniform as in
  LoRA; for a convolution ``A`` is a ``k×k`` conv to ``r`` channels and ``B`` a 1×1 conv, the
  usual LoRA-for-conv), trained by Adam, with one rank ``r`` for all layers chosen so that its
  trainable parameters match the Tucker adapter's *final* count in the same seed (the closest
  ``r``). ``lora_sgd``: the same LoRA trained by plain SGD, the optimizer TDLRT uses here, to
  separate the effect of the format from that of the optimizer.
- ``full``: every parameter fine-tuned by Adam (the reference).

Every method sees the same batches (seeded) for the same number of epochs. Each method's
learning rate is picked in the same run from a small grid (``TUNE_GRID``; seed 0, Tucker at
``tau = 0.1``, LoRA at rank 4) by the accuracy on a validation split (the last 15% of the 5-9
training digits), never on the test digits; the reported accuracy is on the test split's
digits 5-9. TDLRT uses inner SGD (with Adam the normalized core steps have a flat spectrum and
the relative truncation keeps nearly every direction: the ranks run to their maximum).

Over ``--seeds`` seeds (pretraining included), the script reports accuracy mean ± std,
trainable parameters and the adaptation time, writes ``benchmarks/results/adapters.json``
and the plots ``docs/img/benchmarks/adapters.png`` (accuracy against trainable parameters, time) and
``docs/img/benchmarks/adapters_ranks.png`` (the Tucker adapters' parameters during training).

Run from the repository root (about 10-20 minutes on 2 shared CPU cores)::

    nice -n 5 python benchmarks/bench_adapters.py
    python benchmarks/bench_adapters.py --quick      # one seed, one tolerance, one epoch
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F
from _common import CpuMonitor  # noqa: E402
from torch import nn
from tuckerman.integrations.torch import TDLRT, adapter_report, add_tucker_adapters

from tuckerman.datasets import load_mnist

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "adapters.json"
DEFAULT_PLOTS = ROOT / "docs" / "img" / "benchmarks"
TARGETS = ["features.0", "features.3", "classifier.1", "classifier.3"]


# --------------------------------------------------------------------------- model and data
def lenet5(num_classes: int) -> nn.Module:
    """The package's LeNet5 when present, else the same architecture defined here."""
    try:
        from tuckerman.integrations.torch import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        return build_model("lenet5", 1, num_classes, 28)
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
        nn.MaxPool2d(2),
    )  # fmt: skip
    model.classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes)
    )
    model.forward = lambda x: model.classifier(model.features(x))  # type: ignore[method-assign]
    return model


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


def batches(n: int, batch: int, epochs: int, seed: int):
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


# --------------------------------------------------------------------------- LoRA
class LoRA(nn.Module):
    """``base(x) + scale · B(A(x))`` on a frozen ``nn.Linear`` / ``nn.Conv2d`` (LoRA, Hu et al.
    2021). For a convolution ``A`` is a ``k×k`` convolution ``C_in → r`` with the base stride,
    padding and dilation and ``B`` a 1×1 convolution ``r → C_out``. ``B = 0`` at the start."""

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


def per_rank_lora_parameters(model: nn.Module) -> int:
    """LoRA parameters per unit of rank over the target layers: ``Σ (fan_in + C_out)``."""
    total = 0
    for name in TARGETS:
        m = model.get_submodule(name)
        w = m.weight
        total += math.prod(w.shape[1:]) + w.shape[0]
    return total


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in TARGETS:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRA(getattr(parent, child), rank))
    return model


# --------------------------------------------------------------------------- training
def cross_entropy_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def train_adam(model, data, epochs, lr, batch, seed, optimizer: str = "adam") -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    x, y = data
    start = time.perf_counter()
    for idx in batches(len(y), batch, epochs, seed):
        opt.step(cross_entropy_closure(model, opt, x[idx], y[idx]))
    return time.perf_counter() - start


def train_tucker(model, data, epochs, lr, tau, batch, seed) -> tuple[float, list[int]]:
    # inner SGD: with Adam the normalized core steps have a flat singular spectrum, so the
    # relative truncation keeps almost every new direction and the ranks run to the maximum
    opt = TDLRT(model, lr=lr, tau=tau, inner="sgd")
    x, y = data
    sizes = []
    start = time.perf_counter()
    for idx in batches(len(y), batch, epochs, seed):
        opt.step(cross_entropy_closure(model, opt, x[idx], y[idx]))
        sizes.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return time.perf_counter() - start, sizes


def pretrain(data, args, seed) -> nn.Module:
    torch.manual_seed(seed)
    model = lenet5(5)
    train_adam(model, data["pretrain"], args.pretrain_epochs, 1e-3, args.batch, seed)
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_seed(data, args, seed: int, base: nn.Module | None = None) -> dict:
    base = pretrain(data, args, seed) if base is None else base
    out: dict[str, Any] = {
        "seed": seed,
        "pretrain_accuracy_0_4": accuracy(base, data["pretrain_test"]),
        "zero_shot_accuracy_5_9": accuracy(base, data["test"]),
        "runs": [],
    }
    adapt_seed = 1000 + seed
    for tau in args.taus:
        torch.manual_seed(adapt_seed)
        model = add_tucker_adapters(copy.deepcopy(base), TARGETS, ranks=args.rank0)
        seconds, sizes = train_tucker(
            model, data["adapt"], args.epochs, args.lr_tucker, tau, args.batch, adapt_seed
        )
        report = adapter_report(model)
        tucker_params = report["adapter_parameters"]
        run = {
            "method": "tucker",
            "tau": tau,
            "trainable_parameters": tucker_params,
            "max_trainable_parameters": max(sizes),
            "ranks": {layer["name"]: layer["ranks"] for layer in report["layers"]},
            "parameter_history": sizes,
            "seconds": seconds,
            "val_accuracy": accuracy(model, data["val"]),
            "test_accuracy": accuracy(model, data["test"]),
        }
        out["runs"].append(run)
        print(f"  seed {seed} tucker tau={tau}: {fmt_run(run)}", flush=True)

        per_rank = per_rank_lora_parameters(base)
        rank = max(1, round(tucker_params / per_rank))
        torch.manual_seed(adapt_seed)
        model = add_lora(copy.deepcopy(base), rank)
        seconds = train_adam(
            model, data["adapt"], args.epochs, args.lr_lora, args.batch, adapt_seed
        )
        run = {
            "method": "lora",
            "matched_to_tau": tau,
            "rank": rank,
            "trainable_parameters": trainable(model),
            "seconds": seconds,
            "val_accuracy": accuracy(model, data["val"]),
            "test_accuracy": accuracy(model, data["test"]),
        }
        out["runs"].append(run)
        print(f"  seed {seed} lora r={rank}: {fmt_run(run)}", flush=True)

        torch.manual_seed(adapt_seed)  # the same LoRA with plain SGD, the optimizer TDLRT uses
        model = add_lora(copy.deepcopy(base), rank)
        seconds = train_adam(
            model, data["adapt"], args.epochs, args.lr_lora_sgd, args.batch, adapt_seed, "sgd"
        )
        run = {
            "method": "lora_sgd",
            "matched_to_tau": tau,
            "rank": rank,
            "trainable_parameters": trainable(model),
            "seconds": seconds,
            "val_accuracy": accuracy(model, data["val"]),
            "test_accuracy": accuracy(model, data["test"]),
        }
        out["runs"].append(run)
        print(f"  seed {seed} lora (SGD) r={rank}: {fmt_run(run)}", flush=True)

    torch.manual_seed(adapt_seed)
    model = copy.deepcopy(base)
    seconds = train_adam(model, data["adapt"], args.epochs, args.lr_full, args.batch, adapt_seed)
    run = {
        "method": "full",
        "trainable_parameters": trainable(model),
        "seconds": seconds,
        "val_accuracy": accuracy(model, data["val"]),
        "test_accuracy": accuracy(model, data["test"]),
    }
    out["runs"].append(run)
    print(f"  seed {seed} full: {fmt_run(run)}", flush=True)
    return out


TUNE_GRID = {
    "tucker": [0.05, 0.1, 0.2, 0.4],  # TDLRT, inner SGD, tau = 0.1
    "lora": [1e-3, 3e-3, 1e-2, 3e-2],  # Adam, rank 4 (about the Tucker adapter's size)
    "lora_sgd": [0.1, 0.3, 1.0],  # SGD, rank 4
    "full": [3e-4, 1e-3, 3e-3],  # Adam
}


def tune(data, args, base: nn.Module) -> dict:
    """Validation accuracy over the learning-rate grids (seed 0; never the test digits)."""
    results: dict[str, list] = {k: [] for k in TUNE_GRID}
    for lr in TUNE_GRID["tucker"]:
        torch.manual_seed(1000)
        model = add_tucker_adapters(copy.deepcopy(base), TARGETS, ranks=args.rank0)
        train_tucker(model, data["adapt"], args.epochs, lr, 0.1, args.batch, 1000)
        params = adapter_report(model)["adapter_parameters"]
        results["tucker"].append((lr, accuracy(model, data["val"]), params))
        print(f"  tucker lr={lr:g}: val {results['tucker'][-1][1]:.4f}, {params} params")
    for method in ("lora", "lora_sgd", "full"):
        for lr in TUNE_GRID[method]:
            torch.manual_seed(1000)
            model = copy.deepcopy(base)
            if method != "full":
                model = add_lora(model, 4)
            kind = "sgd" if method == "lora_sgd" else "adam"
            train_adam(model, data["adapt"], args.epochs, lr, args.batch, 1000, kind)
            results[method].append((lr, accuracy(model, data["val"]), trainable(model)))
            print(f"  {method} lr={lr:g}: val {results[method][-1][1]:.4f}")
    best = {k: max(v, key=lambda t: t[1])[0] for k, v in results.items()}
    print(f"best learning rates on the validation split: {best}")
    return {"grid": results, "best": best}


def fmt_run(run: dict) -> str:
    return (
        f"test acc {100 * run['test_accuracy']:.2f}%  val {100 * run['val_accuracy']:.2f}%  "
        f"params {run['trainable_parameters']:,}  {run['seconds']:.1f} s"
    )


# --------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(seeds: list[dict], taus: list[float]) -> list[dict]:
    rows = []
    keys = [(m, t) for m in ("tucker", "lora", "lora_sgd") for t in taus] + [("full", None)]
    for method, tau in keys:
        runs = [
            r
            for s in seeds
            for r in s["runs"]
            if r["method"] == method and r.get("tau", r.get("matched_to_tau")) == tau
        ]
        acc = mean_std([r["test_accuracy"] for r in runs])
        params = mean_std([float(r["trainable_parameters"]) for r in runs])
        secs = mean_std([r["seconds"] for r in runs])
        row = {
            "method": method,
            "tau": tau,
            "test_accuracy_mean": acc[0],
            "test_accuracy_std": acc[1],
            "val_accuracy_mean": mean_std([r["val_accuracy"] for r in runs])[0],
            "trainable_parameters_mean": params[0],
            "trainable_parameters_std": params[1],
            "seconds_mean": secs[0],
            "seconds_std": secs[1],
            "n": len(runs),
        }
        if method in ("lora", "lora_sgd"):
            row["ranks"] = [r["rank"] for r in runs]
        if method == "tucker":
            row["final_ranks_seed0"] = runs[0]["ranks"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], full_params: int) -> None:
    head = f"{'method':<9} {'tau':>5} {'test acc (%)':>15} {'trainable':>18} {'% of full':>9} "
    head += f"{'time (s)':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:g}"
        label = r["method"] + ("*" if r["method"].startswith("lora") else "")
        print(
            f"{label:<9} {tau:>5} "
            f"{100 * r['test_accuracy_mean']:>8.2f} ± {100 * r['test_accuracy_std']:<4.2f} "
            f"{r['trainable_parameters_mean']:>10,.0f} ± {r['trainable_parameters_std']:<5,.0f} "
            f"{100 * r['trainable_parameters_mean'] / full_params:>8.2f}% "
            f"{r['seconds_mean']:>6.1f} ± {r['seconds_std']:<4.1f}"
        )
    print("lora*: rank matched to the Tucker adapter's final parameter count at that tau")
    print("(lora: Adam; lora_sgd: plain SGD, as TDLRT's inner optimizer; full: Adam)")


def plot(rows: list[dict], seeds: list[dict], taus: list[float], plot_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "tucker": ("o-", "Tucker adapter (TDLRT, SGD)"),
        "lora": ("s--", "LoRA, matched (Adam)"),
        "lora_sgd": ("d:", "LoRA, matched (SGD)"),
    }
    # a diverged run (plain SGD) would squash the axis: crop it and say what is below
    accs = [100 * r["test_accuracy_mean"] for r in rows]
    good = [a for a in accs if a >= 80.0] or accs
    low = math.floor(min(good) - 1.5)
    for method, (style, label) in styles.items():
        every = [r for r in rows if r["method"] == method]
        sel = [r for r in every if 100 * r["test_accuracy_mean"] >= low]
        ax.errorbar(
            [r["trainable_parameters_mean"] for r in sel],
            [100 * r["test_accuracy_mean"] for r in sel],
            xerr=[r["trainable_parameters_std"] for r in sel],
            yerr=[100 * r["test_accuracy_std"] for r in sel],
            fmt=style,
            capsize=3,
            label=label,
        )
        if method == "tucker":
            for r in sel:
                ax.annotate(
                    f"τ={r['tau']:g}",
                    (r["trainable_parameters_mean"], 100 * r["test_accuracy_mean"]),
                    textcoords="offset points",
                    xytext=(4, -12),
                    fontsize=8,
                )
        ax2.errorbar(
            [r["trainable_parameters_mean"] for r in every],
            [r["seconds_mean"] for r in every],
            yerr=[r["seconds_std"] for r in every],
            fmt=style,
            capsize=3,
            label=label,
        )
    full = next(r for r in rows if r["method"] == "full")
    for a, y, yerr in (
        (ax, 100 * full["test_accuracy_mean"], 100 * full["test_accuracy_std"]),
        (ax2, full["seconds_mean"], full["seconds_std"]),
    ):
        a.errorbar(
            [full["trainable_parameters_mean"]],
            [y],
            yerr=[yerr],
            fmt="k^",
            capsize=3,
            label="full fine-tuning",
        )
        a.set_xscale("log")
        a.set_xlabel("trainable parameters")
        a.grid(True, alpha=0.3)
    ax.set_ylim(low, 100)
    below = [
        f"{r['method']} at {r['trainable_parameters_mean']:,.0f} params: "
        f"{100 * r['test_accuracy_mean']:.1f} ± {100 * r['test_accuracy_std']:.1f}%"
        for r in rows
        if 100 * r["test_accuracy_mean"] < low
    ]
    if below:
        ax.text(
            0.02,
            0.02,
            "below the axis (a seed diverged):\n" + "\n".join(dict.fromkeys(below)),
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
        )
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.set_title(f"LeNet5, MNIST 0-4 → 5-9, mean ± std over {len(seeds)} seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax2.set_ylabel("adaptation time (s)")
    ax2.set_title("training time (TDLRT: two gradient evaluations per step)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    main = plot_dir / "adapters.png"
    fig.savefig(main, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for tau in taus:
        run = next(r for r in seeds[0]["runs"] if r["method"] == "tucker" and r["tau"] == tau)
        ax.plot(np.arange(1, len(run["parameter_history"]) + 1), run["parameter_history"])
        ax.lines[-1].set_label(f"τ = {tau:g}")
    ax.set_xlabel("TDLRT step")
    ax.set_ylabel("adapter parameters")
    ax.set_yscale("log")
    ax.set_title("Tucker adapter size during training (seed 0)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ranks = plot_dir / "adapters_ranks.png"
    fig.savefig(ranks, dpi=110)
    plt.close(fig)
    return [str(main.relative_to(ROOT)), str(ranks.relative_to(ROOT))]


def environment() -> dict:
    return _common.environment(torch=torch.__version__, torch_num_threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--rank0", type=int, default=8, help="initial channel ranks")
    parser.add_argument("--epochs", type=int, default=3, help="adaptation epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr-tucker", type=float, default=0.1)
    parser.add_argument("--lr-lora", type=float, default=1e-2)
    parser.add_argument("--lr-lora-sgd", type=float, default=0.3)
    parser.add_argument("--lr-full", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 tau, 1 epoch")
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="skip the learning-rate grids on the validation split; use the --lr-* values",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot-dir", type=Path, default=DEFAULT_PLOTS)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plots from the JSON at --out"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.taus, args.epochs, args.pretrain_epochs = 1, args.taus[:1], 1, 1
        args.no_tune = True
    if args.replot:
        report = json.loads(args.out.read_text())
        print(plot(report["summary"], report["seeds"], report["settings"]["taus"], args.plot_dir))
        return 0
    torch.set_num_threads(args.threads)
    data = split_data()
    print(
        f"pretrain on {len(data['pretrain'][1])} digits 0-4; adapt on {len(data['adapt'][1])} "
        f"digits 5-9 (val {len(data['val'][1])}, test {len(data['test'][1])})",
        flush=True,
    )
    monitor = CpuMonitor()
    start = time.perf_counter()
    base0 = pretrain(data, args, 0)
    tuned = None
    if not args.no_tune:
        print("learning rates (validation split, seed 0):", flush=True)
        tuned = tune(data, args, base0)
        args.lr_tucker, args.lr_lora, args.lr_lora_sgd, args.lr_full = (
            tuned["best"][k] for k in ("tucker", "lora", "lora_sgd", "full")
        )
    seeds = [run_seed(data, args, 0, base0)]
    seeds += [run_seed(data, args, seed) for seed in range(1, args.seeds)]
    rows = summarize(seeds, args.taus)
    full_params = int(next(r for r in rows if r["method"] == "full")["trainable_parameters_mean"])
    print()
    print_table(rows, full_params)
    pre = mean_std([s["pretrain_accuracy_0_4"] for s in seeds])
    zero = mean_std([s["zero_shot_accuracy_5_9"] for s in seeds])
    print(f"pretrained accuracy on digits 0-4: {100 * pre[0]:.2f} ± {100 * pre[1]:.2f}%")
    print(f"before adaptation on digits 5-9: {100 * zero[0]:.2f} ± {100 * zero[1]:.2f}%")
    plots = [] if args.no_plot or args.quick else plot(rows, seeds, args.taus, args.plot_dir)
    report = {
        "benchmark": "adapters",
        "description": __doc__.split("\n\n")[0],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "environment": environment(),
        "load": monitor.report(),
        "total_seconds": time.perf_counter() - start,
        "pretrain_accuracy_0_4": {"mean": pre[0], "std": pre[1]},
        "before_adaptation_accuracy_5_9": {"mean": zero[0], "std": zero[1]},
        "learning_rate_search": tuned,
        "summary": rows,
        "seeds": seeds,
        "plots": plots,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}" + (f" and {', '.join(plots)}" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
