"""One run of ``tuckerman train`` in one process: :class:`Session` (all of it, or one replica's
part of a data-parallel run), the stop requests (signals) and the ways a run ends early.

A session goes through these phases, and refuses bad input in the early ones, before anything
is written:

1. the output folder (:func:`preflight`, read-only); a resumed run reads its checkpoint and
   refuses other settings;
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
import json
import math
import platform
import signal
import threading
import time
from collections.abc import Iterator
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

__all__ = ["TrainingDiverged", "TrainingInterrupted", "TrainingStopped"]

EXIT_DIVERGED = 3


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


class _Stop(Exception):
    """Internal: a stop was requested during evaluation."""


# --------------------------------------------------------------------------- signals
class StopRequests:
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

    def __enter__(self) -> StopRequests:
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


def signal_name(signum: int) -> str:
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
def num_threads(threads: int | None) -> Iterator[None]:
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
class Session:
    """One process's part of a run (all of it without data parallelism)."""

    def __init__(
        self,
        config: TrainConfig,
        stops: StopRequests,
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
                f"interrupted by {signal_name(self.stops.received)} before the first step of "
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
            stop = {"reason": signal_name(signum), "step": pos.steps, "epoch": pos.epoch}
            self._write_report("interrupted", stop)
        raise TrainingInterrupted(
            f"interrupted by {signal_name(signum)} at {where}: checkpoint and partial report "
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
