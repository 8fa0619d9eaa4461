"""The data of a run: loading, checks before training, standardization, subset, fingerprint.

Every check names the file and the array and refuses with :class:`ConfigError` (exit status 2)
before anything is trained or written: labels that are not integers, negative, far beyond the
others or too many classes (uint64 labels are checked before any conversion, so values of
2**63 and more cannot wrap around); non-finite pixels; empty splits; shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tuckerman.integrations.torch._train._config import ConfigError, TrainConfig

__all__ = ["MAX_CLASSES", "Data", "load_data"]

# what reading a damaged or foreign .npz raises
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)

MAX_CLASSES = 10_000
"""Largest number of classes accepted (labels 0 .. MAX_CLASSES - 1): far more than the
reference models are meant for, and a stray huge label is refused instead of building a model
with that many outputs."""


@dataclasses.dataclass
class Data:
    """Host arrays of one data set: float32 images ``(n, C, H, W)`` (standardized per channel
    with the training statistics) and int64 labels; ``fingerprint`` identifies the arrays (a
    resumed run checks that it trains on the same data)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int
    fingerprint: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])


# --------------------------------------------------------------------------- checks
def _as_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """Images ``(n,H,W)``, ``(n,H,W,C)`` or ``(n,C,H,W)`` → float32 ``(n,C,H,W)`` (uint8 /255)."""
    images = np.asarray(images)
    if images.dtype.kind not in "uif":
        raise ConfigError(f"{where}: images must be numeric, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        first, last = images.shape[1], images.shape[-1]
        if first <= 4 < last:
            pass
        elif last <= 4 < first:
            images = np.moveaxis(images, -1, 1)
        else:
            raise ConfigError(
                f"{where}: cannot tell the channel axis of images of shape {images.shape}; "
                "expected (n, H, W), (n, H, W, C) or (n, C, H, W) with C <= 4 < H, W"
            )
    else:
        raise ConfigError(
            f"{where}: images must have shape (n, H, W), (n, H, W, C) or (n, C, H, W), "
            f"got {images.shape}"
        )
    if images.shape[0] == 0:
        raise ConfigError(f"{where}: no images (shape {images.shape}): the split is empty")
    if images.shape[2] != images.shape[3]:
        raise ConfigError(f"{where}: images must be square, got shape {images.shape} (n, C, H, W)")
    if images.dtype.kind == "f":
        finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ConfigError(
                f"{where}: {len(bad)} image(s) hold non-finite pixels (NaN or Inf), the first "
                f"is image {bad[0]}: a single one makes every standardized image NaN"
            )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return (images.astype(np.float32) / np.float32(scale)).copy()


def _as_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    """Integer labels ``(n,)`` in ``[0, MAX_CLASSES)`` → int64, checked in their own dtype."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ConfigError(f"{where}: labels must have shape ({n},), got {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ConfigError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size == 0:
        raise ConfigError(f"{where}: no labels: the split is empty")
    low, high = int(labels.min()), int(labels.max())  # exact Python ints, also for uint64
    if low < 0:
        i = int(np.argmin(labels))
        raise ConfigError(f"{where}: labels must be >= 0, got {low} at index {i}")
    if high >= MAX_CLASSES:
        i = int(np.argmax(labels))
        raise ConfigError(
            f"{where}: label {high} at index {i} would make a model with {high + 1:,} classes; "
            f"at most {MAX_CLASSES:,} are accepted (labels 0 .. {MAX_CLASSES - 1})"
        )
    return labels.astype(np.int64)


def _check_label_range(splits: list[tuple[np.ndarray, str, int]]) -> int:
    """The number of classes (largest label + 1), refusing a largest label far beyond the
    others (a stray value that would add many classes that no example has).

    ``splits``: the label arrays with the name of the array they come from and the index of
    their first entry in it.
    """
    values = np.unique(np.concatenate([y for y, _, _ in splits]))
    high = int(values[-1])
    below = int(values[-2]) if len(values) > 1 else 0
    if high > 2 * below + 10:
        y, where, offset = next(s for s in splits if int(s[0].max()) == high)
        raise ConfigError(
            f"{where}: label {high} at index {offset + int(np.argmax(y))} is far beyond the "
            f"other labels (the next largest is {below}): the model would get {high + 1:,} "
            f"classes for {len(values)} distinct labels; number the classes 0 .. K-1"
        )
    return max(high + 1, 2)


# --------------------------------------------------------------------------- sources
def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """The four arrays, and the label arrays as :func:`_check_label_range` takes them."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data file {str(p)!r} does not exist")
    try:
        f = np.load(p, allow_pickle=False)
    except _READ_ERRORS as err:
        raise ConfigError(f"cannot read {str(p)!r} as an .npz file: {err}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ConfigError(f"{str(p)!r} holds a single array, not an .npz archive of named arrays")
    try:
        with f:
            keys = set(f.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                xtr = _as_nchw(f["x_train"], f"{p}: x_train")
                xte = _as_nchw(f["x_test"], f"{p}: x_test")
                ytr = _as_labels(f["y_train"], len(xtr), f"{p}: y_train")
                yte = _as_labels(f["y_test"], len(xte), f"{p}: y_test")
                labels = [(ytr, f"{p}: y_train", 0), (yte, f"{p}: y_test", 0)]
            elif {"images", "labels"} <= keys:
                x = _as_nchw(f["images"], f"{p}: images")
                y = _as_labels(f["labels"], len(x), f"{p}: labels")
                n_train = (4 * len(x)) // 5
                if n_train < 1 or n_train == len(x):
                    raise ConfigError(f"{p}: {len(x)} images are too few to split 80/20")
                xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
                labels = [(y, f"{p}: labels", 0)]
            else:
                raise ConfigError(
                    f"{p}: expected arrays 'images' and 'labels', or 'x_train', 'y_train', "
                    f"'x_test', 'y_test'; found {sorted(keys)}"
                )
    except _READ_ERRORS as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot read {str(p)!r}: {err}") from None
    if xtr.shape[1:] != xte.shape[1:]:
        raise ConfigError(
            f"{p}: train and test images differ in shape: {xtr.shape[1:]} vs {xte.shape[1:]}"
        )
    return xtr, ytr, xte, yte, labels


def _load_cifar10(root: str) -> tuple[np.ndarray, ...]:
    try:
        import torchvision  # noqa: F401
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise ConfigError(
            "--data cifar10 needs torchvision: `pip install torchvision` (it downloads CIFAR-10, "
            "170 MB, on first use). Without it, save the data as an .npz with x_train, y_train, "
            "x_test, y_test and pass --data PATH.npz"
        ) from None
    root_path = Path(root).expanduser() / "cifar10"
    try:
        train = CIFAR10(str(root_path), train=True, download=True)
        test = CIFAR10(str(root_path), train=False, download=True)
    except Exception as err:  # offline, proxy, disk full ...
        raise ConfigError(
            f"could not load or download CIFAR-10 into {str(root_path)!r}: {err}. Download "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
            "(or pass --data-root DIR)"
        ) from err
    xtr, xte = _as_nchw(train.data, "cifar10 train"), _as_nchw(test.data, "cifar10 test")
    return (
        xtr,
        _as_labels(np.asarray(train.targets), len(xtr), "cifar10 train: targets"),
        xte,
        _as_labels(np.asarray(test.targets), len(xte), "cifar10 test: targets"),
    )


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def load_data(config: TrainConfig) -> Data:
    """Load and check the configured data set on the host, apply ``subset`` and standardize.

    Images are standardized per channel with the mean and standard deviation of the training
    images (after ``subset``). The number of classes is the largest label of the whole data set
    plus one (at least 2), whatever the subset.

    Raises
    ------
    ConfigError
        Naming the file and the array, for data that cannot be trained on as they are.
    """
    if config.data == "mnist":
        from tuckerman.datasets import MNIST_TRAIN_SIZE, load_mnist

        x, y = load_mnist("all")  # one read of the archive
        xtr, ytr, xte, yte = (
            x[:MNIST_TRAIN_SIZE],
            y[:MNIST_TRAIN_SIZE],
            x[MNIST_TRAIN_SIZE:],
            y[MNIST_TRAIN_SIZE:],
        )
        name = "mnist (bundled, 8,000 train / 2,000 test)"
        splits = [(ytr, "mnist train", 0), (yte, "mnist test", 0)]
    elif config.data == "cifar10":
        xtr, ytr, xte, yte = _load_cifar10(config.data_root)
        name = "cifar10"
        splits = [(ytr, "cifar10 train: targets", 0), (yte, "cifar10 test: targets", 0)]
    else:
        xtr, ytr, xte, yte, splits = _load_npz(config.data)
        name = str(Path(config.data).expanduser())
    num_classes = _check_label_range(splits)
    if config.subset is not None:
        rng = np.random.default_rng([config.seed, 1])
        keep = np.sort(rng.permutation(len(xtr))[: config.subset])
        xtr, ytr = xtr[keep], ytr[keep]
        xte, yte = xte[: config.subset], yte[: config.subset]
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = xtr.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    mean, std = mean.astype(np.float32), std.astype(np.float32)  # no float64 copies of the data
    xtr = ((xtr - mean) / std).astype(np.float32)
    xte = ((xte - mean) / std).astype(np.float32)
    return Data(xtr, ytr, xte, yte, name, num_classes, _fingerprint(xtr, ytr, xte, yte))
