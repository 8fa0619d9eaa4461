"""Packaging: backends/ and integrations/ install inside the tuckerman namespace only."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_backends_and_integrations_are_subpackages():
    b = importlib.import_module("tuckerman.backends")
    assert b.__name__ == "tuckerman.backends"
    assert importlib.import_module("tuckerman.backends.numpy").to_numpy is not None
    assert importlib.import_module("tuckerman.integrations").__name__ == "tuckerman.integrations"


def test_wheel_puts_nothing_named_backends_at_the_top_level(tmp_path):
    """Build the wheel a normal install would use and look at its file list."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("tuckerman-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert all(t == "tuckerman" or t.startswith("tuckerman-") for t in tops), sorted(tops)
    assert "tuckerman/backends/torch.py" in names
    assert "tuckerman/integrations/__init__.py" in names
    assert "tuckerman/testing/strategies.py" in names
