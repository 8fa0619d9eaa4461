"""The settings of a training run: :class:`TrainConfig`, one field per ``tuckerman train`` option.

Each field carries an :class:`Option` in its metadata: the rule its value must satisfy (a
:class:`Kind`), its help text and its place in ``--help``. :meth:`TrainConfig.validate` checks
typed values against these rules and the command line parses text with the same rules
(``tuckerman.integrations.torch._cli`` builds its parser from the fields), so each option is
checked in one place. Rules between options (``tau`` only with TDLRT, ...) live in
:meth:`TrainConfig.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

from tuckerman.integrations.torch._models import MODELS

__all__ = [
    "ConfigError",
    "DATASETS",
    "DEVICES",
    "DTYPES",
    "INITS",
    "INNERS",
    "METHODS",
    "RESUMABLE",
    "SCHEDULES",
    "Kind",
    "Option",
    "TrainConfig",
]

METHODS = ("tdlrt", "dense", "tucker-fixed")
DATASETS = ("mnist", "cifar10")
DEVICES = ("auto", "cpu", "cuda")
INNERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "float64")
INITS = ("random", "hosvd")

#: Defaults that depend on other options (None in :class:`TrainConfig` means "the default").
#: TDLRT's tolerance (method "tdlrt") and the learning rate, per inner optimizer: tuned on the
#: default job (LeNet5, bundled MNIST, seeds 0-2; docs/train.md).
DEFAULT_TAU = {"sgd": 0.14, "adam": 0.2}
DEFAULT_LR = {"sgd": 0.03, "adam": 0.005}
DEFAULT_MOMENTUM = 0.9  # with inner "sgd"
DEFAULT_INIT = "random"  # with the Tucker methods

#: Fields that may differ when a run is resumed: they do not change what is computed (the data
#: path is checked by the data's fingerprint instead).
RESUMABLE = frozenset(
    {"progress", "threads", "dist_timeout", "checkpoint_every", "device", "data", "data_root"}
)
#: Fields that say where and how a run is written, not what it computes.
RUN_FIELDS = frozenset({"out", "resume", "overwrite"})


def _per_inner(values: dict[str, float]) -> str:
    return ", ".join(f"{v} ({k})" for k, v in values.items())


class ConfigError(ValueError):
    """A bad setting, or data, an output folder or a device that the settings ask for but cannot
    be had. Raised before anything is written; the command exits with status 2."""


# --------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Kind:
    """What values an option takes: the rule for typed values and how to read it from text.

    ``expected`` completes "must be ..." / "expected ..." in messages; ``parse`` reads the
    command line's text (``ValueError`` if it cannot), ``accept`` decides whether a typed value
    satisfies the rule. ``flag``: an on/off switch (no value on the command line).
    """

    expected: str
    parse: Callable[[str], Any]
    accept: Callable[[Any], bool]
    metavar: str | None = None
    flag: bool = False

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``name`` and ``value`` unless accepted."""
        if not self.accept(value):
            raise ConfigError(f"{name} must be {self.expected}, got {value!r}")

    def from_text(self, text: str) -> Any:
        """The value of ``text``, or ``ValueError("expected ..., got 'text'")``."""
        try:
            value = self.parse(text)
        except (ValueError, TypeError):
            value = _INVALID
        if value is _INVALID or not self.accept(value):
            raise ValueError(f"expected {self.expected}, got {text!r}")
        return value


_INVALID = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _integer(minimum: int) -> Kind:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return Kind(what, int, lambda v: _is_int(v) and v >= minimum)


def _number(low: float, *, open_low: bool, below: float | None = None) -> Kind:
    what = f"a number {'>' if open_low else '>='} {low:g}" + (
        "" if below is None else f" and < {below:g}"
    )

    def accept(v: Any) -> bool:
        if not _is_real(v) or (v <= low if open_low else v < low):
            return False
        return below is None or v < below

    return Kind(what, float, accept)


def _choice(options: tuple[str, ...]) -> Kind:
    return Kind(
        f"one of {', '.join(options)}",
        str,
        lambda v: isinstance(v, str) and v in options,
        metavar="{" + ",".join(options) + "}",
    )


def _optional(kind: Kind, word: str) -> Kind:
    """``kind`` or None, written ``word`` on the command line."""
    return Kind(
        f"'{word}' or {kind.expected}",
        lambda t: None if t.strip().lower() == word else kind.parse(t),
        lambda v: v is None or kind.accept(v),
        metavar=kind.metavar,
    )


def _or_default(kind: Kind) -> Kind:
    """``kind``, or None for "the default" (typed only; the command line takes ``kind``)."""
    return Kind(
        kind.expected, kind.parse, lambda v: v is None or kind.accept(v), metavar=kind.metavar
    )


def _parse_ranks(text: str) -> int | float | None:
    if text.strip().lower() == "full":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _ranks_ok(v: Any) -> bool:
    if v is None:
        return True
    if _is_int(v):
        return v >= 1
    return _is_real(v) and 0.0 < v <= 1.0


def _data_ok(v: Any) -> bool:
    return isinstance(v, str) and (v in DATASETS or v.endswith(".npz"))


def _path_ok(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() != "")


POSITIVE_INT = _integer(1)
NONNEGATIVE_INT = _integer(0)
OPTIONAL_POSITIVE_INT = _optional(POSITIVE_INT, "none")
POSITIVE_NUMBER = _number(0.0, open_low=True)
NONNEGATIVE_NUMBER = _number(0.0, open_low=False)
FLAG = Kind("True or False", bool, lambda v: isinstance(v, bool), flag=True)
PATH = Kind("a non-empty path", str, _path_ok, metavar="DIR")
RANKS = Kind(
    "'full', an integer >= 1 or a fraction in (0, 1]",
    _parse_ranks,
    _ranks_ok,
    metavar="{full,INT,FRACTION}",
)
DATA = Kind(
    f"one of {', '.join(DATASETS)} or a PATH.npz", str, _data_ok, "{mnist,cifar10,PATH.npz}"
)


@dataclasses.dataclass(frozen=True)
class Option:
    """How a :class:`TrainConfig` field appears on the command line and in ``--help``.

    ``flag``: the option's name (default ``--`` and the field name with dashes); ``negate``: a
    switch that turns the field off (``--no-progress``); ``shown_default``: the default as
    ``--help`` prints it (default: the field's default).
    """

    kind: Kind
    help: str
    group: str
    flag: str | None = None
    negate: bool = False
    shown_default: str | None = None


def _field(default: Any, kind: Kind, help: str, group: str, **option: Any) -> Any:
    return dataclasses.field(
        default=default, metadata={"option": Option(kind, help, group, **option)}
    )


MODEL_DATA = "model and data"
METHOD = "method"
OPTIMIZATION = "optimization"
RUN = "run"
OUTPUT = "output, checkpoints and resuming"
PARALLEL = "data parallel"


# --------------------------------------------------------------------------- the settings
@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (the options of ``tuckerman train``).

    The defaults are the main job: LeNet5 trained with TDLRT on the bundled MNIST digits, which
    reaches more than 95% test accuracy at more than 80% compression in two epochs. Fields left
    at None take a default that depends on other fields (``tau``, ``momentum``, ``init``); an
    option that the chosen method does not use must stay None (it is refused, not ignored).

    Attributes
    ----------
    model : {"lenet5", "vgg-small", "resnet18"}
    data : str
        ``"mnist"`` (the 10,000 bundled digits: 8,000 train, 2,000 test), ``"cifar10"``
        (through torchvision, downloaded to ``data_root``), or the path of an ``.npz`` file with
        ``images`` and ``labels`` (split 80/20 in file order) or ``x_train``, ``y_train``,
        ``x_test``, ``y_test``. The data are checked before training (labels, pixels, sizes).
    data_root : str
        Where torchvision keeps CIFAR-10.
    subset : int, optional
        Use only this many training examples (a seeded random choice) and at most as many test
        examples: for smoke runs.
    method : {"tdlrt", "dense", "tucker-fixed"}
        ``"tdlrt"``: rank-adaptive TDLRT; ``"tucker-fixed"``: the same Tucker layers trained at
        the fixed ranks ``ranks`` (``TDLRT(fixed_rank=True)``; ``ranks`` is required and must
        compress); ``"dense"``: the dense model with the inner optimizer.
    tau : float, optional
        TDLRT's relative truncation tolerance (method ``"tdlrt"`` only; default 0.14 with inner
        ``"sgd"``, 0.2 with ``"adam"``).
    ranks : None, int or float
        Initial ranks of the Tucker layers (``"tdlrt"``) or their fixed ranks
        (``"tucker-fixed"``): an int caps both channel ranks, a float in (0, 1] is a fraction of
        each channel mode's full rank, None is full rank (``"tdlrt"`` only).
    init : {"random", "hosvd"}, optional
        Tucker layer initialization (see :func:`tuckerize`; default ``"random"``).
    one_pass : bool
        TDLRT with one gradient evaluation per step.
    lr : float, optional
        Peak learning rate (default 0.03 with inner ``"sgd"``, 0.005 with ``"adam"``).
    schedule : {"cosine", "constant"}
        Learning rate per step: cosine decay from ``lr`` to 0 over the run, or constant.
    momentum : float, optional
        SGD momentum in [0, 1) (inner ``"sgd"`` only; default 0.9).
    weight_decay : float
    inner : {"sgd", "adam"}
        Inner optimizer (Tucker cores and dense parameters alike).
    epochs, batch_size : int
    max_steps : int, optional
        Stop after this many optimizer steps in total (the last epoch may be partial).
    seed : int
        Seeds torch, numpy and the data order; on the CPU the same seed gives the same report
        (up to the measured times) for a fixed ``threads``.
    device : {"auto", "cpu", "cuda"}
    dtype : {"float32", "float64"}
        Floating-point type of the model and the data.
    threads : int or None
        CPU threads for torch during the run (restored afterwards); None: torch's setting.
        Default 1: TDLRT calls LAPACK's SVD and QR on small matrices every step, and their
        threads stall when they compete for cores. The report is reproducible for a fixed
        thread count.
    out : str, optional
        Output folder (default: a new ``runs/<date>-<time>``). An existing folder that is not
        empty is refused unless ``resume`` or ``overwrite``.
    resume : str, optional
        Continue the run in this folder from its last checkpoint (the output goes there too).
        Start from :meth:`resuming`, which reads the run's settings; only the fields in
        :data:`RESUMABLE` may differ from them.
    overwrite : bool
        Replace the run in an existing ``out`` (its report, plots, model, checkpoint and
        metrics; other files are left alone).
    checkpoint_every : int
        Steps between checkpoints (0: only at the end of each epoch, which always has one).
    progress : bool
        Show progress (bars on a terminal, periodic lines otherwise).
    nproc : int
        Data-parallel replicas (processes) on this machine: 1 trains in this process; more
        starts that many processes (gloo on the CPU, NCCL with one GPU each for CUDA), each
        training on ``batch_size / nproc`` examples of every global batch of ``batch_size``
        (which must be divisible by ``nproc``). Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
        environment) this process is one replica, and ``nproc`` must be 1 or ``WORLD_SIZE``.
    dist_timeout : float
        Seconds a replica waits for the others in a collective before failing (data-parallel
        runs only). Rank 0 evaluates the test set while the others wait in their next step, so
        it must exceed the evaluation time.

    Examples
    --------
    >>> from tuckerman.integrations.torch import TrainConfig
    >>> TrainConfig(epochs=1, tau=0.2).validate()  # fine: returns None
    >>> TrainConfig(batch_size=0).validate()
    Traceback (most recent call last):
    ...
    tuckerman.integrations.torch._train._config.ConfigError: batch_size must be a positive integer, got 0
    >>> TrainConfig(method="tucker-fixed", ranks=16, tau=0.2).validate()
    Traceback (most recent call last):
    ...
    tuckerman.integrations.torch._train._config.ConfigError: tau is used only by method 'tdlrt' (the rank-adaptive truncation), not by method 'tucker-fixed'
    >>> TrainConfig(inner="adam").resolved().momentum is None, TrainConfig().resolved().tau
    (True, 0.14)
    """  # noqa: E501

    model: str = _field("lenet5", _choice(MODELS), "network", MODEL_DATA)
    data: str = _field(
        "mnist",
        DATA,
        "bundled MNIST (8,000 train / 2,000 test), CIFAR-10 via torchvision, or an .npz with "
        "images/labels (split 80/20) or x_train/y_train/x_test/y_test",
        MODEL_DATA,
    )
    data_root: str = _field(
        "~/.cache/tuckerman", PATH, "where torchvision keeps (downloads) CIFAR-10", MODEL_DATA
    )
    subset: int | None = _field(
        None,
        OPTIONAL_POSITIVE_INT,
        "use N random training examples and the first N test examples (smoke runs)",
        MODEL_DATA,
        shown_default="all",
    )
    method: str = _field(
        "tdlrt",
        _choice(METHODS),
        "rank-adaptive TDLRT, Tucker layers at fixed --ranks, or the dense model",
        METHOD,
    )
    tau: float | None = _field(
        None,
        _optional(NONNEGATIVE_NUMBER, "none"),
        "TDLRT truncation tolerance, relative to the norm of each core (tdlrt only)",
        METHOD,
        shown_default=_per_inner(DEFAULT_TAU),
    )
    ranks: int | float | None = _field(
        None,
        RANKS,
        "initial ranks (tdlrt) or fixed ranks (tucker-fixed, required) of the channel modes: "
        "'full', a cap, or a fraction of full rank",
        METHOD,
        shown_default="full",
    )
    init: str | None = _field(
        None,
        _optional(_choice(INITS), "none"),
        "Tucker layer initialization",
        METHOD,
        shown_default=DEFAULT_INIT,
    )
    one_pass: bool = _field(
        False, FLAG, "TDLRT with one gradient evaluation per step instead of two", METHOD
    )
    lr: float | None = _field(
        None,
        _or_default(POSITIVE_NUMBER),
        "learning rate",
        OPTIMIZATION,
        shown_default=_per_inner(DEFAULT_LR),
    )
    schedule: str = _field("cosine", _choice(SCHEDULES), "learning rate per step", OPTIMIZATION)
    momentum: float | None = _field(
        None,
        _optional(_number(0.0, open_low=False, below=1.0), "none"),
        "SGD momentum (inner sgd only)",
        OPTIMIZATION,
        shown_default=f"{DEFAULT_MOMENTUM}",
    )
    weight_decay: float = _field(0.0, NONNEGATIVE_NUMBER, "L2 weight decay", OPTIMIZATION)
    inner: str = _field(
        "sgd", _choice(INNERS), "inner optimizer (cores, dense layers)", OPTIMIZATION
    )
    epochs: int = _field(2, POSITIVE_INT, "passes over the data", OPTIMIZATION)
    batch_size: int = _field(
        32, POSITIVE_INT, "global batch size (split across processes with --nproc)", OPTIMIZATION
    )
    max_steps: int | None = _field(
        None,
        OPTIONAL_POSITIVE_INT,
        "stop after N optimizer steps in total (smoke runs)",
        OPTIMIZATION,
        shown_default="none",
    )
    seed: int = _field(
        0,
        NONNEGATIVE_INT,
        "seeds torch, numpy and the data order (same seed, same report on CPU)",
        RUN,
    )
    device: str = _field("auto", _choice(DEVICES), "'auto': cuda when available", RUN)
    dtype: str = _field("float32", _choice(DTYPES), "floating-point type of model and data", RUN)
    threads: int | None = _field(
        1,
        _optional(POSITIVE_INT, "auto"),
        "CPU threads for torch; 'auto': torch's setting (more threads help large models on an "
        "idle machine, but stall TDLRT's small SVDs on a busy one)",
        RUN,
    )
    out: str | None = _field(
        None,
        PATH,
        "output folder for report.json, metrics.jsonl, checkpoint.pt, model.pt and the plots; "
        "an existing non-empty folder is refused unless --resume or --overwrite",
        OUTPUT,
        shown_default="a new runs/<date>-<time>",
    )
    resume: str | None = _field(
        None,
        PATH,
        "continue the run in DIR from its last checkpoint, with its settings (only --threads, "
        "--device, --data, --data-root, --checkpoint-every, --dist-timeout, --no-progress may "
        "change)",
        OUTPUT,
        shown_default="none",
    )
    overwrite: bool = _field(
        False,
        FLAG,
        "replace the run in an existing --out (its report, plots, model, checkpoint, metrics)",
        OUTPUT,
    )
    checkpoint_every: int = _field(
        100,
        NONNEGATIVE_INT,
        "steps between checkpoints (0: only at the end of each epoch, which always has one)",
        OUTPUT,
    )
    progress: bool = _field(
        True,
        FLAG,
        "no progress bars or progress lines",
        OUTPUT,
        flag="--no-progress",
        negate=True,
    )
    nproc: int = _field(
        1,
        POSITIVE_INT,
        "train with N replica processes on this machine (gloo on the CPU, NCCL with one GPU "
        "each for --device cuda); each step's --batch-size examples are split across them "
        "(batch-size / N per replica). Under torchrun the launcher starts the processes: leave "
        "it at 1",
        PARALLEL,
    )
    dist_timeout: float = _field(
        1800.0,
        POSITIVE_NUMBER,
        "seconds a replica waits for the others in a collective before failing (rank 0 "
        "evaluates while the others wait)",
        PARALLEL,
    )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        for f in dataclasses.fields(self):
            f.metadata["option"].kind.check(f.name, getattr(self, f.name))
        method = self.method
        if self.tau is not None and method != "tdlrt":
            raise ConfigError(
                "tau is used only by method 'tdlrt' (the rank-adaptive truncation), not by "
                f"method {method!r}"
            )
        if self.one_pass and method != "tdlrt":
            raise ConfigError(f"one_pass needs method 'tdlrt', got method {method!r}")
        if method == "dense":
            for name in ("ranks", "init"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name} is used only by the Tucker methods (tdlrt, tucker-fixed), not "
                        "by method 'dense'"
                    )
        if method == "tucker-fixed" and self.ranks is None:
            raise ConfigError(
                "method 'tucker-fixed' needs ranks: at full rank a Tucker layer holds more "
                "parameters than the dense layer (lenet5: 2.2x, a compression rate of -118%); "
                "give a fraction such as ranks=0.1 or a cap such as ranks=27"
            )
        if self.momentum is not None and self.inner != "sgd":
            raise ConfigError(
                f"momentum is used only by inner 'sgd', not by inner {self.inner!r} (Adam keeps "
                "its own moment estimates)"
            )
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by nproc {self.nproc}: each "
                f"step's global batch of batch_size examples is split evenly across the "
                f"{self.nproc} replicas (batch_size / nproc per replica)"
            )
        self.check_output_fields()

    def check_output_fields(self) -> None:
        """The rules between ``out``, ``resume`` and ``overwrite`` (part of :meth:`validate`)."""
        if self.resume is None:
            return
        if self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues the run in its "
                "folder, overwrite replaces it"
            )
        if self.out is not None and not _same_path(self.out, self.resume):
            raise ConfigError(
                f"a resumed run writes to its own folder: out {self.out!r} differs from "
                f"resume {self.resume!r} (leave out unset)"
            )

    def resolved(self) -> TrainConfig:
        """A copy with the method-dependent defaults filled in (what the run uses)."""
        changes: dict[str, Any] = {}
        if self.method == "tdlrt" and self.tau is None:
            changes["tau"] = DEFAULT_TAU[self.inner]
        if self.lr is None:
            changes["lr"] = DEFAULT_LR[self.inner]
        if self.inner == "sgd" and self.momentum is None:
            changes["momentum"] = DEFAULT_MOMENTUM
        if self.method != "dense" and self.init is None:
            changes["init"] = DEFAULT_INIT
        return dataclasses.replace(self, **changes)

    def computation(self) -> dict[str, Any]:
        """The resolved fields that decide what the run computes (all but :data:`RESUMABLE`
        and where it is written)."""
        values = dataclasses.asdict(self.resolved())
        return {k: v for k, v in values.items() if k not in RESUMABLE | RUN_FIELDS}

    @classmethod
    def resuming(cls, folder: str) -> TrainConfig:
        """The settings of the run in ``folder`` (from its checkpoint), set to resume it.

        Change only the fields in :data:`RESUMABLE` (e.g. with ``dataclasses.replace``) before
        passing it to :func:`train`.

        Raises
        ------
        ConfigError
            When ``folder`` holds no readable checkpoint.
        """
        from tuckerman.integrations.torch._train._checkpoint import read_config

        saved = read_config(folder)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known and k not in RUN_FIELDS}
        return cls(**values, resume=folder)


def _same_path(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
