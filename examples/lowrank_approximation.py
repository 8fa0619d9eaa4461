"""Low-rank approximation of a dense tensor: ST-HOSVD, HOOI (TensorLy) and Riemannian solvers.

Given a dense tensor A, find X of multilinear rank (r, r, r) that minimizes

    f(X) = ||X - A||_F^2 / 2 .

Three routes, compared at several ranks:

- ``tm.hosvd`` (sequentially truncated HOSVD): one pass, quasi-optimal
  (``||A - X_hosvd|| <= sqrt(d) min_X ||A - X||``);
- HOOI (higher-order orthogonal iteration) as implemented by ``tensorly.decomposition.tucker``:
  alternating SVDs, started from the HOSVD;
- Riemannian optimization on the manifold of rank-(r, r, r) tensors (``tuckerman.solvers``):
  gradient descent, conjugate gradients and trust region, started from the HOSVD and, to show
  their convergence, from a random point.

A is a 60 x 70 x 80 tensor: a signal of multilinear rank (12, 12, 12) whose core decays
geometrically along each mode, plus 1% Gaussian noise, normalized to ||A|| = 1.

Run from the repository root (about 10 s on two idle CPU cores)::

    python examples/lowrank_approximation.py               # writes examples/output/*.png
    python examples/lowrank_approximation.py --out /tmp/x  # another output directory

TensorLy (``pip install tensorly``, or the ``bench`` extra) gives the HOOI column and matplotlib
the plot; without either, the script says so and skips that part. Excerpts of this file appear in
docs/tutorials/lowrank_approximation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import tuckerman as tm
from tuckerman.solvers import Problem, rcg, rgd, trust_region

OUTPUT = Path(__file__).resolve().parent / "output"
SHAPE = (60, 70, 80)
SIGNAL_RANKS = (12, 12, 12)
TARGET_RANKS = (2, 4, 6, 8, 10)
PLOT_RANK = 6  # the rank whose convergence is plotted


# --8<-- [start:data]
def make_tensor(shape=SHAPE, ranks=SIGNAL_RANKS, decay=0.7, noise=0.01, seed=0):
    """A dense NumPy tensor of norm 1: a rank-``ranks`` signal with core entries
    ``g_ijk decay^(i+j+k)`` (g Gaussian) plus Gaussian noise of relative size ``noise``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(r) for r in ranks), indexing="ij")
    core = rng.standard_normal(ranks) * decay ** sum(grids)
    factors = [np.linalg.qr(rng.standard_normal((n, r)))[0] for n, r in zip(shape, ranks)]
    signal = tm.TuckerTensor(core, factors).to_dense()
    e = rng.standard_normal(shape)
    a = signal / np.linalg.norm(signal) + noise * e / np.linalg.norm(e)
    return a / np.linalg.norm(a)


# --8<-- [end:data]


# --8<-- [start:problem]
def approximation_problem(a, ranks):
    """f(X) = ||X - A||^2 / 2 on the rank-``ranks`` manifold: egrad(X) = X - A (dense) and
    ehess(X)[D] = D (``D`` comes as a Tucker tensor of rank <= 2r and is returned as it is)."""
    M = tm.FixedRankTucker(a.shape, ranks)
    problem = Problem(
        M,
        cost=lambda x: 0.5 * np.sum((x.to_dense() - a) ** 2),
        egrad=lambda x: x.to_dense() - a,
        ehess=lambda x, d: d,
    )
    return M, problem


# --8<-- [end:problem]


def relative_error(x, a):
    """||X - A|| / ||A|| for a Tucker tensor X."""
    return float(np.linalg.norm(x.to_dense() - a) / np.linalg.norm(a))


def import_tensorly():
    """TensorLy's HOOI (``tensorly.decomposition.tucker``), or None when TensorLy is missing."""
    try:
        import tensorly
        from tensorly.decomposition import tucker
    except ImportError:
        print(
            "note: TensorLy is not installed, so the HOOI column is skipped "
            "(pip install tensorly, or the 'bench' extra)",
            file=sys.stderr,
        )
        return None
    tensorly.set_backend("numpy")
    return tucker


def timed(fn, *args, repeat=3, **kwargs):
    """``fn(*args, **kwargs)`` and its best time over ``repeat`` runs (the machine may be busy)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return out, best


# --8<-- [start:compare]
def compare_at_rank(a, r, hooi):
    """Relative error, time and iterations of each method at rank (r, r, r)."""
    ranks = (r,) * a.ndim
    M, problem = approximation_problem(a, ranks)
    rows = {}

    x_hosvd, t = timed(tm.hosvd, a, ranks)  # ST-HOSVD
    rows["HOSVD"] = (relative_error(x_hosvd, a), t, 1)

    if hooi is not None:  # TensorLy's HOOI, when TensorLy is installed
        out, t = timed(hooi, a, rank=list(ranks), init="svd", tol=1e-12, return_errors=True)
        (core, factors), errors = out
        tucker = tm.TuckerTensor(core, factors)
        rows["HOOI (TensorLy)"] = (relative_error(tucker, a), t, len(errors))

    for name, solver in (("RGD", rgd), ("RCG", rcg), ("trust region", trust_region)):
        result, t = timed(solver, problem, x_hosvd, min_grad_norm=1e-9, max_iter=500)
        rows[f"{name} from HOSVD"] = (relative_error(result.point, a), t, result.iterations)
    return rows


# --8<-- [end:compare]


def convergence_from_random(a, r, key=1):
    """Relative error per iteration of RGD, RCG and trust region from one random point."""
    M, problem = approximation_problem(a, (r,) * a.ndim)
    norm_a = float(np.linalg.norm(a))
    x0 = M.random_point(key=key)
    x0 = tm.scale(x0, norm_a / float(tm.norm(x0)))  # a random point of the norm of A
    curves = {}
    for name, solver in (("RGD", rgd), ("RCG", rcg), ("trust region", trust_region)):
        result = solver(problem, x0, min_grad_norm=1e-9, max_iter=500)
        # cost = ||X - A||^2 / 2, so the relative error is sqrt(2 cost) / ||A||
        curves[name] = [np.sqrt(max(2.0 * e.cost, 0.0)) / norm_a for e in result.log]
    return curves


def plot(results, curves, reference, path):
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, so no plot is drawn", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranks = sorted(results)
    base = np.array([results[r]["HOSVD"][0] for r in ranks])
    for name, marker in (("HOOI (TensorLy)", "s"), ("RCG from HOSVD", "o")):
        if name not in reference:
            continue
        err = np.array([results[r][name][0] for r in ranks])
        left.plot(ranks, 100 * (base - err) / base, marker=marker, label=name)
    left.axhline(0.0, color="grey", lw=0.8)
    left.set_xlabel("rank r (all modes)")
    left.set_ylabel("error reduction over ST-HOSVD (%)")
    left.set_title("Improvement over the HOSVD")
    left.legend()

    best = reference["RCG from HOSVD"][0]
    for name, errs in curves.items():
        left_over = np.maximum(np.array(errs) - best, 1e-16)
        right.semilogy(left_over, label=name)
    for name, style in (("HOSVD", "--"), ("HOOI (TensorLy)", ":")):
        if name not in reference:
            continue
        gap = reference[name][0] - best
        label = name if gap > 1e-15 else f"{name} (at the optimum)"
        right.axhline(max(gap, 1e-16), ls=style, color="k", label=label)
    right.set_xlabel("iteration (random start)")
    right.set_ylabel("relative error - optimum (floor 1e-16)")
    right.set_title(f"Convergence at rank ({PLOT_RANK}, {PLOT_RANK}, {PLOT_RANK})")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(results, column):
    """Markdown table of ``column`` (0: relative error, 1: time, 2: iterations) per method."""
    methods = list(next(iter(results.values())))
    lines = ["| rank | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for r, rows in sorted(results.items()):
        if column == 0:
            cells = [f"{row[0]:.6f}" for row in rows.values()]
        else:
            cells = [f"{1e3 * row[1]:.0f} ms / {row[2]}" for row in rows.values()]
        lines.append(f"| ({r}, {r}, {r}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUTPUT, help="directory for the PNG (default examples/output)"
    )
    args = parser.parse_args(argv)
    hooi = import_tensorly()
    a = make_tensor()
    print(f"A: shape {a.shape}, signal rank {SIGNAL_RANKS}, 1% noise, ||A|| = 1")

    results = {r: compare_at_rank(a, r, hooi) for r in TARGET_RANKS}
    curves = convergence_from_random(a, PLOT_RANK)

    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(results, curves, results[PLOT_RANK], args.out / "lowrank_approximation.png")

    print("\nrelative error ||X - A|| / ||A||:\n")
    print(table(results, 0))
    print("\ntime (best of 3) / iterations:\n")
    print(table(results, 1))
    if hooi is not None:
        gap = max(
            abs(rows["HOOI (TensorLy)"][0] - rows[name][0])
            for rows in results.values()
            for name in rows
            if name.endswith("from HOSVD")
        )
        print(f"\nlargest difference between HOOI and a Riemannian solver: {gap:.1e}")
    print(f"\nfrom a random start at rank ({PLOT_RANK},) * 3, final relative errors:")
    for name, errs in curves.items():
        print(f"  {name:13s} {errs[-1]:.6f} after {len(errs) - 1} iterations")
    if png is not None:
        print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
