"""Speed and memory of the fixed-rank Tucker manifold against baselines measured in the same run.

Targets (NumPy, float64, shape 128^3, ranks 8 unless stated):

1. ``M.retract(x, v)`` takes <= 0.02x the dense route: form ``X + xi`` densely
   (``x.to_dense() + M.tangent_to_dense(x, v)``) and truncate it by ST-HOSVD
   (``tm.hosvd(dense, ranks)``); forming the dense tensor is counted.
2. ``M.project(x, G)`` of a dense ``G`` takes <= 3x one pass over ``G``, where one pass is
   ``np.tensordot(U1.T, G, axes=(1, 0))`` (``U1`` the first factor, 128 x 8).
3. A retraction at 400^3, ranks 5, allocates < 5% of the bytes of the dense 400^3 float64 tensor
   (tracemalloc peak during ``M.retract`` only; ``x`` and ``v`` exist before, nothing dense is
   formed).
4. The same retract / project timings on torch (CPU, float64) and on JAX (CPU, float64, jitted,
   compilation excluded), each against a baseline in the same library: reported, no target.

``project`` on NumPy is measured twice: ``[fresh]``, first thing in the process, before any large
array has been freed (glibc's malloc then still uses its initial mmap / trim thresholds and may
hand megabyte temporaries back to the OS after every call), and ``[warm]``, after the dense
retraction route has allocated and freed 16 MiB arrays (the steady state of a loop that computes
dense gradients). Minor page faults per call are reported for both. ``retract [vs eigh]`` is an
extra row without target: the dense route with a lean Gram-eigh ST-HOSVD instead of ``tm.hosvd``.

Timing: ``time.perf_counter``; after a warm-up the operation and its baseline are timed in
interleaved rounds (alternating which goes first), so both see the same machine state. A sample of
a fast operation averages several calls (about 5 ms per sample). ``time`` is the best sample,
``ratio`` the ratio of best samples (the least disturbed estimate on a shared machine); the median
of the per-round ratios is reported next to it. Pass / fail is decided on ``ratio``. The machine
may be shared: CPU time used by other processes is read from ``/proc/stat`` during each
measurement, and a measurement is flagged ``noisy`` when others used > 5% of the CPUs or the
median sample exceeds 1.5x the best; ``--wait-idle SECONDS`` first waits for a quiet machine.

Run from the repository root::

    python benchmarks/bench_manifold.py            # writes benchmarks/results/manifold.json
    python benchmarks/bench_manifold.py --quick    # fewer rounds
    python benchmarks/bench_manifold.py --backends numpy --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: E402
import numpy as np
from _common import BUSY_SHARE, CpuMonitor, wait_until_idle  # noqa: E402

import tuckerman as tm

try:  # minor page faults per call: a diagnostic, Unix only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "manifold.json"

SHAPE, RANKS = (128, 128, 128), 8
MEM_SHAPE, MEM_RANKS = (400, 400, 400), 5
TARGET_RETRACT = 0.02  # retract / dense route
TARGET_PROJECT = 3.0  # project / one pass over G
TARGET_MEMORY = 0.05  # peak bytes / dense bytes
SEED_POINT, SEED_TANGENT, SEED_AMBIENT = 0, 1, 2
SAMPLE_SECONDS = 0.005  # a sample of a fast operation averages calls for about this long
NOISY_SPREAD = 1.5  # median / best above this: the machine was disturbed during the measurement


# --------------------------------------------------------------------------- timing
def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _calls_per_sample(fn: Callable[[], Any]) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(200, int(SAMPLE_SECONDS / max(once, 1e-9))))


def _sample(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(op: Callable[[], Any], base: Callable[[], Any], *, rounds: int, warmup: int) -> dict:
    """Time ``op`` and ``base`` (both already synchronous) in interleaved rounds."""
    monitor = CpuMonitor()
    for _ in range(warmup):
        op()
        base()
    n_op, n_base = _calls_per_sample(op), _calls_per_sample(base)
    t_op, t_base, f_op, f_base = [], [], 0, 0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                f0 = _faults()
                if which == 0:
                    t_op.append(_sample(op, n_op))
                    f_op += _faults() - f0
                else:
                    t_base.append(_sample(base, n_base))
                    f_base += _faults() - f0
    finally:
        if gc_was_enabled:
            gc.enable()
    spread = max(statistics.median(t_op) / min(t_op), statistics.median(t_base) / min(t_base))
    share = monitor.report().get("other_processes_cpu_share")
    busy = share is not None and share > BUSY_SHARE
    return {
        "time_s": min(t_op),
        "time_median_s": statistics.median(t_op),
        "baseline_s": min(t_base),
        "baseline_median_s": statistics.median(t_base),
        "ratio": min(t_op) / min(t_base),
        "ratio_median": statistics.median(a / b for a, b in zip(t_op, t_base, strict=True)),
        "rounds": rounds,
        "noisy": bool(spread > NOISY_SPREAD or busy),
        "other_processes_cpu_share": share,
        "spread (median/best, worse of op and baseline)": spread,
        "calls_per_sample": [n_op, n_base],
        "minor_faults_per_call": [
            f_op / (rounds * n_op) if resource is not None else None,
            f_base / (rounds * n_base) if resource is not None else None,
        ],
    }


# --------------------------------------------------------------------------- environment


def _blas_info() -> dict:
    try:
        import threadpoolctl

        return {"threadpoolctl": threadpoolctl.threadpool_info()}
    except ImportError:
        pass
    info: dict = {"threadpoolctl": "not importable"}
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]
        info["numpy"] = {
            part: {k: deps[part].get(k) for k in ("name", "version", "openblas configuration")}
            for part in ("blas", "lapack")
            if part in deps
        }
    except Exception as err:  # older NumPy: no mode="dicts"
        info["numpy"] = f"unavailable ({type(err).__name__})"
    return info


def environment() -> dict:
    return _common.environment(
        ("OPENBLAS_", "OMP_", "MKL_", "XLA_FLAGS", "MALLOC_"),
        numpy=np.__version__,
        blas=_blas_info(),
    )


# --------------------------------------------------------------------------- per backend
def _record(
    results: list, op: str, backend: str, m: dict, target: float | None, note: str, condition=""
):
    m = dict(m)
    m.update(
        operation=op,
        condition=condition,
        backend=backend,
        target=target,
        passed=None if target is None else bool(m["ratio"] <= target),
        baseline=note,
    )
    results.append(m)
    status = "-" if target is None else ("pass" if m["passed"] else "FAIL")
    print(
        f"  {_label(m):16s} {backend:6s} {_fmt(m['time_s'])} vs {_fmt(m['baseline_s'])}  "
        f"ratio {m['ratio']:.4g} (median {m['ratio_median']:.4g})  {status}"
        f"{'  [noisy]' if m['noisy'] else ''}  faults/call {_faults_str(m)}",
        flush=True,
    )


def _label(r: dict) -> str:
    return r["operation"] + (f" [{r['condition']}]" if r.get("condition") else "")


def _faults_str(m: dict) -> str:
    f = m.get("minor_faults_per_call") or [None, None]
    return "n/a" if f[0] is None else f"{f[0]:.0f} / {f[1]:.0f}"


def _eigh_st_hosvd(t: np.ndarray, r: int) -> tuple[np.ndarray, list]:
    """A lean dense ST-HOSVD for reference: leading eigenvectors of each unfolding's Gram matrix.

    Same result as ``tm.hosvd`` for these well-conditioned tensors (fixed ranks), but it avoids
    LAPACK's SVD of a wide 128 x 16384 unfolding; a stricter baseline for the retraction.
    """
    factors = []
    for k in range(t.ndim):
        a = np.moveaxis(t, k, 0).reshape(t.shape[k], -1)
        _, vecs = np.linalg.eigh(a @ a.T)
        u = vecs[:, ::-1][:, :r]
        factors.append(u)
        t = np.moveaxis(np.tensordot(u.T, np.moveaxis(t, k, 0), axes=(1, 0)), 0, k)
    return t, factors


def bench_numpy(results: list, plan: dict) -> dict:
    M = tm.FixedRankTucker(SHAPE, RANKS)
    x = M.random_point(key=SEED_POINT)
    v = M.random_tangent(x, key=SEED_TANGENT)
    g = np.random.default_rng(SEED_AMBIENT).standard_normal(SHAPE)
    u1 = x.factors[0]

    def project():
        return compare(
            lambda: M.project(x, g),
            lambda: np.tensordot(u1.T, g, axes=(1, 0)),
            rounds=plan["fast_rounds"],
            warmup=plan["warmup"],
        )

    # First, before this process has freed any large array: glibc's malloc still has its
    # initial mmap / trim thresholds (128 KiB each, raised dynamically once a large mmapped
    # block is freed), so megabyte temporaries may go back to the OS after every call and be
    # page-faulted in again on the next. This is what a short script calling project sees.
    m = project()
    note = "np.tensordot(U1.T, G, axes=(1, 0))"
    _record(results, "project", "numpy", m, TARGET_PROJECT, note, condition="fresh")

    def dense_route():
        return tm.hosvd(x.to_dense() + M.tangent_to_dense(x, v), M.ranks)

    def eigh_route():
        return _eigh_st_hosvd(x.to_dense() + M.tangent_to_dense(x, v), RANKS)

    # sanity: the routes give the same tensor (ST-HOSVD of the same rank <= 2r tensor)
    y, y_ref = M.retract(x, v).to_dense(), dense_route().to_dense()
    y_eigh = tm.TuckerTensor(*eigh_route()).to_dense()
    checks = {
        "retract_vs_dense_route_rel_diff": float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)),
        "retract_vs_eigh_route_rel_diff": float(np.linalg.norm(y - y_eigh) / np.linalg.norm(y)),
        "project_is_tangent": bool(M.check_tangent(x, M.project(x, g))),
    }
    del y, y_ref, y_eigh

    m = compare(
        lambda: M.retract(x, v), dense_route, rounds=plan["slow_rounds"], warmup=plan["warmup"]
    )
    _record(results, "retract", "numpy", m, TARGET_RETRACT, "to_dense + tangent_to_dense + hosvd")
    # informational: the same dense route with a leaner ST-HOSVD (no target)
    m = compare(
        lambda: M.retract(x, v), eigh_route, rounds=plan["fast_rounds"], warmup=plan["warmup"]
    )
    note = "to_dense + tangent_to_dense + Gram-eigh ST-HOSVD (reference, numpy)"
    _record(results, "retract", "numpy", m, None, note, condition="vs eigh")

    # Again, now that large (16 MiB) arrays have been allocated and freed: the steady state of
    # an optimization loop that computes dense gradients.
    m = project()
    _record(results, "project", "numpy", m, TARGET_PROJECT, note, condition="warm")
    return checks


def bench_torch(results: list, plan: dict) -> dict:
    import torch

    M = tm.FixedRankTucker(SHAPE, RANKS)
    x = M.random_point(key=SEED_POINT, xp="torch", dtype=torch.float64)
    v = M.random_tangent(x, key=SEED_TANGENT)
    g = torch.from_numpy(np.random.default_rng(SEED_AMBIENT).standard_normal(SHAPE))
    u1 = x.factors[0]

    def dense_route():
        return tm.hosvd(x.to_dense() + M.tangent_to_dense(x, v), M.ranks)

    with torch.no_grad():
        m = compare(
            lambda: M.retract(x, v), dense_route, rounds=plan["slow_rounds"], warmup=plan["warmup"]
        )
        _record(results, "retract", "torch", m, None, "to_dense + tangent_to_dense + hosvd")
        m = compare(
            lambda: M.project(x, g),
            lambda: torch.tensordot(u1.T, g, dims=([1], [0])),
            rounds=plan["fast_rounds"],
            warmup=plan["warmup"],
        )
        _record(results, "project", "torch", m, None, "torch.tensordot(U1.T, G, dims=([1], [0]))")
    return {"torch": torch.__version__, "torch_num_threads": torch.get_num_threads()}


def bench_jax(results: list, plan: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    M = tm.FixedRankTucker(SHAPE, RANKS)
    x = M.random_point(key=SEED_POINT, xp="jax", dtype=jnp.float64)
    v = M.random_tangent(x, key=SEED_TANGENT)
    g = jnp.asarray(np.random.default_rng(SEED_AMBIENT).standard_normal(SHAPE))
    u1 = x.factors[0]

    retract = jax.jit(M.retract)
    project = jax.jit(M.project)
    dense_route = jax.jit(lambda x, v: tm.hosvd(x.to_dense() + M.tangent_to_dense(x, v), M.ranks))
    one_pass = jax.jit(lambda u, g: jnp.tensordot(u.T, g, axes=(1, 0)))

    compile_s = {}
    for name, fn, args in (
        ("retract", retract, (x, v)),
        ("project", project, (x, g)),
        ("dense_route", dense_route, (x, v)),
        ("one_pass", one_pass, (u1, g)),
    ):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        compile_s[name] = time.perf_counter() - start

    def run(fn, *args):
        return lambda: jax.block_until_ready(fn(*args))

    m = compare(
        run(retract, x, v),
        run(dense_route, x, v),
        rounds=plan["slow_rounds"],
        warmup=plan["warmup"],
    )
    _record(results, "retract", "jax", m, None, "jit(to_dense + tangent_to_dense + hosvd)")
    m = compare(
        run(project, x, g), run(one_pass, u1, g), rounds=plan["fast_rounds"], warmup=plan["warmup"]
    )
    _record(results, "project", "jax", m, None, "jit(jnp.tensordot(U1.T, G, axes=(1, 0)))")
    return {
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "first_call_s (compile + run)": compile_s,
    }


def bench_memory(results: list) -> dict:
    """tracemalloc peak of one NumPy retraction at 400^3, ranks 5 (x and v made beforehand)."""
    M = tm.FixedRankTucker(MEM_SHAPE, MEM_RANKS)
    x = M.random_point(key=SEED_POINT)
    v = M.random_tangent(x, key=SEED_TANGENT)
    M.retract(x, v)  # warm-up: lazy imports and caches are not the retraction's memory
    dense_bytes = math.prod(MEM_SHAPE) * 8
    gc.collect()

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        y = M.retract(x, v)
        _, peak = tracemalloc.get_traced_memory()
        # sanity: tracemalloc sees NumPy buffers (np.empty does not touch the memory)
        tracemalloc.reset_peak()
        probe_before, _ = tracemalloc.get_traced_memory()
        probe = np.empty(math.prod(MEM_SHAPE), dtype=np.float64)
        _, probe_peak = tracemalloc.get_traced_memory()
        del probe
    finally:
        tracemalloc.stop()
    peak_bytes = peak - before
    ratio = peak_bytes / dense_bytes
    input_bytes = sum(int(a.nbytes) for a in (x.core, *x.factors, v.dcore, *v.dfactors))
    m = {
        "operation": "retract memory",
        "backend": "numpy",
        "peak_bytes": peak_bytes,
        "dense_bytes": dense_bytes,
        "input_bytes (x and v)": input_bytes,
        "ratio": ratio,
        "target": TARGET_MEMORY,
        "passed": bool(ratio < TARGET_MEMORY),
        "result_is_point": bool(M.check_point(y)),
        "tracemalloc_sees_numpy": bool(probe_peak - probe_before >= dense_bytes),
        "shape": list(MEM_SHAPE),
        "ranks": MEM_RANKS,
        "baseline": "bytes of the dense 400^3 float64 tensor",
    }
    results.append(m)
    print(
        f"  retract memory numpy  peak {peak_bytes / 2**20:.3f} MiB vs dense "
        f"{dense_bytes / 2**20:.1f} MiB  ratio {ratio:.3g}  "
        f"{'pass' if m['passed'] else 'FAIL'}",
        flush=True,
    )
    return {}


# --------------------------------------------------------------------------- report
def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:7.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:7.2f} ms"
    return f"{seconds:7.3f} s "


def table(results: list) -> str:
    """Markdown table; ``faults/call``: minor page faults per call of the operation / baseline."""
    head = (
        "operation",
        "backend",
        "time",
        "baseline",
        "ratio",
        "ratio (med.)",
        "target",
        "result",
        "faults/call",
    )
    rows = []
    for r in results:
        if r["operation"] == "retract memory":
            t, b = f"{r['peak_bytes'] / 2**20:.3f} MiB", f"{r['dense_bytes'] / 2**20:.1f} MiB"
            med, target, faults = "", f"< {r['target']:g}", ""
        else:
            t, b = _fmt(r["time_s"]).strip(), _fmt(r["baseline_s"]).strip()
            med = f"{r['ratio_median']:.4g}"
            target = "-" if r["target"] is None else f"<= {r['target']:g}"
            faults = _faults_str(r)
        result = "-" if r["target"] is None else ("pass" if r["passed"] else "FAIL")
        if r.get("noisy"):
            result += " (noisy)"
        rows.append(
            (_label(r), r["backend"], t, b, f"{r['ratio']:.4g}", med, target, result, faults)
        )
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]

    def line(row: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--backends",
        default="numpy,torch,jax",
        help="comma-separated subset of numpy,torch,jax (default: all; missing ones are skipped)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS until other processes leave the CPUs idle (shared machines)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the 400^3 memory check")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if a target fails"
    )
    args = parser.parse_args(argv)
    plan = (
        {"slow_rounds": 3, "fast_rounds": 7, "warmup": 1}
        if args.quick
        else {"slow_rounds": 7, "fast_rounds": 31, "warmup": 2}
    )
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    start = time.perf_counter()
    monitor = CpuMonitor()
    env = environment()
    print(
        f"tuckerman {tm.__version__}, numpy {np.__version__}, {env['cpu_count']} CPUs "
        f"({env['cpu']}), shape {SHAPE}, ranks {RANKS}, float64, rounds {plan}",
        flush=True,
    )
    results: list = []
    extra: dict = {}
    skipped: dict = {}
    runners = {"numpy": bench_numpy, "torch": bench_torch, "jax": bench_jax}
    for name in backends:
        if name not in runners:
            parser.error(f"unknown backend {name!r}; expected numpy, torch or jax")
        try:
            extra[name] = runners[name](results, plan)
        except ImportError as err:
            skipped[name] = f"not importable: {err}"
            print(f"  {name}: skipped ({err})", flush=True)
    if not args.no_memory:
        bench_memory(results)

    elapsed = time.perf_counter() - start
    contention = monitor.report()
    report = {
        "benchmark": "manifold",
        "settings": {
            "shape": list(SHAPE),
            "ranks": RANKS,
            "dtype": "float64",
            "rounds": plan,
            "quick": args.quick,
            "seeds": {"point": SEED_POINT, "tangent": SEED_TANGENT, "ambient": SEED_AMBIENT},
            "statistic": "ratio = best op sample / best baseline sample; ratio_median = median "
            "of per-round ratios (op and baseline interleaved)",
        },
        "environment": env,
        "contention": {**contention, "waited_for_idle_s": round(waited, 1)},
        "backend_info": extra,
        "skipped": skipped,
        "results": results,
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(table(results))
    share = contention.get("other_processes_cpu_share")
    if share is not None:
        print(
            f"\nother processes used {contention['other_processes_cpu_s']} CPU s during the run "
            f"({100 * share:.0f}% of the machine)"
            + ("; timings are disturbed, rerun on an idle machine" if share > BUSY_SHARE else "")
        )
    failed = [f"{_label(r)} ({r['backend']})" for r in results if r.get("passed") is False]
    noisy = [f"{_label(r)} ({r['backend']})" for r in results if r.get("noisy")]
    if noisy:
        print(
            f"\nnoisy measurements (median > {NOISY_SPREAD}x best, or other processes used "
            f"> {100 * BUSY_SHARE:.0f}% of the CPUs): " + ", ".join(noisy) + "; consider rerunning"
        )
    print(
        f"\n{len(failed)} target(s) failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{elapsed:.1f} s; results in {args.out}"
    )
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
