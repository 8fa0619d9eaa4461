"""What every solver returns (:class:`Result`, :class:`LogEntry`), and the bookkeeping they share:
argument checks, stopping rules, the per-iteration log and the optional progress bar."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, NamedTuple

import tuckerman.backends as backends
from tuckerman._compat import is_array

__all__ = ["LogEntry", "Result", "STOP_REASONS"]

#: Every value :attr:`Result.stop_reason` can take.
STOP_REASONS = (
    "min_grad_norm",
    "min_step",
    "max_iter",
    "max_time",
    "line_search_failed",
)


class LogEntry(NamedTuple):
    """One line of a solver's log: the state after ``iteration`` steps.

    Entry 0 describes the starting point (``step_size`` is ``nan`` there). All numbers are
    Python floats and ints, whatever the array library.

    Attributes
    ----------
    iteration : int
        Steps taken so far.
    cost : float
        Cost at the current point.
    grad_norm : float
        Norm of the Riemannian gradient at the current point (on the manifold of the point's
        ranks for the rank-adaptive solver).
    step_size : float
        Length of the last step: the norm of the tangent vector that was retracted
        (``‖x_k - x_{k-1}‖_F`` for the rank-adaptive solver; the norm of the rejected step for
        a trust-region step that was not accepted).
    ranks : tuple of int
        Multilinear rank of the current point.
    time : float
        Seconds since the solver started.
    extra : dict
        Solver-specific numbers: ``alpha`` and ``backtracks`` (line searches), ``beta`` and
        ``restart`` (conjugate gradients), ``radius``, ``rho``, ``accepted``, ``inner`` and
        ``inner_stop`` (trust region).
    """

    iteration: int
    cost: float
    grad_norm: float
    step_size: float
    ranks: tuple
    time: float
    extra: dict


class Result(NamedTuple):
    """What a solver returns.

    Attributes
    ----------
    point : TuckerTensor
        The last point, in the library, dtype and device of ``x0``.
    cost : float
        Cost at ``point``.
    grad_norm : float
        Norm of the Riemannian gradient at ``point``.
    iterations : int
        Steps taken (for the trust region: steps attempted, rejected ones included).
    stop_reason : str
        Which rule stopped the solver: ``"min_grad_norm"``, ``"min_step"``, ``"max_iter"``,
        ``"max_time"`` or ``"line_search_failed"`` (no step satisfied the Armijo condition: the
        cost cannot decrease further at working precision, or the direction is poor).
    time : float
        Seconds spent in the solver.
    log : list of LogEntry
        One entry per iteration, entry 0 for the starting point.
    """

    point: Any
    cost: float
    grad_norm: float
    iterations: int
    stop_reason: str
    time: float
    log: list


# --------------------------------------------------------------------------- argument checks
def positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return int(value)


def positive_float(value: Any, what: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a positive number or None" if allow_none else "a positive number"
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        hint = " (pass None to switch this rule off)" if allow_none else ""
        raise ValueError(f"{what} must be positive and finite, got {value}{hint}")
    return value


def in_open_unit_interval(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0 < value < 1:
        raise ValueError(f"{what} must lie in (0, 1), got {value}")
    return value


def as_float(value: Any, what: str) -> float:
    """A scalar (0-d array, Python or NumPy number) as a Python float; TypeError otherwise."""
    if is_array(value):
        shape = tuple(value.shape)
        if shape != ():
            raise TypeError(
                f"{what} must be a scalar (a 0-d array or a number), got an array of shape {shape}"
            )
        return float(backends.to_numpy(value))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a scalar (a 0-d array or a number), got {value!r:.80}")
    return float(value)


def finite_float(value: Any, what: str) -> float:
    """:func:`as_float`, and a ValueError when the value is nan or infinite."""
    out = as_float(value, what)
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {out}")
    return out


def host_float(a: Any) -> float:
    """A 0-d array (or number) as a Python float, without checks."""
    return float(backends.to_numpy(a))


class Stopping(NamedTuple):
    max_iter: int
    min_grad_norm: float | None
    min_step: float | None
    max_time: float | None


def stopping(max_iter: Any, min_grad_norm: Any, min_step: Any, max_time: Any) -> Stopping:
    return Stopping(
        positive_int(max_iter, "max_iter"),
        positive_float(min_grad_norm, "min_grad_norm", allow_none=True),
        positive_float(min_step, "min_step", allow_none=True),
        positive_float(max_time, "max_time", allow_none=True),
    )


# --------------------------------------------------------------------------- the run
class Monitor:
    """Clock, log, stopping rules and progress bar of one solver run."""

    def __init__(self, name: str, rules: Stopping, progress: bool) -> None:
        self.rules = rules
        self.log: list[LogEntry] = []
        self.start = time.perf_counter()
        self.bar = _progress_bar(name, rules.max_iter) if progress else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def record(
        self,
        iteration: int,
        cost: float,
        grad_norm: float,
        step_size: float,
        ranks: tuple,
        **extra: Any,
    ) -> None:
        entry = LogEntry(
            iteration, cost, grad_norm, step_size, tuple(ranks), self.elapsed(), dict(extra)
        )
        self.log.append(entry)
        if self.bar is not None:
            if iteration > 0:
                self.bar.update(1)
            self.bar.set_postfix(cost=f"{cost:.4g}", grad=f"{grad_norm:.3g}", ranks=entry.ranks)

    def check(self, iteration: int, grad_norm: float, step_size: float | None = None):
        """The reason to stop now, or None. Order: gradient, step, iterations, time."""
        r = self.rules
        if r.min_grad_norm is not None and grad_norm <= r.min_grad_norm:
            return "min_grad_norm"
        if step_size is not None and r.min_step is not None and step_size <= r.min_step:
            return "min_step"
        if iteration >= r.max_iter:
            return "max_iter"
        if r.max_time is not None and self.elapsed() >= r.max_time:
            return "max_time"
        return None

    def finish(
        self, point: Any, cost: float, grad_norm: float, iteration: int, reason: str
    ) -> Result:
        if self.bar is not None:
            self.bar.set_description(f"{self.bar.desc} ({reason})")
            self.bar.close()
        return Result(point, cost, grad_norm, iteration, reason, self.elapsed(), self.log)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(name: str, total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "progress=True needs tqdm, which is not installed: pip install tqdm "
            "(or pass progress=False)"
        ) from err
    return tqdm(total=total, desc=name, unit="it")
