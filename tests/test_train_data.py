"""Data checks of ``tuckerman train`` before training: each bad input exits with status 2 and
one line naming the file, the array and the value, and nothing is written (the output folder
is not even created)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
from train_helpers import one_error_line, read_report, save_images_npz  # noqa: E402
from tuckerman.integrations.torch._cli import main  # noqa: E402
from tuckerman.integrations.torch._train import MAX_CLASSES, TrainConfig, load_data  # noqa: E402

N = 50
IMAGES = np.random.default_rng(1).integers(0, 256, size=(N, 16, 16), dtype=np.uint8)


def _labels(**at) -> np.ndarray:
    y = np.arange(N) % 4
    for i, v in at.items():
        y[int(i[1:])] = v
    return y


def _float_images(bad: float, where: int = 17) -> np.ndarray:
    x = IMAGES.astype(np.float32) / 255
    x[where, 3, 4] = bad
    return x


CASES = {
    "a label of 100000 among 50 images": (
        dict(labels=_labels(i17=100_000)),
        "labels: label 100000 at index 17 would make a model with 100,001 classes",
    ),
    "uint64 labels of 2**63 (no wrap-around)": (
        dict(labels=np.where(np.arange(N) == 5, 2**63, np.arange(N) % 4).astype(np.uint64)),
        "label 9223372036854775808 at index 5",
    ),
    "a stray label far beyond the others": (
        dict(labels=_labels(i33=500)),
        "label 500 at index 33 is far beyond the other labels (the next largest is 3)",
    ),
    "a negative label": (dict(labels=_labels(i8=-1)), "labels must be >= 0, got -1 at index 8"),
    "float labels": (dict(labels=np.full(N, 1.0)), "labels must be integers, got dtype float64"),
    "labels of the wrong length": (
        dict(labels=np.zeros(N - 1, int)),
        "labels must have shape (50,)",
    ),
    "a NaN pixel": (
        dict(images=_float_images(np.nan)),
        "images: 1 image(s) hold non-finite pixels (NaN or Inf), the first is image 17",
    ),
    "an infinite pixel": (dict(images=_float_images(np.inf, 3)), "the first is image 3"),
    "no images": (
        dict(images=np.zeros((0, 16, 16), np.uint8), labels=np.zeros(0, int)),
        "images: no images (shape (0, 1, 16, 16)): the split is empty",
    ),
    "too few images to split": (
        dict(images=IMAGES[:1], labels=np.zeros(1, int)),
        "1 images are too few to split 80/20",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    arrays, message = CASES[case]
    path = save_images_npz(tmp_path / "data.npz", n=N, **{"images": IMAGES, **arrays})
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and message in line, line
    assert not out.exists()


def _explicit_split(tmp_path, **changes):
    rng = np.random.default_rng(2)
    arrays = dict(
        x_train=rng.random((30, 1, 16, 16), dtype=np.float32),
        y_train=np.arange(30) % 3,
        x_test=rng.random((8, 1, 16, 16), dtype=np.float32),
        y_test=np.arange(8) % 3,
    )
    arrays.update(changes)
    path = tmp_path / "split.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(x_test=np.zeros((0, 1, 16, 16), np.float32), y_test=np.zeros(0, int)),
         "x_test: no images"),
        (dict(y_test=np.r_[np.arange(7) % 3, 5000]), "y_test: label 5000 at index 7 is far beyond"),
        (dict(y_train=np.r_[np.arange(29) % 3, -4]), "y_train: labels must be >= 0, got -4"),
        (dict(x_train=np.full((30, 1, 16, 16), np.nan, np.float32)),
         "x_train: 30 image(s) hold non-finite pixels"),
        (dict(x_test=np.zeros((8, 1, 12, 12), np.float32)), "train and test images differ"),
    ],
)  # fmt: skip
def test_bad_explicit_splits_name_the_array(tmp_path, capsys, changes, message):
    path = _explicit_split(tmp_path, **changes)
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_damaged_file_is_refused_with_its_name(tmp_path, capsys):
    good = save_images_npz(tmp_path / "good.npz", images=IMAGES)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(good.read_bytes()[:300])
    assert main(["train", "--data", str(damaged), "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot read {str(damaged)!r}" in line
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=IMAGES, labels=np.array([object()] * N))
    assert main(["train", "--data", str(pickled), "--out", str(tmp_path / "run")]) == 2
    assert "pickled.npz" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_largest_accepted_class_count_trains(tmp_path):
    """The checks refuse values, not sizes: labels up to MAX_CLASSES - 1 are fine when they are
    not far beyond the others (here: every class 0 .. 199 present)."""
    labels = np.arange(400) % 200
    path = save_images_npz(tmp_path / "many.npz", n=400, images=np.zeros((400, 16, 16), np.uint8),
                           labels=labels)  # fmt: skip
    assert load_data(TrainConfig(data=str(path))).num_classes == 200
    assert MAX_CLASSES == 10_000
    out = tmp_path / "run"
    args = ["train", "--data", str(path), "--max-steps", "1", "--ranks", "4", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert read_report(out)["data"]["num_classes"] == 200


def test_the_class_count_comes_from_the_whole_file_not_the_subset(tmp_path):
    labels = np.arange(N) % 4
    labels[-1] = 6  # class 6 only in the last example, which a subset leaves out
    path = save_images_npz(tmp_path / "d.npz", n=N, images=IMAGES, labels=labels)
    assert load_data(TrainConfig(data=str(path), subset=5)).num_classes == 7
