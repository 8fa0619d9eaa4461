"""The output folder of ``tuckerman train``: never clobbered, locked, written atomically.

Earlier results are never overwritten (exit 2, one line, every file unchanged) unless asked;
two runs into one folder cannot both run; default folders are unique; symbolic links are
replaced, not followed; an unwritable folder is refused before training; a failed write (an
injected ``ENOSPC``, a real file size limit, a real full tmpfs where one can be mounted) names
the file and the cause and leaves the earlier files intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
from train_helpers import (  # noqa: E402
    cli,
    env,
    one_error_line,
    read_report,
    run,
    snapshot,
    without_times,
)
from tuckerman.integrations.torch._cli import main  # noqa: E402
from tuckerman.integrations.torch._train import TrainConfig, train  # noqa: E402
from tuckerman.integrations.torch._train._outputs import RunFolder  # noqa: E402

SMOKE = ["--subset", "64", "--max-steps", "3", "--ranks", "8", "--no-progress"]


def _train(out, *args: str) -> int:
    smoke = SMOKE[:-3] + SMOKE[-1:] if "dense" in args else SMOKE  # dense: no --ranks
    return main(["train", *smoke, "--out", str(out), *args])


@pytest.fixture
def finished(tmp_path):
    """A finished run in tmp_path/run."""
    out = tmp_path / "run"
    assert _train(out) == 0
    return out


# --------------------------------------------------------------------------- no clobbering
def test_an_existing_run_is_refused_and_left_as_it_was(finished, capsys):
    before = snapshot(finished)
    assert _train(finished, "--method", "dense") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"output folder {str(finished)!r} is not empty (" in line
    assert "--resume it to continue the run there, or --overwrite to replace it" in line
    assert snapshot(finished) == before


def test_a_folder_holding_other_files_is_refused_too(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert _train(out) == 2
    assert "is not empty (notes.txt)" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == {"notes.txt": b"my notes"}


def test_overwrite_replaces_the_run_and_its_stale_plots_but_not_other_files(finished):
    (finished / "notes.txt").write_text("keep me")
    assert (finished / "ranks.png").exists()
    assert _train(finished, "--overwrite", "--method", "dense") == 0
    report = read_report(finished)
    assert report["config"]["method"] == "dense"
    assert not (finished / "ranks.png").exists()  # the old run's plot is gone
    assert (finished / "notes.txt").read_text() == "keep me"
    names = sorted(p.name for p in finished.iterdir() if not p.name.startswith("."))
    assert names == sorted([*report["files"], "notes.txt"])


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_out_that_is_not_a_folder_is_refused(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("data")
    out = blocker if where == "file" else blocker / "run"
    assert _train(out) == 2
    line = one_error_line(capsys.readouterr().err)
    expected = "is a file, not a folder" if where == "file" else f"lies under {blocker}"
    assert expected in line
    assert blocker.read_text() == "data"


def test_symbolic_links_in_the_folder_are_replaced_not_followed(finished, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("report.json", "model.pt", "metrics.jsonl"):
        (finished / name).unlink()
        (finished / name).symlink_to(victim)
    assert _train(finished, "--overwrite") == 0
    assert victim.read_text() == "precious"
    for name in ("report.json", "model.pt", "metrics.jsonl"):
        assert not (finished / name).is_symlink() and (finished / name).stat().st_size > 0


def test_a_resumed_run_does_not_write_through_a_planted_link(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(subset=64, epochs=2, batch_size=32, ranks=8, progress=False)
    train(dataclass_replace(config, out=str(out)))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    train(TrainConfig.resuming(str(out)))
    assert victim.read_text() == "precious"
    assert not (out / "metrics.jsonl").is_symlink()


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------- default folders
def test_default_folders_are_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stamp = "20260101-120000"
    paths = [RunFolder._fresh(Path("runs"), stamp) for _ in range(3)]  # one second, three runs
    assert [p.name for p in paths] == [stamp, f"{stamp}-2", f"{stamp}-3"]
    folders = [RunFolder.prepare(None, resume=False, overwrite=False) for _ in range(2)]
    try:
        assert folders[0].path != folders[1].path and all(f.path.is_dir() for f in folders)
    finally:
        for f in folders:
            f.release()


def test_concurrent_runs_into_one_folder_and_into_default_folders(tmp_path):
    """Four runs start together: two into the same --out (one runs, the other is refused with
    exit 2), two without --out (each gets its own folder)."""
    shared = tmp_path / "shared"
    commands = [cli(*SMOKE, "--out", str(shared)) for _ in range(2)]
    commands += [cli(*SMOKE) for _ in range(2)]
    processes = [
        subprocess.Popen(c, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for c in commands
    ]  # fmt: skip
    results = [(p.wait(300), *p.communicate()) for p in processes]
    shared_codes = sorted(code for code, _, _ in results[:2])
    assert shared_codes == [0, 2], results[:2]
    loser = next(err for code, _, err in results[:2] if code == 2)
    line = one_error_line(loser)
    assert "is in use by another tuckerman train (pid" in line or "is not empty" in line
    assert read_report(shared)["status"] == "finished"
    folders = []
    for code, out, err in results[2:]:
        assert code == 0, err
        folders.append(out.strip().splitlines()[-1].removeprefix("report and plots: "))
    assert len(set(folders)) == 2
    for folder in folders:
        assert Path(folder).parent == Path("runs")  # relative to the working directory
        assert read_report(tmp_path / folder)["status"] == "finished"


def test_a_live_run_locks_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--subset", "640", "--batch-size", "8", "--epochs", "1", "--checkpoint-every", "2")
    process = subprocess.Popen(
        cli(*args, "--no-progress", "--out", str(out)), env=env(), stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        start = time.monotonic()
        while not (out / "checkpoint.pt").exists():
            assert process.poll() is None and time.monotonic() - start < 240
            time.sleep(0.01)
        for extra in (["--overwrite"], ["--resume", str(out)]):
            base = ["train", "--no-progress"] + ([] if "--resume" in extra else ["--out", str(out)])
            assert main(base + extra) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"is in use by another tuckerman train (pid {process.pid} on " in line
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    assert process.returncode == 143
    assert read_report(out)["status"] == "interrupted"  # the live run was not disturbed
    # the lock goes with the process: the folder can be resumed now
    assert main(["train", "--resume", str(out), "--max-steps", "1"]) == 2  # other settings
    assert "max_steps (run: None, now: 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- unwritable
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root ignores file permissions (the read-only mount test covers this case)",
)
def test_a_read_only_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _train(out) == 2
        assert "permission denied" in one_error_line(capsys.readouterr().err)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """The write probe (a small file, fsync-ed) fails: exit 2 before any step."""
    import tuckerman.integrations.torch._train._outputs as outputs

    def read_only(fd):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.os, "fsync", read_only)
    out = tmp_path / "run"
    assert _train(out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write to the output folder {str(out)!r}: read-only file system (EROFS)" in line
    assert [p.name for p in out.iterdir()] == [".lock"]  # no checkpoint: nothing was trained


# --------------------------------------------------------------------------- failed writes
CHECKPOINTED = ["--subset", "128", "--batch-size", "16", "--epochs", "1", "--ranks", "8"]
CHECKPOINTED += ["--checkpoint-every", "2", "--no-progress"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_file(
    tmp_path, capsys, monkeypatch
):
    """The second checkpoint fails half-way with ENOSPC (injected into the write): the first
    one is intact, no temporary file is left, the message names the file and the cause; once
    there is space again, --resume finishes the run as if nothing had happened."""
    reference = tmp_path / "reference"
    assert main(["train", *CHECKPOINTED, "--out", str(reference)]) == 0
    real_save = torch.save
    calls = []

    def save_then_fill_the_disk(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 2 and hasattr(f, "write"):
            f.write(b"x" * 1000)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    out = tmp_path / "run"
    assert main(["train", *CHECKPOINTED, "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err, "tuckerman train: failed: ")
    assert f"cannot write {out}/checkpoint.pt: no space left on the device (ENOSPC)" in line
    assert "the previous checkpoint (step 2) is intact" in line
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["position"]["steps"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(out)]) == 0
    capsys.readouterr()
    assert without_times(read_report(out), ("out", "resume", "resumed")) == without_times(
        read_report(reference), ("out", "resume", "resumed")
    )


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_failed_final_report_leaves_the_earlier_report_intact(tmp_path, capsys, monkeypatch):
    """Syncing the new report.json fails (ENOSPC, as some file systems report a full disk
    only then): the earlier report.json stays as it was, and no temporary file is left."""
    import tuckerman.integrations.torch._train._outputs as outputs

    out = tmp_path / "run"
    train(TrainConfig(subset=64, max_steps=3, ranks=8, progress=False, out=str(out)))
    earlier = (out / "report.json").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if ".report.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    assert main(["train", "--resume", str(out)]) == 1  # a finished run: writes its results again
    line = one_error_line(capsys.readouterr().err, "tuckerman train: failed: ")
    assert f"cannot write {out}/report.json: no space left on the device (ENOSPC)" in line
    assert (out / "report.json").read_bytes() == earlier
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_file_size_limit_names_the_file_and_leaves_no_partial_file(tmp_path):
    """A real write error from the OS: the process may not write files larger than 64 kB
    (RLIMIT_FSIZE), so the first checkpoint (several hundred kB) fails with EFBIG."""
    pytest.importorskip("resource")
    out = tmp_path / "run"
    # a small Python sets the limit and execs the command (no fork of this multithreaded
    # process, as preexec_fn would do)
    limited = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (64000, 64000))"
    limited += "; os.execv(sys.argv[1], sys.argv[1:])"
    command = cli(*CHECKPOINTED, "--out", str(out))
    done = subprocess.run(
        [sys.executable, "-c", limited, *command], capture_output=True, text=True, env=env(),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr, "tuckerman train: failed: ")
    assert f"cannot write {out}/checkpoint.pt: file too large" in line and "(EFBIG)" in line
    assert "no checkpoint was written before" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


_TMPFS_DRIVER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    disk, size, results = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    command = json.loads(sys.argv[4])
    def sh(*a):
        subprocess.run(a, check=True, capture_output=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk)
    out = os.path.join(disk, "run")
    first = subprocess.run(command + ["--out", out], capture_output=True, text=True)
    names = sorted(os.listdir(out))
    import torch
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    sh("mount", "-o", "remount,size=64m", disk)
    head = command[: command.index("train") + 1]
    second = subprocess.run([*head, "--resume", out], capture_output=True, text=True)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    json.dump({"first": [first.returncode, first.stderr], "names": names,
               "checkpoint_steps": saved["position"]["steps"],
               "second": [second.returncode, second.stderr], "report": report},
              open(results, "w"))
    """
)


def _private_mount_namespace() -> list[str] | None:
    """``unshare`` arguments that give a private mount namespace here, or None."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    for args in ([unshare, "-m"], [unshare, "-rm"]):
        probe = subprocess.run([*args, "true"], capture_output=True)
        if probe.returncode == 0:
            return args
    return None


_READ_ONLY_DRIVER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    disk, results = sys.argv[1], sys.argv[2]
    command = json.loads(sys.argv[3])
    def sh(*a):
        subprocess.run(a, check=True, capture_output=True)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk)
    os.mkdir(os.path.join(disk, "empty"))
    sh("mount", "-o", "remount,ro", disk)
    found = {}
    for name in ("new", "empty"):
        done = subprocess.run(command + ["--out", os.path.join(disk, name)],
                              capture_output=True, text=True)
        found[name] = [done.returncode, done.stderr, sorted(os.listdir(disk))]
    json.dump(found, open(results, "w"))
    """
)


def test_a_read_only_file_system_is_refused_before_training(tmp_path):
    """A read-only tmpfs (private mount namespace): a new --out there and an existing empty
    folder on it are refused with exit 2, naming the cause, and nothing is written."""
    namespace = _private_mount_namespace()
    if namespace is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm)")
    disk = tmp_path / "disk"
    disk.mkdir()
    results = tmp_path / "results.json"
    driver = subprocess.run(
        [*namespace, sys.executable, "-c", _READ_ONLY_DRIVER, str(disk), str(results),
         json.dumps(cli(*SMOKE))],
        capture_output=True, text=True, env=env(), timeout=600,
    )  # fmt: skip
    if driver.returncode != 0 and not results.exists():
        pytest.skip(f"cannot mount a tmpfs here: {driver.stderr.strip()[-200:]}")
    found = json.loads(results.read_text())
    for name in ("new", "empty"):
        code, stderr, listing = found[name]
        assert code == 2, stderr
        line = one_error_line(stderr)
        assert "read-only file system (EROFS)" in line and str(disk) in line
        assert listing == ["empty"]  # nothing written, the empty folder still empty


def test_a_real_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    """A small tmpfs (in a private mount namespace) holds one checkpoint and a half: the
    second checkpoint fails with ENOSPC from the kernel; after more space, --resume finishes
    as the run left alone."""
    namespace = _private_mount_namespace()
    if namespace is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm): the injected ENOSPC "
                    "test covers this case")  # fmt: skip
    reference = tmp_path / "reference"
    done = run(*CHECKPOINTED, "--out", str(reference))
    assert done.returncode == 0, done.stderr
    size = (reference / "checkpoint.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    results = tmp_path / "results.json"
    command = cli(*CHECKPOINTED)
    driver = subprocess.run(
        [*namespace, sys.executable, "-c", _TMPFS_DRIVER, str(disk), str(int(1.6 * size)),
         str(results), json.dumps(command)],
        capture_output=True, text=True, env=env(), timeout=600,
    )  # fmt: skip
    if driver.returncode != 0 and "mount" in driver.stderr and not results.exists():
        pytest.skip(f"cannot mount a tmpfs here: {driver.stderr.strip()[-200:]}")
    assert driver.returncode == 0, driver.stderr
    found = json.loads(results.read_text())
    code, stderr = found["first"]
    assert code == 1, stderr
    line = one_error_line(stderr, "tuckerman train: failed: ")
    assert "checkpoint.pt: no space left on the device (ENOSPC)" in line
    assert "the previous checkpoint (step 2) is intact" in line
    assert found["checkpoint_steps"] == 2
    assert not [n for n in found["names"] if n.endswith(".tmp")]
    assert found["second"][0] == 0, found["second"][1]
    drop = ("out", "resume", "resumed")
    assert without_times(found["report"], drop) == without_times(read_report(reference), drop)
