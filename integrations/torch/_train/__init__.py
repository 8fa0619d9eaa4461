"""Training of the reference models with TDLRT, fixed-rank Tucker layers or dense layers.

The library side of ``tuckerman train``: :func:`train` takes a :class:`TrainConfig` and returns
the report (also written to ``report.json``, with checkpoints, ``metrics.jsonl``, plots and
``model.pt``). One module per concern:

- ``_config``: :class:`TrainConfig`, each option's rule (the command line is built from it);
- ``_data``: :func:`load_data` and the checks of the data;
- ``_loop``: :func:`make_model`, :func:`make_optimizer`, :func:`make_scheduler`,
  :func:`make_closure`, one step, :func:`evaluate`, :func:`shard`;
- ``_checkpoint``: what a checkpoint holds, saved and loaded;
- ``_outputs``: the output folder (never clobbered, locked) and atomic writes;
- ``_report``: ``report.json`` (strict JSON), ``metrics.jsonl``, the plots;
- ``_progress``: bars on a terminal, periodic lines otherwise;
- ``_run``: one process's run (checkpoints, signals, the endings of a run);
- ``_command``: :func:`train`, the data-parallel launcher and replicas.
"""

from tuckerman.integrations.torch._train._command import ReplicaFailed, train
from tuckerman.integrations.torch._train._config import (
    DATASETS,
    DEVICES,
    DTYPES,
    INNERS,
    METHODS,
    RESUMABLE,
    SCHEDULES,
    ConfigError,
    TrainConfig,
)
from tuckerman.integrations.torch._train._data import MAX_CLASSES, Data, load_data
from tuckerman.integrations.torch._train._loop import (
    evaluate,
    make_closure,
    make_model,
    make_optimizer,
    make_scheduler,
    resolve_device,
    shard,
)
from tuckerman.integrations.torch._train._outputs import OutputError
from tuckerman.integrations.torch._train._run import (
    TrainingDiverged,
    TrainingInterrupted,
    TrainingStopped,
)

__all__ = [
    "ConfigError",
    "DATASETS",
    "DEVICES",
    "DTYPES",
    "Data",
    "INNERS",
    "MAX_CLASSES",
    "METHODS",
    "OutputError",
    "RESUMABLE",
    "ReplicaFailed",
    "SCHEDULES",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingStopped",
    "evaluate",
    "load_data",
    "make_closure",
    "make_model",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "shard",
    "train",
]
