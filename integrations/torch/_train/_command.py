"""A whole run: :func:`train` (one process, spawned replicas, or one replica under torchrun).

A run goes through these phases, and refuses bad input in the early ones, before anything is
written:

1. the settings (:meth:`TrainConfig.validate`) and the output folder (:func:`preflight`,
   read-only); a resumed run reads its checkpoint and refuses other settings;
2. the data (checked), the model (``tucker-fixed`` must compress), the optimizer; a resumed run
   loads the checkpoint's states and checks the data's fingerprint;
3. the output folder is made or reused, locked and checked writable (rank 0);
4. training: a checkpoint every ``checkpoint_every`` steps and at the end of every epoch,
   per-epoch metrics appended to ``metrics.jsonl``; SIGINT / SIGTERM stop at the next step
   boundary with a checkpoint and a partial report (:class:`TrainingInterrupted`), a non-finite
   loss stops with the last good checkpoint kept (:class:`TrainingDiverged`);
5. ``model.pt``, the plots and ``report.json`` (last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tuckerman.integrations.torch._convert import compression_report
from tuckerman.integrations.torch._train import _checkpoint
from tuckerman.integrations.torch._train._config import ConfigError, TrainConfig
from tuckerman.integrations.torch._train._data import load_data
from tuckerman.integrations.torch._train._loop import (
    EVAL_BATCH,
    NonFinite,
    Plan,
    batches,
    evaluate,
    layer_ranks,
    make_model,
    make_optimizer,
    make_scheduler,
    resolve_device,
    shard,
    step,
)
from tuckerman.integrations.torch._train._outputs import (
    CHECKPOINT,
    METRICS,
    MODEL,
    REPORT,
    OutputError,
    RunFolder,
    preflight,
    write_atomic,
)
from tuckerman.integrations.torch._train._progress import Progress
from tuckerman.integrations.torch._train._report import (
    UNITS,
    percent_compression,
    write_metrics,
    write_plots,
    write_report,
)

import tuckerman

__all__ = ["ReplicaFailed", "TrainingDiverged", "TrainingInterrupted", "TrainingStopped", "train"]

EXIT_DIVERGED = 3
_GRACE_S = 5.0


# --------------------------------------------------------------------------- outcomes
class TrainingStopped(Exception):
    """The run stopped before its end. ``folder`` holds its last checkpoint (step
    ``checkpoint_step``, None if none was written) and a partial ``report.json``;
    ``exit_code`` is the command's exit status."""

    exit_code = 1

    def __init__(self, message: str, *, folder: str | None, checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.folder = folder
        self.checkpoint_step = checkpoint_step


class TrainingInterrupted(TrainingStopped):
    """Stopped by SIGINT (exit status 130) or SIGTERM (143); ``tuckerman train --resume
    FOLDER`` continues the run."""

    def __init__(self, message: str, *, signal_number: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


class TrainingDiverged(TrainingStopped):
    """A non-finite loss or gradient (exit status 3); the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class ReplicaFailed(RuntimeError):
    """A replica of a data-parallel run crashed or was killed; the others were stopped.

    ``str()`` is one line; ``details`` holds the replica's traceback when it raised.
    """

    def __init__(self, err: Exception, nproc: int, folder: str | None) -> None:
        index = getattr(err, "error_index", "?")
        text = str(err).strip()
        self.details = text if "Traceback" in text else ""
        cause = text.splitlines()[-1] if text else type(err).__name__
        message = (
            f"train with nproc {nproc}: the replica of rank {index} failed ({cause}) and the "
            "others were stopped"
        )
        if folder is not None:
            message += (
                f"; continue from the last checkpoint with: tuckerman train --resume {folder}"
            )
        super().__init__(message)


class _Stop(Exception):
    """Internal: a stop was requested during evaluation."""


# --------------------------------------------------------------------------- signals
class _StopRequests:
    """SIGINT and SIGTERM set :attr:`received` (read at step boundaries) instead of raising.

    ``force``: a second signal raises ``KeyboardInterrupt`` at once (the checkpoint on disk is
    complete: files are written atomically). Handlers are installed only in the main thread
    and restored afterwards. ``ignore``: signals to ignore (replicas leave SIGINT to the
    launcher).
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
        *,
        force: bool = True,
        ignore: tuple[int, ...] = (),
    ) -> None:
        self.signals, self.force, self.ignore = signals, force, ignore
        self.received: int | None = None
        self._before: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        elif self.force:
            raise KeyboardInterrupt

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._before[s] = signal.signal(s, self._handle)
            for s in self.ignore:
                self._before[s] = signal.signal(s, signal.SIG_IGN)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before.clear()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------- helpers
def _versions() -> dict[str, str]:
    return {
        "tuckerman": tuckerman.__version__,
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU threads set to ``threads`` (None: unchanged) and restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclasses.dataclass
class _Replica:
    """This process's place in a data-parallel run: its rank, the group size, the wrapper."""

    rank: int
    world_size: int
    wrapper: nn.Module  # the TuckerDDP around the model
    device: torch.device

    def any(self, flag: bool) -> bool:
        """True on every replica when ``flag`` is True on one."""
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(int(t.item()))

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every replica's ``values`` (float64, exact for the sums and counts kept here)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [p.cpu().tolist() for p in parts]


def _check_resume(config: TrainConfig, saved: dict) -> None:
    """Refuse a resumed run whose settings differ from the run's (other than RESUMABLE)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in saved.items() if k in known}).computation()
    now = config.computation()
    differ = [f"{k} (run: {run.get(k)!r}, now: {now[k]!r})" for k in now if run.get(k) != now[k]]
    if differ:
        raise ConfigError(
            f"cannot resume {config.resume!r} with other settings: {', '.join(differ)}; a "
            "resumed run keeps the settings it started with (give only --resume DIR, and "
            "optionally --threads, --device, --data, --data-root, --checkpoint-every, "
            "--dist-timeout, --no-progress; in Python start from TrainConfig.resuming(DIR))"
        )


# --------------------------------------------------------------------------- one run
class _Session:
    """One process's part of a run (all of it without data parallelism)."""

    def __init__(
        self,
        config: TrainConfig,
        stops: _StopRequests,
        replica: tuple[int, int, torch.device] | None = None,
    ) -> None:
        self.config = config.resolved()
        self.stops = stops
        self.rank = 0 if replica is None else replica[0]
        self.world_size = 1 if replica is None else replica[1]
        self.device = resolve_device(config.device) if replica is None else replica[2]
        self.progress = Progress(config.progress and self.rank == 0, interval=15.0)
        self.folder: RunFolder | None = None
        self.replica: _Replica | None = None
        self.checkpoint_step: int | None = None
        self.bar: Any = None
        self._clock = (time.perf_counter(), 0.0)  # (start of this session, time of the earlier)

    # ------------------------------------------------------------------ set-up
    def run(self) -> dict | None:
        config = self.config
        saved = None
        resuming = config.resume is not None
        out = config.resume if resuming else config.out
        if self.rank == 0:
            preflight(out, resume=resuming, overwrite=config.overwrite)
        if config.resume is not None:
            saved = _checkpoint.load(config.resume)
            _check_resume(config, saved["config"])
        torch.manual_seed(config.seed)
        data = load_data(config)
        if saved is not None and saved["data_fingerprint"] != data.fingerprint:
            raise ConfigError(
                f"the data of {config.data!r} differ from those the run in {config.resume!r} was "
                "trained on (their fingerprints differ); a resumed run needs the same data"
            )
        model = make_model(config, data, self.device)
        forward: nn.Module = model
        if self.world_size > 1:
            from tuckerman.integrations.torch._distributed import TuckerDDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = TuckerDDP(model, device_ids=ids)
            self.replica = _Replica(self.rank, self.world_size, forward, self.device)
        optimizer = make_optimizer(forward, config)
        plan = Plan.of(len(data.x_train), config.batch_size, config.epochs, config.max_steps)
        scheduler = make_scheduler(optimizer, config, plan.total_steps)
        state = _State(plan, self.world_size)
        data_rng = np.random.default_rng(config.seed)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _checkpoint.restore_rng(saved["rng"], data_rng, self.device)
            state.restore(saved)
            self.checkpoint_step = state.position.steps
        if self.rank == 0:
            self.folder = RunFolder.prepare(out, resume=resuming, overwrite=config.overwrite)
            self.config.out = str(self.folder.path)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data, self.data_rng, self.state = data, data_rng, state
        try:
            return self._train()
        finally:
            if self.folder is not None:
                self.folder.release()

    # ------------------------------------------------------------------ training
    def _train(self) -> dict | None:
        config, state = self.config, self.state
        plan, pos = state.plan, state.position
        if self.replica is None and self.stops.received is not None:  # during the set-up
            raise TrainingInterrupted(
                f"interrupted by {_signal_name(self.stops.received)} before the first step of "
                "this session: nothing new was trained or written",
                signal_number=self.stops.received,
                folder=self._folder_name(),
                checkpoint_step=self.checkpoint_step,
            )
        if self.folder is not None:
            self._warn_if_little_space(self.model)
            if config.resume is not None:
                write_metrics(self.folder.path, state.history, append=False)  # as checkpointed
                state.resumed.append({"step": pos.steps, "at": _now()})
                self.progress.line(
                    f"resuming {self.folder.path} at step {pos.steps} of {plan.total_steps} "
                    f"(epoch {min(pos.epoch, plan.epochs)}/{plan.epochs}, batch {pos.batch})"
                )
        self._clock = (time.perf_counter(), state.time_s)
        try:
            while state.position.epoch <= plan.epochs:
                self._epoch(state.position.epoch)
        except NonFinite as err:
            self._tick()
            self._diverged(err)
        except _Stop:
            self._tick()
            self._interrupted()
        except KeyboardInterrupt:  # a second signal: stop at once, write nothing more
            raise TrainingInterrupted(
                f"interrupted again: stopped at once; {self._checkpoint_note()}",
                signal_number=signal.SIGINT,
                folder=self._folder_name(),
                checkpoint_step=self.checkpoint_step,
            ) from None
        if self.rank != 0:
            return None
        self._tick()
        return self._finish()

    def _tick(self) -> None:
        """Bring the run's wall time (over all its sessions) up to date."""
        start, before = self._clock
        self.state.time_s = before + time.perf_counter() - start

    def _epoch(self, epoch: int) -> None:
        config, state, pos = self.config, self.state, self.state.position
        plan = state.plan
        n_batches = plan.batches_in(epoch)
        if pos.order_state is None:
            pos.order_state = self.data_rng.bit_generator.state
        else:  # resumed inside this epoch: the same shuffle again
            self.data_rng.bit_generator.state = pos.order_state
        order = self.data_rng.permutation(len(self.data.x_train))
        dtype = getattr(torch, config.dtype)
        own = pos.sums[self.rank]
        self.bar = bar = self.progress.bar(
            f"epoch {epoch}/{plan.epochs}", n_batches, initial=pos.batch
        )
        show = self.progress.mode != "off"
        start, time_before = time.perf_counter(), pos.epoch_time_s
        done = False
        try:
            for idx in batches(order, config.batch_size, pos.batch):
                if pos.batch >= n_batches:
                    break
                weight = 1.0
                if self.replica is not None:
                    idx, weight = shard(idx, self.rank, self.world_size)
                xb = torch.from_numpy(self.data.x_train[idx]).to(device=self.device, dtype=dtype)
                yb = torch.from_numpy(self.data.y_train[idx]).to(self.device)
                agree = self.replica.any if self.replica is not None else None
                record = step(self.model, self.replica.wrapper if self.replica else self.model,
                              self.optimizer, self.scheduler, (xb, yb), weight, agree)  # fmt: skip
                if weight != 0.0:
                    own[0] += float(record["loss"]) * len(idx)
                    own[1] += int(record["correct"])
                    own[2] += len(idx)
                pos.batch += 1
                pos.steps += 1
                postfix = None
                if show and (pos.batch % 10 == 0 or pos.batch == n_batches):
                    cr = compression_report(self.model)["compression_rate"]
                    postfix = f"loss={own[0] / max(own[2], 1):.4f}, cr={100 * cr:.1f}%"
                bar.update(1, postfix)
                stop = self.stops.received is not None
                if self.replica is not None:
                    stop = self.replica.any(stop)
                every = config.checkpoint_every
                if stop or (every and pos.steps % every == 0 and pos.batch < n_batches):
                    pos.epoch_time_s = time_before + time.perf_counter() - start
                    self._checkpoint()
                if stop:
                    raise _Stop
            done = True
        finally:
            pos.epoch_time_s = time_before + time.perf_counter() - start
            self.bar = None
            summary = f"epoch {epoch}/{plan.epochs}: {pos.batch} steps in {pos.epoch_time_s:.1f} s"
            bar.close(
                summary if done else f"epoch {epoch}/{plan.epochs}: stopped at step {pos.steps}"
            )
        sums = own if self.replica is None else [sum(v) for v in zip(*self.replica.gather(own))]
        if self.rank == 0:
            self._evaluate(epoch, sums)
        state.next_epoch()
        self._checkpoint()
        if self.folder is not None:
            write_metrics(self.folder.path, state.history[-1:], append=True)

    def _evaluate(self, epoch: int, sums: list[float]) -> None:
        state, pos = self.state, self.state.position
        eval_bar = self.progress.bar(
            f"epoch {epoch}: evaluating",
            math.ceil(len(self.data.x_test) / EVAL_BATCH),
            unit="batch",
            delay=1.0,
        )

        def on_batch(done: int, total: int) -> None:
            eval_bar.update(1)
            if self.replica is None and self.stops.received is not None:
                raise _Stop

        start = time.perf_counter()
        try:
            test_loss, test_acc = evaluate(
                self.model, self.data.x_test, self.data.y_test, self.device, on_batch
            )
        except _Stop:
            eval_bar.close("evaluation stopped")
            self._checkpoint()  # the epoch is trained; its evaluation runs again on resume
            raise
        eval_time = time.perf_counter() - start
        loss_sum, correct, seen = sums
        comp = compression_report(self.model)
        entry = {
            "epoch": epoch,
            "steps": pos.steps,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy_percent": 100 * correct / max(seen, 1),
            "test_loss": test_loss,
            "test_accuracy_percent": 100 * test_acc,
            "compression_rate_percent": 100 * comp["compression_rate"],
            "parameters": comp["model_parameters"],
            "ranks": layer_ranks(self.model),
            "train_time_s": pos.epoch_time_s,
            "eval_time_s": eval_time,
        }
        state.history.append(entry)
        summary = (
            f"epoch {epoch}/{state.plan.epochs}: train loss {entry['train_loss']:.4f}, test "
            f"accuracy {entry['test_accuracy_percent']:.2f}%, compression rate "
            f"{entry['compression_rate_percent']:.2f}% (evaluation {eval_time:.1f} s)"
        )
        eval_bar.close(summary)
        if self.progress.mode == "bar":
            self.progress.line(summary)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        state, pos = self.state, self.state.position
        sums = (
            [pos.sums[self.rank]]
            if self.replica is None
            else self.replica.gather(pos.sums[self.rank])
        )
        if self.folder is None:
            return
        payload = {
            "config": dataclasses.asdict(self.config),
            "data_fingerprint": self.data.fingerprint,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _checkpoint.rng_state(self.data_rng, self.device),
            "position": dataclasses.asdict(dataclasses.replace(pos, sums=sums)),
            "history": state.history,
            "time_s": state.time_s,
            "resumed": state.resumed,
            "versions": _versions(),
        }
        if self.bar is not None:
            self.bar.status("saving checkpoint")
        self._tick()
        payload["time_s"] = state.time_s
        start = time.perf_counter()
        path = self.folder.file(CHECKPOINT)
        try:
            size = _checkpoint.save(self.folder.path, payload)
        except OutputError as err:
            note = (
                f"the previous checkpoint (step {self.checkpoint_step}) is intact"
                if self.checkpoint_step is not None
                else "no checkpoint was written before"
            )
            raise OutputError(path, OSError(err.errno, err.cause), note) from None
        seconds = time.perf_counter() - start
        if self.bar is not None:
            self.bar.status(None)
        self.checkpoint_step = pos.steps
        if self.progress.mode == "lines" or seconds > 1.0:
            self.progress.line(
                f"checkpoint at step {pos.steps}: {path} ({size / 1e6:.1f} MB, {seconds:.2f} s)"
            )

    def _checkpoint_note(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written yet"
        return (
            f"the last checkpoint is {self._folder_name()}/{CHECKPOINT} (step "
            f"{self.checkpoint_step})"
        )

    def _folder_name(self) -> str | None:
        return str(self.folder.path) if self.folder is not None else None

    def _warn_if_little_space(self, model: nn.Module) -> None:
        assert self.folder is not None
        free = self.folder.free_bytes()
        need = 3 * _state_bytes(model)  # a checkpoint (model, optimizer state), its temporary copy
        if free is not None and free < need:
            self.progress.line(
                f"warning: {self.folder.path} has {free / 1e6:.1f} MB free; the checkpoints need "
                f"about {need / 1e6:.1f} MB"
            )

    # ------------------------------------------------------------------ endings
    def _interrupted(self) -> None:
        signum = self.stops.received or signal.SIGINT
        pos, plan = self.state.position, self.state.plan
        epoch = min(pos.epoch, plan.epochs)
        where = f"step {pos.steps} of {plan.total_steps} (epoch {epoch}/{plan.epochs})"
        folder = self._folder_name()
        if self.folder is not None:
            stop = {"reason": _signal_name(signum), "step": pos.steps, "epoch": pos.epoch}
            self._write_report("interrupted", stop)
        raise TrainingInterrupted(
            f"interrupted by {_signal_name(signum)} at {where}: checkpoint and partial report "
            f"saved in {folder}; continue with: tuckerman train --resume {folder}",
            signal_number=signum,
            folder=folder,
            checkpoint_step=self.checkpoint_step,
        )

    def _diverged(self, err: NonFinite) -> None:
        pos, plan = self.state.position, self.state.plan
        where = f"step {pos.steps + 1} (epoch {pos.epoch}/{plan.epochs})"
        if self.folder is not None:
            stop = {
                "reason": "non-finite loss or gradient",
                "step": pos.steps + 1,
                "epoch": pos.epoch,
            }
            self._write_report("diverged", stop)
        note = self._checkpoint_note()
        if self.checkpoint_step is not None:
            note += ", from before the divergence"
        raise TrainingDiverged(
            f"training diverged at {where}: non-finite loss or gradient (try a smaller --lr); "
            f"{note}; the partial report is in {self._folder_name()}",
            folder=self._folder_name(),
            checkpoint_step=self.checkpoint_step,
        )

    def _finish(self) -> dict:
        assert self.folder is not None
        folder = self.folder.path
        write_atomic(folder / MODEL, lambda f: torch.save(self.model.state_dict(), f))
        report = self._report("finished", None)
        report["files"] = [REPORT, METRICS, CHECKPOINT, MODEL] + write_plots(report, folder)
        report["plots"] = report["files"][4:]
        write_report(folder / REPORT, report)
        return json.loads((folder / REPORT).read_text())

    def _write_report(self, status: str, stop: dict) -> None:
        assert self.folder is not None
        report = self._report(status, stop)
        present = [n for n in (METRICS, CHECKPOINT) if self.folder.file(n).is_file()]
        report["files"] = [REPORT, *present]
        report["plots"] = []
        write_report(self.folder.file(REPORT), report)

    def _report(self, status: str, stop: dict | None) -> dict:
        state, pos = self.state, self.state.position
        comp = compression_report(self.model)
        history = state.history
        last = history[-1] if history else None
        reasons = {}
        if last is None:
            for key in ("test_accuracy_percent", "test_loss"):
                reasons[key] = "no epoch was finished before the run stopped"
        steps = getattr(self.optimizer, "rank_history", [])
        return {
            "status": status,
            "stopped": stop,
            "test_accuracy_percent": last["test_accuracy_percent"] if last else None,
            "test_loss": last["test_loss"] if last else None,
            "compression_rate_percent": 100 * comp["compression_rate"],
            "ranks": layer_ranks(self.model),
            "parameters": comp["model_parameters"],
            "compression": percent_compression(comp),
            "history": history,
            "rank_history": [
                {"step": i + 1, "ranks": {name: list(r) for name, r in h.items()}}
                for i, h in enumerate(steps)
            ],
            "steps": pos.steps,
            "total_steps": state.plan.total_steps,
            "epochs": state.plan.epochs,
            "time_s": state.time_s,
            "train_time_s": sum(h["train_time_s"] for h in history),
            "checkpoint": None
            if self.checkpoint_step is None
            else {"file": CHECKPOINT, "step": self.checkpoint_step},
            "resumed": state.resumed,
            "seed": self.config.seed,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "world_size": self.world_size,
            "data": {
                "name": self.data.name,
                "train_size": len(self.data.x_train),
                "test_size": len(self.data.x_test),
                "image_shape": list(self.data.x_train.shape[1:]),
                "num_classes": self.data.num_classes,
                "fingerprint": self.data.fingerprint,
            },
            "config": dataclasses.asdict(self.config),
            "versions": _versions(),
            "units": UNITS,
            "null_reasons": reasons,
        }


class _State:
    """What a checkpoint restores besides the model, optimizer, schedule and generators."""

    def __init__(self, plan: Plan, world_size: int) -> None:
        self.plan = plan
        self.world_size = world_size
        self.position = _checkpoint.Position(sums=[[0.0, 0, 0] for _ in range(world_size)])
        self.history: list[dict] = []
        self.time_s = 0.0
        self.resumed: list[dict] = []

    def restore(self, saved: dict) -> None:
        pos = dict(saved["position"])
        sums = [list(s) for s in pos.pop("sums")]
        sums = [[float(a), int(b), int(c)] for a, b, c in sums]
        if len(sums) != self.world_size:
            raise ConfigError(
                f"the checkpoint was written by {len(sums)} replicas, this run has "
                f"{self.world_size}"
            )
        self.position = _checkpoint.Position(**pos, sums=sums)
        self.history = [dict(h) for h in saved["history"]]
        self.time_s = float(saved["time_s"])
        self.resumed = [dict(r) for r in saved["resumed"]]

    def next_epoch(self) -> None:
        pos = self.position
        self.position = _checkpoint.Position(
            epoch=pos.epoch + 1,
            batch=0,
            steps=pos.steps,
            sums=[[0.0, 0, 0] for _ in range(self.world_size)],
        )


# --------------------------------------------------------------------------- entry point
def train(config: TrainConfig | None = None) -> dict | None:
    """Train a model as configured; write checkpoints, ``metrics.jsonl``, ``model.pt``, the plots
    and ``report.json`` to the output folder.

    ``model.pt`` is the trained model's ``state_dict`` (Tucker layers at their final ranks;
    :func:`make_model` with the same config and ``load_state_dict`` restore it). A run stopped
    by SIGINT / SIGTERM or killed continues from its last checkpoint with
    ``train(TrainConfig.resuming(folder))`` (or ``tuckerman train --resume FOLDER``), on the
    CPU exactly as if it had not stopped.

    With ``config.nproc > 1`` it starts ``nproc`` replica processes (``spawn``; gloo on the CPU,
    NCCL with one GPU per process for CUDA) that train data-parallel with
    :class:`~tuckerman.integrations.torch.TuckerDDP` and :class:`TDLRT` (rank decisions taken on
    rank 0 and broadcast), waits for them and returns rank 0's report; if a replica fails, the
    others are stopped and the error names it; if this process dies, the replicas stop. Started
    by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), this process is one replica: it
    joins the group from the environment, and returns the report on rank 0 and None on the
    others.

    Parameters
    ----------
    config : TrainConfig, optional
        Default: the main job (LeNet5, TDLRT, bundled MNIST, two epochs).

    Returns
    -------
    dict
        The report, as written to ``report.json`` (``docs/train.md`` lists its fields):
        ``status``, ``test_accuracy_percent``, ``test_loss``, ``compression_rate_percent``
        (the paper's c.r. over the Tucker layers, 0 for ``"dense"``), ``ranks``,
        ``compression``, ``history`` (per epoch), ``rank_history`` (per step), ``steps``,
        ``time_s``, ``config``, ``data``, ``versions``, ... .

    Raises
    ------
    ConfigError
        Bad settings, data or output folder; nothing was written.
    OutputError
        Writing a file failed (the message names it and the cause); earlier files are intact.
    TrainingInterrupted, TrainingDiverged
        The run stopped early; its checkpoint and a partial report are in the output folder.

    Examples
    --------
    >>> import tempfile
    >>> from tuckerman.integrations.torch import TrainConfig, train
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     report = train(TrainConfig(subset=256, epochs=1, ranks=16, progress=False,
    ...                                out=tmp + "/run"))
    >>> report["status"], len(report["history"]), sorted(report["ranks"])
    ('finished', 1, ['classifier.1', 'features.3'])
    """
    config = TrainConfig() if config is None else config
    config.validate()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1:  # started by torchrun (or another launcher that sets the environment)
        if config.nproc not in (1, world_size):
            raise ConfigError(
                f"nproc {config.nproc} differs from WORLD_SIZE {world_size} set by the launcher "
                "(torchrun): leave nproc at 1 (the launcher starts the processes) or give the "
                "same number"
            )
        config = dataclasses.replace(config, nproc=world_size)
        config.validate()  # batch_size divisible by the world size
        rank = _env_int("RANK", None)
        local_rank = _env_int("LOCAL_RANK", rank)
        local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
        with _StopRequests() as stops:
            return _run_replica(config, "env://", rank, local_rank, local_world, stops)
    if config.nproc > 1:
        return _launch(config)
    with _num_threads(config.threads), _StopRequests() as stops:
        return _Session(config, stops).run()


# --------------------------------------------------------------------------- data parallel
def _env_int(name: str, default: int | None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(
                f"{name} is not set in the environment (WORLD_SIZE is): start with "
                "torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_*"
            )
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"environment variable {name} must be >= 0, got {text!r}")
    return value


def _replica_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """The device of the replica ``local_rank`` of ``local_world`` on this machine."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if count < local_world:
        raise ConfigError(
            f"{local_world} replicas on this machine need one CUDA device each, but torch sees "
            f"{count}: use nproc <= {count} or device 'cpu'"
        )
    return torch.device("cuda", local_rank)


_OUTCOMES = {
    "config-error": ConfigError,
    "output-error": OutputError,
    "interrupted": TrainingInterrupted,
    "diverged": TrainingDiverged,
}


def _launch(config: TrainConfig) -> dict:
    """Run ``config.nproc`` spawned replicas of :func:`_run_replica`; rank 0's report.

    SIGINT / SIGTERM here are passed on to the replicas as one SIGTERM (they stop together at a
    step boundary and rank 0 writes the checkpoint); a second one kills them.
    """
    import torch.multiprocessing as mp

    _replica_device(config.device, 0, config.nproc)  # refuse before starting anything
    preflight(config.out if config.resume is None else config.resume,
              resume=config.resume is not None, overwrite=config.overwrite)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tuckerman-train-") as tmp:
        context = mp.start_processes(
            _spawned_replica,
            args=(config, Path(tmp, "store").as_uri(), tmp, os.getpid()),
            nprocs=config.nproc,
            join=False,
            start_method="spawn",
        )
        forwarded = []

        def forward(signum: int, frame: Any) -> None:
            forwarded.append(signum)
            for process in context.processes:
                if process.is_alive() and process.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(
                            process.pid, signal.SIGTERM if len(forwarded) == 1 else signal.SIGKILL
                        )

        # torch logs each SIGTERM / SIGKILL it sends to a replica; the failure is reported once
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        log_level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, forward)
        try:
            # join raises when a replica fails, after stopping the others: SIGTERM once they had
            # `grace` seconds to end by themselves, SIGKILL after as many more (a replica that
            # waits in a collective for a dead peer does not reach its next step boundary)
            while not context.join(grace_period=_GRACE_S):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            outcome = _read_outcome(tmp, err.error_index)
            if outcome is not None and outcome["status"] in _OUTCOMES:
                raise _outcome_error(outcome, forwarded) from None
            if forwarded:
                raise TrainingInterrupted(
                    f"interrupted by {_signal_name(forwarded[0])} twice: the replicas were "
                    "killed; the last checkpoint in the output folder is complete",
                    signal_number=forwarded[0],
                    folder=None,
                    checkpoint_step=None,
                ) from None
            folder = config.resume if config.resume is not None else config.out
            raise ReplicaFailed(err, config.nproc, folder) from None
        finally:
            spawn_log.setLevel(log_level)
            for s, handler in handlers.items():
                signal.signal(s, handler)
            for process in context.processes:  # e.g. after KeyboardInterrupt
                if process.is_alive():
                    process.terminate()
                    process.join(10)
        outcome = _read_outcome(tmp, 0)
    if outcome is None:
        raise RuntimeError(f"train with nproc {config.nproc}: rank 0 ended without a result")
    if outcome["status"] != "finished":
        raise _outcome_error(outcome, forwarded)
    with open(Path(outcome["folder"]) / REPORT) as f:
        return json.load(f)


def _read_outcome(tmp: str, rank: int) -> dict | None:
    own = Path(tmp, f"outcome-{rank}.json")
    found = [own] if own.exists() else sorted(Path(tmp).glob("outcome-*.json"))
    for path in found:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    return None


def _outcome_error(outcome: dict, forwarded: list[int]) -> Exception:
    kind = _OUTCOMES[outcome["status"]]
    message = outcome["message"]
    if kind is ConfigError:
        return ConfigError(message)
    if kind is OutputError:
        err = OutputError(outcome.get("path", "?"), OSError(outcome.get("errno"), ""))
        err.strerror = message
        return err
    kw = {"folder": outcome.get("folder"), "checkpoint_step": outcome.get("checkpoint_step")}
    if kind is TrainingInterrupted:
        signum = forwarded[0] if forwarded else outcome.get("signal", signal.SIGTERM)
        message = message.replace(_signal_name(outcome.get("signal", signum)), _signal_name(signum))
        return TrainingInterrupted(message, signal_number=signum, **kw)
    return TrainingDiverged(message, **kw)


def _watch_parent(parent: int) -> None:
    """Stop this replica when its launcher (``parent``) is gone (killed, crashed)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                print(
                    f"tuckerman train replica (pid {os.getpid()}): the launcher (pid {parent}) "
                    "is gone; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="tuckerman-parent-watch", daemon=True).start()


def _spawned_replica(
    rank: int, config: TrainConfig, init_method: str, tmp: str, parent: int
) -> None:
    """Body of a replica started by :func:`_launch` (a module-level function for ``spawn``)."""
    _watch_parent(parent)
    outcome: dict[str, Any] = {"status": "finished"}
    stops = _StopRequests((signal.SIGTERM,), force=False, ignore=(signal.SIGINT,))
    try:
        with stops:
            _run_replica(config, init_method, rank, rank, config.nproc, stops, outcome)
    except TrainingStopped as err:  # all replicas stop together: end normally
        outcome.update(
            status="interrupted" if isinstance(err, TrainingInterrupted) else "diverged",
            message=str(err),
            folder=err.folder,
            checkpoint_step=err.checkpoint_step,
            signal=getattr(err, "signal_number", None),
        )
    except ConfigError as err:
        outcome.update(status="config-error", message=str(err))
        _write_outcome(tmp, rank, outcome)
        raise
    except OutputError as err:
        outcome.update(status="output-error", message=str(err), path=err.path, errno=err.errno)
        _write_outcome(tmp, rank, outcome)
        raise
    _write_outcome(tmp, rank, outcome)


def _write_outcome(tmp: str, rank: int, outcome: dict) -> None:
    Path(tmp, f"outcome-{rank}.json.part").write_text(json.dumps(outcome))
    os.replace(Path(tmp, f"outcome-{rank}.json.part"), Path(tmp, f"outcome-{rank}.json"))


def _run_replica(
    config: TrainConfig,
    init_method: str,
    rank: int,
    local_rank: int,
    local_world: int,
    stops: _StopRequests,
    outcome: dict | None = None,
) -> dict | None:
    """Join the process group, train one replica, leave the group (also on errors)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(
            "data-parallel training needs torch.distributed, which this torch "
            "build lacks (torch.distributed.is_available() is False)"
        )
    device = _replica_device(config.device, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=config.nproc,
        timeout=datetime.timedelta(seconds=config.dist_timeout),
    )
    try:
        with _num_threads(config.threads):
            session = _Session(config, stops, (rank, config.nproc, device))
            try:
                report = session.run()
            finally:
                if outcome is not None and session.folder is not None:
                    outcome["folder"] = str(session.folder.path)
        # wait for rank 0's evaluation and files, so that all replicas end together
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        return report
    finally:
        # DDP's reducers hold the group, and reference cycles keep them alive: free them and the
        # group now, not while the interpreter shuts down (where freeing gloo's worker threads
        # occasionally aborted a replica: "terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
