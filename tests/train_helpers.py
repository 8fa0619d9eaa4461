"""Helpers shared by the ``tuckerman train`` tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TIME_KEYS = ("time_s", "train_time_s", "eval_time_s")


def cli(*args: str) -> list[str]:
    """The command line of ``tuckerman train ARGS``: the installed console script when it sits
    next to this Python, else ``python -m`` of the same entry point."""
    script = Path(sys.executable).with_name("tuckerman")
    head = (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-m", "tuckerman.integrations.torch._cli"]
    )
    return [*head, "train", *args]


def env() -> dict[str, str]:
    """The environment of a child run: one thread everywhere, no colours."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", NO_COLOR="1")
    return e


def run(
    *args: str, cwd: Path | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env(), **kw
    )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str):
    """Parse ``text`` as strict JSON (NaN / Infinity refused)."""
    return json.loads(text, parse_constant=_refuse_constant)


def read_report(folder: Path) -> dict:
    return strict_json((Path(folder) / "report.json").read_text())


def without_times(value, drop: tuple[str, ...] = ()):
    """``value`` without measured times (and the keys in ``drop``), recursively."""
    if isinstance(value, dict):
        return {
            k: without_times(v, drop)
            for k, v in value.items()
            if k not in TIME_KEYS and k not in drop
        }
    if isinstance(value, list):
        return [without_times(v, drop) for v in value]
    return value


def one_error_line(stderr: str, prefix: str = "tuckerman train: error: ") -> str:
    """The single line of ``stderr``, which must start with ``prefix``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name → bytes); symbolic links as their target."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def save_images_npz(path: Path, n: int = 50, classes: int = 4, **changes) -> Path:
    """An .npz of ``n`` random 16x16 grey images and labels ``0 .. classes-1``; ``changes``
    replace arrays (``images=...``, ``labels=...``) or add others."""
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8),
        "labels": np.arange(n) % classes,
    }
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def dense_weights(folder: Path) -> dict:
    """The trained model's weights in ``folder/model.pt`` as dense tensors (Tucker layers
    multiplied out).

    The factors themselves are not comparable across runs: at full rank the cores have nearly
    equal singular values, whose singular vectors rounding may rotate within their span.
    """
    import torch
    from tuckerman.integrations.torch import AbstractTuckerLayer, TrainConfig
    from tuckerman.integrations.torch._train import load_data, make_model

    config = TrainConfig(**{**read_report(folder)["config"], "out": None, "resume": None})
    model = make_model(config, load_data(config), torch.device("cpu"))
    model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    weights = {
        f"{name}.weight": module.dense_weight().detach()
        for name, module in model.named_modules()
        if isinstance(module, AbstractTuckerLayer)
    }
    for name, p in model.named_parameters():
        if ".core" not in name and ".factors." not in name:
            weights[name] = p.detach()
    return weights
