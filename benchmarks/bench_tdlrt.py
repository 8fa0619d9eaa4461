"""Time per TDLRT step and per solver iteration on Tucker completion, against a dense RGD baseline.

Problem (as in examples/tensor_completion.py): a 100^3 tensor of multilinear rank (5, 5, 5),
5% of its entries observed (50,000, uniform without replacement), f(X) = ||P_Ω(X - A)||^2 / 2.
The Euclidean gradient is a ``tm.SparseTensor`` of the residuals (``tm.entries``); the
structured operations cost O(|Ω| prod r + sum n r^2) and never form the 100^3 tensor.

A second configuration keeps the 50,000 observations but puts them in a 200^3 tensor (0.625%):
the structured cost depends on |Ω| and the ranks, the dense baseline on n^3 (whole iterations
only).

Baseline, measured in the same run: one iteration of Riemannian gradient descent written the
way dense ("pymanopt-style") code does it:

- cost and Euclidean gradient from the dense tensor: ``X = x.to_dense()``, the gradient is a
  dense 100^3 array, zero except the residuals at Ω;
- projection with dense mode products, mode by mode without shared contractions:
  ``dC = G ×_1 U_1ᵀ ×_2 U_2ᵀ ×_3 U_3ᵀ``, ``dU_k = (I - U_kU_kᵀ) [G ×_{j≠k} U_jᵀ]_(k) pinv(C_(k))``;
- retraction through a dense truncated HOSVD: the tangent vector and ``X - α ξ`` formed densely
  (100^3), then ``tm.hosvd`` (ST-HOSVD) to rank 5, and the cost of the new point from its dense
  form.

Rows (each timed in interleaved rounds with the baseline; ratio = time / baseline time, lower is
better; speed-up = baseline / time):

- ``gradient``, ``project``, ``retract``: the structured parts against their dense counterparts;
- ``RGD iteration (fixed step)``: cost + sparse gradient + ``M.project`` + ``M.norm`` +
  ``M.retract`` + cost at the new point: the structured twin of the baseline (same iterate up to
  rounding, checked);
- ``tdlrt_step`` and ``fixed_rank_step`` with the sparse gradient (two gradient evaluations each);
- ``rgd``, ``rcg``, ``trust_region`` (exact Hessian P_Ω) and ``rank_adaptive`` from
  ``tuckerman.solvers``: seconds per iteration from the solver's own log over a few iterations
  (start-up excluded), started near the solution (relative distance 1e-2) so that line searches
  rarely backtrack and the rank-adaptive solver stays at rank (5, 5, 5) (its augmented rank is 10).

Timing conventions follow benchmarks/bench_manifold.py: fixed seeds, warm-up, interleaved rounds,
best sample and median of per-round ratios, CPU share of other processes from /proc/stat
(``noisy`` when > 5% or when the median sample is > 1.5x the best).

Run from the repository root (about 2-3 minutes on two idle cores)::

    python benchmarks/bench_tdlrt.py            # writes benchmarks/results/tdlrt.json
    python benchmarks/bench_tdlrt.py --quick    # fewer rounds
    python benchmarks/bench_tdlrt.py --only-main   # only 100^3, 5%
    python benchmarks/bench_tdlrt.py --wait-idle 300  # on a shared machine: wait for quiet
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

import _common  # noqa: E402
import numpy as np
from _common import BUSY_SHARE, CpuMonitor, wait_until_idle  # noqa: E402

import tuckerman as tm
from tuckerman.solvers import Problem, TuckerDomain, rank_adaptive, rcg, rgd, trust_region

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tdlrt.json"

RANK = 5
# (name, n, observed entries, rows): the problem with every row, then the same number of
# observations in a 200^3 tensor (0.625%) for the whole iterations only: the structured cost
# depends on |Ω|, the dense one on n^3
CONFIGS = (
    ("100^3, 5%", 100, 50_000, "all"),
    ("200^3, 0.625%", 200, 50_000, "iterations"),
)
STEP = 10.0  # fixed RGD step for the iteration rows (about what Armijo accepts here)
LR, TAU, MAX_RANK = 1.8, 0.1, 10  # TDLRT settings of examples/tensor_completion.py
SEED_DATA, SEED_POINT = 0, 1
NOISY_SPREAD = 1.5


# --------------------------------------------------------------------------- the problem
def make_problem(n: int, observed_entries: int):
    rng = np.random.default_rng(SEED_DATA)
    shape = (n, n, n)
    truth = tm.FixedRankTucker(shape, RANK).random_point(key=rng)
    truth = tm.scale(truth, math.sqrt(math.prod(shape)) / float(tm.norm(truth)))
    m = observed_entries
    flat = rng.choice(math.prod(shape), size=m, replace=False)
    idx = np.stack(np.unravel_index(flat, shape), axis=1)
    observed = tm.entries(truth, idx)

    def cost(x):
        r = tm.entries(x, idx) - observed
        return 0.5 * float(r @ r)

    def egrad(x):
        return tm.SparseTensor(idx, tm.entries(x, idx) - observed, shape)

    def ehess(x, d):
        return tm.SparseTensor(idx, tm.entries(d, idx), shape)

    # a rank-5 point at relative distance ~1e-2 from the solution
    M = tm.FixedRankTucker(shape, RANK)
    v = M.random_tangent(truth, key=SEED_POINT)
    x = M.retract(truth, v * (1e-2 * float(tm.norm(truth))))
    return truth, idx, observed, cost, egrad, ehess, x


# --------------------------------------------------------------------------- dense baseline
def _mode_dot(t: np.ndarray, m: np.ndarray, k: int) -> np.ndarray:
    """``t ×_k m`` on a dense array (tensordot, then the new axis moved back to k)."""
    return np.moveaxis(np.tensordot(m, t, axes=(1, k)), 0, k)


def _unfold(t: np.ndarray, k: int) -> np.ndarray:
    return np.moveaxis(t, k, 0).reshape(t.shape[k], -1)


def dense_project(x: tm.TuckerTensor, g: np.ndarray) -> tm.TangentVector:
    """Tangent projection of a dense ``g`` by dense mode products, one mode at a time."""
    core, us = x.core, x.factors
    d = g.ndim
    dcore = g
    for k in range(d):
        dcore = _mode_dot(dcore, us[k].T, k)
    dfactors = []
    for k in range(d):
        t = g
        for j in range(d):
            if j != k:
                t = _mode_dot(t, us[j].T, j)
        b = _unfold(t, k) @ np.linalg.pinv(_unfold(core, k))
        dfactors.append(b - us[k] @ (us[k].T @ b))
    return tm.TangentVector(dcore, dfactors)


def dense_tangent(x: tm.TuckerTensor, v: tm.TangentVector) -> np.ndarray:
    """``dC ×_k U_k + sum_k C ×_k dU_k ×_{j≠k} U_j`` as a dense array, term by term."""
    out = tm.TuckerTensor(v.dcore, x.factors).to_dense()
    for k, du in enumerate(v.dfactors):
        factors = list(x.factors)
        factors[k] = du
        out = out + tm.TuckerTensor(x.core, factors).to_dense()
    return out


def make_dense_iteration(idx, observed, shape):
    where = tuple(idx.T)

    def iteration(x: tm.TuckerTensor, x_dense: np.ndarray):
        """One dense RGD iteration from ``x`` (whose dense form the previous one computed)."""
        g = np.zeros(shape)
        g[where] = x_dense[where] - observed  # dense Euclidean gradient
        rgrad = dense_project(x, g)
        gnorm = float(np.linalg.norm(dense_tangent(x, rgrad)))  # dense norm
        y = tm.hosvd(x_dense - STEP * dense_tangent(x, rgrad), x.ranks)  # dense retraction
        y_dense = y.to_dense()
        f = 0.5 * float(np.sum((y_dense[where] - observed) ** 2))  # cost at the new point
        return y, y_dense, f, gnorm

    return iteration


def make_structured_iteration(M, cost, egrad):
    def iteration(x: tm.TuckerTensor):
        f0 = cost(x)
        rgrad = M.project(x, egrad(x))
        gnorm = float(M.norm(x, rgrad))
        y = M.retract(x, rgrad * (-STEP))
        return y, cost(y), gnorm, f0

    return iteration


# --------------------------------------------------------------------------- timing


def _wall(fn: Callable[[], object]) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return sample


def interleaved(op: Callable[[], float], base: Callable[[], float], rounds: int, warmup: int):
    """``op`` and ``base`` return the seconds of one sample; interleaved rounds."""
    monitor = CpuMonitor()
    for _ in range(warmup):
        op()
        base()
    t_op, t_base = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                (t_op if which == 0 else t_base).append(op() if which == 0 else base())
    finally:
        if enabled:
            gc.enable()
    share = monitor.share()
    spread = max(statistics.median(t_op) / min(t_op), statistics.median(t_base) / min(t_base))
    return {
        "time_s": min(t_op),
        "time_median_s": statistics.median(t_op),
        "baseline_s": min(t_base),
        "baseline_median_s": statistics.median(t_base),
        "ratio": min(t_op) / min(t_base),
        "ratio_median": statistics.median(a / b for a, b in zip(t_op, t_base, strict=True)),
        "speedup": min(t_base) / min(t_op),
        "rounds": rounds,
        "noisy": bool(spread > NOISY_SPREAD or (share is not None and share > BUSY_SHARE)),
        "other_processes_cpu_share": share,
        "spread (median/best, worse of op and baseline)": spread,
    }


def solver_sample(run: Callable[[], object], info: dict) -> Callable[[], float]:
    """Seconds per iteration from the solver's log (its start-up excluded)."""

    def sample() -> float:
        result = run()
        log = result.log
        info.setdefault("ranks", set()).update(e.ranks for e in log)
        info["iterations"] = result.iterations
        for key in ("backtracks", "inner"):
            values = [e.extra[key] for e in log[1:] if key in e.extra]
            if values:
                info[f"mean {key}"] = sum(values) / len(values)
        return (log[-1].time - log[0].time) / max(result.iterations, 1)

    return sample


# --------------------------------------------------------------------------- environment


def environment() -> dict:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]
        blas = {k: deps[k].get("name") for k in ("blas", "lapack") if k in deps}
    except Exception as err:  # older NumPy
        blas = f"unavailable ({type(err).__name__})"
    return _common.environment(("OPENBLAS_", "OMP_"), numpy=np.__version__, blas=blas)


# --------------------------------------------------------------------------- report
def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: list) -> str:
    head = ("operation", "time", "baseline", "ratio", "ratio (med.)", "speed-up", "note")
    body = [
        (
            r["operation"],
            _fmt(r["time_s"]),
            _fmt(r["baseline_s"]),
            f"{r['ratio']:.3f}",
            f"{r['ratio_median']:.3f}",
            f"{r['speedup']:.1f}x",
            r.get("note", "") + (" (noisy)" if r["noisy"] else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]

    def line(row):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in body)])


def run_config(name: str, n: int, observed_entries: int, which: str, plan: dict) -> dict:
    truth, idx, observed, cost, egrad, ehess, x = make_problem(n, observed_entries)
    shape = truth.shape
    M = tm.FixedRankTucker(shape, RANK)
    print(
        f"\n[{name}] completion {shape}, rank {RANK}, |Ω| = {idx.shape[0]:,} "
        f"({100 * idx.shape[0] / math.prod(shape):.3g}%)",
        flush=True,
    )
    dense_iteration = make_dense_iteration(idx, observed, shape)
    structured_iteration = make_structured_iteration(M, cost, egrad)
    x_dense = x.to_dense()

    # ---- checks: the baseline computes the same iterate as the structured code
    y_dense_route, _, f_dense, gn_dense = dense_iteration(x, x_dense)
    y_struct, f_struct, gn_struct, _ = structured_iteration(x)
    d_struct = y_struct.to_dense()
    g_sparse = egrad(x)
    v_struct, v_dense = M.project(x, g_sparse), dense_project(x, g_sparse.to_dense())
    t_struct = M.tangent_to_dense(x, v_struct)
    checks = {
        "iterate_rel_diff": float(
            np.linalg.norm(y_dense_route.to_dense() - d_struct) / np.linalg.norm(d_struct)
        ),
        "cost_rel_diff": abs(f_dense - f_struct) / abs(f_struct),
        "grad_norm_rel_diff": abs(gn_dense - gn_struct) / gn_struct,
        "project_rel_diff": float(
            np.linalg.norm(dense_tangent(x, v_dense) - t_struct) / np.linalg.norm(t_struct)
        ),
        "start_rel_distance_to_solution": float(
            np.linalg.norm(x_dense - truth.to_dense()) / np.linalg.norm(truth.to_dense())
        ),
    }
    del d_struct, t_struct
    print("  checks: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()), flush=True)

    def baseline() -> float:
        return _wall(lambda: dense_iteration(x, x_dense))()

    rows: list = []

    def record(op_name: str, op: Callable[[], float], note: str = "", base=baseline):
        m = interleaved(op, base, plan["rounds"], plan["warmup"])
        m.update(config=name, operation=op_name, note=note)
        rows.append(m)
        print(
            f"  {op_name:30s} {_fmt(m['time_s']):>9s} vs {_fmt(m['baseline_s']):>9s}  "
            f"ratio {m['ratio']:.3f} (median {m['ratio_median']:.3f})  "
            f"{'[noisy]' if m['noisy'] else ''}",
            flush=True,
        )

    if which == "all":  # ---- parts against their dense counterparts
        where = tuple(idx.T)

        def dense_gradient():
            g = np.zeros(shape)
            g[where] = x_dense[where] - observed
            return g

        g_dense = dense_gradient()
        record(
            "gradient (SparseTensor)",
            _wall(lambda: egrad(x)),
            "vs dense: zeros + scatter of the residuals",
            base=_wall(dense_gradient),
        )
        record(
            "project (sparse gradient)",
            _wall(lambda: M.project(x, g_sparse)),
            "vs dense_project of the dense gradient",
            base=_wall(lambda: dense_project(x, g_dense)),
        )
        record(
            "retract",
            _wall(lambda: M.retract(x, v_struct * (-STEP))),
            "vs dense tangent + X - αξ + tm.hosvd",
            base=_wall(lambda: tm.hosvd(x_dense - STEP * dense_tangent(x, v_dense), x.ranks)),
        )

    # ---- whole iterations against the dense RGD iteration
    record("RGD iteration (fixed step)", _wall(lambda: structured_iteration(x)), "same iterate")
    record(
        "tdlrt_step",
        _wall(lambda: tm.tdlrt_step(x, egrad, lr=LR, tau=TAU, max_rank=MAX_RANK)),
        f"lr {LR:g}, tau {TAU:g}, augmented rank 10",
    )
    if which == "all":
        record(
            "fixed_rank_step",
            _wall(lambda: tm.fixed_rank_step(x, egrad, lr=LR)),
            "augmented rank 10, truncated to 5",
        )

    problem = Problem(M, cost, egrad=egrad)
    problem_h = Problem(M, cost, egrad=egrad, ehess=ehess)
    domain = Problem(TuckerDomain(shape, max_rank=MAX_RANK), cost, egrad=egrad)
    k = plan["solver_iterations"]
    off = {"min_grad_norm": None, "min_step": None}
    solvers = {
        "rgd": lambda: rgd(problem, x, max_iter=k, step0=STEP, **off),
        "rcg": lambda: rcg(problem, x, max_iter=k, step0=STEP, **off),
        "trust_region": lambda: trust_region(problem_h, x, max_iter=max(1, k // 2), **off),
        "rank_adaptive": lambda: rank_adaptive(domain, x, lr=LR, tau=TAU, max_iter=k, **off),
    }
    if which != "all":
        solvers = {s: solvers[s] for s in ("rgd", "rank_adaptive")}
    solver_info: dict = {}
    for solver_name, run in solvers.items():
        info: dict = {}
        record(f"{solver_name} (per iteration)", solver_sample(run, info), "tuckerman.solvers")
        info["ranks"] = sorted(info.get("ranks", ()))
        rows[-1]["note"] = _solver_note(info)
        solver_info[solver_name] = info
    return {
        "name": name,
        "shape": list(shape),
        "rank": RANK,
        "observed": int(idx.shape[0]),
        "fraction": idx.shape[0] / math.prod(shape),
        "checks": checks,
        "solvers": solver_info,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--only-main", action="store_true", help="only the 100^3, 5%% problem (skip 200^3)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON ({DEFAULT_OUT})")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS until other processes leave the CPUs idle (shared machines)",
    )
    args = parser.parse_args(argv)
    waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    plan = (
        {"rounds": 3, "warmup": 1, "solver_iterations": 2}
        if args.quick
        else {"rounds": 7, "warmup": 1, "solver_iterations": 4}
    )
    start = time.perf_counter()
    monitor = CpuMonitor()
    env = environment()
    print(
        f"tuckerman {tm.__version__}, numpy {np.__version__}, {env['cpu_count']} CPUs; "
        f"rounds {plan}",
        flush=True,
    )
    configs = CONFIGS[:1] if args.only_main else CONFIGS
    runs = [run_config(*config, plan) for config in configs]

    elapsed = time.perf_counter() - start
    report = {
        "benchmark": "tdlrt",
        "settings": {
            "rank": RANK,
            "dtype": "float64",
            "fixed_step": STEP,
            "tdlrt": {"lr": LR, "tau": TAU, "max_rank": MAX_RANK},
            "plan": plan,
            "quick": args.quick,
            "seeds": {"data": SEED_DATA, "point": SEED_POINT},
            "baseline": "dense RGD iteration: dense gradient, dense mode-product projection, "
            "dense tangent, tm.hosvd of X - αξ, cost from the dense new point",
            "statistic": "ratio = best op sample / best baseline sample; ratio_median = median "
            "of per-round ratios (op and baseline interleaved); speedup = 1 / ratio",
        },
        "environment": env,
        "other_processes_cpu_share": monitor.share(),
        "waited_for_idle_s": round(waited, 1),
        "configs": runs,
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for run in runs:
        print(f"\n{run['name']}: |Ω| = {run['observed']:,}\n")
        print(table(run["results"]))
    share = report["other_processes_cpu_share"]
    if share is not None and share > BUSY_SHARE:
        print(f"\nother processes used {100 * share:.0f}% of the CPUs: timings are disturbed")
    print(f"\n{elapsed:.0f} s; results in {args.out}")
    return 0


def _solver_note(info: dict) -> str:
    parts = [f"ranks {', '.join(map(str, info['ranks']))}"]
    for key in ("mean backtracks", "mean inner"):
        if key in info:
            parts.append(f"{key} {info[key]:.1f}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
