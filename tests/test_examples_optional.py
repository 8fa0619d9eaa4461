"""examples/lowrank_approximation.py degrades without TensorLy: the HOOI column is skipped with a
note instead of the script exiting (TensorLy is an optional, benchmark-only dependency)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lowrank_approximation.py"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorly", None)  # import tensorly raises ImportError
    spec = importlib.util.spec_from_file_location("lowrank_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
