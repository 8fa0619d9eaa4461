"""The pieces of the training loop: device, model, optimizer, schedule, batches, one step, and
evaluation. :mod:`._command` strings them together with checkpoints and outputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tuckerman.integrations.torch._convert import compression_report, tuckerize
from tuckerman.integrations.torch._models import build_model
from tuckerman.integrations.torch._optim import TDLRT
from tuckerman.integrations.torch._train._config import ConfigError, TrainConfig
from tuckerman.integrations.torch._train._data import Data

__all__ = [
    "EVAL_BATCH",
    "Plan",
    "batches",
    "evaluate",
    "make_closure",
    "make_model",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "shard",
]

EVAL_BATCH = 1000


class NonFinite(Exception):
    """A step met a non-finite loss or gradient; the model was left as before the step."""


# --------------------------------------------------------------------------- model, optimizer
def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def make_model(config: TrainConfig, data: Data, device: torch.device) -> nn.Module:
    """The dense reference model, with its layers made Tucker unless ``method == "dense"``.

    The first convolution and the last linear layer stay dense (as in the paper); the others get
    ``config.ranks`` and ``config.init``. The model is moved to ``device`` and ``config.dtype``.
    """
    config = config.resolved()
    try:
        model = build_model(config.model, data.in_channels, data.num_classes, data.image_size)
    except ValueError as err:
        raise ConfigError(f"{err} (data {data.name!r}, images {data.x_train.shape[1:]})") from None
    if config.method != "dense":
        model = tuckerize(model, ranks=config.ranks, init=config.init)
        if config.method == "tucker-fixed":
            report = compression_report(model)
            if report["compression_rate"] <= 0:
                raise ConfigError(
                    f"method 'tucker-fixed' with ranks {config.ranks!r} does not compress "
                    f"{config.model}: its Tucker layers hold {report['parameters']:,} parameters, "
                    f"the dense ones {report['dense_parameters']:,} (compression rate "
                    f"{100 * report['compression_rate']:.1f}%); give smaller ranks"
                )
    return model.to(device=device, dtype=getattr(torch, config.dtype))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """TDLRT (rank-adaptive or fixed-rank) for Tucker models, SGD / Adam for dense ones."""
    config = config.resolved()
    momentum = config.momentum if config.momentum is not None else 0.0
    if config.method == "dense":
        if config.inner == "adam":
            return torch.optim.Adam(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=momentum, weight_decay=config.weight_decay
        )
    return TDLRT(
        model,
        lr=config.lr,
        tau=config.tau if config.tau is not None else 0.0,
        momentum=momentum,
        weight_decay=config.weight_decay,
        inner=config.inner,
        fixed_rank=config.method == "tucker-fixed",
        one_pass=config.one_pass,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning rate: cosine decay to 0 over ``total_steps``, or constant."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )


# --------------------------------------------------------------------------- the schedule of steps
@dataclasses.dataclass(frozen=True)
class Plan:
    """How many steps each epoch of a run has: ``epochs`` counts only the epochs that run
    (``max_steps`` may end the run early).

    Examples
    --------
    >>> from tuckerman.integrations.torch._train._loop import Plan
    >>> plan = Plan.of(n_train=100, batch_size=32, epochs=3, max_steps=5)
    >>> plan.steps_per_epoch, plan.total_steps, plan.epochs, plan.batches_in(2)
    (4, 5, 2, 1)
    """

    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, n_train: int, batch_size: int, epochs: int, max_steps: int | None) -> Plan:
        per_epoch = math.ceil(n_train / batch_size)
        total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
        return cls(per_epoch, total, math.ceil(total / per_epoch))

    def batches_in(self, epoch: int) -> int:
        """Steps of epoch ``epoch`` (1-based)."""
        left = self.total_steps - (epoch - 1) * self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, left))


def batches(order: np.ndarray, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
    """The index batches of one shuffled pass ``order``, from batch number ``start`` on (the
    last batch may be smaller)."""
    for begin in range(start * batch_size, len(order), batch_size):
        yield order[begin : begin + batch_size]


def shard(idx: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, float]:
    """Replica ``rank``'s part of the global batch ``idx`` and its loss weight.

    The batch is cut into ``world_size`` contiguous parts (equal when ``world_size`` divides
    its length, else differing by one). The weight ``len(part) * world_size / len(idx)`` makes
    DDP's average of the replicas' gradients of ``weight * mean loss`` the gradient of the mean
    loss over the whole batch. A replica left without examples (a last batch shorter than
    ``world_size``) gets the batch's first example with weight 0: it must still take part in
    the forward and backward passes (DDP's all-reduce), but contributes zero gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman.integrations.torch._train import shard
    >>> shard(np.arange(8), 1, 2)
    (array([4, 5, 6, 7]), 1.0)
    >>> shard(np.arange(3), 1, 2)
    (array([2]), 0.6666666666666666)
    >>> shard(np.arange(1), 1, 2)
    (array([0]), 0.0)
    """
    part = np.array_split(idx, world_size)[rank]
    if len(part) == 0:
        return idx[:1], 0.0
    return part, len(part) * world_size / len(idx)


# --------------------------------------------------------------------------- one step
def make_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, record: dict, weight: float = 1.0
) -> Callable[[], torch.Tensor]:
    """One gradient evaluation of the cross-entropy on the batch ``(x, y)``.

    Zeroes the model's gradients, runs forward and backward and returns the loss. The first call
    stores the loss and the number of correct predictions in ``record`` (``"loss"``,
    ``"correct"``): TDLRT calls the closure twice per step, and the first call is at the
    current point.

    ``weight`` scales the mean loss that is differentiated (not the one recorded): a replica of
    a data-parallel run holding ``n_r`` of the ``m`` examples of a global batch uses
    ``n_r * world_size / m``, so that DDP's average of the replicas' gradients is the gradient of
    the mean over the global batch also when the shares differ (1 when they are equal).
    """

    def closure() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        (loss if weight == 1.0 else loss * weight).backward()
        if "loss" not in record:
            record["loss"] = loss.detach()
            record["correct"] = (logits.detach().argmax(1) == y).sum()
        return loss

    return closure


def _finite(loss: torch.Tensor, model: nn.Module) -> bool:
    """Whether the loss and every gradient are finite (one transfer to the host)."""
    flags = [torch.isfinite(loss).all()]
    flags += [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all())


def step(
    model: nn.Module,
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: tuple[torch.Tensor, torch.Tensor],
    weight: float,
    agree: Callable[[bool], bool] | None = None,
) -> dict:
    """One optimizer step on ``batch`` through ``forward`` (the model, or its DDP wrapper), then
    one scheduler step; returns the closure's record (loss and correct predictions).

    Raises :class:`NonFinite` when the loss or a gradient is not finite, with the parameters
    unchanged: TDLRT refuses such a step itself, the dense optimizers are not stepped (their
    gradients are checked first; ``agree`` makes the decision the same on every replica).
    """
    record: dict = {}
    closure = make_closure(forward, *batch, record, weight)
    if isinstance(optimizer, TDLRT):
        try:
            optimizer.step(closure)
        except FloatingPointError as err:
            raise NonFinite(str(err)) from None
    else:
        with torch.enable_grad():
            closure()
        bad = not _finite(record["loss"], model)
        if agree is not None:
            bad = agree(bad)
        if bad:
            raise NonFinite("non-finite loss or gradient: the step was refused")
        optimizer.step()
    scheduler.step()
    return record


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    device: torch.device,
    on_batch: Callable[[int, int], Any] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode.

    The images are cast to the floating-point type of the model's parameters. ``on_batch(done,
    total)`` is called after each batch of :data:`EVAL_BATCH` images (progress, interruption).
    """
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    total_loss, correct = 0.0, 0
    n_batches = math.ceil(len(x) / EVAL_BATCH)
    try:
        for i, start in enumerate(range(0, len(x), EVAL_BATCH)):
            xb = torch.from_numpy(x[start : start + EVAL_BATCH]).to(device=device, dtype=dtype)
            yb = torch.from_numpy(y[start : start + EVAL_BATCH]).to(device)
            logits = model(xb)
            total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            if on_batch is not None:
                on_batch(i + 1, n_batches)
    finally:
        model.train(was_training)
    return total_loss / len(x), correct / len(x)


def layer_ranks(model: nn.Module) -> dict[str, list[int]]:
    """``{layer name: ranks}`` of the Tucker layers."""
    return {layer["name"]: layer["ranks"] for layer in compression_report(model)["layers"]}
