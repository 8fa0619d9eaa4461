"""The ``tuckerman`` console command: ``tuckerman train`` trains a compressed network.

The options of ``tuckerman train`` are generated from the fields of :class:`TrainConfig`: each
field's rule (``_train._config.Kind``) parses and checks its text, so an option is validated in
one place, for the command and the library alike. Also runnable as ``python -m
tuckerman.integrations.torch._cli``, e.g. under ``python -m torch.distributed.run``.

Exit status: 0 finished; 1 an output could not be written (or another failure); 2 bad options,
data or output folder (nothing written); 3 training diverged (the last good checkpoint is
kept); 130 / 143 stopped by SIGINT / SIGTERM (checkpoint and partial report saved). Every
error is one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from tuckerman.integrations.torch._train._config import ConfigError, Kind, Option, TrainConfig

import tuckerman

__all__ = ["build_parser", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: message``), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _argument_type(kind: Kind) -> Any:
    def parse(text: str) -> Any:
        try:
            return kind.from_text(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = kind.expected  # argparse names the type in some messages
    return parse


def _default_text(field: dataclasses.Field, option: Option) -> str:
    if option.shown_default is not None:
        return option.shown_default
    value = field.default
    if value is None:
        return "none"
    if option.kind.flag:
        return "off"
    return str(value)


def _version() -> str:
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:  # the console script needs torch, but --version should still answer
        torch_version = "not installed"
    import numpy

    return f"tuckerman {tuckerman.__version__} (torch {torch_version}, numpy {numpy.__version__})"


def build_parser() -> argparse.ArgumentParser:
    """The ``tuckerman`` argument parser (subcommand ``train``), built from :class:`TrainConfig`.

    Options that are not given are absent from the parsed namespace (their default is
    ``argparse.SUPPRESS``): :func:`main` tells a given option from a default, which a resumed
    run needs.

    Examples
    --------
    >>> from tuckerman.integrations.torch._cli import build_parser
    >>> args = build_parser().parse_args(["train", "--lr", "0.1", "--no-progress"])
    >>> args.lr, args.progress, hasattr(args, "epochs")
    (0.1, False, False)
    """
    parser = _Parser(
        prog="tuckerman",
        description="Rank-adaptive training of Tucker-factorized networks (TDLRT).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    train = sub.add_parser(
        "train",
        help="train a compressed network and write report.json, checkpoints and plots",
        description=(
            "Train a network with Tucker layers (TDLRT, fixed rank) or dense layers and report "
            "test accuracy, per-layer ranks and the compression rate c.r. = 1 - factorized / "
            "dense parameters of the factorized layers. The defaults (LeNet5, TDLRT, bundled "
            "MNIST) run offline. A stopped or killed run continues with --resume DIR. Exit "
            "status: 0 finished, 1 output failure, 2 bad input (nothing written), 3 diverged, "
            "130/143 interrupted by SIGINT/SIGTERM (checkpoint saved)."
        ),
    )
    train.set_defaults(subparser=train)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        option: Option = field.metadata["option"]
        group = groups.get(option.group) or groups.setdefault(
            option.group, train.add_argument_group(option.group)
        )
        flag = option.flag or "--" + field.name.replace("_", "-")
        help_text = option.help
        if option.kind.flag:
            action = "store_false" if option.negate else "store_true"
            group.add_argument(
                flag, dest=field.name, action=action, default=argparse.SUPPRESS, help=help_text
            )
            continue
        group.add_argument(
            flag,
            dest=field.name,
            type=_argument_type(option.kind),
            default=argparse.SUPPRESS,
            metavar=option.kind.metavar or field.name.upper(),
            help=f"{help_text} (default: {_default_text(field, option)})",
        )
    return parser


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of the given options (``--resume DIR``: the run's settings,
    with the given options on top)."""
    if options.get("resume") is not None:
        TrainConfig(**options).check_output_fields()
        base = TrainConfig.resuming(options["resume"])
        return dataclasses.replace(base, **options)
    return TrainConfig(**options)


def _summary(report: dict) -> str:
    from tuckerman.integrations.torch._convert import format_report

    lines = []
    compression = report["compression"]
    if compression["layers"]:
        as_fractions = {
            **compression,
            "compression_rate": compression["compression_rate_percent"] / 100,
            "layers": [
                {**layer, "compression_rate": layer["compression_rate_percent"] / 100}
                for layer in compression["layers"]
            ],
        }
        lines.append(format_report(as_fractions))
    else:
        lines.append(f"dense model: {compression['model_parameters']:,} parameters")
    lines.append(
        f"test accuracy: {report['test_accuracy_percent']:.2f}%   "
        f"compression rate: {report['compression_rate_percent']:.2f}%   "
        f"steps: {report['steps']}   time: {report['time_s']:.1f} s"
    )
    lines.append(f"report and plots: {report['config']['out']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tuckerman`` command; returns the exit status (see the module docstring).

    Errors are one line on stderr: ``tuckerman train: error: ...`` for bad options, data or
    output folders (status 2, nothing written). Under ``torchrun`` only rank 0 prints the
    summary.

    Examples
    --------
    >>> import tempfile
    >>> from tuckerman.integrations.torch._cli import main
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     status = main(["train", "--subset", "128", "--epochs", "1", "--ranks", "16",
    ...                    "--no-progress", "--out", tmp + "/run"])  # doctest: +ELLIPSIS
    layer ...
    test accuracy: ...
    >>> status
    0
    >>> main(["train", "--lr", "-1"])  # doctest: +SKIP
    tuckerman train: error: argument --lr: expected a number > 0, got '-1'
    2
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand, as its own errors are
            args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version, or a bad option (already printed)
        return int(stop.code or 0) if not isinstance(stop.code, str) else EXIT_USAGE
    options = {k: v for k, v in vars(args).items() if k not in ("command", "subparser")}
    prog = "tuckerman train"
    from tuckerman.integrations.torch._train import (
        OutputError,
        ReplicaFailed,
        TrainingStopped,
        train,
    )

    try:
        report = train(config_from_options(options))
    except ConfigError as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as err:
        print(f"{prog}: failed: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except ReplicaFailed as err:
        if err.details:
            print(err.details, file=sys.stderr)
        print(f"{prog}: failed: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingStopped as err:
        print(f"{prog}: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: stopped at once", file=sys.stderr)
        return 130
    if report is not None:  # None: a replica other than rank 0 under torchrun
        print(_summary(report))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
