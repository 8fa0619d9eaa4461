"""Data sets shipped with tuckerman, so examples and the ``tuckerman train`` command run offline.

Everything here is NumPy; frameworks convert with their own ``asarray``.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import numpy as np

__all__ = ["MNIST_TRAIN_SIZE", "load_mnist"]

MNIST_TRAIN_SIZE = 8000
"""The first 8,000 of the 10,000 bundled digits are the training split, the last 2,000 the test
split (the file is already shuffled, with every class in both splits)."""

_SPLITS = ("train", "test", "all")


def load_mnist(
    split: Literal["train", "test", "all"] = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """Load the 10,000 real MNIST digits bundled with the package.

    Parameters
    ----------
    split : {"train", "test", "all"}
        ``"train"``: the first 8,000 digits; ``"test"``: the last 2,000; ``"all"``: all 10,000.

    Returns
    -------
    images : ndarray of float32, shape (n, 1, 28, 28)
        Pixel intensities scaled to [0, 1] (channels-first, as torch convolutions expect;
        transpose for channels-last frameworks).
    labels : ndarray of int64, shape (n,)
        Digit classes 0–9.

    Examples
    --------
    >>> from tuckerman.datasets import load_mnist
    >>> x, y = load_mnist("test")
    >>> x.shape, x.dtype, y.shape, int(y.max())
    ((2000, 1, 28, 28), dtype('float32'), (2000,), 9)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    with resources.files("tuckerman").joinpath("data/mnist10k.npz").open("rb") as f:
        with np.load(f) as data:
            images = data["images"]
            labels = data["labels"]
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    y = labels.astype(np.int64)
    if split == "train":
        return x[:MNIST_TRAIN_SIZE], y[:MNIST_TRAIN_SIZE]
    if split == "test":
        return x[MNIST_TRAIN_SIZE:], y[MNIST_TRAIN_SIZE:]
    return x, y
