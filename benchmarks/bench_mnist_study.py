"""Accuracy against compression on MNIST: TDLRT and fixed-rank baselines (Figure 1 in miniature).

LeNet5 (``tuckerman.integrations.torch.build_model``: conv 1→20, conv 20→50, fc 800→500,
fc 500→10) on the bundled MNIST digits (``tuckerman.datasets.load_mnist``: 8,000 training and
2,000 test images), batch 64, SGD with momentum 0.9, no weight decay, no augmentation, the same
number of epochs and the same learning rate (0.05) for every method. Every method is run over
the same seeds; within a seed every method sees the same mini-batches in the same order, and the
dense model and TDLRT start from the same dense initialization.

Methods (the factorized layers are conv 20→50 and fc 800→500; the first conv and the classifier
stay dense, as in the paper):

- ``dense``: the dense model, ``torch.optim.SGD``.
- ``tdlrt``: ``tuckerize(model)`` at full rank (HOSVD of the dense initialization, exact), then
  ``TDLRT(model, lr, tau, momentum=0.9)``: two gradient evaluations per step, ranks chosen by the
  relative tolerance ``tau``; several ``tau`` give a spread of compression rates.
- ``tdlrt-1pass``: the same with ``one_pass=True`` (one gradient evaluation per step), at one
  ``tau``; compared with ``tdlrt`` at that ``tau`` for accuracy and wall time per epoch.
- ``tdlrt-amortized``: the same with ``augment_every=5`` (augmentation and truncation every
  fifth step, the cores alone updated in between, as the authors' later code does), at the
  one-pass ``tau``.
- ``tucker-sgd``: fixed-rank Tucker layers (``tuckerize(..., init="random")``) at the final ranks
  of the ``tdlrt`` run with the same seed and ``tau``; core and factors trained by plain Euclidean
  SGD with momentum, no manifold (what TensorLy-Torch does).
- ``matrix-sgd``: each factorized layer's weight, reshaped to ``out × in·kh·kw``, as a product
  ``A B`` (a ``r``-channel convolution followed by a 1×1 convolution, or two linear maps), with
  ``r`` per layer chosen so that the layer has the parameters of the matched ``tdlrt`` layer;
  Euclidean SGD with momentum. Random Gaussian ``A`` and ``B`` of equal scale, with the product's
  entry variance equal to PyTorch's default for the dense layer (``1 / (3 fan_in)``).
- ``tdlrt-fixed``: ``TDLRT(fixed_rank=True)`` on the same random fixed-rank Tucker layers as
  ``tucker-sgd`` (the fixed-rank integrator of the paper).

Compression rate (the paper's): ``c.r. = 1 - (parameters of the factorized layers) /
(parameters of the same layers dense)``, biases included, at the end of training.

Recorded: test accuracy per seed and its mean and standard deviation (over seeds, ``ddof=1``),
c.r., final ranks, mean training loss of the last epoch, wall time per epoch (training only,
``time.perf_counter``) and the CPU share other processes used during each run (``_common``).
The plot (accuracy ± std against c.r.) goes to ``docs/img/benchmarks/mnist_study.png``.

Torch runs on one thread (``--threads``) so that timings are less disturbed on a shared machine.

Defaults: 5 seeds, 1 epoch (125 steps), taus 0.07, 0.1, 0.15, 0.2, one-pass at 0.1. Run from the
repository root (about 13 minutes on a busy 2-core machine; twice that with ``--epochs 2``)::

    nice -n 5 python benchmarks/bench_mnist_study.py     # writes results/mnist_study.json + plot
    python benchmarks/bench_mnist_study.py --quick       # 1 seed, 1 epoch, two taus: smoke run
    python benchmarks/bench_mnist_study.py --seeds 3 --epochs 2 --taus 0.1 0.2
    python benchmarks/bench_mnist_study.py --plot-only benchmarks/results/mnist_study.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import torch
import torch.nn.functional as F
from _common import CpuMonitor  # noqa: E402
from torch import nn
from tuckerman.integrations.torch import TDLRT, build_model, compression_report, tuckerize

from tuckerman.datasets import load_mnist

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mnist_study.json"
DEFAULT_PLOT = ROOT / "docs" / "img" / "benchmarks" / "mnist_study.png"

MODEL = "lenet5"
BATCH = 64
LR = 0.05
MOMENTUM = 0.9
TAUS = (0.07, 0.1, 0.15, 0.2)
ONE_PASS_TAU = 0.1
METHODS = (
    "dense",
    "tdlrt",
    "tdlrt-1pass",
    "tdlrt-amortized",
    "tucker-sgd",
    "matrix-sgd",
    "tdlrt-fixed",
)
AUGMENT_EVERY = 5  # tdlrt-amortized: augment and truncate every 5th step, cores only between


# --------------------------------------------------------------------------- environment
def environment() -> dict:
    """Versions, CPU, threads, git state: shared by the torch training benchmarks."""
    return _common.environment(
        ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "DNNL_", "ONEDNN_"),
        torch=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        niceness=os.nice(0) if hasattr(os, "nice") else None,
    )


# --------------------------------------------------------------------------- matrix baseline
class LowRankConv2d(nn.Module):
    """A convolution whose weight, reshaped to ``out × in·kh·kw``, is ``A B`` of rank ``r``.

    ``B`` is an ``r``-channel convolution with the original kernel size, stride and padding;
    ``A`` a 1×1 convolution ``r → out`` carrying the bias.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"LowRankConv2d supports plain convolutions only, got {conv}")
        out, cin, kh, kw = conv.weight.shape
        if not 1 <= rank <= min(out, cin * kh * kw):
            raise ValueError(
                f"rank {rank} out of range for weight shape {tuple(conv.weight.shape)}"
            )
        self.first = nn.Conv2d(
            cin, rank, (kh, kw), conv.stride, conv.padding, conv.dilation, bias=False
        )
        self.second = nn.Conv2d(rank, out, 1, bias=conv.bias is not None)
        _init_pair(self.second.weight, self.first.weight, fan_in=cin * kh * kw, rank=rank)
        if conv.bias is not None:
            bound = 1.0 / math.sqrt(cin * kh * kw)
            nn.init.uniform_(self.second.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankLinear(nn.Module):
    """A linear layer whose weight is ``A B`` of rank ``r`` (``x Bᵀ Aᵀ + b``)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        out, cin = linear.weight.shape
        if not 1 <= rank <= min(out, cin):
            raise ValueError(f"rank {rank} out of range for weight shape {(out, cin)}")
        self.first = nn.Linear(cin, rank, bias=False)
        self.second = nn.Linear(rank, out, bias=linear.bias is not None)
        _init_pair(self.second.weight, self.first.weight, fan_in=cin, rank=rank)
        if linear.bias is not None:
            nn.init.uniform_(self.second.bias, -1.0 / math.sqrt(cin), 1.0 / math.sqrt(cin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _init_pair(a: torch.Tensor, b: torch.Tensor, *, fan_in: int, rank: int) -> None:
    """Gaussian ``A``, ``B`` of equal scale with ``Var((A B)_ij) = 1 / (3 fan_in)``."""
    std = (1.0 / (3.0 * fan_in * rank)) ** 0.25
    with torch.no_grad():
        a.normal_(0.0, std)
        b.normal_(0.0, std)


def matrix_rank_for(module: nn.Module, parameters: int) -> int:
    """Rank of ``A B`` whose parameters (bias included) come closest to ``parameters``."""
    w = module.weight
    out, fan_in = w.shape[0], w[0].numel()
    bias = 0 if module.bias is None else out
    r = round((parameters - bias) / (out + fan_in))
    return max(1, min(r, out, fan_in))


def matrixize(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace the named Conv2d / Linear layers of ``model`` by rank-``r`` products, in place."""
    for name, r in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = LowRankConv2d(old, r) if isinstance(old, nn.Conv2d) else LowRankLinear(old, r)
        setattr(parent, child, new)
    return model


def check_low_rank_layers() -> dict:
    """The matrix baseline's layers against the dense layer with weight ``A B`` (reshaped)."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    low = LowRankConv2d(conv, 3)
    a = low.second.weight.reshape(8, 3)
    w = (a @ low.first.weight.reshape(3, -1)).reshape(conv.weight.shape)
    x = torch.randn(2, 6, 9, 9, generator=gen)
    with torch.no_grad():
        ref = F.conv2d(x, w, low.second.bias, stride=2, padding=1)
        conv_diff = float((low(x) - ref).norm() / ref.norm())
    lin = LowRankLinear(nn.Linear(7, 5), 2)
    x = torch.randn(4, 7, generator=gen)
    with torch.no_grad():
        ref = x @ (lin.second.weight @ lin.first.weight).T + lin.second.bias
        lin_diff = float((lin(x) - ref).norm() / ref.norm())
    if max(conv_diff, lin_diff) > 1e-5:
        raise RuntimeError(f"low-rank layers disagree with A B: {conv_diff}, {lin_diff}")
    return {"low_rank_conv_rel_diff": conv_diff, "low_rank_linear_rel_diff": lin_diff}


# --------------------------------------------------------------------------- training
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    return (
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
        for i in range(0, len(x), 500)
    )
    model.train()
    return correct / len(x)


def train(
    model: nn.Module,
    step: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
    zero_grad: Callable[[], None],
    data: tuple,
    *,
    epochs: int,
    seed: int,
) -> dict:
    """Train with ``step(closure)``; returns accuracy, last-epoch loss and per-epoch times."""
    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every method
    epoch_times, losses = [], []
    steps_done = 0
    diverged, error = False, None
    monitor = CpuMonitor()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in range(0, len(xtr), BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = xtr[idx], ytr[idx]

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            try:
                loss = float(step(closure).detach())
            except (FloatingPointError, torch.linalg.LinAlgError) as err:
                # TDLRT refuses a non-finite step; an SVD of a non-finite core fails
                diverged, error = True, f"{type(err).__name__}: {err}"
                break
            if not math.isfinite(loss):
                diverged = True
                break
            total += loss * len(idx)
            steps_done += 1
            count += len(idx)
        epoch_times.append(time.perf_counter() - start)
        losses.append(total / max(count, 1))
        if diverged:
            break
    cpu = monitor.report()
    return {
        "test_accuracy": accuracy(model, xte, yte),
        "train_loss_last_epoch": losses[-1],
        "diverged": diverged,
        "error": error,
        "steps_done": steps_done,
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "other_processes_cpu_share": cpu["other_processes_cpu_share"],
    }


def sgd_step(opt: torch.optim.Optimizer) -> Callable:
    def step(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = closure()
        opt.step()
        return loss.detach()

    return step


def dense_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL, in_channels=1, num_classes=10, image_size=28)


def factorized_layers() -> list[str]:
    """Names of the layers tuckerize converts (all Conv2d / Linear but the first conv and the
    last linear), read from a converted copy so that the rule stays tuckerize's own."""
    probe = tuckerize(dense_model(0), ranks=1, init="random")
    names = [n for n, m in probe.named_modules() if type(m).__name__.startswith("Tucker")]
    if not names:
        raise RuntimeError(f"tuckerize converted no layer of {MODEL}")
    return names


def layer_counts(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(parameters, dense parameters) of the named layers; the dense counts come from a fresh
    dense model (weight and bias)."""
    dense = dense_model(0)
    own = sum(sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names)
    ref = sum(sum(p.numel() for p in dense.get_submodule(n).parameters()) for n in names)
    return own, ref


def run_one(
    method: str,
    seed: int,
    data: tuple,
    epochs: int,
    *,
    tau: float | None = None,
    match: dict | None = None,
    names: list[str],
) -> dict:
    """One training run; ``match``: the tdlrt run whose final ranks a baseline copies."""
    model = dense_model(seed)
    record: dict[str, Any] = {"method": method, "seed": seed, "tau": tau}
    torch.manual_seed(10_000 + seed)  # the baselines' random factor initialization
    if method == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        result = train(model, sgd_step(opt), opt.zero_grad, data, epochs=epochs, seed=seed)
    elif method in ("tdlrt", "tdlrt-1pass", "tdlrt-amortized"):
        tuckerize(model)  # full rank: the dense initialization, exactly
        opt = TDLRT(
            model,
            lr=LR,
            tau=tau,
            momentum=MOMENTUM,
            one_pass=method == "tdlrt-1pass",
            augment_every=AUGMENT_EVERY if method == "tdlrt-amortized" else 1,
        )
        result = train(model, opt.step, opt.zero_grad, data, epochs=epochs, seed=seed)
    elif method in ("tucker-sgd", "tdlrt-fixed"):
        ranks = {n: tuple(r) for n, r in match["ranks"].items()}
        tuckerize(model, ranks=lambda name, _m: ranks[name], init="random")
        if method == "tucker-sgd":
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            result = train(model, sgd_step(opt), opt.zero_grad, data, epochs=epochs, seed=seed)
        else:
            opt = TDLRT(model, lr=LR, momentum=MOMENTUM, fixed_rank=True)
            result = train(model, opt.step, opt.zero_grad, data, epochs=epochs, seed=seed)
        record["matched_tau"] = match["tau"]
    elif method == "matrix-sgd":
        layer_params = match["layer_parameters"]
        ranks = {n: matrix_rank_for(model.get_submodule(n), layer_params[n]) for n in names}
        matrixize(model, ranks)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        result = train(model, sgd_step(opt), opt.zero_grad, data, epochs=epochs, seed=seed)
        record["matched_tau"] = match["tau"]
        record["ranks"] = ranks
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    record.update(result)
    if method == "dense":
        record["compression_rate"] = 0.0
    elif method == "matrix-sgd":
        own, ref = layer_counts(model, names)
        record["compression_rate"] = 1.0 - own / ref
        record["layer_parameters"] = {
            n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names
        }
    else:
        report = compression_report(model)
        record["compression_rate"] = report["compression_rate"]
        record["ranks"] = {layer["name"]: layer["ranks"] for layer in report["layers"]}
        record["layer_parameters"] = {
            layer["name"]: layer["parameters"] for layer in report["layers"]
        }
    return record


# --------------------------------------------------------------------------- summary and plot
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> list[dict]:
    """Per (method, tau): mean and std over all seeds, and over the runs that completed (a run
    fails when its loss goes non-finite or the optimizer raises; its accuracy is still counted
    in the all-seeds numbers). Epoch times come from completed runs only."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["method"], r.get("matched_tau") if r["tau"] is None else r["tau"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (method, tau), rs in groups.items():
        done = [r for r in rs if not r["diverged"]]
        acc, acc_std = _mean_std([r["test_accuracy"] for r in rs])
        cr, cr_std = _mean_std([r["compression_rate"] for r in rs])
        acc_done, acc_done_std = _mean_std([r["test_accuracy"] for r in done])
        cr_done, cr_done_std = _mean_std([r["compression_rate"] for r in done])
        times = [t for r in done for t in r["epoch_times_s"]]
        rows.append(
            {
                "method": method,
                "tau": tau,
                "seeds": len(rs),
                "accuracy_mean": acc,
                "accuracy_std": acc_std,
                "compression_rate_mean": cr,
                "compression_rate_std": cr_std,
                "completed_runs": len(done),
                "accuracy_mean_completed": acc_done,
                "accuracy_std_completed": acc_done_std,
                "compression_rate_mean_completed": cr_done,
                "compression_rate_std_completed": cr_done_std,
                "epoch_time_median_s": statistics.median(times) if times else None,
                "diverged_runs": len(rs) - len(done),
                "max_other_processes_cpu_share": max(
                    (r["other_processes_cpu_share"] or 0.0) for r in rs
                ),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = ("method", "tau", "seeds", "accuracy (%)", "c.r. (%)", "s/epoch", "diverged")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["method"],
                "-" if r["tau"] is None else f"{r['tau']:g}",
                str(r["seeds"]),
                f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
                f"{100 * r['compression_rate_mean']:.1f} ± {100 * r['compression_rate_std']:.1f}",
                "-" if r["epoch_time_median_s"] is None else f"{r['epoch_time_median_s']:.2f}",
                str(r["diverged_runs"]),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_title(config: dict) -> str:
    return (
        f"LeNet5 on MNIST (8k/2k), {config['epochs']} epoch(s), {config['seeds']} seed(s), "
        f"SGD lr {config['lr']} momentum {config['momentum']}: mean ± std"
    )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "tdlrt": ("TDLRT (rank-adaptive)", "o", "C0"),
        "tdlrt-1pass": ("TDLRT one-pass", "D", "C4"),
        "tdlrt-amortized": (f"TDLRT, augmented every {AUGMENT_EVERY} steps", "v", "C5"),
        "tdlrt-fixed": ("TDLRT fixed rank", "s", "C2"),
        "tucker-sgd": ("Tucker, Euclidean SGD", "^", "C1"),
        "matrix-sgd": ("matrix A·B, Euclidean SGD", "v", "C3"),
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        d = dense[0]
        ax.axhline(100 * d["accuracy_mean"], color="k", lw=1, label="dense")
        ax.axhspan(
            100 * (d["accuracy_mean"] - d["accuracy_std"]),
            100 * (d["accuracy_mean"] + d["accuracy_std"]),
            color="k",
            alpha=0.1,
        )

    # points: mean ± std over the runs that completed; failed runs are counted next to them.
    # x: the share of parameters kept, 100 (1 - c.r.) %, on a log axis running right to left,
    # so that compression grows to the right and 95%, 98% and 99% c.r. stay apart
    def kept(r: dict) -> float:
        return 100 * (1 - r["compression_rate_mean_completed"])

    for method, (label, marker, color) in styles.items():
        rs = sorted(
            (r for r in rows if r["method"] == method and r["completed_runs"]),
            key=lambda r: r["compression_rate_mean_completed"],
        )
        if not rs:
            continue
        ax.errorbar(
            [kept(r) for r in rs],
            [100 * r["accuracy_mean_completed"] for r in rs],
            xerr=[100 * r["compression_rate_std_completed"] for r in rs],
            yerr=[100 * r["accuracy_std_completed"] for r in rs],
            marker=marker,
            color=color,
            label=label,
            capsize=3,
            ls="-" if len(rs) > 1 else "none",
            lw=1,
        )
    # a collapsed run (near 10%) would squash the rest: clip the axis, mark it with an arrow at
    # the bottom and list it in a note
    good = [
        100 * r["accuracy_mean_completed"]
        for r in rows
        if r["completed_runs"] and r["accuracy_mean_completed"] > 0.5
    ]
    low = math.floor(min(good) - 3) if good else 0
    ax.set_ylim(low, 100)
    notes = []
    for r in rows:
        if r["method"] == "dense":
            continue
        color = styles.get(r["method"], ("", "", "k"))[2]
        label = styles.get(r["method"], (r["method"],))[0]
        failed = f"{r['diverged_runs']}/{r['seeds']} failed" if r["diverged_runs"] else ""
        if r["completed_runs"] and 100 * r["accuracy_mean_completed"] >= low:
            if failed:
                ax.annotate(
                    failed,
                    (kept(r), 100 * r["accuracy_mean_completed"]),
                    xytext=(-4, 8),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
            continue
        x = kept(r) if r["completed_runs"] else 100 * (1 - r["compression_rate_mean"])
        ax.annotate(
            "",
            (x, low),
            xytext=(0, 18),
            textcoords="offset points",
            arrowprops={"arrowstyle": "->", "color": color},
        )
        acc = (
            f"{100 * r['accuracy_mean_completed']:.0f}% over completed runs"
            if r["completed_runs"]
            else "no run completed"
        )
        notes.append(
            f"{label}, c.r. {100 * (1 - x / 100):.0f}%: {acc}" + (f" ({failed})" if failed else "")
        )
    if notes:
        ax.text(
            0.99,
            0.02,
            "below the axis (arrows):\n" + "\n".join(notes),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=6.5,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
        )
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [100, 50, 20, 10, 5, 2, 1]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}%\n({100 - t}%)" for t in ticks])
    ax.set_xlabel("parameters kept in the factorized layers (compression rate)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    parser.add_argument("--one-pass-tau", type=float, default=ONE_PASS_TAU)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, taus 0.1 0.3")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG output path")
    parser.add_argument(
        "--plot-only",
        type=Path,
        metavar="JSON",
        help="recompute the summary (written back) and the plot from the per-seed runs of a "
        "results file, without training",
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        saved = json.loads(args.plot_only.read_text())
        saved["summary"] = rows = summarize(saved["runs"])
        print(table(rows))
        args.plot_only.write_text(json.dumps(saved, indent=2) + "\n")
        plot(rows, args.plot, plot_title(saved["config"]))
        print(f"rewrote the summary of {args.plot_only}; wrote {args.plot}")
        return 0
    if args.quick:
        args.seeds, args.epochs, args.taus = 1, 1, [0.1, 0.3]
    if args.one_pass_tau not in args.taus:
        parser.error(f"--one-pass-tau {args.one_pass_tau} must be one of --taus {args.taus}")
    torch.set_num_threads(args.threads)
    checks = check_low_rank_layers()
    data = load_data()
    names = factorized_layers()
    print(
        f"bench_mnist_study: {MODEL}, {args.seeds} seeds x {args.epochs} epochs, taus "
        f"{args.taus}, factorized layers {names}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    runs: list[dict] = []
    start = time.perf_counter()

    def log(r: dict) -> None:
        runs.append(r)
        tau = r["tau"] if r["tau"] is not None else r.get("matched_tau")
        print(
            f"  seed {r['seed']} {r['method']:12s} tau {tau!s:5s} "
            f"acc {100 * r['test_accuracy']:.2f}%"
            f"  c.r. {100 * r['compression_rate']:.1f}%  {sum(r['epoch_times_s']):.1f} s"
            f"{'  DIVERGED' if r['diverged'] else ''}  ranks {r.get('ranks', '-')}"
            f"  [others {r['other_processes_cpu_share']}]",
            flush=True,
        )

    for seed in range(args.seeds):
        if "dense" in args.methods:
            log(run_one("dense", seed, data, args.epochs, names=names))
        for tau in args.taus:
            ref = run_one("tdlrt", seed, data, args.epochs, tau=tau, names=names)
            if "tdlrt" in args.methods:
                log(ref)
            for variant in ("tdlrt-1pass", "tdlrt-amortized"):
                if variant in args.methods and tau == args.one_pass_tau:
                    log(run_one(variant, seed, data, args.epochs, tau=tau, names=names))
            for method in ("tucker-sgd", "matrix-sgd", "tdlrt-fixed"):
                if method in args.methods:
                    log(run_one(method, seed, data, args.epochs, match=ref, names=names))
    rows = summarize(runs)
    text = table(rows)
    print()
    print(text)
    report = {
        "config": {
            "model": MODEL,
            "factorized_layers": names,
            "dataset": "tuckerman.datasets.load_mnist (8000 train / 2000 test)",
            "batch": BATCH,
            "lr": LR,
            "momentum": MOMENTUM,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "taus": args.taus,
            "one_pass_tau": args.one_pass_tau,
            "methods": args.methods,
            "compression_rate": "1 - params(factorized layers) / params(same layers dense), "
            "biases included, at the end of training",
        },
        "checks": checks,
        "summary": rows,
        "runs": runs,
        "total_wall_s": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    plot(rows, args.plot, plot_title(report["config"]))
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
