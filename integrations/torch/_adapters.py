"""Tucker adapters: fine-tune frozen ``nn.Linear`` / ``nn.Conv2d`` layers with a low-rank update.

A wrapped layer computes ``base(x) + scale · delta(x)``: ``base`` is the original layer, frozen
(its weight ``W₀`` and bias do not require grad), and ``delta`` a bias-free
:class:`~tuckerman.integrations.torch.TuckerLinear` / ``TuckerConv2d`` holding the update ``ΔW``
in Tucker format (2 modes for a linear layer, 4 for a convolution: out, in, k_h, k_w), evaluated
by its own factorized forward with the base layer's stride, padding, dilation and padding mode.
Because the layer is linear in its weight, the output is that of the layer with weight
``W₀ + scale · ΔW``, but ``ΔW`` is never formed (except by :func:`merge_adapters`, on request).
The :class:`~tuckerman.integrations.torch.TDLRT` optimizer finds the ``delta`` layers like any
other Tucker layer and trains them with rank adaptation: this is the LoRA-like use of the
TDLRT paper (Zangrando et al., NeurIPS 2024, fine-tuning experiments).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tuckerman.integrations.torch._convert import _convertible, _replace_modules
from tuckerman.integrations.torch._layers import (
    AbstractTuckerLayer,
    TuckerConv2d,
    TuckerLinear,
    _check_modes,
    _groups_message,
    resolve_ranks,
)

__all__ = [
    "TuckerAdapter",
    "adapter_report",
    "adapter_state_dict",
    "add_tucker_adapters",
    "load_adapter_state_dict",
    "merge_adapters",
    "remove_adapters",
    "unmerge_adapters",
]

_GLOB_CHARS = frozenset("*?[")


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


# --------------------------------------------------------------------------- the wrapper
class TuckerAdapter(nn.Module):
    """A frozen ``nn.Linear`` / ``nn.Conv2d`` plus a trainable Tucker update.

    ``forward(x) = base(x) + scale * delta(x)``, the layer with weight ``W₀ + scale · ΔW`` and
    the base bias, where ``ΔW = core ×_1 U_1 ⋯ ×_d U_d`` is held by ``delta`` (a bias-free
    :class:`TuckerLinear` / :class:`TuckerConv2d` with the base layer's hyperparameters, dtype
    and device). The dense ``ΔW`` is formed only by :meth:`merge` and :meth:`delta_weight`.

    Initialization: ``ΔW = 0`` (zero core, random orthonormal factors), as LoRA's ``B = 0``,
    so wrapping does not change the model's output. The first TDLRT step then only moves the
    core: the factor gradients ``∂L/∂U_k = [G ×_{j≠k} U_jᵀ]_(k) C_(k)ᵀ`` vanish at ``C = 0``,
    so the augmented bases are the initial ones completed by arbitrary orthonormal directions,
    and the Galerkin step puts the projected gradient into the core (truncated by ``tau``).
    From the second step on the core is non-zero and the bases follow the gradient; ranks grow
    (up to doubling per step) or shrink by the tolerance.

    Parameters
    ----------
    base : nn.Linear or nn.Conv2d
        The layer to adapt (exact type; ``groups`` must be 1). Its parameters are frozen.
    ranks : int, float, tuple or None
        Initial ranks of ``ΔW``, as for :class:`TuckerLinear` / :class:`TuckerConv2d` (an int:
        both channel ranks; the window modes of a convolution full rank), lowered to the
        largest feasible ranks when too large.
    scale : float
        Multiplies the update (LoRA's ``alpha / r``, here a constant since ``r`` changes).
    adaptive_modes : sequence of int, optional
        Modes whose rank TDLRT may change; default the channel modes ``(0, 1)``.
    name : str
        The layer's name in the model, for error messages.

    Attributes
    ----------
    base : nn.Module
    delta : AbstractTuckerLayer
    scale : float
    merged : bool
        True after :meth:`merge`: ``base.weight`` holds ``W₀ + scale · ΔW`` and ``delta`` is
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
    """

    def __init__(
        self,
        base: nn.Module,
        ranks: Any = 8,
        *,
        scale: float = 1.0,
        adaptive_modes: Sequence[int] | None = None,
        name: str = "",
    ) -> None:
        where = f" {name!r}" if name else ""
        owner = f"TuckerAdapter{where}"
        if isinstance(base, TuckerAdapter):
            raise ValueError(f"{owner}: the layer already has a Tucker adapter ({base})")
        if not _convertible(base):
            raise TypeError(
                f"{owner}: can adapt nn.Linear and nn.Conv2d layers (exact types), got "
                f"{type(base).__name__} ({base})"
            )
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(
                _groups_message(owner, base.groups, base.in_channels, base.out_channels)
            )
        scale = _check_scale(scale, owner)
        w = base.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"{owner}: the base weight must be floating point, got {w.dtype}")
        d = w.ndim
        modes = _check_modes((0, 1) if adaptive_modes is None else adaptive_modes, d, owner)
        r = resolve_ranks(tuple(w.shape), ranks, owner=f"{owner} ({base})", clip=True)
        kw: dict[str, Any] = {
            "bias": False,
            "ranks": r,
            "adaptive_modes": modes,
            "device": w.device,
            "dtype": w.dtype,
        }
        delta: AbstractTuckerLayer
        if isinstance(base, nn.Conv2d):
            delta = TuckerConv2d(
                base.in_channels,
                base.out_channels,
                base.kernel_size,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                padding_mode=base.padding_mode,
                **kw,
            )
        else:
            delta = TuckerLinear(base.in_features, base.out_features, **kw)
        with torch.no_grad():
            delta.core.zero_()
        super().__init__()
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.delta = delta
        self.scale = scale
        self.merged = False
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.train(base.training)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = self.delta(x)
        return y + update if self.scale == 1.0 else y + self.scale * update

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale · ΔW`` in the base weight's layout (differentiable).

        Allocates a full weight: for merging, tests and export only.
        """
        w = self.delta.dense_weight()
        return w if self.scale == 1.0 else self.scale * w

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """``base.weight ← W₀ + scale · ΔW``; the adapter is then skipped in :meth:`forward`.

        A copy of ``W₀`` is kept (a non-persistent buffer, not in ``state_dict``), so
        :meth:`unmerge` restores it bit for bit. Raises ``ValueError`` when already merged.
        """
        if self.merged:
            raise ValueError(f"{self._owner()} is already merged (merge_adapters called twice?)")
        with torch.no_grad():
            w0 = self.base.weight.detach().clone()
            self.base.weight.add_(self.delta_weight().to(w0.dtype))
        self._unmerged_weight = w0
        self.merged = True

    def unmerge(self) -> None:
        """Restore the original ``W₀`` exactly (from the copy :meth:`merge` kept)."""
        if not self.merged:
            raise ValueError(f"{self._owner()} is not merged; there is nothing to unmerge")
        with torch.no_grad():
            self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def _owner(self) -> str:
        return f"TuckerAdapter({self.base})"

    def _restore_base_flags(self) -> None:
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, merged={self.merged}"


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


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not value or not all(isinstance(p, str) for p in value):
        raise TypeError(
            "target_modules must be a module name or glob pattern (as in model.named_modules(), "
            f"e.g. 'features.3' or 'classifier.*') or a non-empty sequence of them, got {value!r}"
        )
    return tuple(value)


def add_tucker_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    ranks: Any = 8,
    *,
    scale: float = 1.0,
    adaptive_modes: Sequence[int] | None = None,
    freeze_model: bool = True,
) -> nn.Module:
    """Wrap the model's target layers in :class:`TuckerAdapter` modules, in place.

    Each target ``nn.Linear`` / ``nn.Conv2d`` becomes ``base(x) + scale · delta(x)`` with the
    base frozen and a zero-initialized Tucker update ``ΔW`` (see :class:`TuckerAdapter`). Train
    the updates with :class:`~tuckerman.integrations.torch.TDLRT` (built after this call): its
    ``tau`` sets the rank adaptation, its ``min_rank`` / ``max_rank`` the bounds.

    Parameters
    ----------
    model : nn.Module
    target_modules : str or sequence of str
        Module names as in ``model.named_modules()`` (``"features.3"``) or glob patterns
        (``"classifier.*"``, ``"*"``). An exact name must be an ``nn.Linear`` or an
        ``nn.Conv2d`` with ``groups=1``; a pattern adapts the supported layers it matches and
        passes over the others, but must match at least one.
    ranks : int, float, tuple, None or callable
        Initial ranks of each update, as for :class:`TuckerLinear` / :class:`TuckerConv2d`,
        lowered to the largest feasible ranks per layer (so one int fits layers of different
        widths). A callable ``ranks(name, module)`` gives each layer's.
    scale : float
        Multiplier of every update (LoRA's alpha; a constant, since the ranks change).
    adaptive_modes : sequence of int, optional
        Modes TDLRT may truncate or grow; default the channel modes ``(0, 1)`` (a
        convolution's window modes stay full, 3×3 or 5×5 being small).
    freeze_model : bool
        True (default): every parameter of the model outside the adapters' updates stops
        requiring grad, as in LoRA fine-tuning. False: only the wrapped layers' weights and
        biases are frozen.

    Returns
    -------
    nn.Module
        ``model``, changed in place (the new adapter when ``model`` itself is the target ``""``).

    Raises
    ------
    TypeError
        Bad argument types; an exact name of a layer that is not an ``nn.Linear`` /
        ``nn.Conv2d``.
    ValueError
        A name or pattern matching no module (the message lists the adaptable ones); a pattern
        matching no adaptable layer; a grouped convolution named exactly; a target that already
        has an adapter; bad ranks or scale. Nothing is changed when an error is raised.

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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_tucker_adapters expects an nn.Module, got {type(model).__name__}")
    patterns = _targets(target_modules)
    scale = _check_scale(scale, "add_tucker_adapters")
    if not isinstance(freeze_model, bool):
        raise TypeError(f"freeze_model must be a bool, got {freeze_model!r}")

    named = list(model.named_modules())
    inside: dict[str, str] = {}  # module name -> the adapter it belongs to
    for name, m in named:
        if isinstance(m, TuckerAdapter):
            inside[name] = name
            for sub, _ in m.named_modules():
                if sub:
                    inside[f"{name}.{sub}" if name else sub] = name
    adaptable = [n for n, m in named if _convertible(m) and n not in inside]

    chosen: dict[int, tuple[str, nn.Module]] = {}
    for pattern in patterns:
        exact = not (_GLOB_CHARS & set(pattern))
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            listed = ", ".join(repr(n) for n in adaptable[:20])
            more = f", ... ({len(adaptable)} in all)" if len(adaptable) > 20 else ""
            raise ValueError(
                f"add_tucker_adapters: target {pattern!r} matches no module of the model; "
                f"adaptable nn.Linear / nn.Conv2d layers: {listed or 'none'}{more}"
            )
        wrapped = sorted({inside[n] for n, _ in hits if n in inside})
        if wrapped:
            raise ValueError(
                f"add_tucker_adapters: target {pattern!r} matches {wrapped[0] or '(root)'!r}, "
                "which already has a Tucker adapter; a layer is wrapped once (remove_adapters "
                "first, or narrow the pattern)"
            )
        kept = []
        for n, m in hits:
            if isinstance(m, nn.Conv2d) and _convertible(m) and m.groups != 1:
                if exact:
                    raise ValueError(
                        _groups_message(
                            f"add_tucker_adapters: target {n!r}",
                            m.groups,
                            m.in_channels,
                            m.out_channels,
                        )
                    )
                continue
            if not _convertible(m):
                if exact:
                    raise TypeError(
                        f"add_tucker_adapters: target {n!r} is a {type(m).__name__}; adapters "
                        "wrap nn.Linear and nn.Conv2d layers (exact types)"
                    )
                continue
            kept.append((n, m))
        if not kept:
            found = ", ".join(f"{n or '(root)'} ({type(m).__name__})" for n, m in hits[:10])
            raise ValueError(
                f"add_tucker_adapters: pattern {pattern!r} matches no adaptable layer "
                f"(nn.Linear, or nn.Conv2d with groups=1); it matches {found}"
            )
        for n, m in kept:
            chosen.setdefault(id(m), (n, m))

    # build every adapter first: a bad rank raises before the model is touched
    new: dict[int, TuckerAdapter] = {}
    try:
        for key, (n, m) in chosen.items():
            spec = ranks(n, m) if callable(ranks) else ranks
            new[key] = TuckerAdapter(m, spec, scale=scale, adaptive_modes=adaptive_modes, name=n)
    except BaseException:  # adapters built so far froze their base layers: unfreeze them
        for adapter in new.values():
            for name, p in adapter.base.named_parameters():
                p.requires_grad_(adapter._base_requires_grad[name])
        raise
    model = _replace_modules(model, new)
    if freeze_model:
        keep = {id(p) for _, a in _adapters(model) for p in a.delta.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer: ``W₀ ← W₀ + scale · ΔW``.

    The only place the dense ``ΔW`` is formed. The adapters stay in the model, skipped by the
    forward pass, with a copy of each ``W₀`` so that :func:`unmerge_adapters` restores it
    exactly; :func:`remove_adapters` with ``merge=True`` leaves plain layers instead.

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
        ``model`` with plain ``nn.Linear`` / ``nn.Conv2d`` layers (the base layer itself when
        ``model`` is an adapter). The base layers' ``requires_grad`` flags are those they had
        before wrapping; other parameters frozen by ``freeze_model`` stay frozen.

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
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' updates alone (cores and factors, at their current ranks), without ``W₀``.

    Keys are those of ``model.state_dict()`` (``"<layer>.delta.core"``,
    ``"<layer>.delta.factors.<k>"``); values are detached copies. Load with
    :func:`load_adapter_state_dict` into a model with adapters on the same layers (any ranks).
    The ``scale`` is configuration, not state: give the same one when rebuilding.

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
        prefix = f"{name}.delta." if name else "delta."
        for key, value in a.delta.state_dict().items():
            out[prefix + key] = value.detach().clone()
    return out


def _check_adapter_entry(
    name: str, a: TuckerAdapter, prefix: str, state: Mapping[str, Any]
) -> None:
    """Validate one adapter's saved core and factors against its layer (shapes, ranks)."""
    shape = a.delta.weight_shape
    d = len(shape)
    core = state[prefix + "core"]
    factors = [state[f"{prefix}factors.{k}"] for k in range(d)]
    where = f"load_adapter_state_dict: adapter {name or '(root)'!r} (weight shape {shape})"
    for key, value in [(prefix + "core", core)] + [
        (f"{prefix}factors.{k}", u) for k, u in enumerate(factors)
    ]:
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            got = f"a tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value)
            raise TypeError(f"{where}: {key!r} must be a floating-point torch.Tensor, got {got}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key!r} has NaN or Inf entries")
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


def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> None:
    """Load updates saved by :func:`adapter_state_dict` into the model's adapters.

    Ranks may differ from the current ones: each ``delta`` layer is resized to the saved ranks
    (its parameters become new objects, so build the optimizer after loading, or load the
    optimizer's own state too). ``W₀`` is not touched.

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
    expected: dict[str, tuple[str, TuckerAdapter, str, list[str]]] = {}
    for name, a in found:
        prefix = f"{name}.delta." if name else "delta."
        keys = [prefix + "core"] + [f"{prefix}factors.{k}" for k in range(len(a.delta.factors))]
        expected[name] = (name, a, prefix, keys)
    all_keys = {k for *_, keys in expected.values() for k in keys}
    unexpected = sorted(k for k in state_dict if k not in all_keys)
    loads = []
    missing = []
    for name, a, prefix, keys in expected.values():
        present = [k for k in keys if k in state_dict]
        if not present and not strict:
            continue
        missing += [k for k in keys if k not in state_dict]
        loads.append((name, a, prefix, keys))
    if missing or (strict and unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if strict and unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}")
        raise KeyError(
            "load_adapter_state_dict: " + "; ".join(parts) + f" (the model's adapters: "
            f"{[n or '(root)' for n in expected]})"
        )
    merged = [n or "(root)" for n, a, _, _ in loads if a.merged]
    if merged:
        raise ValueError(
            f"load_adapter_state_dict: adapters {merged} are merged; unmerge_adapters first"
        )
    for name, a, prefix, _ in loads:
        _check_adapter_entry(name, a, prefix, state_dict)
    for _, a, prefix, keys in loads:
        sub = {k[len(prefix) :]: state_dict[k] for k in keys}
        a.delta.load_state_dict(sub, strict=True)


# --------------------------------------------------------------------------- reporting
def adapter_report(model: nn.Module) -> dict:
    """Per-adapter ranks and parameter counts, and the model's trainable parameters.

    Returns
    -------
    dict
        ``layers``: a list of ``{"name", "base_type", "weight_shape", "ranks", "parameters"
        (the update's core and factors), "base_parameters" (the frozen layer's weight and bias),
        "merged"}``; ``adapter_parameters``: their sum; ``trainable_parameters``: every
        parameter of the model that requires grad; ``model_parameters``: every parameter
        (frozen included). Plain Python values, ready for ``json.dump``.

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
            "weight_shape": list(a.delta.weight_shape),
            "ranks": list(a.delta.ranks),
            "parameters": a.delta.num_parameters(),
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
