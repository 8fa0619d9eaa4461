"""Helpers shared by the benchmark scripts: load on a shared machine, waiting for quiet, and the
environment record (git, CPU). Imported as ``_common`` (the scripts run from this folder)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY_SHARE = 0.05  # other processes used more than this share of the CPUs: disturbed


class CpuMonitor:
    """CPU seconds that *other* processes used while this one ran (Linux ``/proc/stat``).

    The machine is shared: another process computing at the same time stalls multi-threaded BLAS
    (a GEMM waits for its slower thread), which shows up as slow, quantized samples.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(f) for f in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
        return busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4]), time.perf_counter()

    def report(self) -> dict:
        end = self._read()
        if self.start is None or end is None:
            return {"other_processes_cpu_s": None, "other_processes_cpu_share": None}
        other = max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))
        wall = end[2] - self.start[2]
        return {
            "other_processes_cpu_s": round(other, 2),
            "wall_s": round(wall, 2),
            "other_processes_cpu_share": round(other / (wall * (os.cpu_count() or 1)), 3),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }

    def share(self) -> float | None:
        """Share of the CPUs other processes used since construction (None off Linux)."""
        return self.report()["other_processes_cpu_share"]


def wait_until_idle(timeout: float, window: float = 3.0) -> float:
    """Wait (at most ``timeout`` s) until other processes use < BUSY_SHARE of the CPUs for
    ``window`` s; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        monitor = CpuMonitor()
        time.sleep(window)
        share = monitor.share()
        if share is None or share < BUSY_SHARE:
            break
    return time.perf_counter() - start


def git(*args: str) -> str | None:
    """Output of ``git args`` in the repository, or None."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(env_prefixes: tuple[str, ...] = (), **extra: object) -> dict:
    """The record every results file carries: date, git commit and whether the library sources
    differ from it, Python, platform, CPU, the environment variables starting with
    ``env_prefixes`` (thread and allocator settings), then ``extra`` (library versions...)."""
    import datetime as _dt
    import sys

    import tuckerman

    dirty = git("status", "--porcelain", "--", "tuckerman", "backends", "integrations")
    record: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if dirty is None else bool(dirty),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "tuckerman": tuckerman.__version__,
    }
    if env_prefixes:
        record["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(env_prefixes)}
    record.update(extra)
    return record
