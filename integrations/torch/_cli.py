"""The ``tuckerman`` console command: ``tuckerman train`` trains a compressed network.

A thin argparse layer over :func:`tuckerman.integrations.torch._train.train`. Also runnable as
``python -m tuckerman.integrations.torch._cli``, e.g. under ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

from tuckerman.integrations.torch._models import MODELS
from tuckerman.integrations.torch._train import (
    DATASETS,
    DEVICES,
    DTYPES,
    INNERS,
    METHODS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
)

__all__ = ["main", "build_parser"]

_DEFAULTS = TrainConfig()


# --------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _float(text: str, *, low: float, high: float = math.inf, open_low: bool) -> float:
    bounds = f"{'>' if open_low else '>='} {low:g}" + (
        "" if high == math.inf else f" and < {high:g}"
    )
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value < high
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, low=0.0, open_low=True)


def _nonnegative_float(text: str) -> float:
    return _float(text, low=0.0, open_low=False)


def _momentum(text: str) -> float:
    return _float(text, low=0.0, high=1.0, open_low=False)


def _threads(text: str) -> int | None:
    """``auto`` (torch's setting) or a positive integer."""
    if text.strip().lower() == "auto":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a positive integer, got {text!r}"
        ) from None


def _ranks(text: str) -> int | float | None:
    """``full``, an int >= 1 (cap on the channel ranks) or a fraction in (0, 1]."""
    if text.strip().lower() == "full":
        return None
    message = f"expected 'full', an integer >= 1 or a fraction in (0, 1], got {text!r}"
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(message) from None
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(message) from None
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(message)
    return value


def _data(text: str) -> str:
    if text in DATASETS:
        return text
    if text.endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DATASETS)} or a PATH.npz, got {text!r}"
    )


# --------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The ``tuckerman`` argument parser (subcommand ``train``)."""
    parser = argparse.ArgumentParser(
        prog="tuckerman",
        description="Rank-adaptive training of Tucker-factorized networks (TDLRT).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    d = _DEFAULTS
    t = sub.add_parser(
        "train",
        help="train a compressed network and write report.json and plots",
        description=(
            "Train a network with Tucker layers (TDLRT, fixed rank) or dense layers and report "
            "test accuracy, per-layer ranks and the compression rate c.r. = 1 - factorized / "
            "dense parameters of the factorized layers. The defaults (LeNet5, TDLRT, bundled "
            "MNIST) run offline."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = t.add_argument_group("model and data")
    g.add_argument("--model", choices=MODELS, default=d.model, help="network")
    g.add_argument(
        "--data",
        type=_data,
        default=d.data,
        metavar="{mnist,cifar10,PATH.npz}",
        help="bundled MNIST (8,000 train / 2,000 test), CIFAR-10 via torchvision, or an .npz with "
        "images/labels (split 80/20) or x_train/y_train/x_test/y_test",
    )
    g.add_argument(
        "--data-root", default=d.data_root, help="where torchvision keeps (downloads) CIFAR-10"
    )
    g.add_argument(
        "--subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use N random training examples and the first N test examples (smoke runs)",
    )
    g = t.add_argument_group("method")
    g.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help="rank-adaptive TDLRT, Tucker layers at fixed --ranks, or the dense model",
    )
    g.add_argument(
        "--tau",
        type=_nonnegative_float,
        default=d.tau,
        help="TDLRT truncation tolerance, relative to the norm of each core",
    )
    g.add_argument(
        "--ranks",
        type=_ranks,
        default=d.ranks,
        metavar="{full,INT,FRACTION}",
        help="initial ranks (tdlrt) or fixed ranks (tucker-fixed) of the channel modes: 'full', "
        "a cap, or a fraction of full rank; none given: full rank",
    )
    g.add_argument(
        "--init", choices=("random", "hosvd"), default=d.init, help="Tucker layer initialization"
    )
    g.add_argument(
        "--one-pass",
        action="store_true",
        help="TDLRT with one gradient evaluation per step instead of two",
    )
    g = t.add_argument_group("optimization")
    g.add_argument("--lr", type=_positive_float, default=d.lr, help="learning rate")
    g.add_argument(
        "--schedule", choices=SCHEDULES, default=d.schedule, help="learning rate per step"
    )
    g.add_argument("--momentum", type=_momentum, default=d.momentum, help="SGD momentum")
    g.add_argument(
        "--weight-decay", type=_nonnegative_float, default=d.weight_decay, help="L2 weight decay"
    )
    g.add_argument(
        "--inner", choices=INNERS, default=d.inner, help="inner optimizer (cores, dense layers)"
    )
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the data")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="global batch size (split across processes with --nproc)",
    )
    g.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N optimizer steps in total (smoke runs)",
    )
    g = t.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=d.seed,
        help="seeds torch, numpy and the data order (same seed, same report on CPU)",
    )
    g.add_argument(
        "--device", choices=DEVICES, default=d.device, help="'auto': cuda when available"
    )
    g.add_argument(
        "--dtype", choices=DTYPES, default=d.dtype, help="floating-point type of model and data"
    )
    g.add_argument(
        "--threads",
        type=_threads,
        default=d.threads,
        metavar="{N,auto}",
        help="CPU threads for torch; 'auto': torch's setting (more threads help large models on "
        "an idle machine, but stall TDLRT's small SVDs on a busy one)",
    )
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory for report.json, accuracy.png, ranks.png (default: "
        "runs/<date>-<time>)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = t.add_argument_group("data parallel")
    g.add_argument(
        "--nproc",
        type=_positive_int,
        default=d.nproc,
        metavar="N",
        help="train with N replica processes on this machine (gloo on the CPU, NCCL with one GPU "
        "each for --device cuda); each step's --batch-size examples are split across them "
        "(batch-size / N per replica). Under torchrun the launcher starts the processes: leave "
        "it at 1",
    )
    g.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=d.dist_timeout,
        metavar="SECONDS",
        help="how long a replica waits for the others in a collective before failing (rank 0 "
        "evaluates while the others wait)",
    )
    t.set_defaults(subparser=t)
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    """Every option is named as its ``TrainConfig`` field, except ``--no-progress``."""
    fields = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "progress"
    }
    return TrainConfig(**fields, progress=not args.no_progress)


def _summary(report: dict, out: str) -> str:
    from tuckerman.integrations.torch._convert import format_report

    lines = []
    if report["compression"]["layers"]:
        lines.append(format_report(report["compression"]))
    else:
        lines.append(f"dense model: {report['compression']['model_parameters']:,} parameters")
    lines.append(
        f"test accuracy: {100 * report['test_accuracy']:.2f}%   "
        f"compression rate: {100 * report['compression_rate']:.2f}%   "
        f"steps: {report['steps']}   time: {report['time_s']:.1f} s"
    )
    lines.append(f"report and plots: {out}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tuckerman`` command; returns the exit status.

    Bad options exit with status 2 and an argparse message naming the value. Under ``torchrun``
    only rank 0 prints the summary.

    Examples
    --------
    >>> import tempfile
    >>> from tuckerman.integrations.torch._cli import main
    >>> with tempfile.TemporaryDirectory() as out:
    ...     status = main(["train", "--subset", "128", "--epochs", "1", "--ranks", "16",
    ...                    "--no-progress", "--out", out])  # doctest: +ELLIPSIS
    layer ...
    test accuracy: ...
    >>> status
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _config(args)
    if config.out is None:
        import time

        config.out = time.strftime("runs/%Y%m%d-%H%M%S")
    from tuckerman.integrations.torch._train import train

    try:
        config.validate()
        report = train(config)
    except ConfigError as err:
        args.subparser.error(str(err))  # exits with status 2
    if report is not None:  # None: a replica other than rank 0 under torchrun
        print(_summary(report, config.out))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
