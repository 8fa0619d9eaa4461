"""Time per training step of LeNet5 on MNIST batches in JAX: TDLRT against dense and fixed rank.

Three steps on the same model (conv 1→20 5×5 dense, conv 20→50 5×5, fc 800→500, fc 500→10
dense; NHWC; float32; CPU), all jitted, timed in interleaved rounds on the same batches:

- ``dense``: the baseline, ``jax.value_and_grad`` + ``optax.sgd(0.05, momentum=0.9)`` with the
  middle two layers dense;
- ``tdlrt``: ``TDLRT.step`` (two gradient evaluations, augmentation, Galerkin step, truncation
  with the rank decision on device, one host sync for the new ranks, bucket bookkeeping) with
  the middle two layers Tucker (start ranks conv2 (32, 16, 5, 5), fc1 48, channel modes
  adaptive, ``tau = 0.1``, ``max_rank = 48``, as in ``examples/jax_mnist.py``);
- ``fixed``: the same with ``fixed_rank=True`` (the fixed-rank integrator: same work, no rank
  change).

Reported: the best sample of each, the ratios ``tdlrt / dense`` and ``tdlrt / fixed`` of best
samples, and the median of the per-round ratios. Batch sizes 64 and 256. Compilation is
excluded (warm-up). The machine may be shared: the CPU time other processes used is recorded
and a result is flagged ``noisy`` when they used > 5% of the CPUs or the median sample exceeds
1.5x the best.

Run from the repository root::

    python benchmarks/bench_jax_tdlrt.py            # writes benchmarks/results/jax_tdlrt.json
    python benchmarks/bench_jax_tdlrt.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import BUSY_SHARE, CpuMonitor, wait_until_idle
from jax import lax
from tuckerman.integrations.jax import (
    TDLRT,
    init_tucker_conv,
    init_tucker_dense,
    tucker_conv,
    tucker_dense,
)

from tuckerman.datasets import load_mnist

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "jax_tdlrt.json"
DIMS = ("NHWC", "OIHW", "NHWC")


def _uniform(key: Any, shape: tuple, fan_in: int) -> Any:
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def init(key: Any, tucker: bool) -> dict:
    k = jax.random.split(key, 8)
    p = {
        "conv1": {"w": _uniform(k[0], (20, 1, 5, 5), 25), "b": _uniform(k[1], (20,), 25)},
        "fc2": {"w": _uniform(k[2], (10, 500), 500), "b": _uniform(k[3], (10,), 500)},
    }
    if tucker:
        p["conv2"] = init_tucker_conv(k[4], 20, 50, 5, ranks=(32, 16))
        p["fc1"] = init_tucker_dense(k[5], 800, 500, ranks=48)
    else:
        p["conv2"] = {"w": _uniform(k[4], (50, 20, 5, 5), 500), "b": _uniform(k[6], (50,), 500)}
        p["fc1"] = {"w": _uniform(k[5], (500, 800), 800), "b": _uniform(k[7], (500,), 800)}
    return p


def _pool(h: Any) -> Any:
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def forward(p: dict, x: Any) -> Any:
    h = lax.conv_general_dilated(x, p["conv1"]["w"], (1, 1), "VALID", dimension_numbers=DIMS)
    h = _pool(jax.nn.relu(h + p["conv1"]["b"]))
    if "weight" in p["conv2"]:
        h = tucker_conv(p["conv2"], h)
    else:
        h = lax.conv_general_dilated(h, p["conv2"]["w"], (1, 1), "VALID", dimension_numbers=DIMS)
        h = h + p["conv2"]["b"]
    h = _pool(jax.nn.relu(h)).reshape(x.shape[0], -1)
    if "weight" in p["fc1"]:
        h = tucker_dense(p["fc1"], h)
    else:
        h = h @ p["fc1"]["w"].T + p["fc1"]["b"]
    return jax.nn.relu(h) @ p["fc2"]["w"].T + p["fc2"]["b"]


def loss_fn(p: dict, batch: tuple) -> Any:
    logits = forward(p, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def make_steps(batches: list) -> dict:
    """One callable per method; each takes a batch index and runs one (blocking) step."""
    dense_tx = optax.sgd(0.05, momentum=0.9)
    holder: dict[str, Any] = {}
    holder["dense"] = [init(jax.random.key(0), False)]
    holder["dense"].append(dense_tx.init(holder["dense"][0]))

    @jax.jit
    def dense_step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = dense_tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    def run_dense(i: int) -> None:
        p, s, loss = dense_step(*holder["dense"], batches[i])
        jax.block_until_ready(loss)
        holder["dense"] = [p, s]

    steps = {"dense": run_dense}
    for name, fixed in (("tdlrt", False), ("fixed", True)):
        tx = TDLRT(
            0.05, tau=0.1, momentum=0.9, max_rank=48, adaptive_modes=(0, 1), fixed_rank=fixed
        )
        p = init(jax.random.key(0), True)
        holder[name] = [tx, p, tx.init(p)]

        def run(i: int, name: str = name) -> None:
            tx, p, s = holder[name]
            p, s, loss = tx.step(p, s, loss_fn, batches[i])  # syncs on the new ranks
            jax.block_until_ready(loss)
            holder[name] = [tx, p, s]

        steps[name] = run
    return steps, holder


def measure(batch_size: int, rounds: int, warmup: int) -> dict:
    x, y = load_mnist("train")
    x = np.transpose(x, (0, 2, 3, 1))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):
        idx = rng.choice(len(x), batch_size, replace=False)
        batches.append((jnp.asarray(x[idx]), jnp.asarray(y[idx])))
    steps, holder = make_steps(batches)
    for i in range(warmup):
        for f in steps.values():
            f(i % len(batches))
    samples: dict[str, list[float]] = {k: [] for k in steps}
    monitor = CpuMonitor()
    order = list(steps)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            steps[name](r % len(batches))
            samples[name].append(time.perf_counter() - t)
    load = monitor.report()
    best = {k: min(v) for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    per_round = {
        "tdlrt/dense": statistics.median(a / b for a, b in zip(samples["tdlrt"], samples["dense"])),
        "tdlrt/fixed": statistics.median(a / b for a, b in zip(samples["tdlrt"], samples["fixed"])),
    }
    tx = holder["tdlrt"][0]
    noisy = (load.get("other_processes_cpu_share") or 0) > BUSY_SHARE or any(
        med[k] > 1.5 * best[k] for k in best
    )
    return {
        "batch_size": batch_size,
        "time_s": {k: round(v, 6) for k, v in best.items()},
        "median_time_s": {k: round(v, 6) for k, v in med.items()},
        "ratio": {
            "tdlrt/dense": round(best["tdlrt"] / best["dense"], 3),
            "tdlrt/fixed": round(best["tdlrt"] / best["fixed"], 3),
        },
        "median_round_ratio": {k: round(v, 3) for k, v in per_round.items()},
        "tdlrt_ranks_at_end": tx.ranks(holder["tdlrt"][2]),
        "tdlrt_compilations": tx.compilations,
        "rounds": rounds,
        "load": load,
        "noisy": bool(noisy),
    }


def environment() -> dict:
    return _common.environment(
        ("XLA_FLAGS", "OMP_", "OPENBLAS_"),
        jax=jax.__version__,
        optax=optax.__version__,
        numpy=np.__version__,
        jax_devices=[str(d) for d in jax.devices()],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    rounds, warmup = (10, 3) if args.quick else (40, 10)
    results = []
    for b in (64, 256):
        r = measure(b, rounds, warmup)
        results.append(r)
        t = r["time_s"]
        print(
            f"batch {b:4d}: dense {1e3 * t['dense']:7.2f} ms  tdlrt {1e3 * t['tdlrt']:7.2f} ms  "
            f"fixed {1e3 * t['fixed']:7.2f} ms  tdlrt/dense {r['ratio']['tdlrt/dense']:.2f} "
            f"(median {r['median_round_ratio']['tdlrt/dense']:.2f})  tdlrt/fixed "
            f"{r['ratio']['tdlrt/fixed']:.2f}  ranks {r['tdlrt_ranks_at_end']}"
            + ("  [noisy]" if r["noisy"] else ""),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "environment": environment()}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
