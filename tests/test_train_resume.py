"""Checkpoints and resuming: a real ``tuckerman train`` process is stopped mid-epoch (SIGINT,
SIGTERM, SIGKILL) and resumed; the final report and weights must equal those of the same run
left alone (CPU, one thread), although TDLRT changes the ranks at every step of these runs.

Also: an interruption during evaluation, a diverged run (last good checkpoint kept, strict
JSON), resuming with other settings or data (refused, nothing changed), resuming a finished
run, and the checkpoint's contents (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
from train_helpers import (  # noqa: E402
    cli,
    dense_weights,
    env,
    one_error_line,
    read_report,
    run,
    save_images_npz,
    snapshot,
    strict_json,
    without_times,
)
from tuckerman.integrations.torch._cli import main  # noqa: E402
from tuckerman.integrations.torch._train import (  # noqa: E402
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    train,
)

# 20 steps per epoch, 40 in all; TDLRT changes the rank of the fc layer at every step
ARGS = ("--subset", "320", "--epochs", "2", "--batch-size", "16", "--ranks", "0.3")
ARGS += ("--tau", "0.1", "--checkpoint-every", "3", "--seed", "3", "--threads", "1")
ARGS += ("--no-progress",)
TOTAL_STEPS = 40
PER_EPOCH = 20


def _comparable(report: dict) -> dict:
    """What must be equal between a resumed run and the same run left alone."""
    return without_times(report, drop=("out", "resume", "resumed"))


def _weights(folder) -> dict:
    return torch.load(folder / "model.pt", weights_only=True)


def _assert_same_run(folder, reference) -> None:
    report, expected = read_report(folder), read_report(reference)
    assert report["status"] == "finished" and report["steps"] == TOTAL_STEPS
    assert _comparable(report) == _comparable(expected)
    a, b = _weights(folder), _weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line) for line in lines] == report["history"]  # one line per epoch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run left alone (a subprocess too: same code path, nothing shared with pytest)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(*ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = read_report(out)
    changes = {json.dumps(h["ranks"]) for h in report["rank_history"]}
    assert len(changes) > 20  # the ranks change along the run
    return out


def _wait_for(predicate, process, what: str, timeout: float = 240.0) -> None:
    start = time.monotonic()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before {what}")
        if time.monotonic() - start > timeout:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _checkpoint(folder) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_saves_a_checkpoint_and_resume_equals_the_run_left_alone(
    tmp_path, reference, name
):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli(*ARGS, "--out", str(out)), stderr=subprocess.PIPE, text=True, env=env()
    )
    _wait_for(lambda: (out / "checkpoint.pt").exists(), process, "the first checkpoint")
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, name)
    line = one_error_line(stderr, f"tuckerman train: interrupted by {name} at step ")
    assert f"continue with: tuckerman train --resume {out}" in line
    # the checkpoint is where the run stopped, inside the first epoch
    position = _checkpoint(out)["position"]
    assert 0 < position["batch"] < PER_EPOCH and position["epoch"] == 1
    assert position["steps"] == position["batch"]
    # the partial report: strict JSON, the stop and the missing results with a reason
    partial = read_report(out)
    assert partial["status"] == "interrupted"
    assert partial["stopped"] == {"reason": name, "step": position["steps"], "epoch": 1}
    assert partial["checkpoint"] == {"file": "checkpoint.pt", "step": position["steps"]}
    assert partial["test_accuracy_percent"] is None
    assert "no epoch was finished" in partial["null_reasons"]["test_accuracy_percent"]
    assert len(partial["rank_history"]) == position["steps"]
    assert not (out / "model.pt").exists()

    done = run("--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    _assert_same_run(out, reference)
    report = read_report(out)
    assert [r["step"] for r in report["resumed"]] == [position["steps"]]


def test_sigkill_in_the_second_epoch_resumes_from_the_last_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    process = subprocess.Popen(cli(*ARGS, "--out", str(out)), stderr=subprocess.DEVNULL, env=env())
    metrics, checkpoint = out / "metrics.jsonl", out / "checkpoint.pt"

    def in_epoch_2() -> bool:  # a checkpoint written after the first epoch's metrics line
        try:
            return checkpoint.stat().st_mtime_ns > metrics.stat().st_mtime_ns
        except FileNotFoundError:
            return False

    _wait_for(in_epoch_2, process, "a checkpoint in the second epoch")
    process.kill()
    process.wait(60)
    assert process.returncode == -signal.SIGKILL
    position = _checkpoint(out)["position"]
    assert position["epoch"] == 2 and 0 < position["batch"] < PER_EPOCH
    assert position["steps"] % 3 == 0  # a periodic checkpoint
    history = [strict_json(line) for line in metrics.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]  # the killed run kept its history

    done = run("--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    _assert_same_run(out, reference)


def test_an_interruption_during_evaluation_evaluates_again_on_resume(tmp_path, monkeypatch):
    """SIGINT arrives while the test set is evaluated (in this process): the checkpoint says
    the epoch is trained, and the resumed run evaluates it and goes on as the run left alone."""
    import tuckerman.integrations.torch._train._run as command

    config = dict(subset=300, epochs=2, batch_size=30, ranks=0.3, tau=0.1, progress=False)
    config.update(threads=1, checkpoint_every=0)
    reference = train(TrainConfig(**config, out=str(tmp_path / "reference")))
    real_evaluate = command.evaluate
    calls = []

    def evaluate_and_interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # during the second epoch's evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(command, "evaluate", evaluate_and_interrupt)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGINT at step 20 of 20"):
        train(TrainConfig(**config, out=str(out)))
    monkeypatch.setattr(command, "evaluate", real_evaluate)
    position = _checkpoint(out)["position"]
    assert (position["epoch"], position["batch"], position["steps"]) == (2, 10, 20)
    assert len(_checkpoint(out)["history"]) == 1  # epoch 2 not evaluated yet
    resumed = train(TrainConfig.resuming(str(out)))
    assert _comparable(resumed) == _comparable(reference)


def test_resuming_a_finished_run_rewrites_the_same_results(tmp_path, reference):
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "report.json", "model.pt"):
        (out / name).write_bytes((reference / name).read_bytes())
    done = run("--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    _assert_same_run(out, reference)


def test_resume_with_other_settings_or_data_is_refused_and_changes_nothing(
    tmp_path, reference, capsys
):
    before = snapshot(reference)
    assert main(["train", "--resume", str(reference), "--lr", "0.5", "--epochs", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "lr (run: 0.03, now: 0.5)" in line and "epochs (run: 2, now: 3)" in line
    with pytest.raises(ConfigError, match=r"seed \(run: 3, now: 0\)"):
        train(TrainConfig(resume=str(reference), subset=320, epochs=2, batch_size=16))
    other = save_images_npz(tmp_path / "other.npz", n=400, classes=10)
    assert main(["train", "--resume", str(reference), "--data", str(other)]) == 2
    assert "the data of" in one_error_line(capsys.readouterr().err)
    assert snapshot(reference) == before


def test_the_checkpoint_loads_with_weights_only_and_holds_the_run(reference):
    saved = _checkpoint(reference)
    assert saved["format"] == "tuckerman-train-checkpoint/1"
    assert set(saved) >= {"model", "optimizer", "scheduler", "rng", "position", "history"}
    assert saved["position"]["steps"] == TOTAL_STEPS and saved["position"]["epoch"] == 3
    assert saved["config"] == read_report(reference)["config"]
    assert len(saved["optimizer"]["rank_history"]) == TOTAL_STEPS
    assert isinstance(saved["rng"]["torch"], torch.Tensor)


# --------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("method", ["dense", "tdlrt"])
def test_a_diverged_run_keeps_its_last_good_checkpoint_and_says_where(tmp_path, capsys, method):
    out = tmp_path / "run"
    args = ["train", "--method", method, "--subset", "256", "--epochs", "1", "--lr", "1e4"]
    args += ["--checkpoint-every", "1", "--no-progress", "--out", str(out), "--momentum", "0"]
    if method == "tdlrt":
        args += ["--ranks", "8"]
    status = main(args)
    line = one_error_line(capsys.readouterr().err, "tuckerman train: training diverged at step ")
    assert status == 3
    report = read_report(out)  # strict JSON, whatever the losses were
    step = report["stopped"]["step"]
    assert report["status"] == "diverged" and step > 1
    assert f"the last checkpoint is {out}/checkpoint.pt (step {step - 1})" in line
    saved = _checkpoint(out)
    assert saved["position"]["steps"] == step - 1
    assert all(
        bool(torch.isfinite(t).all()) for t in saved["model"].values() if t.is_floating_point()
    )
    assert not (out / "model.pt").exists()


def test_a_run_that_diverges_at_once_says_no_checkpoint_was_written(tmp_path):
    path = save_images_npz(tmp_path / "d.npz", n=60, classes=3)
    with pytest.raises(TrainingDiverged, match="at step 2 .*no checkpoint was written yet"):
        train(
            TrainConfig(
                data=str(path), method="dense", lr=1e30, momentum=0.0, progress=False,
                out=str(tmp_path / "run"),
            )
        )  # fmt: skip
    report = read_report(tmp_path / "run")
    assert report["checkpoint"] is None and report["history"] == []
    assert np.isfinite(report["compression_rate_percent"])


# --------------------------------------------------------------------------- data parallel
DDP = ("--nproc", "2", "--subset", "321", "--epochs", "2", "--batch-size", "32", "--lr", "0.1")
DDP += ("--ranks", "0.2", "--dtype", "float64", "--dist-timeout", "60", "--threads", "1")
DDP += ("--checkpoint-every", "3", "--no-progress")


def _replicas(launcher: int) -> list[int]:
    """The replica processes started by ``launcher`` (spawned Python processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


def _start_ddp(out) -> tuple[subprocess.Popen, list[int]]:
    process = subprocess.Popen(
        cli(*DDP, "--out", str(out)), stderr=subprocess.PIPE, text=True, env=env()
    )
    _wait_for(lambda: (out / "checkpoint.pt").exists(), process, "the first checkpoint")
    replicas = _replicas(process.pid)
    assert len(replicas) == 2, replicas
    return process, replicas


def _wait_until_gone(pids: list[int], seconds: float) -> None:
    start = time.monotonic()
    while any(_running(p) for p in pids):
        assert time.monotonic() - start < seconds, [p for p in pids if _running(p)]
        time.sleep(0.05)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
def test_the_replicas_stop_when_the_launcher_is_killed(tmp_path):
    process, replicas = _start_ddp(tmp_path / "run")
    process.kill()
    process.communicate(timeout=60)
    _wait_until_gone(replicas, 30)
    saved = _checkpoint(tmp_path / "run")  # the last checkpoint is complete
    assert saved["world_size"] == 2 and saved["position"]["steps"] % 3 == 0


@needs_proc
def test_a_killed_replica_stops_the_others_with_one_line(tmp_path):
    out = tmp_path / "run"
    process, replicas = _start_ddp(out)
    os.kill(replicas[-1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    line = one_error_line(stderr, "tuckerman train: failed: train with nproc 2: the replica of ")
    assert "terminated with signal SIGKILL) and the others were stopped" in line
    assert f"continue from the last checkpoint with: tuckerman train --resume {out}" in line
    _wait_until_gone(replicas, 30)


def test_sigterm_stops_a_data_parallel_run_and_resume_matches_one_process(tmp_path):
    """SIGTERM to the launcher: the replicas stop together at a step boundary, rank 0 writes
    the checkpoint; the resumed two-process run trains the same model as one process on the
    global batch (float64: exactly the same ranks, weights to 1e-12)."""
    one = tmp_path / "one"
    single = DDP[2:]  # without --nproc 2
    assert main(["train", *single, "--out", str(one)]) == 0
    out = tmp_path / "two"
    process, _ = _start_ddp(out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    line = one_error_line(stderr, "tuckerman train: interrupted by SIGTERM at step ")
    assert f"--resume {out}" in line
    assert read_report(out)["status"] == "interrupted"
    done = run("--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    a, b = read_report(one), read_report(out)
    assert b["world_size"] == 2 and b["resumed"] and b["steps"] == a["steps"] == 22
    assert b["rank_history"] == a["rank_history"]
    assert [h["test_accuracy_percent"] for h in b["history"]] == [
        h["test_accuracy_percent"] for h in a["history"]
    ]
    wa, wb = dense_weights(one), dense_weights(out)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-12, msg=name)
