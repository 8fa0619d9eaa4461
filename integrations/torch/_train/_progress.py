"""Progress of the long phases (training epochs, evaluation, checkpoints) on stderr.

On a terminal: tqdm bars. Otherwise (a log file, a pipe, a batch system): one plain line every
``interval`` seconds and one when a phase ends, never carriage returns. Off with
``progress=False``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

__all__ = ["Progress"]


class _Bar:
    """A tqdm bar, or periodic lines, for one phase of ``total`` units."""

    def __init__(
        self, progress: Progress, desc: str, total: int, unit: str, initial: int, delay: float
    ) -> None:
        self._progress = progress
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self._postfix = ""
        self._start = self._last = time.monotonic()
        self._tqdm: Any = None
        if progress.mode == "bar":
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                leave=True,
                dynamic_ncols=True,
                file=progress.stream,
                delay=delay,
            )

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self._postfix = postfix
        if self._tqdm is not None:
            if postfix is not None:
                self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(n)
        elif self._progress.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self._progress.interval and self.n < self.total:
                self._last = now
                self._progress.line(self._text(now))

    def status(self, text: str | None) -> None:
        """A passing note (e.g. "saving checkpoint") on the bar, None to put back the usual
        postfix; nothing in line mode."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(self._postfix if text is None else text)

    def _text(self, now: float) -> str:
        pct = 100 * self.n / self.total if self.total else 100.0
        elapsed = now - self._start
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%), {elapsed:.1f} s"
        return text + (f", {self._postfix}" if self._postfix else "")

    def close(self, summary: str | None = None) -> None:
        """End the phase; in line mode one closing line (``summary`` or the counts)."""
        if self._tqdm is not None:
            if self._postfix:
                self._tqdm.set_postfix_str(self._postfix, refresh=False)
            self._tqdm.close()
            self._tqdm = None
        elif self._progress.mode == "lines":
            self._progress.line(summary or self._text(time.monotonic()))


class Progress:
    """Where progress goes: ``mode`` is ``"bar"`` (a terminal and tqdm), ``"lines"`` or
    ``"off"``."""

    def __init__(
        self,
        enabled: bool,
        stream: IO[str] | None = None,
        *,
        interval: float = 15.0,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.mode = "off"
        if enabled:
            self.mode = "bar" if _is_terminal(self.stream) and _has_tqdm() else "lines"

    def bar(
        self, desc: str, total: int, unit: str = "step", initial: int = 0, delay: float = 0.0
    ) -> _Bar:
        """A bar (shown after ``delay`` seconds on a terminal) or periodic lines."""
        return _Bar(self, desc, total, unit, initial, delay)

    def line(self, text: str) -> None:
        """One line of progress (above the bar on a terminal)."""
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def _is_terminal(stream: IO[str]) -> bool:
    """A terminal with a width (a pseudo-terminal of 0 columns, as some batch systems give,
    would show empty bars)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return True  # a terminal-like object without a file descriptor (e.g. a notebook)


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
