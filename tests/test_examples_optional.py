"""The examples degrade without their optional packages: lowrank_approximation.py skips the HOOI
column without TensorLy (an optional, benchmark-only dependency) instead of exiting, and both
it and rank_discovery.py skip the plot without matplotlib, each with a note; jax_mnist.py shows
its --help without JAX and says how to install it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorly", None)  # import tensorly raises ImportError
    return _load("lowrank_approximation")


def test_without_tensorly_the_hooi_column_is_skipped(example, capsys, tmp_path):
    hooi = example.import_tensorly()
    assert hooi is None
    assert "TensorLy is not installed" in capsys.readouterr().err
    a = example.make_tensor(shape=(8, 9, 10), ranks=(4, 4, 4))
    rows = example.compare_at_rank(a, 2, hooi)
    assert "HOOI (TensorLy)" not in rows
    assert set(rows) == {"HOSVD", "RGD from HOSVD", "RCG from HOSVD", "trust region from HOSVD"}
    # the Riemannian solvers improve on the HOSVD they start from
    assert rows["RCG from HOSVD"][0] <= rows["HOSVD"][0] + 1e-12
    pytest.importorskip("matplotlib")
    curves = example.convergence_from_random(a, 2)
    png = example.plot({2: rows}, curves, rows, tmp_path / "plot.png")
    assert png.is_file()


@pytest.mark.parametrize("name", ["lowrank_approximation", "rank_discovery"])
def test_without_matplotlib_the_plot_is_skipped(name, monkeypatch, capsys, tmp_path):
    module = _load(name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert module.plot(None, None, {}, tmp_path / "plot.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()


def test_jax_example_helps_without_jax_and_says_how_to_install_it(monkeypatch, capsys):
    for name in ("jax", "jax.numpy", "optax"):
        monkeypatch.setitem(sys.modules, name, None)
    module = _load("jax_mnist")
    with pytest.raises(SystemExit) as help_exit:
        module.main(["--help"])
    assert help_exit.value.code == 0 and "--epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as run_exit:
        module.main(["--epochs", "1"])
    assert run_exit.value.code == 1
    assert "pip install 'tuckerman[jax]'" in capsys.readouterr().err
