"""Model conversion (dense layers → Tucker layers) and the compression report."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from tuckerman.integrations.torch._layers import AbstractTuckerLayer, TuckerConv2d, TuckerLinear

from tuckerman.layers import resolve_ranks

__all__ = ["tuckerize", "compression_report", "format_report"]

_INITS = ("hosvd", "random")


def _patterns(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise TypeError(f"{what} must be a glob pattern or a sequence of them, got {value!r}")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _convertible(module: nn.Module) -> bool:
    # exact types only: subclasses (e.g. the out_proj of nn.MultiheadAttention) may read
    # `.weight` directly or override forward
    return type(module) in (nn.Conv2d, nn.Linear)


def tuckerize(
    model: nn.Module,
    *,
    ranks: Any = None,
    tau: float | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    init: str = "hosvd",
    skip_first_conv: bool = True,
    skip_last_linear: bool = True,
    adaptive_modes: Sequence[int] | None = None,
) -> nn.Module:
    """Replace the model's ``nn.Conv2d`` and ``nn.Linear`` layers by Tucker layers, in place.

    Parameters
    ----------
    model : nn.Module
    ranks : None, int, float, tuple, or callable
        Ranks of every converted layer, as in :class:`TuckerConv2d` / :class:`TuckerLinear`
        (None: full rank; an int: both channel ranks; a float in (0, 1]: a fraction of each
        channel mode's full rank). Ranks larger than a layer allows are lowered to the largest
        feasible ones, so one int fits layers of different widths. A callable
        ``ranks(name, module)`` returns the ranks of each layer.
    tau : float, optional
        With ``init="hosvd"``: relative tolerance of each layer's HOSVD, choosing the ranks of
        the adaptive modes (capped by ``ranks``): ``‖W - W_tucker‖_F <= tau ‖W‖_F``.
    include, exclude : glob pattern or sequence of patterns, optional
        Module names (as in ``model.named_modules()``, e.g. ``"features.*"``) to convert / to
        leave dense. Default: every ``nn.Conv2d`` and ``nn.Linear``.
    init : {"hosvd", "random"}
        ``"hosvd"``: the layer approximates the dense weight (exact at full rank) and keeps its
        bias. ``"random"``: a fresh random initialization (orthonormal factors, the dense
        layer's weight variance).
    skip_first_conv, skip_last_linear : bool
        Leave the first ``nn.Conv2d`` and the last ``nn.Linear`` (registration order, usually the
        stem and the classifier) dense, as the paper does. Applied after ``include``.
    adaptive_modes : sequence of int, optional
        Passed to every converted layer (default: the layer's default, the channel modes).

    Returns
    -------
    nn.Module
        ``model`` itself, changed in place (or the new layer when ``model`` is itself a
        convertible layer).

    Notes
    -----
    Only modules whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` are converted (subclasses
    may depend on a dense ``.weight``); grouped convolutions (``groups != 1``) are left dense,
    since a Tucker factorization of the channel modes cannot represent them. A module registered
    under several names is converted once and replaced everywhere. The new layers have new
    parameters: build the optimizer after converting. Dtype, device, ``requires_grad`` and the
    training flag follow the dense layer.

    Examples
    --------
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import tuckerize, TuckerConv2d
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(),
    ...                     nn.Linear(8, 8), nn.Linear(8, 2))
    >>> net = tuckerize(net, ranks=4)
    >>> [type(m).__name__ for m in net]
    ['Conv2d', 'TuckerConv2d', 'Flatten', 'TuckerLinear', 'Linear']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tuckerize expects an nn.Module, got {type(model)}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if tau is not None and init != "hosvd":
        raise ValueError(
            f"tau={tau} chooses ranks from the dense weights and needs init='hosvd' "
            f"(got init={init!r}); give ranks for a random initialization"
        )
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")

    candidates = [(n, m) for n, m in model.named_modules() if _convertible(m)]
    skipped: set[int] = set()
    if skip_first_conv:
        convs = [m for _, m in candidates if isinstance(m, nn.Conv2d)]
        skipped.update(id(m) for m in convs[:1])
    if skip_last_linear:
        linears = [m for _, m in candidates if isinstance(m, nn.Linear)]
        skipped.update(id(m) for m in linears[-1:])

    new: dict[int, nn.Module] = {}
    for name, module in candidates:
        if id(module) in skipped:
            continue
        if inc is not None and not _matches(name, inc):
            continue
        if exc is not None and _matches(name, exc):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        new[id(module)] = _convert(name, module, ranks, tau, init, adaptive_modes)

    return _replace_modules(model, new)


def _replace_modules(model: nn.Module, new: Mapping[int, nn.Module]) -> nn.Module:
    """Put ``new[id(child)]`` wherever ``child`` is registered; returns the (new) root."""
    if id(model) in new:
        return new[id(model)]
    # list first: new modules may contain the old ones (adapters), which must stay inside them
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a child registered twice
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return model


def _convert(
    name: str,
    module: nn.Module,
    ranks: Any,
    tau: float | None,
    init: str,
    adaptive_modes: Sequence[int] | None,
) -> AbstractTuckerLayer:
    spec = ranks(name, module) if callable(ranks) else ranks
    cls = TuckerConv2d if isinstance(module, nn.Conv2d) else TuckerLinear
    modes = (0, 1) if adaptive_modes is None else adaptive_modes
    if init == "hosvd":
        return cls._from_dense(module, spec, tau, modes, clip=True)
    w = cast(torch.Tensor, module.weight)
    owner = f"tuckerize: layer {name!r} ({module})"
    r = resolve_ranks(tuple(w.shape), spec, owner=owner, clip=True)
    layer: AbstractTuckerLayer = cls._like(module, r, modes)
    for p in (layer.core, *layer.factors):
        p.requires_grad_(w.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(module.bias.requires_grad)
    layer.train(module.training)
    return layer


# --------------------------------------------------------------------------- reporting
def compression_report(model: nn.Module) -> dict:
    """Per-layer ranks and parameter counts, and the paper's compression rate.

    The compression rate is that of Zangrando et al. (NeurIPS 2024):
    ``c.r. = 1 - (parameters of the factorized layers) / (parameters of the same layers
    dense)``, over the Tucker layers of ``model``. A layer's parameters are all its parameters
    (core, factors and bias); its dense parameters those of the dense layer it stands for
    (weight and bias).

    Returns
    -------
    dict
        ``layers``: a list of ``{"name", "type", "weight_shape", "ranks", "adaptive_modes",
        "parameters", "dense_parameters", "compression_rate"}``; ``parameters`` and
        ``dense_parameters``: the sums over the Tucker layers; ``compression_rate``: the paper's
        c.r. over them (0.0 when there is none); ``model_parameters``: every parameter of the
        model; ``model_dense_parameters``: the same model with its Tucker layers dense. Plain
        Python values, ready for ``json.dump``.

    Examples
    --------
    >>> from tuckerman.integrations.torch import TuckerLinear, compression_report
    >>> r = compression_report(TuckerLinear(100, 100, bias=False, ranks=10))
    >>> r["parameters"], r["dense_parameters"], round(r["compression_rate"], 2)
    (2100, 10000, 0.79)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compression_report expects an nn.Module, got {type(model)}")
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, AbstractTuckerLayer):
            p, d = m.num_parameters(), m.num_parameters_dense()
            layers.append(
                {
                    "name": name,
                    "type": type(m).__name__,
                    "weight_shape": list(m.weight_shape),
                    "ranks": list(m.ranks),
                    "adaptive_modes": list(m.adaptive_modes),
                    "parameters": p,
                    "dense_parameters": d,
                    "compression_rate": 1.0 - p / d,
                }
            )
    total = sum(layer["parameters"] for layer in layers)
    dense = sum(layer["dense_parameters"] for layer in layers)
    # Tucker layers count at their true ranks (their parameters may be padded to a capacity)
    tucker_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, AbstractTuckerLayer)
        for p in m.parameters(recurse=False)
    } | {id(u) for m in model.modules() if isinstance(m, AbstractTuckerLayer) for u in m.factors}
    model_total = total + sum(p.numel() for p in model.parameters() if id(p) not in tucker_ids)
    return {
        "layers": layers,
        "parameters": total,
        "dense_parameters": dense,
        "compression_rate": 1.0 - total / dense if dense else 0.0,
        "model_parameters": model_total,
        "model_dense_parameters": model_total - total + dense,
    }


def format_report(report: dict) -> str:
    """A text table of :func:`compression_report`'s result.

    Examples
    --------
    >>> from tuckerman.integrations.torch import TuckerLinear, compression_report, format_report
    >>> print(format_report(compression_report(TuckerLinear(100, 100, bias=False, ranks=10))))
    layer   type          shape    ranks  params  dense    c.r.
    ------  ------------  -------  -----  ------  -----  ------
    (root)  TuckerLinear  100x100  10x10    2100  10000  79.00%
    ------  ------------  -------  -----  ------  -----  ------
    total                                   2100  10000  79.00%
    model parameters: 2,100 (dense: 10,000)
    """
    header = ("layer", "type", "shape", "ranks", "params", "dense", "c.r.")
    rows = [
        (
            layer["name"] or "(root)",
            layer["type"],
            "x".join(str(n) for n in layer["weight_shape"]),
            "x".join(str(r) for r in layer["ranks"]),
            str(layer["parameters"]),
            str(layer["dense_parameters"]),
            f"{100 * layer['compression_rate']:.2f}%",
        )
        for layer in report["layers"]
    ]
    total = (
        "total",
        "",
        "",
        "",
        str(report["parameters"]),
        str(report["dense_parameters"]),
        f"{100 * report['compression_rate']:.2f}%",
    )
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]
    right = {4, 5, 6}

    def line(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = line(["-" * w for w in widths])
    out = [line(header), rule, *(line(r) for r in rows), rule, line(total)]
    out.append(
        f"model parameters: {report['model_parameters']:,} "
        f"(dense: {report['model_dense_parameters']:,})"
    )
    return "\n".join(out)
