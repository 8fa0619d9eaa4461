"""The README's first example runs as written, and with torch or JAX as its array library, as the
README says; its printed results are the ones in its comments."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
LIBRARY_LINE = "xp = np  # the same code runs with `import torch as xp` or `import jax.numpy as xp`"


def _example() -> str:
    block = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert block is not None and LIBRARY_LINE in block.group(1)
    return block.group(1)


def _run(code: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    return out.getvalue().split("\n")


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_readme_example(library):
    code = _example()
    expected = "42 3.4e-12"
    if library == "torch":
        pytest.importorskip("torch")
        code = code.replace(LIBRARY_LINE, "import torch as xp")
    elif library == "jax":
        jax = pytest.importorskip("jax")
        code = code.replace(LIBRARY_LINE, "import jax.numpy as xp")
        expected = "43 2.4e-12"  # JAX's own random numbers, as the README says
        previous = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
    try:
        lines = _run(code)
    finally:
        if library == "jax":
            jax.config.update("jax_enable_x64", previous)
    assert lines[:2] == [expected, "True 376"]
