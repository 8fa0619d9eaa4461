"""Forward + backward time of a Tucker conv layer against ``nn.Conv2d``, measured in the same run.

Target: a 256 → 256, 3×3 convolution (padding 1) on 32×32 maps, batch 32, float32, CPU.
``TuckerConv2d`` with channel ranks chosen so that its weight has ≈ 8% of the dense weight's
parameters (kernel modes full rank, the default) takes <= 0.45x the time of ``nn.Conv2d``
for one forward and one backward pass.

Two cases are timed:

- ``input grad`` (the target): the input requires grad, as for every layer but the first of a
  network (``tuckerize`` leaves the first conv dense by default). Backward computes the input,
  weight and bias gradients.
- ``no input grad`` (reported, no target): the input does not require grad (a first layer);
  backward computes only the parameter gradients, so the dense layer skips one of its two big
  backward convolutions.

Timing: ``time.perf_counter``; gradients are reset (``None``) before each sample; a warm-up,
then the Tucker layer and the dense layer in interleaved rounds (alternating which goes first),
so both see the same machine state. ``time`` is the best sample, ``ratio`` the ratio of best
samples; the median of the per-round ratios is reported next to it. Pass / fail is decided on
``ratio``. ``torch.set_num_threads`` is left at its default. The machine may be shared: the CPU
time other processes used is read from ``/proc/stat`` during each measurement, and a result is
flagged ``noisy`` when they used > 5% of the CPUs or the median sample exceeds 1.5x the best;
``--wait-idle SECONDS`` first waits for a quiet machine.

Run from the repository root::

    python benchmarks/bench_torch_conv.py            # writes benchmarks/results/torch_conv.json
    python benchmarks/bench_torch_conv.py --quick    # fewer rounds
    python benchmarks/bench_torch_conv.py --strict   # exit status 1 when the target fails
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import torch
from _common import BUSY_SHARE, CpuMonitor, wait_until_idle  # noqa: E402
from torch import nn
from tuckerman.integrations.torch import TuckerConv2d

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "torch_conv.json"

CHANNELS, KERNEL, MAP, BATCH = 256, 3, 32, 32
TARGET_FRACTION = 0.08  # factorized / dense weight parameters
TARGET_RATIO = 0.45  # Tucker fwd+bwd time / nn.Conv2d fwd+bwd time
NOISY_SPREAD = 1.5
SEED = 0


# --------------------------------------------------------------------------- machine state


def environment() -> dict:
    return _common.environment(
        ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "DNNL_", "ONEDNN_"),
        torch=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        mkldnn_enabled=torch.backends.mkldnn.is_available(),
    )


# --------------------------------------------------------------------------- the layers
def weight_parameters(r: int) -> int:
    """Core + factors of a TuckerConv2d(256, 256, 3) at channel ranks (r, r), kernel full."""
    k2 = KERNEL * KERNEL
    return r * r * k2 + 2 * CHANNELS * r + 2 * KERNEL * KERNEL


def choose_rank() -> int:
    dense = CHANNELS * CHANNELS * KERNEL * KERNEL
    return min(
        range(1, CHANNELS + 1), key=lambda r: abs(weight_parameters(r) / dense - TARGET_FRACTION)
    )


def compare(op: Callable[[], Any], base: Callable[[], Any], *, rounds: int, warmup: int) -> dict:
    """Time ``op`` and ``base`` in interleaved rounds (one call per sample)."""
    monitor = CpuMonitor()
    for _ in range(warmup):
        op()
        base()
    t_op: list[float] = []
    t_base: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                fn, out = (op, t_op) if which == 0 else (base, t_base)
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    spread = max(statistics.median(t_op) / min(t_op), statistics.median(t_base) / min(t_base))
    cpu = monitor.report()
    share = cpu.get("other_processes_cpu_share")
    return {
        "time_s": min(t_op),
        "time_median_s": statistics.median(t_op),
        "baseline_s": min(t_base),
        "baseline_median_s": statistics.median(t_base),
        "ratio": min(t_op) / min(t_base),
        "ratio_median": statistics.median(a / b for a, b in zip(t_op, t_base, strict=True)),
        "rounds": rounds,
        "noisy": bool(spread > NOISY_SPREAD or (share is not None and share > BUSY_SHARE)),
        "spread (median/best, worse of op and baseline)": spread,
        **cpu,
    }


def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(g)

    return step


def run(rounds: int, warmup: int) -> dict:
    torch.manual_seed(SEED)
    r = choose_rank()
    dense = nn.Conv2d(CHANNELS, CHANNELS, KERNEL, padding=1)
    tucker = TuckerConv2d(CHANNELS, CHANNELS, KERNEL, padding=1, ranks=(r, r))
    dense_weight = math.prod(dense.weight.shape)
    tucker_weight = tucker.num_parameters() - CHANNELS  # minus the bias
    assert tucker_weight == weight_parameters(r)
    x = torch.randn(BATCH, CHANNELS, MAP, MAP)
    g = torch.randn(BATCH, CHANNELS, MAP, MAP)

    # sanity: the factorized forward equals nn.Conv2d with the dense weight C ×_k U_k
    with torch.no_grad():
        ref = nn.Conv2d(CHANNELS, CHANNELS, KERNEL, padding=1)
        ref.weight.copy_(tucker.dense_weight())
        ref.bias.copy_(tucker.bias)
        y, y_ref = tucker(x), ref(x)
        rel_diff = float(torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref))
    del ref, y, y_ref

    results = []
    for case, needs_grad, target in (
        ("input grad", True, TARGET_RATIO),
        ("no input grad", False, None),
    ):
        x.requires_grad_(needs_grad)
        m = compare(fwd_bwd(tucker, x, g), fwd_bwd(dense, x, g), rounds=rounds, warmup=warmup)
        m.update(
            case=case,
            target=target,
            passed=None if target is None else bool(m["ratio"] <= target),
        )
        results.append(m)
        status = "-" if target is None else ("pass" if m["passed"] else "FAIL")
        print(
            f"  {case:14s} {m['time_s'] * 1e3:8.1f} ms vs {m['baseline_s'] * 1e3:8.1f} ms  "
            f"ratio {m['ratio']:.3f} (median {m['ratio_median']:.3f})  {status}"
            f"{'  [noisy]' if m['noisy'] else ''}  "
            f"others used {m.get('other_processes_cpu_share')} of the CPUs",
            flush=True,
        )
    return {
        "config": {
            "in_channels": CHANNELS,
            "out_channels": CHANNELS,
            "kernel_size": KERNEL,
            "padding": 1,
            "map": [MAP, MAP],
            "batch": BATCH,
            "dtype": "float32",
            "device": "cpu",
            "ranks": list(tucker.ranks),
            "weight_parameters": tucker_weight,
            "dense_weight_parameters": dense_weight,
            "weight_fraction": tucker_weight / dense_weight,
            "parameters_with_bias": tucker.num_parameters(),
            "dense_parameters_with_bias": tucker.num_parameters_dense(),
        },
        "checks": {"forward_vs_dense_conv_rel_diff": rel_diff},
        "results": results,
    }


def table(report: dict) -> str:
    c = report["config"]
    head = (
        f"TuckerConv2d {c['in_channels']}->{c['out_channels']} {c['kernel_size']}x"
        f"{c['kernel_size']}, {c['map'][0]}x{c['map'][1]} maps, batch {c['batch']}, ranks "
        f"{tuple(c['ranks'])}: {100 * c['weight_fraction']:.2f}% of the dense weight's "
        f"parameters; torch {report['environment']['torch']}, "
        f"{report['environment']['torch_num_threads']} threads"
    )
    rows = [("case", "tucker fwd+bwd", "nn.Conv2d", "ratio", "median", "target", "status")]
    for m in report["results"]:
        status = "-" if m["target"] is None else ("pass" if m["passed"] else "FAIL")
        rows.append(
            (
                m["case"],
                f"{m['time_s'] * 1e3:.1f} ms",
                f"{m['baseline_s'] * 1e3:.1f} ms",
                f"{m['ratio']:.3f}",
                f"{m['ratio_median']:.3f}",
                "-" if m["target"] is None else f"<= {m['target']}",
                status + (" [noisy]" if m["noisy"] else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: tuple) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    return "\n".join(
        [head, line(rows[0]), line(tuple("-" * w for w in widths))] + [line(r) for r in rows[1:]]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait (at most this long) until other processes use < 5%% of the CPUs",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target fails")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 15)
    warmup = 1 if args.quick else 3
    waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    print(f"bench_torch_conv: {rounds} rounds, torch {torch.__version__}", flush=True)
    report = run(rounds, warmup)
    report["environment"] = environment()
    report["environment"]["waited_for_idle_s"] = round(waited, 1)
    text = table(report)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    failed = any(m["passed"] is False for m in report["results"])
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
