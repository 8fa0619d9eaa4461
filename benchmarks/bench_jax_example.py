"""Wall time of the JAX example against the torch main job, one epoch each, on the same machine.

Both are the same task (LeNet5 with two Tucker layers, rank-adaptive TDLRT, bundled MNIST, batch
32, one epoch, CPU) run as a user runs them, each in a fresh process (imports, data, JAX's
compilation, evaluation and plots included):

- ``jax``: ``python examples/jax_mnist.py --epochs 1 --seed S``
- ``torch``: ``tuckerman train --epochs 1 --seed S --no-progress --out <tmp>``

The two alternate (the order rotates every round) so that both see the same load; the median
per command and the ratio of medians ``jax / torch`` are reported (target ≤ 2), with the
accuracy each printed. Results go to ``--out`` (default ``benchmarks/results/jax_example.json``).

Run from the repository root::

    nice -n 5 python benchmarks/bench_jax_example.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402
from _common import CpuMonitor  # noqa: E402

ROOT = _common.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "jax_example.json"
TARGET = 2.0


def commands(seed: int, out: Path) -> dict[str, list[str]]:
    exe = Path(sys.executable)
    tuckerman = exe.with_name("tuckerman")
    return {
        "jax": [
            str(exe),
            str(ROOT / "examples" / "jax_mnist.py"),
            "--epochs",
            "1",
            "--seed",
            str(seed),
        ],
        "torch": [
            str(tuckerman),
            "train",
            "--epochs",
            "1",
            "--seed",
            str(seed),
            "--no-progress",
            "--out",
            str(out),
        ],
    }


def accuracy_of(name: str, text: str) -> float | None:
    pattern = r"test_accuracy=([0-9.]+)" if name == "jax" else r"test accuracy: ([0-9.]+)%"
    found = re.findall(pattern, text)
    if not found:
        return None
    value = float(found[-1])
    return value if name == "torch" else 100 * value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    samples: dict[str, list[dict]] = {"jax": [], "torch": []}
    monitor = CpuMonitor()
    work = Path(tempfile.mkdtemp(prefix="bench_jax_example_"))
    try:
        for rnd in range(args.rounds):
            order = ["jax", "torch"] if rnd % 2 == 0 else ["torch", "jax"]
            for name in order:
                out = work / f"run{rnd}"
                cmd = commands(args.seed, out)[name]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{name} failed with exit status {proc.returncode}")
                acc = accuracy_of(name, proc.stdout)
                samples[name].append({"wall_s": round(wall, 2), "test_accuracy_percent": acc})
                print(f"round {rnd} {name:>5}: {wall:6.1f} s  test accuracy {acc}%", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(s["wall_s"] for s in v) for k, v in samples.items()}
    ratio = med["jax"] / med["torch"]
    result = {
        "benchmark": "bench_jax_example",
        "description": __doc__,
        "environment": _common.environment(),
        "load": monitor.report(),
        "rounds": args.rounds,
        "seed": args.seed,
        "samples": samples,
        "median_wall_s": med,
        "ratio_jax_over_torch": round(ratio, 3),
        "target": TARGET,
        "target_met": ratio <= TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(
        f"median: jax {med['jax']:.1f} s, torch {med['torch']:.1f} s, ratio {ratio:.2f} "
        f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
