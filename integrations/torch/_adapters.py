"""Tucker adapters: fine-tune frozen layers of CNNs and transformers with a low-rank update.

A wrapped layer computes ``base(x) + scale · delta(x)``: ``base`` is the original layer, frozen
(its weight ``W₀`` and bias do not require grad), and the update ``ΔW`` is held in Tucker format
by bias-free :class:`~tuckerman.integrations.torch.TuckerLinear` / ``TuckerConv2d`` layers (2
modes for a linear layer or an embedding table, 4 for a convolution: out, in, k_h, k_w),
evaluated by their factorized forward. ``ΔW`` is never formed, except by :func:`merge_adapters`
(on request). The :class:`~tuckerman.integrations.torch.TDLRT` optimizer finds the update layers
like any other Tucker layer and trains them with rank adaptation: the LoRA-like use of the TDLRT
paper (Zangrando et al., NeurIPS 2024, fine-tuning experiments).

Layers: ``nn.Linear`` (attention and MLP projections, optionally a *fused* projection split
into one update per output slice, e.g. q/k/v), ``nn.Conv2d`` (``groups=1``) and ``nn.Embedding``
(the update's rows are looked up in its first factor, ``F.embedding(idx, U_1) C U_2ᵀ``). Targets
are chosen by name as in PEFT (exact names, dotted suffixes, globs, regexes), from a
:class:`TuckerAdapterConfig`; :func:`save_adapters` / :func:`load_adapters` write and read the
updates at their ranks as ``safetensors`` plus a JSON description.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tuckerman.integrations.torch._convert import _replace_modules
from tuckerman.integrations.torch._layers import (
    AbstractTuckerLayer,
    TuckerConv2d,
    TuckerLinear,
    _groups_message,
)

import tuckerman as tm
from tuckerman.layers import check_adaptive_modes, resolve_ranks

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "TuckerAdapter",
    "TuckerAdapterConfig",
    "adapter_report",
    "adapter_state_dict",
    "add_tucker_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "remove_adapters",
    "save_adapters",
    "unmerge_adapters",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""File name of the updates written by :func:`save_adapters` (PEFT's name)."""
ADAPTER_CONFIG_NAME = "adapter_config.json"
"""File name of the JSON description written by :func:`save_adapters` (PEFT's name)."""

_FORMAT = "tuckerman-adapters"
_FORMAT_VERSION = 1
_GLOB_CHARS = frozenset("*?[")
_REGEX_PREFIX = "re:"
_INITS = ("zero", "principal")
_ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Embedding)
_ADAPTABLE_TEXT = "nn.Linear, nn.Conv2d (groups=1) and nn.Embedding"


def _adaptable_type(module: nn.Module) -> bool:
    # exact types only: subclasses (e.g. the out_proj of nn.MultiheadAttention) may read
    # `.weight` directly or override forward
    return type(module) in _ADAPTABLE


def _adaptable(module: nn.Module) -> bool:
    return _adaptable_type(module) and not (isinstance(module, nn.Conv2d) and module.groups != 1)


def _check_scale(scale: Any, owner: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{owner}: scale must be a real number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value == 0.0:
        raise ValueError(
            f"{owner}: scale must be finite and non-zero (a zero scale disables the adapter "
            f"and its gradient), got {scale!r}"
        )
    return value


# --------------------------------------------------------------------------- name matching
_Target = str | re.Pattern


def _target_entries(value: Any, what: str) -> tuple[_Target, ...]:
    """Validate ``target_modules`` / ``exclude_modules``-like values into a tuple of entries."""
    if isinstance(value, (str, re.Pattern)):
        value = (value,)
    if (
        isinstance(value, (bytes, Mapping))
        or not isinstance(value, Sequence)
        or not all(isinstance(p, (str, re.Pattern)) for p in value)
    ):
        raise TypeError(
            f"{what} must be a module name, a dotted suffix (e.g. 'qkv'), a glob pattern "
            "('classifier.*'), a regex (re.compile(...) or a string 're:...'), or a sequence of "
            f"them, got {value!r}"
        )
    for p in value:
        if isinstance(p, str) and p.startswith(_REGEX_PREFIX):
            try:
                re.compile(p[len(_REGEX_PREFIX) :])
            except re.error as e:
                raise ValueError(f"{what}: {p!r} is not a valid regular expression: {e}") from None
    return tuple(value)


def _is_pattern(entry: _Target) -> bool:
    """Globs and regexes pass over unsupported modules; names and suffixes must be adaptable."""
    return (
        isinstance(entry, re.Pattern)
        or entry.startswith(_REGEX_PREFIX)
        or bool(_GLOB_CHARS & set(entry))
    )


def _matches(entry: _Target, name: str) -> bool:
    """PEFT-like: a regex matches the full name, a glob the full name, a plain string the full
    name or a dotted suffix of it (``"qkv"`` matches ``"blocks.0.attn.qkv"``)."""
    if isinstance(entry, re.Pattern):
        return entry.fullmatch(name) is not None
    if entry.startswith(_REGEX_PREFIX):
        return re.fullmatch(entry[len(_REGEX_PREFIX) :], name) is not None
    if _GLOB_CHARS & set(entry):
        return fnmatch.fnmatchcase(name, entry)
    return name == entry or (bool(entry) and name.endswith("." + entry))


def _entry_text(entry: _Target) -> str:
    return f"re.compile({entry.pattern!r})" if isinstance(entry, re.Pattern) else repr(entry)


def _entry_json(entry: _Target, owner: str) -> str:
    if isinstance(entry, str):
        return entry
    if entry.flags & ~re.UNICODE:
        raise ValueError(
            f"{owner}: the regex {entry.pattern!r} has flags ({entry.flags}); only plain "
            "patterns can be saved: put the flags inside the pattern, e.g. '(?i)...'"
        )
    return _REGEX_PREFIX + entry.pattern


def _first_match(table: Mapping[_Target, Any], name: str) -> Any:
    for key, value in table.items():
        if _matches(key, name):
            return value
    return None


# --------------------------------------------------------------------------- configuration
def _check_ranks_spec(ranks: Any, what: str) -> Any:
    if ranks is None or callable(ranks):
        return ranks
    if isinstance(ranks, bool):
        raise TypeError(f"{what} must be an int, a float in (0, 1], a tuple or None, got {ranks}")
    if isinstance(ranks, numbers.Real):
        return ranks
    if isinstance(ranks, Sequence) and not isinstance(ranks, (str, bytes)):
        return tuple(ranks)
    raise TypeError(f"{what} must be an int, a float in (0, 1], a tuple or None, got {ranks!r}")


def _check_splits(value: Any, what: str) -> int | tuple[int, ...]:
    bad = f"{what} must be a number of equal slices (an int >= 2) or a sequence of slice sizes"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 2:
            raise ValueError(f"{bad}, got {value}")
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        sizes = tuple(value)
        if len(sizes) < 2 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1
            for s in sizes
        ):
            raise ValueError(f"{bad} (at least two, each >= 1), got {value!r}")
        return tuple(int(s) for s in sizes)
    raise TypeError(f"{bad}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TuckerAdapterConfig:
    """What :func:`add_tucker_adapters` adapts, and how (a PEFT-style adapter config).

    Parameters
    ----------
    target_modules : str, re.Pattern or sequence of them
        Which layers get an adapter, by their names in ``model.named_modules()``. Each entry is

        - a **name** or a **dotted suffix**: ``"features.3"``, ``"qkv"`` (matches
          ``"blocks.0.attn.qkv"``, ``"blocks.1.attn.qkv"``, ...), as PEFT's list entries;
        - a **glob** (contains ``*``, ``?`` or ``[``): ``"blocks.*.mlp.*"``, ``"*"``;
        - a **regex**, matched against the full name: ``re.compile(r"blocks\\.[0-3]\\.attn\\..*")``
          or the string ``"re:blocks\\.[0-3]\\.attn\\..*"`` (the form saved in JSON). Unlike
          PEFT, a plain string is *not* a regex: it is a name, as in earlier tuckerman versions.

        Every module a name or suffix matches must be adaptable (``nn.Linear``, ``nn.Conv2d``
        with ``groups=1``, ``nn.Embedding``; exact types); globs and regexes pass over the
        others. Every entry must match at least one module.
    ranks : int, float, tuple or None
        Initial ranks of each update (as for :class:`TuckerLinear` / :class:`TuckerConv2d`: an
        int for both channel ranks, a convolution's window modes at full rank; a fraction of the
        full rank; a tuple; None: full), lowered per layer to the largest feasible ranks. TDLRT
        then adapts them.
    rank_pattern : mapping, optional
        ``{entry: ranks}`` overriding ``ranks`` for the layers an entry matches (same matching
        rules; the first matching entry wins), e.g. ``{"head": 2}``.
    exclude_modules : str, re.Pattern or sequence of them
        Layers matched here get no adapter even when a target matches them.
    init : {"zero", "principal"}
        The update starts at ``ΔW = 0`` either way (the model's output does not change when
        wrapping). ``"zero"``: random orthonormal factors, as LoRA's random ``A``. ``"principal"``:
        factors spanning the base weight's leading singular subspaces (HOSVD of ``W₀``), so the
        first steps move the update inside the directions the layer already uses.
    scale : float
        Multiplier of every update (LoRA's ``alpha``; a constant since the ranks change).
    adaptive_modes : sequence of int, optional
        Modes TDLRT may truncate or grow; default the channel modes ``(0, 1)``.
    fused_splits : mapping, optional
        ``{entry: slices}`` for fused ``nn.Linear`` projections such as a ``qkv`` of
        ``3·dim`` outputs: the update of a matched layer is one Tucker update **per output
        slice** (``slices``: a number of equal slices, e.g. 3, or the slice sizes), each with
        its own ranks, concatenated in the forward. Without an entry a fused projection gets
        **one** update over the whole fused weight (PEFT's behaviour for fused projections).
    freeze_model : bool
        True (default): every parameter outside the updates stops requiring grad. False: only
        the wrapped layers' parameters are frozen.

    Raises
    ------
    TypeError, ValueError
        Any malformed field, naming it and the value.

    Examples
    --------
    >>> import re
    >>> from tuckerman.integrations.torch import TuckerAdapterConfig
    >>> cfg = TuckerAdapterConfig(
    ...     target_modules=["qkv", "proj", re.compile(r"blocks\\.\\d+\\.mlp\\.fc\\d")],
    ...     ranks=4, rank_pattern={"head": 2}, fused_splits={"qkv": 3})
    >>> cfg.to_dict()["target_modules"]
    ['qkv', 'proj', 're:blocks\\\\.\\\\d+\\\\.mlp\\\\.fc\\\\d']
    >>> TuckerAdapterConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    True
    """

    target_modules: Any
    ranks: Any = 8
    rank_pattern: Mapping[Any, Any] = dataclasses.field(default_factory=dict)
    exclude_modules: Any = ()
    init: str = "zero"
    scale: float = 1.0
    adaptive_modes: tuple[int, ...] | None = None
    fused_splits: Mapping[Any, Any] = dataclasses.field(default_factory=dict)
    freeze_model: bool = True

    def __post_init__(self) -> None:
        owner = "TuckerAdapterConfig"
        set_ = object.__setattr__
        set_(self, "target_modules", _target_entries(self.target_modules, "target_modules"))
        if not self.target_modules:
            raise TypeError(
                "target_modules must be a module name, suffix, glob or regex, or a non-empty "
                "sequence of them (got an empty sequence)"
            )
        excl = self.exclude_modules
        set_(self, "exclude_modules", () if not excl else _target_entries(excl, "exclude_modules"))
        set_(self, "ranks", _check_ranks_spec(self.ranks, "ranks"))
        for field in ("rank_pattern", "fused_splits"):
            table = getattr(self, field)
            if not isinstance(table, Mapping):
                raise TypeError(f"{owner}: {field} must be a mapping, got {table!r}")
            checked = {}
            for key, value in table.items():
                _target_entries(key, f"{field} key")
                what = f"{field}[{key!r}]"
                checked[key] = (
                    _check_ranks_spec(value, what)
                    if field == "rank_pattern"
                    else _check_splits(value, what)
                )
            set_(self, field, checked)
        if self.init not in _INITS:
            raise ValueError(f"{owner}: init must be one of {_INITS}, got {self.init!r}")
        set_(self, "scale", _check_scale(self.scale, owner))
        if self.adaptive_modes is not None:
            modes = self.adaptive_modes
            if isinstance(modes, numbers.Integral) and not isinstance(modes, bool):
                modes = (modes,)
            if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
                raise TypeError(
                    f"{owner}: adaptive_modes must be a sequence of modes, got {modes!r}"
                )
            set_(self, "adaptive_modes", tuple(modes))
        if not isinstance(self.freeze_model, bool):
            raise TypeError(f"freeze_model must be a bool, got {self.freeze_model!r}")

    def ranks_for(self, name: str, module: nn.Module) -> Any:
        """The initial ranks of the layer ``name``: its ``rank_pattern`` entry, else ``ranks``."""
        spec = _first_match(self.rank_pattern, name)
        if spec is None:
            spec = self.ranks
        return spec(name, module) if callable(spec) else spec

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (regexes as ``"re:..."`` strings, tuples as lists).

        Raises ``ValueError`` for what JSON cannot hold (callable ranks, regex flags).
        """
        owner = "TuckerAdapterConfig.to_dict"
        if callable(self.ranks) or any(callable(v) for v in self.rank_pattern.values()):
            raise ValueError(
                f"{owner}: callable ranks cannot be saved; use ranks and rank_pattern instead"
            )

        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "target_modules": [_entry_json(e, owner) for e in self.target_modules],
            "ranks": plain(self.ranks),
            "rank_pattern": {_entry_json(k, owner): plain(v) for k, v in self.rank_pattern.items()},
            "exclude_modules": [_entry_json(e, owner) for e in self.exclude_modules],
            "init": self.init,
            "scale": self.scale,
            "adaptive_modes": plain(self.adaptive_modes),
            "fused_splits": {_entry_json(k, owner): plain(v) for k, v in self.fused_splits.items()},
            "freeze_model": self.freeze_model,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuckerAdapterConfig:
        """The config of :meth:`to_dict`'s output (unknown keys are an error)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"TuckerAdapterConfig.from_dict expects a mapping, got {data!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"TuckerAdapterConfig.from_dict: unknown keys {unknown} (known: {sorted(fields)})"
            )
        kwargs = dict(data)
        if isinstance(kwargs.get("ranks"), list):
            kwargs["ranks"] = tuple(kwargs["ranks"])
        if isinstance(kwargs.get("adaptive_modes"), list):
            kwargs["adaptive_modes"] = tuple(kwargs["adaptive_modes"])
        for field in ("rank_pattern", "fused_splits"):
            if field in kwargs and isinstance(kwargs[field], Mapping):
                kwargs[field] = {
                    k: tuple(v) if isinstance(v, list) else v for k, v in kwargs[field].items()
                }
        return cls(**kwargs)


# --------------------------------------------------------------------------- the wrapper
def _split_sizes(base: nn.Module, splits: Any, owner: str) -> tuple[int, ...] | None:
    if splits is None:
        return None
    if type(base) is not nn.Linear:
        raise ValueError(
            f"{owner}: fused_splits applies to nn.Linear projections (output slices), not to "
            f"{type(base).__name__}"
        )
    splits = _check_splits(splits, f"{owner}: splits")
    n = base.out_features
    if isinstance(splits, int):
        if n % splits:
            raise ValueError(
                f"{owner}: out_features={n} cannot be split into {splits} equal slices"
            )
        return (n // splits,) * splits
    if sum(splits) != n:
        raise ValueError(
            f"{owner}: slice sizes {splits} add up to {sum(splits)}, not out_features={n}"
        )
    return splits


def _new_update(
    base: nn.Module, rows: tuple[int, int] | None, ranks: Any, modes: Any, init: str, owner: str
) -> AbstractTuckerLayer:
    """A bias-free Tucker layer for ``ΔW`` (rows ``rows`` of a fused linear weight), zero core."""
    w = cast(torch.Tensor, base.weight)
    kw: dict[str, Any] = {"bias": False, "device": w.device, "dtype": w.dtype}
    layer: AbstractTuckerLayer
    if isinstance(base, nn.Conv2d):
        shape = tuple(w.shape)
        r = resolve_ranks(shape, ranks, owner=owner, clip=True)
        layer = TuckerConv2d(
            base.in_channels,
            base.out_channels,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            ranks=r,
            adaptive_modes=modes,
            **kw,
        )
    else:  # nn.Linear, or nn.Embedding: a (num_embeddings, dim) matrix, held as a linear layer
        out = w.shape[0] if rows is None else rows[1] - rows[0]
        shape = (out, w.shape[1])
        r = resolve_ranks(shape, ranks, owner=owner, clip=True)
        layer = TuckerLinear(w.shape[1], out, ranks=r, adaptive_modes=modes, **kw)
    if init == "principal":
        block = w.detach() if rows is None else w.detach()[rows[0] : rows[1]]
        x = tm.hosvd(block, ranks=r)
        layer.set_tucker(tm.TuckerTensor(torch.zeros_like(x.core), x.factors))
    else:
        with torch.no_grad():
            layer.core.zero_()
    return layer


class TuckerAdapter(nn.Module):
    """A frozen ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` plus a trainable Tucker update.

    ``forward(x) = base(x) + scale * ΔW(x)``: the layer with weight ``W₀ + scale · ΔW`` and the
    base bias. The update ``ΔW = core ×_1 U_1 ⋯ ×_d U_d`` is held by ``delta``, a bias-free
    :class:`TuckerLinear` / :class:`TuckerConv2d` with the base layer's hyperparameters, dtype
    and device; for a fused linear projection split into slices (``splits``), ``delta`` is an
    ``nn.ModuleList`` of one :class:`TuckerLinear` per output slice, whose outputs are
    concatenated. For an ``nn.Embedding`` of ``num × dim``, ``delta`` is a
    :class:`TuckerLinear` holding the ``num × dim`` table update, evaluated as
    ``F.embedding(idx, U_1) @ (C U_2ᵀ)`` (never the dense table). The dense ``ΔW`` is formed only
    by :meth:`merge` and :meth:`delta_weight`.

    Initialization: ``ΔW = 0`` (zero core), as LoRA's ``B = 0``, so wrapping does not change the
    model's output; factors random orthonormal (``init="zero"``) or the leading singular
    subspaces of ``W₀`` (``init="principal"``). The first TDLRT step then only moves the core:
    the factor gradients ``∂L/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ`` vanish at ``C = 0``, so the
    augmented bases are the initial ones completed by arbitrary orthonormal directions, and the
    Galerkin step puts the projected gradient into the core (truncated by ``tau``). From the
    second step on the bases follow the gradient; ranks grow (up to doubling per step) or shrink
    by the tolerance.

    Parameters
    ----------
    base : nn.Linear, nn.Conv2d or nn.Embedding
        The layer to adapt (exact type; a convolution's ``groups`` must be 1; an embedding
        without ``max_norm`` or ``sparse``). Its parameters are frozen.
    ranks : int, float, tuple or None
        Initial ranks of ``ΔW`` (of each slice), as for :class:`TuckerLinear` /
        :class:`TuckerConv2d`, lowered to the largest feasible ranks when too large.
    scale : float
        Multiplies the update (LoRA's ``alpha / r``, here a constant since ``r`` changes).
    adaptive_modes : sequence of int, optional
        Modes whose rank TDLRT may change; default the channel modes ``(0, 1)``.
    init : {"zero", "principal"}
        See :class:`TuckerAdapterConfig`.
    splits : int or sequence of int, optional
        ``nn.Linear`` only: one update per output slice (a number of equal slices, or sizes).
    name : str
        The layer's name in the model, for error messages.

    Attributes
    ----------
    base : nn.Module
    delta : AbstractTuckerLayer or nn.ModuleList
    deltas : tuple of AbstractTuckerLayer
        The Tucker layers of the update (one, or one per slice).
    splits : tuple of int or None
        Output slice sizes of a split update.
    scale : float
    merged : bool
        True after :meth:`merge`: ``base.weight`` holds ``W₀ + scale · ΔW`` and the update is
        not evaluated.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import TuckerAdapter
    >>> layer = TuckerAdapter(nn.Linear(20, 10), ranks=4)
    >>> layer.delta.ranks, layer.base.weight.requires_grad
    ((4, 4), False)
    >>> x = torch.randn(3, 20)
    >>> bool(torch.equal(layer(x), layer.base(x)))  # ΔW starts at zero
    True
    >>> qkv = TuckerAdapter(nn.Linear(8, 24), ranks=2, splits=3)  # one update per q, k, v
    >>> [d.weight_shape for d in qkv.deltas]
    [(8, 8), (8, 8), (8, 8)]
    """

    _unmerged_weight: torch.Tensor | None

    def __init__(
        self,
        base: nn.Module,
        ranks: Any = 8,
        *,
        scale: float = 1.0,
        adaptive_modes: Sequence[int] | None = None,
        init: str = "zero",
        splits: Any = None,
        name: str = "",
    ) -> None:
        where = f" {name!r}" if name else ""
        owner = f"TuckerAdapter{where}"
        if isinstance(base, TuckerAdapter):
            raise ValueError(f"{owner}: the layer already has a Tucker adapter ({base})")
        if not _adaptable_type(base):
            raise TypeError(
                f"{owner}: can adapt {_ADAPTABLE_TEXT} layers (exact types), got "
                f"{type(base).__name__} ({base})"
            )
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(
                _groups_message(owner, base.groups, base.in_channels, base.out_channels)
            )
        if isinstance(base, nn.Embedding) and (base.max_norm is not None or base.sparse):
            raise ValueError(
                f"{owner}: nn.Embedding with max_norm={base.max_norm} / sparse={base.sparse} "
                "is not supported (max_norm renormalizes the table in place, which the "
                "factorized update cannot follow; sparse gradients are not handled by TDLRT)"
            )
        if init not in _INITS:
            raise ValueError(f"{owner}: init must be one of {_INITS}, got {init!r}")
        scale = _check_scale(scale, owner)
        w = cast(torch.Tensor, base.weight)
        if not w.dtype.is_floating_point:
            raise TypeError(f"{owner}: the base weight must be floating point, got {w.dtype}")
        modes = check_adaptive_modes(
            (0, 1) if adaptive_modes is None else adaptive_modes, w.ndim, owner
        )
        sizes = _split_sizes(base, splits, owner)
        who = f"{owner} ({base})"
        delta: nn.Module
        if sizes is None:
            delta = _new_update(base, None, ranks, modes, init, who)
        else:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            delta = nn.ModuleList(
                [
                    _new_update(base, (a, a + s), ranks, modes, init, f"{who}, slice {i}")
                    for i, (a, s) in enumerate(zip(starts, sizes))
                ]
            )
        super().__init__()
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.delta = delta
        self.splits = sizes
        self.scale = scale
        self.init = init
        self.config: TuckerAdapterConfig | None = None  # set by add_tucker_adapters
        self.merged = False
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.train(base.training)

    @property
    def _base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base.weight)

    @property
    def deltas(self) -> tuple[AbstractTuckerLayer, ...]:
        """The Tucker layers holding the update: one, or one per output slice."""
        if isinstance(self.delta, nn.ModuleList):
            return tuple(cast(AbstractTuckerLayer, m) for m in self.delta)
        return (cast(AbstractTuckerLayer, self.delta),)

    # ------------------------------------------------------------------ evaluation
    def _update(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Embedding):
            # the weights the layer's own forward would use (the live block, or the augmented
            # point TDLRT installs for its second gradient evaluation)
            # core (r1, r2); u_rows (num, r1), u_cols (dim, r2)
            core, (u_rows, u_cols) = self.deltas[0].active_weights()
            out = F.embedding(x, u_rows) @ (core @ u_cols.mT)
            if self.base.padding_idx is not None:  # the padding row stays W₀'s
                out = out.masked_fill((x == self.base.padding_idx).unsqueeze(-1), 0.0)
            return out
        if self.splits is not None:
            return torch.cat([d(x) for d in self.deltas], dim=-1)
        return self.delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = self._update(x)
        return y + update if self.scale == 1.0 else y + self.scale * update

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale · ΔW`` in the base weight's layout (differentiable).

        Allocates a full weight: for merging, tests and export only.
        """
        w = torch.cat([d.dense_weight() for d in self.deltas], dim=0)
        pad = getattr(self.base, "padding_idx", None)
        if pad is not None:
            keep = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
            keep[pad] = 0
            w = w * keep
        return w if self.scale == 1.0 else self.scale * w

    def num_parameters(self) -> int:
        """Parameters of the update (cores and factors)."""
        return sum(d.num_parameters() for d in self.deltas)

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """``base.weight ← W₀ + scale · ΔW``; the adapter is then skipped in :meth:`forward`.

        A copy of ``W₀`` is kept (a non-persistent buffer, not in ``state_dict``), so
        :meth:`unmerge` restores it bit for bit. Raises ``ValueError`` when already merged.
        """
        if self.merged:
            raise ValueError(f"{self._owner()} is already merged (merge_adapters called twice?)")
        with torch.no_grad():
            w0 = self._base_weight.detach().clone()
            self._base_weight.add_(self.delta_weight().to(w0.dtype))
        self._unmerged_weight = w0
        self.merged = True

    def unmerge(self) -> None:
        """Restore the original ``W₀`` exactly (from the copy :meth:`merge` kept)."""
        if not self.merged:
            raise ValueError(f"{self._owner()} is not merged; there is nothing to unmerge")
        with torch.no_grad():
            self._base_weight.copy_(cast(torch.Tensor, self._unmerged_weight))
        self._unmerged_weight = None
        self.merged = False

    def _owner(self) -> str:
        return f"TuckerAdapter({self.base})"

    def _restore_base_flags(self) -> None:
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))

    def extra_repr(self) -> str:
        splits = "" if self.splits is None else f"splits={self.splits}, "
        return f"{splits}scale={self.scale}, merged={self.merged}"


# --------------------------------------------------------------------------- model level
def _adapters(model: nn.Module) -> list[tuple[str, TuckerAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TuckerAdapter)]


def _require_adapters(model: Any, owner: str) -> list[tuple[str, TuckerAdapter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner} expects an nn.Module, got {type(model).__name__}")
    found = _adapters(model)
    if not found:
        raise ValueError(f"{owner}: the model has no Tucker adapters (see add_tucker_adapters)")
    return found


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _select(model: nn.Module, config: TuckerAdapterConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``config`` adapts, in registration order (validated, nothing changed)."""
    named = list(model.named_modules())
    inside: dict[str, str] = {}  # module name -> the adapter it belongs to
    for name, m in named:
        if isinstance(m, TuckerAdapter):
            inside[name] = name
            for sub, _ in m.named_modules():
                if sub:
                    inside[f"{name}.{sub}" if name else sub] = name
    adaptable = [n for n, m in named if _adaptable(m) and n not in inside]
    excluded = {n for n, _ in named if any(_matches(e, n) for e in config.exclude_modules)}

    chosen: dict[int, tuple[str, nn.Module]] = {}
    for entry in config.target_modules:
        text = _entry_text(entry)
        pattern = _is_pattern(entry)
        hits = [(n, m) for n, m in named if _matches(entry, n)]
        if not hits:
            listed = ", ".join(repr(n) for n in adaptable[:20])
            more = f", ... ({len(adaptable)} in all)" if len(adaptable) > 20 else ""
            raise ValueError(
                f"add_tucker_adapters: target {text} matches no module of the model; "
                f"adaptable layers ({_ADAPTABLE_TEXT}): {listed or 'none'}{more}"
            )
        wrapped = sorted({inside[n] for n, _ in hits if n in inside})
        if wrapped:
            raise ValueError(
                f"add_tucker_adapters: target {text} matches {wrapped[0] or '(root)'!r}, "
                "which already has a Tucker adapter; a layer is wrapped once (remove_adapters "
                "first, or narrow the pattern)"
            )
        kept = []
        for n, m in hits:
            if n in excluded:
                continue
            if isinstance(m, nn.Conv2d) and _adaptable_type(m) and m.groups != 1:
                if not pattern:
                    raise ValueError(
                        _groups_message(
                            f"add_tucker_adapters: target {n!r}",
                            m.groups,
                            m.in_channels,
                            m.out_channels,
                        )
                    )
                continue
            if not _adaptable_type(m):
                if not pattern:
                    via = "" if entry == n else f" (matched by {text})"
                    raise TypeError(
                        f"add_tucker_adapters: target {n!r}{via} is a {type(m).__name__}; "
                        f"adapters wrap {_ADAPTABLE_TEXT} layers (exact types)"
                    )
                continue
            kept.append((n, m))
        if not kept and pattern:
            found = ", ".join(f"{n or '(root)'} ({type(m).__name__})" for n, m in hits[:10])
            raise ValueError(
                f"add_tucker_adapters: pattern {text} matches no adaptable layer "
                f"({_ADAPTABLE_TEXT}) outside exclude_modules; it matches {found}"
            )
        for n, m in kept:
            chosen.setdefault(id(m), (n, m))
    if not chosen:
        raise ValueError(
            "add_tucker_adapters: every layer the targets match is excluded by exclude_modules "
            f"{[_entry_text(e) for e in config.exclude_modules]}"
        )
    for key in config.fused_splits:  # a fused_splits entry must split something
        if not any(_matches(key, n) for n, _ in chosen.values()):
            raise ValueError(
                f"add_tucker_adapters: fused_splits entry {_entry_text(key)} matches none of "
                f"the adapted layers {[n for n, _ in chosen.values()][:20]}"
            )
    return list(chosen.values())


def _attach(model: nn.Module, new: Mapping[int, TuckerAdapter], freeze_model: bool) -> nn.Module:
    model = _replace_modules(model, new)
    if freeze_model:
        keep = {id(p) for _, a in _adapters(model) for p in a.delta.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    return model


def _build_all(specs: Sequence[tuple[str, nn.Module, Callable[[], TuckerAdapter]]]) -> dict:
    """Build every adapter before the model is touched; on failure unfreeze the bases."""
    new: dict[int, TuckerAdapter] = {}
    try:
        for _, m, build in specs:
            new[id(m)] = build()
    except BaseException:  # adapters built so far froze their base layers: unfreeze them
        for adapter in new.values():
            adapter._restore_base_flags()
        raise
    return new


def add_tucker_adapters(
    model: nn.Module,
    target_modules: Any = None,
    ranks: Any = _UNSET,
    *,
    scale: Any = _UNSET,
    adaptive_modes: Any = _UNSET,
    freeze_model: Any = _UNSET,
    config: TuckerAdapterConfig | None = None,
) -> nn.Module:
    """Wrap the model's target layers in :class:`TuckerAdapter` modules, in place.

    Each target becomes ``base(x) + scale · ΔW(x)`` with the base frozen and a zero-initialized
    Tucker update ``ΔW`` (see :class:`TuckerAdapter`). Train the updates with
    :class:`~tuckerman.integrations.torch.TDLRT` (built after this call): its ``tau`` sets the
    rank adaptation, its ``min_rank`` / ``max_rank`` the bounds.

    Parameters
    ----------
    model : nn.Module
    target_modules : str, re.Pattern, sequence of them, or TuckerAdapterConfig
        Which layers to adapt (names, dotted suffixes, globs, regexes: see
        :class:`TuckerAdapterConfig`), or a whole config (then give no other option).
    ranks : int, float, tuple, None or callable
        Initial ranks of each update (default 8), lowered to the largest feasible ranks per
        layer. A callable ``ranks(name, module)`` gives each layer's.
    scale : float
        Multiplier of every update (default 1).
    adaptive_modes : sequence of int, optional
        Modes TDLRT may truncate or grow; default the channel modes ``(0, 1)``.
    freeze_model : bool
        True (default): every parameter outside the updates stops requiring grad.
    config : TuckerAdapterConfig, optional
        Everything above, plus ``rank_pattern``, ``exclude_modules``, ``init`` and
        ``fused_splits``; exclusive with the other options.

    Returns
    -------
    nn.Module
        ``model``, changed in place (the new adapter when ``model`` itself is the target ``""``).

    Raises
    ------
    TypeError
        Bad argument types; a name or suffix matching a module that is not adaptable.
    ValueError
        A target matching no module (the message lists the adaptable ones); a pattern matching
        no adaptable layer; a grouped convolution named exactly; a target that already has an
        adapter; bad ranks, scale or splits. Nothing is changed when an error is raised.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, adapter_report
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    >>> net = add_tucker_adapters(net, ["0", "3"], ranks=2)
    >>> type(net[0]).__name__, net[0].delta.ranks, net[3].delta.ranks
    ('TuckerAdapter', (2, 1, 3, 3), (2, 2))
    >>> report = adapter_report(net)
    >>> report["adapter_parameters"], report["trainable_parameters"]
    (641, 641)

    A transformer, by suffix, with one update per q/k/v slice of the fused projection:

    >>> from tuckerman.integrations.torch import TuckerAdapterConfig, VisionTransformer
    >>> vit = VisionTransformer()
    >>> cfg = TuckerAdapterConfig(["qkv", "proj"], ranks=4, fused_splits={"qkv": 3})
    >>> vit = add_tucker_adapters(vit, cfg)
    >>> len(adapter_report(vit)["layers"]), len(vit.blocks[0].attn.qkv.deltas)
    (8, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_tucker_adapters expects an nn.Module, got {type(model).__name__}")
    options = {
        "ranks": ranks,
        "scale": scale,
        "adaptive_modes": adaptive_modes,
        "freeze_model": freeze_model,
    }
    given = {k: v for k, v in options.items() if v is not _UNSET}
    if isinstance(target_modules, TuckerAdapterConfig):
        if config is not None:
            raise TypeError("add_tucker_adapters: a config given twice (target_modules, config)")
        config, target_modules = target_modules, None
    if config is not None:
        if not isinstance(config, TuckerAdapterConfig):
            raise TypeError(f"config must be a TuckerAdapterConfig, got {type(config).__name__}")
        if target_modules is not None or given:
            extra = (["target_modules"] if target_modules is not None else []) + sorted(given)
            raise TypeError(
                f"add_tucker_adapters: give either a TuckerAdapterConfig or options, not both "
                f"(got the config and {extra})"
            )
    else:
        if target_modules is None:
            raise TypeError(
                "add_tucker_adapters needs target_modules (names, suffixes, globs or regexes) "
                "or a TuckerAdapterConfig"
            )
        _target_entries(target_modules, "target_modules")
        config = TuckerAdapterConfig(target_modules, **given)

    chosen = _select(model, config)
    specs = [
        (
            n,
            m,
            lambda n=n, m=m: TuckerAdapter(
                m,
                config.ranks_for(n, m),
                scale=config.scale,
                adaptive_modes=config.adaptive_modes,
                init=config.init,
                splits=_first_match(config.fused_splits, n),
                name=n,
            ),
        )
        for n, m in chosen
    ]
    new = _build_all(specs)
    for adapter in new.values():
        adapter.config = config
    return _attach(model, new, config.freeze_model)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer: ``W₀ ← W₀ + scale · ΔW``.

    The only place the dense ``ΔW`` is formed. The adapters stay in the model, skipped by the
    forward pass, until :func:`unmerge_adapters` or :func:`remove_adapters`.

    Raises
    ------
    ValueError
        When the model has no adapters or one of them is already merged (nothing is changed).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, merge_adapters
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 6)), "0", ranks=2)
    >>> with torch.no_grad():
    ...     _ = net[0].delta.core.fill_(0.5)
    >>> x = torch.randn(4, 6)
    >>> before = net(x)
    >>> net = merge_adapters(net)
    >>> net[0].merged, bool(torch.allclose(net(x), before, atol=1e-6))
    (True, True)
    """
    found = _require_adapters(model, "merge_adapters")
    already = [n or "(root)" for n, a in found if a.merged]
    if already:
        raise ValueError(f"merge_adapters: adapters {already} are already merged")
    for _, a in found:
        a.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`: every base weight gets its original ``W₀`` back, bit for bit.

    Raises
    ------
    ValueError
        When the model has no adapters or one of them is not merged (nothing is changed).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import (
    ...     add_tucker_adapters, merge_adapters, unmerge_adapters)
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 6)), "0", ranks=2)
    >>> w0 = net[0].base.weight.clone()
    >>> net = unmerge_adapters(merge_adapters(net))
    >>> net[0].merged, bool(torch.equal(net[0].base.weight, w0))
    (False, True)
    """
    found = _require_adapters(model, "unmerge_adapters")
    missing = [n or "(root)" for n, a in found if not a.merged]
    if missing:
        raise ValueError(f"unmerge_adapters: adapters {missing} are not merged")
    for _, a in found:
        a.unmerge()
    return model


def remove_adapters(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replace every :class:`TuckerAdapter` by its base layer, in place.

    Parameters
    ----------
    model : nn.Module
    merge : bool
        True: the base layers keep ``W₀ + scale · ΔW`` (merged now if not yet). False: they get
        their original ``W₀`` back (unmerged if they were merged) and the updates are dropped.

    Returns
    -------
    nn.Module
        ``model`` with plain layers (the base layer itself when ``model`` is an adapter). The
        base layers' ``requires_grad`` flags are those they had before wrapping; other
        parameters frozen by ``freeze_model`` stay frozen.

    Examples
    --------
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, remove_adapters
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 6), nn.ReLU()), "0", ranks=2)
    >>> remove_adapters(net)
    Sequential(
      (0): Linear(in_features=6, out_features=6, bias=True)
      (1): ReLU()
    )
    """
    if not isinstance(merge, bool):
        raise TypeError(f"remove_adapters: merge must be a bool, got {merge!r}")
    found = _require_adapters(model, "remove_adapters")
    new: dict[int, nn.Module] = {}
    for _, a in found:
        if merge and not a.merged:
            a.merge()
        elif not merge and a.merged:
            a.unmerge()
        a._unmerged_weight = None
        a._restore_base_flags()
        new[id(a)] = a.base
    return _replace_modules(model, new)


# --------------------------------------------------------------------------- checkpoints
def _update_prefixes(name: str, a: TuckerAdapter) -> list[tuple[str, AbstractTuckerLayer]]:
    """``(key prefix, Tucker layer)`` of each update of an adapter (the model's own keys)."""
    head = f"{name}.delta" if name else "delta"
    if a.splits is None:
        return [(head + ".", a.deltas[0])]
    return [(f"{head}.{i}.", d) for i, d in enumerate(a.deltas)]


def _update_keys(prefix: str, layer: AbstractTuckerLayer) -> list[str]:
    return [prefix + "core"] + [f"{prefix}factors.{k}" for k in range(len(layer.weight_shape))]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' updates alone (cores and factors, at their current ranks), without ``W₀``.

    Keys are those of ``model.state_dict()`` (``"<layer>.delta.core"``,
    ``"<layer>.delta.factors.<k>"``; ``"<layer>.delta.<slice>.core"``, ... for a split update);
    values are detached contiguous copies of each layer's :meth:`~AbstractTuckerLayer.tucker`.
    Load with :func:`load_adapter_state_dict` into a model with adapters on the same layers (any
    ranks), or save to disk with :func:`save_adapters`. The ``scale`` is configuration, not
    state: give the same one when rebuilding.

    Examples
    --------
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, adapter_state_dict
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 5)), "0", ranks=2)
    >>> {k: tuple(v.shape) for k, v in adapter_state_dict(net).items()}
    {'0.delta.core': (2, 2), '0.delta.factors.0': (5, 2), '0.delta.factors.1': (6, 2)}
    """
    out: dict[str, torch.Tensor] = {}
    for name, a in _require_adapters(model, "adapter_state_dict"):
        for prefix, layer in _update_prefixes(name, a):
            x = layer.tucker()
            for key, value in zip(_update_keys(prefix, layer), [x.core, *x.factors]):
                out[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def _check_update_entry(
    where: str, layer: AbstractTuckerLayer, prefix: str, state: Mapping[str, Any]
) -> tm.TuckerTensor:
    """Validate one update's saved core and factors against its layer (shapes, ranks)."""
    shape = layer.weight_shape
    d = len(shape)
    keys = _update_keys(prefix, layer)
    where = f"{where} (weight shape {shape})"
    for key in keys:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            got = f"a tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value)
            raise TypeError(f"{where}: {key!r} must be a floating-point torch.Tensor, got {got}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key!r} has NaN or Inf entries")
    core, factors = state[keys[0]], [state[k] for k in keys[1:]]
    if core.ndim != d:
        raise ValueError(
            f"{where}: {prefix}core has shape {tuple(core.shape)}; expected a core of {d} modes"
        )
    for k, (u, n, r) in enumerate(zip(factors, shape, core.shape)):
        if tuple(u.shape) != (n, r):
            raise ValueError(
                f"{where}: {prefix}factors.{k} has shape {tuple(u.shape)}; expected ({n}, {r}) "
                f"(mode size {n}, the saved core's shape {tuple(core.shape)})"
            )
        if not 1 <= r <= n:
            raise ValueError(
                f"{where}: saved ranks {tuple(core.shape)} need 1 <= ranks[{k}] <= {n}"
            )
        gram = u.detach().double().mT @ u.detach().double()
        eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
        err = float(torch.linalg.matrix_norm(gram - eye))
        tol = 10 * math.sqrt(torch.finfo(u.dtype).eps) * math.sqrt(r)
        if err > tol:
            raise ValueError(
                f"{where}: {prefix}factors.{k} (shape {tuple(u.shape)}) does not have "
                f"orthonormal columns (||UᵀU - I||_F = {err:.2e} > {tol:.1e}); is this a "
                "Tucker adapter checkpoint?"
            )
    return tm.TuckerTensor(core, factors)


def _load_updates(
    found: Sequence[tuple[str, TuckerAdapter]],
    state_dict: Mapping[str, Any],
    strict: bool,
    owner: str,
) -> None:
    """Check every entry, then install them (``set_tucker``): all or nothing."""
    expected = {name: (a, _update_prefixes(name, a)) for name, a in found}
    all_keys = {
        k
        for _, prefixes in expected.values()
        for p, layer in prefixes
        for k in _update_keys(p, layer)
    }
    unexpected = sorted(k for k in state_dict if k not in all_keys)
    loads, missing = [], []
    for name, (a, prefixes) in expected.items():
        keys = [k for p, layer in prefixes for k in _update_keys(p, layer)]
        present = [k for k in keys if k in state_dict]
        if not present and not strict:
            continue
        missing += [k for k in keys if k not in state_dict]
        loads.append((name, a, prefixes))
    if missing or (strict and unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if strict and unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}")
        raise KeyError(
            f"{owner}: " + "; ".join(parts) + f" (the model's adapters: "
            f"{[n or '(root)' for n in expected]})"
        )
    merged = [n or "(root)" for n, a, _ in loads if a.merged]
    if merged:
        raise ValueError(f"{owner}: adapters {merged} are merged; unmerge_adapters first")
    checked = [
        (layer, _check_update_entry(f"{owner}: adapter {name or '(root)'!r}", layer, p, state_dict))
        for name, _, prefixes in loads
        for p, layer in prefixes
    ]
    for layer, x in checked:
        layer.set_tucker(x)


def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> None:
    """Load updates saved by :func:`adapter_state_dict` into the model's adapters.

    Ranks may differ from the current ones: each update layer is resized to the saved ranks
    (:meth:`~AbstractTuckerLayer.set_tucker`; its parameters become new objects, so build the
    optimizer after loading). Values are cast to the layer's dtype (bit-exact when it is the
    saved one). ``W₀`` is not touched.

    Parameters
    ----------
    model : nn.Module
    state_dict : mapping of str to torch.Tensor
    strict : bool
        True: every adapter of the model must be in ``state_dict`` and every key must belong to
        an adapter. False: missing adapters keep their updates and unknown keys are ignored;
        an adapter that is present must still be complete (core and every factor).

    Raises
    ------
    KeyError
        Missing or unexpected keys (listed).
    ValueError
        Shapes inconsistent with the layer or with each other, ranks out of range, factors
        without orthonormal columns, non-finite values, or a merged adapter (unmerge first).
    TypeError
        Values that are not floating-point tensors.

    Nothing is loaded when an error is raised.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import (
    ...     add_tucker_adapters, adapter_state_dict, load_adapter_state_dict)
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 5)), "0", ranks=2)
    >>> other = add_tucker_adapters(nn.Sequential(nn.Linear(6, 5)), "0", ranks=4)
    >>> load_adapter_state_dict(other, adapter_state_dict(net))
    >>> other[0].delta.ranks
    (2, 2)
    """
    found = _require_adapters(model, "load_adapter_state_dict")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_adapter_state_dict expects a mapping of names to tensors, got "
            f"{type(state_dict).__name__}"
        )
    if not isinstance(strict, bool):
        raise TypeError(f"load_adapter_state_dict: strict must be a bool, got {strict!r}")
    _load_updates(found, state_dict, strict, "load_adapter_state_dict")


# --------------------------------------------------------------------------- safetensors
def _safetensors(owner: str) -> Any:
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - declared in the torch extra
        raise ImportError(
            f"{owner} needs the safetensors package: pip install 'tuckerman[torch]' (or "
            "pip install safetensors)"
        ) from None
    return safetensors.torch


def _layer_record(name: str, a: TuckerAdapter) -> dict[str, Any]:
    return {
        "name": name,
        "base_type": type(a.base).__name__,
        "weight_shape": list(a._base_weight.shape),
        "splits": None if a.splits is None else list(a.splits),
        "scale": a.scale,
        "adaptive_modes": list(a.deltas[0].adaptive_modes),
        "init": a.init,
        "ranks": [list(d.ranks) for d in a.deltas],
        "dtype": str(a._base_weight.dtype).removeprefix("torch."),
    }


def save_adapters(
    model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the model's adapter updates, at their current ranks, to a directory.

    Two files, PEFT's names: ``adapter_model.safetensors`` (every core and factor, keys of
    :func:`adapter_state_dict`) and ``adapter_config.json`` (per adapted layer: name, base
    type and weight shape, slices, scale, adaptive modes, ranks; the configs used; the
    SHA-256 of the weights file). ``W₀`` is not saved: :func:`load_adapters` puts the updates
    on a fresh copy of the base model.

    Parameters
    ----------
    model : nn.Module
        A model with Tucker adapters (merged or not: the updates are saved either way).
    directory : str or path
        Created if needed.
    overwrite : bool
        False (default): refuse when the directory already holds either file, so earlier
        results are never replaced. Each file is written to a temporary name and renamed.

    Returns
    -------
    Path
        The directory.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, save_adapters, load_adapters
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(6, 5)), "0", ranks=2)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_adapters(net, tmp)
    ...     fresh = load_adapters(nn.Sequential(nn.Linear(6, 5)), tmp)
    >>> fresh[0].delta.ranks
    (2, 2)
    """
    st = _safetensors("save_adapters")
    found = _require_adapters(model, "save_adapters")
    if not isinstance(overwrite, bool):
        raise TypeError(f"save_adapters: overwrite must be a bool, got {overwrite!r}")
    configs: list[dict] = []
    for _, a in found:
        cfg = getattr(a, "config", None)
        if cfg is not None:
            try:
                d = cfg.to_dict()
            except ValueError:  # callable ranks: the per-layer records suffice to rebuild
                d = None
            if d is not None and d not in configs:
                configs.append(d)
    tensors = adapter_state_dict(model)
    folder = Path(directory)
    weights, config = folder / ADAPTER_WEIGHTS_NAME, folder / ADAPTER_CONFIG_NAME
    if not overwrite:
        existing = [str(p) for p in (weights, config) if p.exists()]
        if existing:
            raise FileExistsError(
                f"save_adapters: {existing} already exist; pass overwrite=True or another "
                "directory (earlier adapters are never replaced silently)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    tmp_weights = weights.with_name(weights.name + ".tmp")
    st.save_file(tensors, str(tmp_weights), metadata={"format": _FORMAT})
    digest = hashlib.sha256(tmp_weights.read_bytes()).hexdigest()
    record = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "layers": [_layer_record(n, a) for n, a in found],
        "configs": configs,
        "weights_file": ADAPTER_WEIGHTS_NAME,
        "weights_sha256": digest,
    }
    tmp_config = config.with_name(config.name + ".tmp")
    tmp_config.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_weights, weights)
    os.replace(tmp_config, config)
    return folder


def load_adapters(
    model: nn.Module, directory: str | os.PathLike, *, freeze_model: bool = True
) -> nn.Module:
    """Put adapters saved by :func:`save_adapters` on a (fresh copy of the) base model.

    Every recorded layer must exist in ``model`` with the recorded type and weight shape and
    without an adapter; each gets a :class:`TuckerAdapter` with the recorded scale, slices and
    adaptive modes, holding the saved updates at their saved ranks (bit for bit when the model's
    dtype is the saved one).

    Parameters
    ----------
    model : nn.Module
        The base model (the same architecture and ``W₀`` as when the adapters were trained).
    directory : str or path
    freeze_model : bool
        As in :func:`add_tucker_adapters`.

    Returns
    -------
    nn.Module
        ``model``, changed in place.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        Not a tuckerman adapter directory, a weights file that does not match its description
        (hash; e.g. an interrupted save), a recorded layer missing from ``model`` or of another
        type / shape, or any check of :func:`load_adapter_state_dict`. Nothing is changed.
    """
    st = _safetensors("load_adapters")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapters expects an nn.Module, got {type(model).__name__}")
    if not isinstance(freeze_model, bool):
        raise TypeError(f"freeze_model must be a bool, got {freeze_model!r}")
    folder = Path(directory)
    config = folder / ADAPTER_CONFIG_NAME
    weights = folder / ADAPTER_WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(f"load_adapters: {path} does not exist (see save_adapters)")
    try:
        record = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_adapters: {config} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"load_adapters: {config} is not a tuckerman adapter description")
    if record.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"load_adapters: {config} has format_version {record.get('format_version')!r}; "
            f"this tuckerman reads version {_FORMAT_VERSION}"
        )
    blob = weights.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record.get("weights_sha256"):
        raise ValueError(
            f"load_adapters: {weights} does not match {config} (SHA-256 {digest[:12]}... "
            f"against {str(record.get('weights_sha256'))[:12]}...): an interrupted or mixed "
            "save? Save the adapters again"
        )
    state = st.load(blob)
    modules = dict(model.named_modules())
    for layer in record["layers"]:
        name = layer["name"]
        m = modules.get(name)
        where = f"load_adapters: layer {name or '(root)'!r}"
        if m is None:
            raise ValueError(f"{where} is not in the model (saved from another architecture?)")
        if isinstance(m, TuckerAdapter):
            raise ValueError(f"{where} already has a Tucker adapter (load onto a fresh model)")
        if type(m).__name__ != layer["base_type"] or list(m.weight.shape) != layer["weight_shape"]:
            raise ValueError(
                f"{where} is a {type(m).__name__} with weight shape {tuple(m.weight.shape)}; "
                f"the adapters were saved for a {layer['base_type']} of shape "
                f"{tuple(layer['weight_shape'])}"
            )
    specs = [
        (
            layer["name"],
            modules[layer["name"]],
            lambda layer=layer: TuckerAdapter(
                modules[layer["name"]],
                1,
                scale=layer["scale"],
                adaptive_modes=layer["adaptive_modes"],
                splits=layer["splits"],
                init="zero",
                name=layer["name"],
            ),
        )
        for layer in record["layers"]
    ]
    new = _build_all(specs)
    try:
        found = [(layer["name"], new[id(modules[layer["name"]])]) for layer in record["layers"]]
        for (_, a), layer in zip(found, record["layers"]):
            a.init = layer.get("init", "zero")
        _load_updates(found, state, True, f"load_adapters ({weights})")
    except BaseException:
        for adapter in new.values():
            adapter._restore_base_flags()
        raise
    return _attach(model, new, freeze_model)


# --------------------------------------------------------------------------- reporting
def adapter_report(model: nn.Module) -> dict:
    """Per-adapter ranks and parameter counts, and the model's trainable parameters.

    Returns
    -------
    dict
        ``layers``: a list of ``{"name", "base_type", "weight_shape", "ranks" (a list per
        update slice when ``splits`` is set), "splits", "parameters" (the update's cores and
        factors), "base_parameters" (the frozen layer's weight and bias), "merged"}``;
        ``adapter_parameters``: their sum; ``trainable_parameters``: every parameter of the
        model that requires grad; ``model_parameters``: every parameter (frozen included).
        Plain Python values, ready for ``json.dump``.

    Examples
    --------
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import add_tucker_adapters, adapter_report
    >>> net = add_tucker_adapters(nn.Sequential(nn.Linear(100, 100)), "0", ranks=4)
    >>> r = adapter_report(net)
    >>> r["layers"][0]["ranks"], r["adapter_parameters"], r["model_parameters"]
    ([4, 4], 816, 10916)
    """
    found = _require_adapters(model, "adapter_report")
    layers = [
        {
            "name": name,
            "base_type": type(a.base).__name__,
            "weight_shape": list(a._base_weight.shape),
            "ranks": (
                list(a.deltas[0].ranks) if a.splits is None else [list(d.ranks) for d in a.deltas]
            ),
            "splits": None if a.splits is None else list(a.splits),
            "parameters": a.num_parameters(),
            "base_parameters": sum(p.numel() for p in a.base.parameters()),
            "merged": a.merged,
        }
        for name, a in found
    ]
    return {
        "layers": layers,
        "adapter_parameters": sum(layer["parameters"] for layer in layers),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }
