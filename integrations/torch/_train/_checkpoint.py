"""Checkpoints of a run: everything needed to continue it as if it had never stopped.

``checkpoint.pt`` (one file, replaced atomically each time) holds

- ``model``: ``model.state_dict()`` (Tucker layers at their current ranks; loading resizes a
  freshly built model's layers), ``optimizer``: ``optimizer.state_dict()`` (TDLRT: its state
  at the current ranks and the rank history), ``scheduler``: the LR schedule's position;
- ``rng``: torch's CPU (and CUDA) generator states and the state of the data-order generator;
- ``position``: the epoch in progress, the batches of it already trained, the steps in total, the
  data-order generator's state before this epoch's shuffle (so the same order is drawn again),
  each replica's running loss and accuracy sums of the epoch, and its training time so far;
- ``history`` (the per-epoch metrics), ``config`` (the resolved settings), ``data_fingerprint``,
  ``world_size``, ``elapsed_s``, ``resumed`` and ``versions``.

Only tensors, numbers, strings, lists and dicts: it loads with ``torch.load(...,
weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tuckerman.integrations.torch._train._config import ConfigError
from tuckerman.integrations.torch._train._outputs import CHECKPOINT, write_atomic

__all__ = ["FORMAT", "Position", "load", "read_config", "restore_rng", "rng_state", "save"]

FORMAT = "tuckerman-train-checkpoint/1"


@dataclasses.dataclass
class Position:
    """Where a run stands: ``batch`` batches of epoch ``epoch`` (1-based) are trained, ``steps``
    in all. ``order_state``: the data-order generator's state before the epoch's shuffle (None
    until the epoch starts); ``sums``: per replica ``[loss sum, correct, examples]`` of the
    epoch so far; ``epoch_time_s``: its training time so far."""

    epoch: int = 1
    batch: int = 0
    steps: int = 0
    order_state: dict | None = None
    sums: list[list[float]] = dataclasses.field(default_factory=list)
    epoch_time_s: float = 0.0


def rng_state(data_rng: np.random.Generator, device: torch.device) -> dict:
    """The generator states a run draws from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data_order": data_rng.bit_generator.state,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, data_rng: np.random.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_rng.bit_generator.state = state["data_order"]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(folder: Path, payload: dict) -> int:
    """Write ``payload`` to ``folder/checkpoint.pt`` atomically; its size in bytes."""
    payload = {"format": FORMAT, **payload}
    return write_atomic(folder / CHECKPOINT, lambda f: torch.save(payload, f))


def load(folder: str | Path, *, mmap: bool = False) -> dict:
    """Read ``folder/checkpoint.pt`` (``weights_only``, tensors on the CPU).

    Raises
    ------
    ConfigError
        When it is missing, unreadable or not a checkpoint of ``tuckerman train``.
    """
    path = Path(folder).expanduser() / CHECKPOINT
    if not path.parent.is_dir():
        raise ConfigError(f"nothing to resume: {str(folder)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {str(folder)!r} holds no {CHECKPOINT}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated, foreign, written by a newer torch ...
        raise ConfigError(f"cannot read the checkpoint {str(path)!r}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ConfigError(
            f"{str(path)!r} is not a checkpoint of tuckerman train (format {FORMAT!r}), "
            f"found {found!r}"
        )
    return payload


def read_config(folder: str | Path) -> dict:
    """The resolved settings saved in ``folder``'s checkpoint."""
    return dict(load(folder, mmap=True)["config"])
