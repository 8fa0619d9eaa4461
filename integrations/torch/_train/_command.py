"""The entry point of a run, :func:`train`: in this process, as spawned replicas (``nproc > 1``)
or as one replica under torchrun. :mod:`._run` holds what one process does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tuckerman.integrations.torch._train._config import ConfigError, TrainConfig
from tuckerman.integrations.torch._train._outputs import REPORT, OutputError, preflight
from tuckerman.integrations.torch._train._run import (
    Session,
    StopRequests,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingStopped,
    num_threads,
    signal_name,
)

__all__ = ["ReplicaFailed", "train"]

_GRACE_S = 5.0


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
        with StopRequests() as stops:
            return _run_replica(config, "env://", rank, local_rank, local_world, stops)
    if config.nproc > 1:
        return _launch(config)
    with num_threads(config.threads), StopRequests() as stops:
        return Session(config, stops).run()


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
                    f"interrupted by {signal_name(forwarded[0])} twice: the replicas were "
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
        message = message.replace(signal_name(outcome.get("signal", signum)), signal_name(signum))
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
    stops = StopRequests((signal.SIGTERM,), force=False, ignore=(signal.SIGINT,))
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
    stops: StopRequests,
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
        with num_threads(config.threads):
            session = Session(config, stops, (rank, config.nproc, device))
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
