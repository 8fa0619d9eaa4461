"""The output folder of a run: never clobbered, locked while a run lives, written atomically.

- A fresh default folder ``runs/<date>-<time>`` is made with ``mkdir`` (which fails when the name
  exists), with ``-2``, ``-3``, ... appended when another run took the name in the same second.
- An existing ``--out`` that holds anything is refused unless the run resumes it or is told to
  overwrite it; :func:`preflight` says so before any data is loaded.
- ``.lock`` in the folder holds an exclusive ``flock`` while the run lives: a second run in the
  same folder is refused, and the lock goes with the process however it ends (no stale locks).
- Every file is written to a temporary file in the same folder, flushed, ``fsync``-ed and renamed
  over the old one (``os.replace``, which replaces a symbolic link rather than following it), so
  a file is either the old or the new version; the folder is ``fsync``-ed after the rename.
- An I/O error becomes :class:`OutputError` naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tuckerman.integrations.torch._train._config import ConfigError

__all__ = [
    "OUTPUT_FILES",
    "OutputError",
    "RunFolder",
    "append_line",
    "describe_os_error",
    "preflight",
    "write_atomic",
]

LOCK_NAME = ".lock"
CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
PLOTS = ("accuracy.png", "ranks.png")
#: What a run writes into its folder (``--overwrite`` removes exactly these).
OUTPUT_FILES = (REPORT, METRICS, CHECKPOINT, MODEL, *PLOTS)
_TEMP_SUFFIX = ".tmp"

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system or the process's file size limit",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder",
    errno.ELOOP: "is a symbolic link (not followed)",
    errno.EIO: "input/output error (the device failed)",
}


def describe_os_error(err: OSError) -> str:
    """The cause of an I/O error in words, with its errno name."""
    code = err.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    text = _CAUSES.get(code) if code is not None else None
    text = text or (err.strerror or str(err) or type(err).__name__)
    return f"{text} ({name})" if name else text


class OutputError(OSError):
    """Writing an output failed; the message names the file and the cause. Files written before
    are intact (every write is atomic). The command exits with status 1."""

    def __init__(self, path: Path | str, err: OSError, context: str = "") -> None:
        self.path = str(path)
        self.cause = describe_os_error(err)
        message = f"cannot write {self.path}: {self.cause}"
        super().__init__(err.errno, message + (f"; {context}" if context else ""))

    def __str__(self) -> str:
        return str(self.strerror)


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the data are synced already
        pass
    finally:
        os.close(fd)


class _Recorder:
    """A binary file that remembers the ``OSError`` of a failed write or flush: writers such as
    ``torch.save`` turn it into an error of their own (``RuntimeError: unexpected pos``) that
    names neither the file nor the cause."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as err:
            self.error = err
            raise


def write_atomic(path: Path, write: Callable[[Any], Any]) -> int:
    """Write ``path`` through ``write(file)`` atomically; returns the size in bytes.

    The data go to a temporary file next to ``path`` (created exclusively, so not through a
    symbolic link), are ``fsync``-ed, and the file is renamed over ``path``. On any failure the
    temporary file is removed and ``path`` is left as it was; an ``OSError`` is raised as
    :class:`OutputError`.
    """
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{_TEMP_SUFFIX}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666
        )
    except OSError as err:
        raise OutputError(path, err) from None
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if isinstance(cause, OSError) and not isinstance(cause, OutputError):
            raise OutputError(path, cause) from None
        raise
    _fsync_folder(folder)
    return size


def write_json(path: Path, value: Any) -> int:
    """Strict JSON (``NaN`` and ``Infinity`` are refused: sanitize first), written atomically."""
    data = (json.dumps(value, indent=2, allow_nan=False) + "\n").encode()
    return write_atomic(path, lambda f: f.write(data))


def append_line(path: Path, text: str) -> None:
    """Append one line to ``path`` (created if missing, never through a symbolic link), synced.

    A write that fails part-way is cut off again, so the file holds whole lines only.
    """
    data = (text.rstrip("\n") + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        raise OutputError(path, err) from None
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise OutputError(path, err) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the folder
def _contents(folder: Path) -> list[str]:
    """Entries of ``folder`` other than the lock file."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def _holder(folder: Path) -> str:
    try:
        info = json.loads((folder / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return "another tuckerman train"
    return (
        f"another tuckerman train (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"started {info.get('started', '?')})"
    )


def _lock_is_held(folder: Path) -> bool:
    """Whether a live run holds ``folder``'s lock (checked without writing anything)."""
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except (ImportError, OSError):
        return False
    finally:
        os.close(fd)
    return False


def _refuse_non_folder(path: Path) -> None:
    """Refuse a path that is, or lies under, something other than a folder."""
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            kind = "a file" if p.is_file() else "not a folder"
            what = f"is {kind}" + (", not a folder" if p.is_file() else "")
            if p != path:
                what = f"lies under {p}, which is {kind}"
            raise ConfigError(f"output folder {str(path)!r} {what}")


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _unwritable(path: Path) -> str | None:
    """Why ``path`` (a folder) cannot be written to, or None when it can."""
    if os.access(path, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1):
            return describe_os_error(OSError(errno.EROFS, "read-only"))
    except (OSError, AttributeError):
        pass
    return describe_os_error(OSError(errno.EACCES, "permission denied"))


def preflight(out: str | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that cannot be used, before anything is loaded or written.

    ``out`` None: a fresh default folder will be made (only the place is checked).
    """
    if out is None:
        base = _first_existing(Path("runs"))
        why = _unwritable(base)
        if why is not None:
            raise ConfigError(f"cannot create the output folder under {str(base)!r}: {why}")
        return
    path = Path(out).expanduser()
    _refuse_non_folder(path)
    if resume:
        if not path.is_dir():
            raise ConfigError(f"nothing to resume: {str(path)!r} does not exist")
        if not (path / CHECKPOINT).is_file():
            raise ConfigError(f"nothing to resume: {str(path)!r} holds no {CHECKPOINT}")
    if path.is_dir():
        if _lock_is_held(path):
            raise ConfigError(f"output folder {str(path)!r} is in use by {_holder(path)}")
        entries = _contents(path)
        if entries and not (resume or overwrite):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(
                f"output folder {str(path)!r} is not empty ({shown}): give a new --out, "
                "--resume it to continue the run there, or --overwrite to replace it"
            )
        target = path
    else:
        target = _first_existing(path)
    why = _unwritable(target)
    if why is not None:
        raise ConfigError(f"cannot write to {str(target)!r}: {why}")


def _make_folder(path: Path, **mkdir: Any) -> None:
    """``path.mkdir(**mkdir)``; an error other than ``FileExistsError`` as ConfigError."""
    try:
        path.mkdir(**mkdir)
    except FileExistsError:
        if not mkdir.get("exist_ok"):
            raise
        raise ConfigError(f"output folder {str(path)!r} is not a folder") from None
    except OSError as err:
        raise ConfigError(
            f"cannot create the output folder {str(path)!r}: {describe_os_error(err)}"
        ) from None


class RunFolder:
    """The locked output folder of a live run (rank 0 only); see :func:`RunFolder.prepare`."""

    def __init__(self, path: Path, lock_fd: int | None) -> None:
        self.path = path
        self._lock_fd = lock_fd

    # ------------------------------------------------------------------ creating and locking
    @classmethod
    def prepare(cls, out: str | None, *, resume: bool, overwrite: bool) -> RunFolder:
        """Make (or reuse) the folder, lock it, check it again under the lock and check that it
        can be written. Raises :class:`ConfigError` (nothing of the run is written yet)."""
        if out is None:
            path = cls._fresh(Path("runs"), time.strftime("%Y%m%d-%H%M%S"))
        else:
            path = Path(out).expanduser()
            preflight(out, resume=resume, overwrite=overwrite)
            _make_folder(path, parents=True, exist_ok=True)
        folder = cls(path, cls._lock(path))
        try:
            entries = _contents(path)
            if out is not None and entries and not (resume or overwrite):  # lost a race
                raise ConfigError(
                    f"output folder {str(path)!r} is not empty ({', '.join(entries[:4])}): "
                    "another run wrote there first"
                )
            folder._probe()
            folder._remove_temporaries()
            if overwrite:
                folder._remove_outputs()
        except BaseException:
            folder.release()
            raise
        return folder

    @staticmethod
    def _fresh(base: Path, stamp: str) -> Path:
        _make_folder(base, parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = base / (stamp if i == 1 else f"{stamp}-{i}")
            try:
                _make_folder(path)
                return path
            except FileExistsError:  # another run took the name: try the next
                continue
        raise ConfigError(f"no free output folder name {stamp}-N under {str(base)!r}")

    @staticmethod
    def _lock(path: Path) -> int | None:
        lock = path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise ConfigError(
                f"cannot write to the output folder {str(path)!r}: {describe_os_error(err)}"
            ) from None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the folder checks still apply
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"output folder {str(path)!r} is in use by {_holder(path)}") from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # the lock holds without the note
            pass
        return fd

    def _probe(self) -> None:
        """Write, sync and remove a small file: the folder is writable now."""
        probe = self.path / f".write-test.{os.getpid()}{_TEMP_SUFFIX}"
        try:
            write_atomic(probe, lambda f: f.write(b"tuckerman"))
        except OutputError as err:
            raise ConfigError(
                f"cannot write to the output folder {str(self.path)!r}: {err.cause}"
            ) from None
        with contextlib.suppress(OSError):
            os.unlink(probe)

    def _remove_temporaries(self) -> None:
        """Temporary files left by a run that was killed while writing."""
        for p in self.path.iterdir():
            if p.name.startswith(".") and p.name.endswith(_TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    p.unlink()

    def _remove_outputs(self) -> None:
        for name in OUTPUT_FILES:
            p = self.path / name
            try:
                if p.is_symlink() or p.is_file():
                    p.unlink()  # a symbolic link itself, never its target
            except OSError as err:
                raise ConfigError(
                    f"--overwrite cannot remove {p}: {describe_os_error(err)}"
                ) from None

    def release(self) -> None:
        """Drop the lock (also done by the OS when the process ends)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ files
    def file(self, name: str) -> Path:
        return self.path / name

    def free_bytes(self) -> int | None:
        import shutil

        try:
            return shutil.disk_usage(self.path).free
        except OSError:
            return None


@contextlib.contextmanager
def held(folder: RunFolder | None) -> Iterator[RunFolder | None]:
    """Release ``folder``'s lock when the block ends."""
    try:
        yield folder
    finally:
        if folder is not None:
            folder.release()
