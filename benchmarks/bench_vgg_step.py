"""Cost of one TDLRT training step on a VGG-like network, against the dense training step.

Model: ``vgg-small`` (``tuckerman.integrations.torch.build_model``: six 3×3 conv-BN-ReLU layers,
64-128-256 channels, global average pooling, fc 256→256, fc 256→10) on 3×32×32 inputs (CIFAR
shape), batch 64 of random data (Gaussian images, uniform labels), float32, CPU. The factorized
model is ``tuckerize(model, ranks=0.15, init="random")``: every conv but the first and fc
256→256 become Tucker layers with channel ranks 15% of full (kernel modes full), a compression
rate of about 93% (c.r. = 1 - factorized / dense parameters of those layers, checked >= 90%).

Four variants, each with its own model and optimizer, on the same batch:

- ``dense``: ``torch.optim.SGD(lr=0.01, momentum=0.9)``; a step is zero_grad, forward, backward,
  ``opt.step()``.
- ``tdlrt``: ``TDLRT(lr=0.01, momentum=0.9, fixed_rank=True)``, ``opt.step(closure)``: the
  two-pass step (gradient at the current point, augmentation, the exact gradient in the
  augmented bases replayed from the first pass, ``second_pass="replay"``), QR of the augmented
  bases and SVD truncation of the cores. ``fixed_rank=True`` keeps the ranks (and so the cost)
  constant over the repeats; the rank-adaptive step (``tau``) does the same work on the same
  shapes (within a capacity) and only picks other ranks.
- ``tdlrt-closure``: the same with ``second_pass="closure"``: the closure called a second time
  with the layers evaluating their augmented weights (the literal two forward/backward passes).
- ``tdlrt-1pass``: the same with ``one_pass=True``: one forward/backward pass, the core gradient
  in the augmented bases from the Riemannian gradient at the current point.

What a GPU feels is counted on one profiled step of each variant (``torch.profiler``): host
synchronizations (``aten::_local_scalar_dense``, e.g. LAPACK's convergence checks), QR and SVD
calls (``aten::linalg_qr``, ``aten::linalg_svd``), and the reads of tensor values by tuckerman's
own code (``.tolist()``/``.item()``/``bool()``..., which on CPU tensors the profiler does not
see); and whether the ``nn.Parameter`` objects are the same after 20 steps.

Time: after a warm-up, the three variants are timed in interleaved rounds (the order rotates
every round), one step per sample, ``time.perf_counter``; the median per variant and the ratio
of medians to ``dense`` (and the median of per-round ratios) are reported. The CPU share used by
other processes during the timing (``_common.CpuMonitor``) flags a noisy run (> 5%).

Peak memory: each variant in a fresh subprocess: build the model, data and optimizer, run one
step (one-time costs: library code paged in, momentum buffers created), hand the freed heap back
to the OS (glibc ``malloc_trim(0)``) so that the resident set size is live memory, record it
(``VmRSS``), reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5), run a few more
steps and report ``VmHWM - VmRSS_before``: the peak resident memory a steady-state training
step adds to what the process already holds (activations, gradients, temporaries, the
augmented parameters of TDLRT). Resident memory is what the process holds from the OS, so the
numbers are coarse (a few MiB). When the counter cannot be reset, ``ru_maxrss`` is used (it
then includes construction) and the row says so.

Torch runs on one thread by default (``--threads``): the machine is shared, and a multi-threaded
GEMM stalls when another process takes a core.

Run from the repository root (about 3 minutes on a busy 2-core machine)::

    python benchmarks/bench_vgg_step.py            # writes benchmarks/results/vgg_step.json
    python benchmarks/bench_vgg_step.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import BUSY_SHARE, CpuMonitor, wait_until_idle  # noqa: E402
from bench_mnist_study import environment  # noqa: E402
from torch import nn
from tuckerman.integrations.torch import TDLRT, build_model, compression_report, tuckerize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vgg_step.json"

MODEL, CHANNELS, SIZE, CLASSES = "vgg-small", 3, 32, 10
BATCH = 64
RANK_FRACTION = 0.15
MIN_COMPRESSION = 0.90
LR, MOMENTUM = 0.01, 0.9
VARIANTS = ("dense", "tdlrt", "tdlrt-closure", "tdlrt-1pass")
TDLRT_VARIANTS = VARIANTS[1:]
# the targets of the device-grade step issue, on CPU (ratios of medians to the dense step)
TARGETS = {"tdlrt": 0.9, "tdlrt-1pass": 0.4}
MAX_SYNCS, MAX_LINALG = 2, 24
SEED = 0


def build(variant: str, batch: int) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    """Model, a ``step()`` callable and the batch of one variant (same init and data)."""
    torch.manual_seed(SEED)
    model = build_model(MODEL, in_channels=CHANNELS, num_classes=CLASSES, image_size=SIZE)
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    if variant == "dense":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    elif variant in TDLRT_VARIANTS:
        tuckerize(model, ranks=RANK_FRACTION, init="random")
        opt = TDLRT(
            model,
            lr=LR,
            momentum=MOMENTUM,
            fixed_rank=True,
            one_pass=variant == "tdlrt-1pass",
            second_pass="closure" if variant == "tdlrt-closure" else "replay",
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if variant == "dense":

        def step() -> None:
            closure()
            opt.step()

    else:

        def step() -> None:
            opt.step(closure)

    return model, step, x, y


# --------------------------------------------------------------------------- memory (child)
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``: return free heap memory to the OS (False when unavailable)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def memory_child(variant: str, steps: int, batch: int) -> dict:
    """Run in a subprocess: extra peak RSS of ``steps`` training steps (see module doc)."""
    model, step, _, _ = build(variant, batch)
    step()  # one-time costs: library code paged in, momentum buffers created
    gc.collect()
    trimmed = _malloc_trim()  # hand freed heap pages back, so that RSS is live memory
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method = "VmHWM after resetting the peak (clear_refs 5) minus VmRSS before the steps"
    except OSError:
        method = "ru_maxrss (not reset: includes construction) minus VmRSS before the steps"
    for _ in range(steps):
        step()
    after = _status_kib("VmRSS")
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant,
        "steps": steps,
        "rss_before_kib": before,
        "peak_kib": peak,
        "extra_peak_mib": None if peak is None or before is None else (peak - before) / 1024,
        "rss_after_kib": after,
        "malloc_trim": trimmed,
        "method": method,
        "parameters": params,
    }


def measure_memory(variant: str, steps: int, batch: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        variant,
        "--memory-steps",
        str(steps),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- what a GPU feels
def _package_dirs() -> tuple[str, ...]:
    import tuckerman.backends
    import tuckerman.integrations

    import tuckerman

    return tuple(str(Path(m.__file__).parent) for m in (tuckerman, tuckerman.integrations,
                                                        tuckerman.backends))  # fmt: skip


def count_step(variant: str, batch: int, identity_steps: int = 20) -> dict:
    """Profiler counts of one step, tuckerman's own host reads, and parameter identity."""
    from torch.profiler import ProfilerActivity, profile

    model, step, _, _ = build(variant, batch)
    for _ in range(2):
        step()
    ours, reads = _package_dirs(), []
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "item", "__bool__", "__int__",
                                                        "__float__")}  # fmt: skip

    def spy(name):
        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                reads.append(name)
            return originals[name](self, *a, **k)

        return read

    for n in originals:
        setattr(torch.Tensor, n, spy(n))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    names = [e.name for e in prof.events()]
    objects = [id(p) for p in model.parameters()]
    for _ in range(identity_steps):
        step()
    return {
        "variant": variant,
        "host_syncs": names.count("aten::_local_scalar_dense"),
        "tuckerman_host_reads": len(reads),
        "qr_calls": names.count("aten::linalg_qr"),
        "svd_calls": names.count("aten::linalg_svd"),
        "same_parameters_after_steps": [id(p) for p in model.parameters()] == objects,
        "identity_steps": identity_steps,
    }


# --------------------------------------------------------------------------- time (interleaved)
def measure_time(rounds: int, warmup: int, batch: int) -> dict:
    steps = {}
    info = {}
    for v in VARIANTS:
        model, step, _, _ = build(v, batch)
        steps[v] = step
        if v != "dense":
            rep = compression_report(model)
            info[v] = {
                "compression_rate": rep["compression_rate"],
                "ranks": {layer["name"]: layer["ranks"] for layer in rep["layers"]},
                "parameters": rep["model_parameters"],
                "dense_parameters": rep["model_dense_parameters"],
                "model": model,
            }
    for _ in range(warmup):
        for v in VARIANTS:
            steps[v]()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    monitor = CpuMonitor()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            j = i % len(VARIANTS)
            order = VARIANTS[j:] + VARIANTS[:j]
            for v in order:
                start = time.perf_counter()
                steps[v]()
                samples[v].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    cpu = monitor.report()
    for v in TDLRT_VARIANTS:  # fixed_rank: the ranks must not have moved
        rep = compression_report(info[v].pop("model"))
        ranks_after = {layer["name"]: layer["ranks"] for layer in rep["layers"]}
        if ranks_after != info[v]["ranks"]:
            raise RuntimeError(f"{v}: ranks changed during timing: {ranks_after}")
    return {"samples": samples, "cpu": cpu, "tucker": info}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps in the memory child")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="subprocesses per variant (median)"
    )
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait (at most this long) until other processes use < 5%% of the CPUs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_steps, args.batch)))
        return 0
    rounds = args.rounds or (4 if args.quick else 20)
    warmup = 1 if args.quick else 2
    waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    print(
        f"bench_vgg_step: {MODEL} {CHANNELS}x{SIZE}x{SIZE}, batch {args.batch}, {rounds} rounds, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    children = {
        v: [
            measure_memory(v, args.memory_steps, args.batch, args.threads)
            for _ in range(args.memory_repeats)
        ]
        for v in VARIANTS
    }
    memory = {
        v: {
            "extra_peak_mib": statistics.median(c["extra_peak_mib"] for c in runs),
            "extra_peak_mib_range": [
                min(c["extra_peak_mib"] for c in runs),
                max(c["extra_peak_mib"] for c in runs),
            ],
            "parameters": runs[0]["parameters"],
            "method": runs[0]["method"],
            "children": runs,
        }
        for v, runs in children.items()
    }
    counts = {v: count_step(v, args.batch) for v in TDLRT_VARIANTS}
    timing = measure_time(rounds, warmup, args.batch)
    samples = timing["samples"]
    share = timing["cpu"].get("other_processes_cpu_share")
    noisy = share is not None and share > BUSY_SHARE
    cr = timing["tucker"]["tdlrt"]["compression_rate"]
    if cr < MIN_COMPRESSION:
        raise RuntimeError(f"compression rate {cr:.3f} < {MIN_COMPRESSION}")
    dense_med = statistics.median(samples["dense"])
    rows = []
    for v in VARIANTS:
        med = statistics.median(samples[v])
        per_round = [a / b for a, b in zip(samples[v], samples["dense"], strict=True)]
        mem = memory[v]
        rows.append(
            {
                "variant": v,
                "median_s": med,
                "best_s": min(samples[v]),
                "ratio_vs_dense": med / dense_med,
                "ratio_vs_dense_median_per_round": statistics.median(per_round),
                "extra_peak_mib": mem["extra_peak_mib"],
                "extra_peak_mib_range": mem["extra_peak_mib_range"],
                "memory_ratio_vs_dense": (
                    None
                    if mem["extra_peak_mib"] is None
                    else mem["extra_peak_mib"] / memory["dense"]["extra_peak_mib"]
                ),
                "parameters": mem["parameters"],
                "samples_s": [round(s, 4) for s in samples[v]],
            }
        )
    head = (
        "variant",
        "median step",
        "vs dense",
        "per-round",
        "extra peak RSS (range)",
        "vs dense",
        "params",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["variant"],
                f"{1e3 * r['median_s']:.0f} ms",
                f"{r['ratio_vs_dense']:.2f}x",
                f"{r['ratio_vs_dense_median_per_round']:.2f}x",
                f"{r['extra_peak_mib']:.0f} MiB ({r['extra_peak_mib_range'][0]:.0f}-"
                f"{r['extra_peak_mib_range'][1]:.0f})",
                f"{r['memory_ratio_vs_dense']:.2f}x",
                f"{r['parameters']:,}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = "\n".join(["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines])
    print(
        f"\nc.r. {100 * cr:.1f}% (ranks {timing['tucker']['tdlrt']['ranks']}); "
        f"others used {share} of the CPUs{' [noisy]' if noisy else ''}"
    )
    print(text)
    print("\nper step (one profiled step; parameter identity over 20 steps):")
    for v, c in counts.items():
        print(
            f"  {v}: {c['host_syncs']} host sync(s), {c['tuckerman_host_reads']} read(s) by "
            f"tuckerman, {c['qr_calls']} QR + {c['svd_calls']} SVD calls, same parameters: "
            f"{c['same_parameters_after_steps']}"
        )
    ratios = {r["variant"]: r["ratio_vs_dense"] for r in rows}
    checks = {f"{v} <= {t}x dense": ratios[v] <= t for v, t in TARGETS.items()}
    c2 = counts["tdlrt"]
    checks[f"two-pass host syncs <= {MAX_SYNCS}"] = (
        c2["host_syncs"] + c2["tuckerman_host_reads"] <= MAX_SYNCS
    )
    checks[f"two-pass QR/SVD calls <= {MAX_LINALG}"] = (
        c2["qr_calls"] + c2["svd_calls"] <= MAX_LINALG
    )
    checks["same nn.Parameter objects after 20 steps"] = all(
        c["same_parameters_after_steps"] for c in counts.values()
    )
    print("\ntargets:")
    for name, ok in checks.items():
        print(f"  {'met' if ok else 'MISSED'}: {name}")
    report = {
        "config": {
            "model": MODEL,
            "input": [args.batch, CHANNELS, SIZE, SIZE],
            "dtype": "float32",
            "device": "cpu",
            "rank_fraction": RANK_FRACTION,
            "lr": LR,
            "momentum": MOMENTUM,
            "rounds": rounds,
            "warmup": warmup,
            "memory_steps": args.memory_steps,
            "tucker": timing["tucker"],
        },
        "results": rows,
        "counts": counts,
        "targets": checks,
        "memory": memory,
        "cpu": timing["cpu"],
        "noisy": noisy,
        "environment": {**environment(), "waited_for_idle_s": round(waited, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
