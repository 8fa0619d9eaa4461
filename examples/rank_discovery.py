"""Rank discovery with TDLRT: start from too-large ranks and let the steps find the true ones.

A is a 40 x 50 x 60 tensor of multilinear rank (3, 5, 4) plus 0.1% Gaussian noise (||A|| = 1).
We minimize f(X) = ||X - A||^2 / 2 by rank-adaptive TDLRT steps (``tm.tdlrt_step``, Algorithm 1
of Zangrando et al., NeurIPS 2024) from a random point of rank (8, 8, 8):

1. a basis step on every mode from one gradient, augmenting each basis to rank <= 16,
2. a Galerkin step on the augmented core from a second gradient,
3. truncation of the core: per mode, the smallest rank whose discarded singular values have
   2-norm <= tau ||core||.

The spurious directions of the start shrink by a factor (1 - lr) per step; once they fall below
the tolerance they are truncated, and the ranks settle at (3, 5, 4). A sweep over tau shows the
window of tolerances between the noise level and the smallest singular value of the signal in
which the true ranks are found.

Run from the repository root (about 5 s)::

    python examples/rank_discovery.py               # writes examples/output/rank_discovery.png
    python examples/rank_discovery.py --out /tmp/x

Excerpts of this file appear in docs/tutorials/rank_discovery.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import tuckerman as tm

OUTPUT = Path(__file__).resolve().parent / "output"
SHAPE = (40, 50, 60)
TRUE_RANKS = (3, 5, 4)
START_RANKS = (8, 8, 8)
LR, TAU, STEPS = 0.5, 1e-2, 60
PLOT_STEPS = 30
SWEEP = (0.3, 0.1, 1e-2, 1e-3, 1e-4, 1e-5)


# --8<-- [start:data]
def make_tensor(shape=SHAPE, ranks=TRUE_RANKS, noise=1e-3, seed=0):
    """Signal of multilinear rank ``ranks`` (norm 1) plus noise of norm ``noise``, normalized;
    returns (A, signal)."""
    rng = np.random.default_rng(seed)
    signal = tm.FixedRankTucker(shape, ranks).random_point(key=rng).to_dense()
    signal /= np.linalg.norm(signal)
    e = rng.standard_normal(shape)
    a = signal + noise * e / np.linalg.norm(e)
    return a / np.linalg.norm(a), signal / np.linalg.norm(a)


# --8<-- [end:data]


# --8<-- [start:run]
def discover(a, *, lr=LR, tau=TAU, steps=STEPS, start=START_RANKS, seed=1):
    """TDLRT steps from a random point of rank ``start`` and norm ||A||; the points visited."""
    x = tm.FixedRankTucker(a.shape, start).random_point(key=seed)
    x = tm.scale(x, float(np.linalg.norm(a)) / float(tm.norm(x)))

    def egrad(y):  # gradient of ||Y - A||^2 / 2 (dense here; sparse and Tucker work too)
        return y.to_dense() - a

    points = [x]
    for _ in range(steps):
        x = tm.tdlrt_step(x, egrad, lr=lr, tau=tau, max_rank=max(start))
        points.append(x)
    return points


# --8<-- [end:run]


def first_settled(ranks, target):
    """First step from which the ranks stay equal to ``target`` (None if they never do)."""
    for k in range(len(ranks)):
        if all(r == tuple(target) for r in ranks[k:]):
            return k
    return None


def core_spectra(x):
    """Mode-k singular values of the core divided by ||core||: the truncation's view of x."""
    norm = np.linalg.norm(x.core)
    return [np.linalg.svd(tm.unfold(x.core, k), compute_uv=False) / norm for k in range(x.ndim)]


def plot(a, signal, runs, path):
    """Ranks and errors per step, saved to ``path``; None (with a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, so no plot is drawn", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (tau, points), style in zip(runs.items(), ("-", "--", ":")):
        points = points[: PLOT_STEPS + 1]
        ranks = np.array([x.ranks for x in points])
        for k in range(ranks.shape[1]):
            left.step(
                range(len(ranks)),
                ranks[:, k] + 0.06 * (k - 1),  # small offsets keep coinciding lines visible
                where="post",
                ls=style,
                color=colors[k],
                label=f"mode {k + 1}, tau {tau:g}",
            )
        dense = [x.to_dense() for x in points]
        right.semilogy(
            [np.linalg.norm(d - a) for d in dense],
            ls=style,
            color="k",
            label=f"||X - A||, tau {tau:g}",
        )
        right.semilogy(
            [np.linalg.norm(d - signal) for d in dense],
            ls=style,
            color=colors[3],
            label=f"||X - signal||, tau {tau:g}",
        )
    left.set_xlabel("TDLRT step")
    left.set_ylabel("rank")
    left.set_yticks(range(1, 9))
    left.set_title(f"ranks per step: start {START_RANKS}, true {TRUE_RANKS}, lr {LR:g}")
    left.legend(ncol=2, fontsize=7)
    right.set_xlabel("TDLRT step")
    right.set_ylabel("error / ||A||")
    right.set_title("error to the data and to the noise-free signal (noise 1e-3)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUTPUT, help="directory for the PNG (default examples/output)"
    )
    args = parser.parse_args(argv)
    a, signal = make_tensor()
    x_true = tm.hosvd(signal, TRUE_RANKS)
    smallest = min(float(s[-1]) for s in core_spectra(x_true))
    print(
        f"A: shape {SHAPE}, rank {TRUE_RANKS} + 0.1% noise; smallest mode singular value of the "
        f"signal's core / ||core|| = {smallest:.3f}; start rank {START_RANKS}, lr {LR:g}\n"
    )

    runs = {tau: discover(a, tau=tau) for tau in SWEEP}
    lines = [
        "| tau | final ranks | settled at step | ‖X - A‖ / ‖A‖ | ‖X - signal‖ / ‖A‖ |",
        "|---:|---|---:|---:|---:|",
    ]
    for tau, points in runs.items():
        x, ranks = points[-1], [y.ranks for y in points]
        err_a, err_signal = (np.linalg.norm(x.to_dense() - t) for t in (a, signal))
        settled = first_settled(ranks, x.ranks)
        lines.append(f"| {tau:g} | {x.ranks} | {settled} | {err_a:.2e} | {err_signal:.2e} |")

    print(f"tau = {TAU:g}: ranks per step")
    for k, x in enumerate(runs[TAU][:16]):
        print(f"  step {k:2d}: {x.ranks}   ||X - A|| = {np.linalg.norm(x.to_dense() - a):.2e}")
    print(f"  ... step {STEPS}: {runs[TAU][-1].ranks}\n")
    print(f"sweep over tau ({STEPS} steps each, lr {LR:g}):\n")
    print("\n".join(lines))

    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(a, signal, {t: runs[t] for t in (TAU, 1e-5)}, args.out / "rank_discovery.png")
    if png is not None:
        print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
