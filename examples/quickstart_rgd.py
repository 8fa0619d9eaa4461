"""Best rank-(3, 3, 3) approximation of a 20 x 20 x 20 tensor by Riemannian gradient descent.

The cost is f(X) = ||X - A||^2 / 2 on the manifold of tensors of multilinear rank (3, 3, 3);
its Euclidean gradient is X - A. Riemannian gradient descent projects that gradient onto the
tangent space and retracts. The result is compared with the (quasi-optimal) truncated HOSVD.

Run::

    python examples/quickstart_rgd.py            # NumPy
    python examples/quickstart_rgd.py torch      # PyTorch (CPU; pass --device cuda for a GPU)
    python examples/quickstart_rgd.py jax        # JAX (float64: x64 is enabled below)
    python examples/quickstart_rgd.py all        # every installed library

This file is reproduced in docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
from array_api_compat import array_namespace

import tuckerman as tm


def make_target(shape=(20, 20, 20), ranks=(3, 3, 3), noise=0.5, seed=0):
    """A NumPy float64 tensor: a random rank-``ranks`` signal plus Gaussian noise.

    Signal and noise have norms 1 and ``noise``, so the best rank-``ranks`` approximation has
    a relative error of roughly ``noise / sqrt(1 + noise**2)``.
    """
    rng = np.random.default_rng(seed)
    signal = tm.FixedRankTucker(shape, ranks).random_point(key=rng).to_dense()
    noise_part = rng.standard_normal(shape)
    return signal / np.linalg.norm(signal) + noise * noise_part / np.linalg.norm(noise_part)


def rgd(A, ranks, *, xp="numpy", device=None, step=1.0, maxiter=100, gtol=1e-8, key=1):
    """Minimize ||X - A||^2 / 2 over tensors of multilinear rank ``ranks``, from a random start."""
    M = tm.FixedRankTucker(tuple(A.shape), ranks)
    X = M.random_point(key=key, xp=xp, dtype=A.dtype, device=device)
    iterations = 0
    while iterations < maxiter:
        G = M.project(X, X.to_dense() - A)  # Riemannian gradient; egrad = X - A (dense)
        if float(M.norm(X, G)) <= gtol:
            break
        X = M.retract(X, -step * G)  # back onto the manifold, never forming X densely
        iterations += 1
    return X, iterations


def relative_error(X, A):
    """||X - A|| / ||A|| for a Tucker tensor X and a dense A of the same library."""
    xp = array_namespace(A)
    return float(xp.linalg.vector_norm(X.to_dense() - A) / xp.linalg.vector_norm(A))


def to_library(A, name, device=None):
    """Copy the NumPy array ``A`` into library ``name``."""
    if name == "numpy":
        return A
    if name == "torch":
        import torch

        return torch.asarray(A, device=device)
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 in JAX needs x64
        return jax.device_put(jax.numpy.asarray(A), device)
    if name == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(A)
    raise ValueError(f"unknown library {name!r}")


def main() -> None:
    libraries = ["numpy", "torch", "jax", "array_api_strict"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", nargs="?", default="numpy", choices=[*libraries, "all"])
    parser.add_argument("--device", default=None, help="e.g. cuda (torch only)")
    args = parser.parse_args()
    if args.library == "all":
        names = [n for n in libraries if importlib.util.find_spec(n) is not None]
    else:
        names = [args.library]

    ranks = (3, 3, 3)
    A_host = make_target(ranks=ranks)
    for name in names:
        A = to_library(A_host, name, args.device if name == "torch" else None)
        X, iterations = rgd(A, ranks, xp=name, device=args.device if name == "torch" else None)
        H = tm.hosvd(A, ranks)
        print(
            f"{name:>16}: RGD relative error {relative_error(X, A):.6f} "
            f"({iterations} iterations), HOSVD relative error {relative_error(H, A):.6f}"
        )


if __name__ == "__main__":
    main()
