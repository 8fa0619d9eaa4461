"""Tucker tensor completion from 5% of the entries, with sparse gradients.

A tensor A of shape (n, n, n) and multilinear rank (5, 5, 5) is observed on a set Ω of 5% of
its entries, drawn uniformly without replacement. We fit X of rank (5, 5, 5) to the
observations,

    f(X) = 1/2 sum_{i in Ω} (X_i - A_i)^2 ,

and measure the relative error on a separate held-out set of 1% of the entries (disjoint from
Ω). The Euclidean gradient is zero outside Ω: it is handed to the solvers as a
``tm.SparseTensor`` of the residuals, computed with ``tm.entries`` (the values of a Tucker
tensor at given indices). Projection, retraction and the TDLRT step then cost
O(|Ω| prod r + sum n r^2) per iteration; nothing of the full shape n^3 is ever formed (except
once, for the optional ``--init hosvd`` starting point).

Solvers: Riemannian gradient descent (RGD), conjugate gradients (RCG) and trust region (exact
Hessian P_Ω) at rank (5, 5, 5), and the rank-adaptive TDLRT solver, which starts at rank
(1, 1, 1) and finds the rank itself (bounded by 10).

Run from the repository root::

    python examples/tensor_completion.py           # n = 100: 50,000 observed entries, ~70 s
    python examples/tensor_completion.py --quick   # n = 50: 6,250 observed entries, ~20 s
    python examples/tensor_completion.py --init hosvd   # start from the HOSVD of the data

The plot goes to ``--out`` (default examples/output/). Excerpts of this file appear in
docs/tutorials/tensor_completion.md.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import tuckerman as tm
from tuckerman.solvers import Problem, TuckerDomain, rank_adaptive, rcg, rgd, trust_region

OUTPUT = Path(__file__).resolve().parent / "output"
RANK = 5
TRAIN_FRACTION = 0.05
TEST_FRACTION = 0.01
LR, TAU = 1.8, 0.1  # rank-adaptive solver: learning rate and relative truncation tolerance


# --8<-- [start:data]
def make_data(n, rank=RANK, train=TRAIN_FRACTION, test=TEST_FRACTION, seed=0):
    """A random tensor of shape (n, n, n) and multilinear rank ``rank`` (entries of RMS 1), and
    disjoint index sets: ``train`` and ``test`` fractions of the entries, uniform without
    replacement. Only the sampled entries are ever computed (``tm.entries``)."""
    rng = np.random.default_rng(seed)
    shape = (n, n, n)
    truth = tm.FixedRankTucker(shape, rank).random_point(key=rng)
    truth = tm.scale(truth, math.sqrt(math.prod(shape)) / float(tm.norm(truth)))
    n_train, n_test = round(train * math.prod(shape)), round(test * math.prod(shape))
    flat = rng.choice(math.prod(shape), size=n_train + n_test, replace=False)
    idx = np.stack(np.unravel_index(flat, shape), axis=1)  # (nnz, 3) integer indices
    train_idx, test_idx = idx[:n_train], idx[n_train:]
    return truth, train_idx, tm.entries(truth, train_idx), test_idx, tm.entries(truth, test_idx)


# --8<-- [end:data]


# --8<-- [start:problem]
def completion_functions(shape, idx, observed):
    """Cost, Euclidean gradient and Euclidean Hessian of f(X) = ||P_Ω(X - A)||^2 / 2."""

    def cost(x):
        r = tm.entries(x, idx) - observed  # X at the observed indices: O(|Ω| prod r)
        return 0.5 * float(r @ r)

    def egrad(x):  # P_Ω(X - A): a sparse tensor, never dense
        return tm.SparseTensor(idx, tm.entries(x, idx) - observed, shape)

    def ehess(x, d):  # the Hessian is P_Ω; d is a Tucker tensor of rank <= 2r
        return tm.SparseTensor(idx, tm.entries(d, idx), shape)

    return cost, egrad, ehess


# --8<-- [end:problem]


class HeldOutLog:
    """Records the held-out relative error wherever a solver evaluates the gradient.

    The solvers' logs hold the cost of every iterate, and every solver evaluates the gradient at
    every iterate; matching the two by cost gives the held-out error per iteration. (The
    rank-adaptive solver also evaluates the gradient at its augmented points; these are the same
    tensors and only add unused records.) This bookkeeping is for the plot, not part of the
    method.
    """

    def __init__(self, cost, egrad, test_idx, test_values):
        self._cost, self._egrad = cost, egrad
        self.test_idx, self.test_values = test_idx, test_values
        self.by_cost: dict[float, float] = {}

    def error(self, x):
        diff = tm.entries(x, self.test_idx) - self.test_values
        return float(np.linalg.norm(diff) / np.linalg.norm(self.test_values))

    def egrad(self, x):
        g = self._egrad(x)
        # cost(x) = ||g.values||^2 / 2, computed exactly as cost() does: the same float
        self.by_cost[0.5 * float(g.values @ g.values)] = self.error(x)
        return g

    def per_iteration(self, result):
        return [self.by_cost.get(entry.cost, math.nan) for entry in result.log]


def hosvd_start(shape, idx, observed, ranks):
    """HOSVD of the zero-filled observations rescaled by 1/p (an unbiased estimate of A).

    Forms the dense tensor once (n^3 entries): acceptable for a starting point only.
    """
    p = idx.shape[0] / math.prod(shape)
    dense = np.zeros(shape)
    dense[tuple(idx.T)] = observed / p
    return tm.hosvd(dense, ranks)


# --8<-- [start:solve]
def solve_all(n, init="random", seed=1):
    truth, idx, observed, test_idx, test_values = make_data(n)
    shape = truth.shape
    cost, egrad, ehess = completion_functions(shape, idx, observed)
    log = HeldOutLog(cost, egrad, test_idx, test_values)
    scale = float(np.linalg.norm(observed)) / math.sqrt(idx.shape[0] / math.prod(shape))  # ~||A||

    M = tm.FixedRankTucker(shape, RANK)
    if init == "hosvd":
        x0 = hosvd_start(shape, idx, observed, M.ranks)
    else:  # a random point of rank 5 with the estimated norm of A
        x0 = M.random_point(key=seed)
        x0 = tm.scale(x0, scale / float(tm.norm(x0)))
    problem = Problem(M, cost, egrad=log.egrad, ehess=ehess)
    stop = {"min_grad_norm": 1e-10 * float(np.linalg.norm(observed)), "min_step": None}
    runs = {
        "RGD": lambda: rgd(problem, x0, max_iter=400, **stop),
        "RCG": lambda: rcg(problem, x0, max_iter=400, **stop),
        "trust region": lambda: trust_region(problem, x0, max_iter=100, **stop),
    }

    # Rank-adaptive TDLRT: from a random rank-(1, 1, 1) point of small norm, ranks <= 10. The
    # first basis step then reads the leading directions of P_Ω(A) (a spectral start for free).
    # A fixed learning rate must stay below 2/L, L = 1 the Lipschitz constant of the gradient.
    domain = Problem(TuckerDomain(shape, max_rank=2 * RANK), cost, egrad=log.egrad)
    x1 = tm.FixedRankTucker(shape, 1).random_point(key=seed)
    x1 = tm.scale(x1, 1e-3 * scale / float(tm.norm(x1)))
    runs["rank-adaptive (TDLRT)"] = lambda: rank_adaptive(
        domain, x1, lr=LR, tau=TAU, max_iter=300, **stop
    )

    results = {}
    for name, run in runs.items():
        result = run()
        results[name] = (result, log.per_iteration(result))
    return results, {"init": init, "shape": shape, "observed": idx.shape[0]}


# --8<-- [end:solve]


def first_below(errors, threshold):
    return next((k for k, e in enumerate(errors) if e < threshold), None)


def table(results):
    lines = [
        "| method | iterations | time (s) | ms / iteration | test error | it. to test < 1e-3 "
        "| final ranks | stop |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, (res, errs) in results.items():
        hit = first_below(errs, 1e-3)
        lines.append(
            f"| {name} | {res.iterations} | {res.time:.1f} | "
            f"{1e3 * res.time / max(res.iterations, 1):.0f} | {errs[-1]:.2e} | "
            f"{'-' if hit is None else hit} | {res.point.ranks} | {res.stop_reason} |"
        )
    return "\n".join(lines)


def plot(results, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (res, errs) in results.items():
        axes[0].semilogy(errs, label=name)
        axes[1].semilogy([e.time for e in res.log], errs, label=name)
    for ax, xlabel in zip(axes[:2], ("iteration", "time (s)")):
        ax.axhline(1e-3, color="grey", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out relative error")
        ax.legend()
    n = info["shape"][0]
    axes[0].set_title(f"{n}³, rank 5, {info['observed']:,} observed entries ({info['init']} start)")
    axes[1].set_title("against time (incl. held-out bookkeeping)")
    res, _ = results["rank-adaptive (TDLRT)"]
    ranks = np.array([e.ranks for e in res.log])
    shown = min(len(ranks), 60)
    for k in range(ranks.shape[1]):
        offset = 0.08 * (k - 1)  # keeps coinciding lines visible
        axes[2].step(range(shown), ranks[:shown, k] + offset, where="post", label=f"mode {k + 1}")
    axes[2].axhline(RANK, color="grey", ls=":", lw=0.8)
    axes[2].set_xlabel(f"iteration (first {shown})")
    axes[2].set_ylabel("rank")
    axes[2].set_title(f"rank-adaptive: ranks per step (lr {LR:g}, tau {TAU:g})")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50^3 instead of 100^3")
    parser.add_argument(
        "--init",
        choices=("random", "hosvd"),
        default="random",
        help="start of the fixed-rank solvers: a random point (default) or the HOSVD of the "
        "rescaled zero-filled observations (forms the dense tensor once)",
    )
    parser.add_argument(
        "--out", type=Path, default=OUTPUT, help="directory for the PNG (default examples/output)"
    )
    args = parser.parse_args(argv)
    n = 50 if args.quick else 100
    start = time.perf_counter()
    results, info = solve_all(n, init=args.init)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / ("tensor_completion" + ("_quick" if args.quick else "") + ".png")
    plot(results, info, png)
    print(
        f"{n}^3 tensor of rank ({RANK}, {RANK}, {RANK}), {info['observed']:,} observed entries "
        f"({100 * TRAIN_FRACTION:g}%), held-out {100 * TEST_FRACTION:g}%; fixed-rank solvers "
        f"from a {info['init']} start, rank-adaptive from a random rank-(1, 1, 1) point\n"
    )
    print(table(results))
    print(f"\nplot: {png}   ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
