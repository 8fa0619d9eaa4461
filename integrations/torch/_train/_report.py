"""What a run tells: ``report.json`` (strict JSON), ``metrics.jsonl`` (one line per epoch, as
training goes) and the plots ``accuracy.png`` and ``ranks.png``.

Field names carry their units (``_percent``, ``_s`` seconds, ``_bytes``); ``units`` in the
report says what each plain one is. Values that are not finite numbers (a diverged loss) are
written as ``null``, and ``null_reasons`` maps each such field (as a path, e.g.
``history[2].test_loss``) to the reason, so that any strict JSON parser reads the report.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from tuckerman.integrations.torch._train._outputs import (
    METRICS,
    append_line,
    write_atomic,
    write_json,
)

__all__ = [
    "UNITS",
    "percent_compression",
    "sanitize",
    "write_metrics",
    "write_plots",
    "write_report",
]

UNITS = {
    "*_percent": "percent (0-100)",
    "*_s": "seconds",
    "*_bytes": "bytes",
    "test_loss, train_loss": "mean cross-entropy per example (nats)",
    "steps, total_steps": "optimizer steps",
    "ranks": "multilinear ranks per Tucker layer (one per weight mode)",
    "parameters": "number of trainable parameters",
}


# --------------------------------------------------------------------------- strict JSON
def sanitize(value: Any, reasons: dict[str, str], path: str = "") -> Any:
    """``value`` with every non-finite float replaced by None, the reason recorded in
    ``reasons[path]``.

    Examples
    --------
    >>> from tuckerman.integrations.torch._train._report import sanitize
    >>> reasons = {}
    >>> sanitize({"loss": float("nan"), "history": [{"acc": float("inf")}]}, reasons)
    {'loss': None, 'history': [{'acc': None}]}
    >>> reasons
    {'loss': 'not a number (NaN)', 'history[0].acc': 'infinite (inf)'}
    """
    if isinstance(value, float) and not math.isfinite(value):
        reasons[path] = "not a number (NaN)" if math.isnan(value) else f"infinite ({value})"
        return None
    if isinstance(value, dict):
        return {
            k: sanitize(v, reasons, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [sanitize(v, reasons, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def write_report(path: Path, report: dict) -> int:
    """Write ``report`` as strict JSON (atomically), with ``null_reasons`` filled in."""
    reasons = dict(report.get("null_reasons", {}))
    clean = sanitize({k: v for k, v in report.items() if k != "null_reasons"}, reasons)
    clean["null_reasons"] = reasons
    return write_json(path, clean)


def write_metrics(folder: Path, entries: list[dict], *, append: bool) -> None:
    """``metrics.jsonl``: append one epoch's entry, or rewrite the file from ``entries`` (a
    resumed run starts from its checkpoint's history)."""
    lines = []
    for entry in entries:
        reasons: dict[str, str] = {}
        clean = sanitize(entry, reasons)
        if reasons:
            clean["null_reasons"] = reasons
        lines.append(json.dumps(clean, allow_nan=False))
    if append:
        for line in lines:
            append_line(folder / METRICS, line)
    else:
        data = "".join(line + "\n" for line in lines).encode()
        write_atomic(folder / METRICS, lambda f: f.write(data))


def percent_compression(report: dict) -> dict:
    """:func:`compression_report`'s result with its fractions as ``compression_rate_percent``."""

    def convert(d: dict) -> dict:
        out = {k: v for k, v in d.items() if k != "compression_rate"}
        out["compression_rate_percent"] = 100 * d["compression_rate"]
        return out

    converted = convert(report)
    converted["layers"] = [convert(layer) for layer in report["layers"]]
    return converted


# --------------------------------------------------------------------------- plots
def _method_title(config: dict) -> str:
    if config["method"] == "tdlrt":
        return f"TDLRT, tau={config['tau']:g}"
    if config["method"] == "tucker-fixed":
        return f"fixed-rank Tucker, ranks={config['ranks']}"
    return "dense"


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, render and write ``fig`` as a PNG (atomically), and close it."""
    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def write_plots(report: dict, folder: Path) -> list[str]:
    """Accuracy per epoch and the ranks per step, as PNGs in ``folder``; their names.

    ``ranks.png``: with up to six Tucker layers, one panel per layer with the rank of each
    adaptive mode (lines that coincide stay visible: solid under dashed); with more (a deep
    model such as resnet18, 19 Tucker layers), one row per layer mode coloured by the rank as a
    fraction of its full rank, so every layer stays readable without a legend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    config = report["config"]
    title = f"{config['model']}, {_method_title(config)}"
    written = []
    history = report["history"]
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["test_accuracy_percent"] for h in history], "o-", label="test")
    ax.plot(
        epochs,
        [h["train_accuracy_percent"] for h in history],
        "s--",
        label="train (during the epoch)",
    )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy [%]")
    ax.set_title(f"{title}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, folder / "accuracy.png")
    written.append("accuracy.png")

    rank_history = report["rank_history"]
    layers = report["compression"]["layers"]
    if rank_history and layers:
        fig = (
            _rank_lines(plt, layers, rank_history)
            if len(layers) <= 6
            else _rank_map(plt, layers, rank_history)
        )
        fig.suptitle(f"{title}: ranks per step")
        _save(plt, fig, folder / "ranks.png")
        written.append("ranks.png")
    return written


def _mode_name(k: int) -> str:
    return {0: "r1 (out)", 1: "r2 (in)"}.get(k, f"r{k + 1}")


def _rank_lines(plt: Any, layers: list[dict], history: list[dict]) -> Any:
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(7, 1.2 + 2.0 * len(layers)), sharex=True, squeeze=False
    )
    steps = [h["step"] for h in history]
    for ax, layer in zip(axes[:, 0], layers):
        for j, mode in enumerate(layer["adaptive_modes"]):
            ax.plot(
                steps,
                [h["ranks"][layer["name"]][mode] for h in history],
                color=f"C{j}",
                linestyle=("-", "--", ":", "-.")[j % 4],
                linewidth=2.2 - 0.6 * j,
                label=f"{_mode_name(mode)} of {layer['weight_shape'][mode]}",
            )
        ax.set_title(
            f"{layer['name']} ({layer['type']}, {'x'.join(map(str, layer['weight_shape']))})",
            fontsize="medium",
        )
        ax.set_ylabel("rank")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True, nbins=5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    return fig


def _rank_map(plt: Any, layers: list[dict], history: list[dict]) -> Any:
    import numpy as np

    rows, labels = [], []
    for layer in layers:
        for mode in layer["adaptive_modes"]:
            full = layer["weight_shape"][mode]
            rows.append([h["ranks"][layer["name"]][mode] / full for h in history])
            final = history[-1]["ranks"][layer["name"]][mode]
            labels.append(f"{layer['name']} {_mode_name(mode).split()[0]}: {final}/{full}")
    image = np.asarray(rows)
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.18 * len(rows)))
    mesh = ax.imshow(
        image,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    colorbar = fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.02)
    colorbar.set_label("rank / full rank")
    return fig
