"""Tucker-factorized ``nn.Linear`` and ``nn.Conv2d`` layers.

The weight of a layer is a Tucker tensor ``W = C ×_1 U_1 ⋯ ×_d U_d`` held as the parameters
``core`` (``C``) and ``factors`` (``U_k``) at a capacity, zero-padded beyond the true ranks, with
the ranks also on the device (:class:`tuckerman.engine.PaddedTucker`), so a rank change inside
the capacity keeps the parameter objects. The forward pass never forms ``W``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
import tuckerman.backends as backends
from torch import nn
from torch.nn.grad import conv2d_weight

import tuckerman as tm
from tuckerman.engine import PaddedTucker
from tuckerman.layers import (
    bias_bound,
    check_adaptive_modes,
    count_parameters,
    init_core_std,
    orthonormal_columns,
    resolve_ranks,
    tucker_of_dense,
)
from tuckerman.validation import int_pair, positive_int

backends.get("torch")  # imported now, so that torch.compile traces the core without an import

__all__ = ["AbstractTuckerLayer", "TuckerLinear", "TuckerConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --------------------------------------------------------------------------- argument checks
def _floating_dtype(dtype: Any, owner: str) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a real floating torch dtype, got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------- the base class
def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False  # pragma: no cover (torch < 2.3)


class AbstractTuckerLayer(nn.Module, abc.ABC):
    """A layer whose weight is a Tucker tensor ``W = core ×_1 factors[0] ⋯ ×_d factors[d-1]``.

    The parameters are held at a *capacity*: ``core`` has shape :attr:`capacity` and
    ``factors[k]`` shape ``(weight_shape[k], capacity[k])``, with the true :attr:`ranks` as the
    leading block and exact zeros beyond it (so the padded weight *is* the true-rank weight).
    The true ranks also live on the device (:attr:`rank_vector`), so an optimizer can change
    them without a host round trip and without replacing the parameters: a rank change inside
    the capacity writes values into the same ``nn.Parameter`` objects. A new capacity
    (:meth:`set_capacity`, or an optimizer whose ranks outgrow it) replaces them. A fresh layer
    has capacity equal to its ranks.

    The forward pass uses the live block when the ranks are known on the host (eager mode) and
    the whole capacity otherwise (under ``torch.compile``, or after a device-side rank change):
    the two agree exactly, the first is cheaper, the second has static shapes.

    Attributes
    ----------
    core : nn.Parameter
        The core tensor (padded to the capacity).
    factors : nn.ParameterList
        The factor matrices: orthonormal leading columns after initialization, zero padding.
    bias : nn.Parameter or None
    rank_vector : torch.Tensor
        The true ranks, int64 of shape ``(d,)`` on the layer's device (a non-persistent buffer:
        checkpoints carry the ranks as the shapes of the saved, trimmed core and factors).
    adaptive_modes : tuple of int
        Modes whose rank a rank-adaptive optimizer may change; the others keep their rank.
    """

    core: nn.Parameter
    factors: nn.ParameterList
    bias: nn.Parameter | None
    rank_vector: torch.Tensor

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        ranks: tuple[int, ...],
        adaptive_modes: tuple[int, ...],
        bias: bool,
        device: Any,
        dtype: Any,
    ) -> None:
        super().__init__()
        self._weight_shape = tuple(int(n) for n in weight_shape)
        self.adaptive_modes = adaptive_modes
        kw = {"device": device, "dtype": dtype}
        self.core = nn.Parameter(torch.empty(ranks, **kw))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty((n, r), **kw)) for n, r in zip(self._weight_shape, ranks)]
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self._weight_shape[0], **kw))
        else:
            self.register_parameter("bias", None)
        self.register_buffer(
            "rank_vector", torch.tensor(ranks, dtype=torch.int64, device=device), persistent=False
        )
        self._host_ranks: tuple[int, ...] | None = tuple(int(r) for r in ranks)
        self._override: tuple[torch.Tensor, list[torch.Tensor], Any] | None = None
        self._records: list[list[Any]] | None = None  # inputs and output gradients (replay)
        self._register_state_dict_hook(_trim_saved_weight)
        self.reset_parameters()

    # ------------------------------------------------------------------ shape information
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the (never formed) dense weight, as in the dense layer."""
        return self._weight_shape

    @property
    def ranks(self) -> tuple[int, ...]:
        """Current multilinear rank (host ints; reads :attr:`rank_vector` when it changed on the
        device since the host last saw it)."""
        if self._host_ranks is None:
            self._host_ranks = tuple(int(r) for r in self.rank_vector.tolist())
        return self._host_ranks

    @property
    def capacity(self) -> tuple[int, ...]:
        """The padded ranks the parameters are held at (``core.shape``)."""
        return tuple(int(s) for s in self.core.shape)

    @property
    @abc.abstractmethod
    def fan_in(self) -> int:
        """Inputs per output (PyTorch's ``fan_in`` of the same dense layer)."""

    # ------------------------------------------------------------------ initialization
    def reset_parameters(self) -> None:
        """Random initialization at the current ranks, the dense layer's weight statistics.

        Factors: orthonormal columns (QR of a Gaussian matrix, signs fixed by ``diag(R) > 0``).
        Core: i.i.d. Gaussian, scaled so that the dense weight has the mean entry variance of
        PyTorch's default (Kaiming-uniform, ``a=√5``) initialization of the same dense layer,
        ``1 / (3 fan_in)``: with orthonormal factors ``‖W‖_F = ‖C‖_F``. Bias: uniform in
        ``±1/√fan_in``, as in ``nn.Linear`` / ``nn.Conv2d``. Padding beyond the ranks is zero.
        Uses torch's default generator (``torch.manual_seed`` makes it reproducible).
        """
        ranks = self.ranks
        work = torch.promote_types(self.core.dtype, torch.float32)
        dev = self.core.device
        factors = [
            orthonormal_columns(torch.randn((n, r), device=dev, dtype=work))
            for n, r in zip(self._weight_shape, ranks)
        ]
        std = init_core_std(self._weight_shape, ranks, self.fan_in)
        core = torch.randn(ranks, device=dev, dtype=work) * std
        with torch.no_grad():
            self._write(core, factors, ranks)
            if self.bias is not None:
                bound = bias_bound(self.fan_in)
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------ the weights in use
    def active_weights(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The core and factors the forward pass evaluates (with autograd).

        The live block of the parameters in eager mode when the ranks are known on the host,
        the whole capacity otherwise (exact either way: the padding is zero); during an
        optimizer's second gradient evaluation with ``second_pass="closure"``, the augmented
        weight it set. Code that evaluates the layer's weight in its own way (e.g. an
        embedding lookup of factor rows) should use this rather than ``core`` and ``factors``.
        """
        if self._override is not None:
            core, factors, live = self._override
        else:
            core, factors, live = self.core, list(self.factors), self._host_ranks
        if _compiling():  # static shapes: no guard on the (changing) host ranks
            return core, factors
        if live is None or tuple(live) == tuple(core.shape):
            return core, factors
        return core[tuple(slice(0, k) for k in live)], [u[:, :k] for u, k in zip(factors, live)]

    # ------------------------------------------------------------------ replayed gradients
    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the input and (through a hook) the output gradient of a forward pass with
        autograd on, while an optimizer asked for them (``_records`` is a list)."""
        if self._records is None or not torch.is_grad_enabled() or _compiling():
            return
        if self.core.grad is None:  # gradients were reset: earlier backward passes are stale
            self._records[:] = [r for r in self._records if r[1] is None]
        entry: list[Any] = [x.detach(), None]
        self._records.append(entry)
        if y.requires_grad:

            def keep(g: torch.Tensor, entry: list = entry) -> None:
                entry[1] = g.detach() if entry[1] is None else entry[1] + g.detach()

            y.register_hook(keep)

    def replay_core_gradient(self, factors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``∂L/∂C̃`` of the recorded passes for the same weight in other bases ``factors``.

        For a weight ``W = C̃ ×_k Û_k`` equal to the current one (an augmented point) the
        forward pass, and so every layer's input and output gradient, is the same; the
        gradient of its core is ``G ×_k Û_kᵀ`` with ``G = ∂L/∂W``, which the recorded inputs and
        output gradients give without forming ``G`` (one batched product per record). This is
        TDLRT's second gradient evaluation without a second pass through the network.
        """
        out = None
        for x, g in self._records or ():
            if g is None:
                continue
            t = self._replay(x, g, list(factors))
            out = t if out is None else out + t
        if out is None:
            shape = tuple(int(f.shape[1]) for f in factors)
            out = torch.zeros(shape, dtype=factors[0].dtype, device=factors[0].device)
        return out

    def _replay(self, x: torch.Tensor, g: torch.Tensor, factors: list[torch.Tensor]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot replay its core gradient")

    # ------------------------------------------------------------------ Tucker view
    def tucker(self) -> tm.TuckerTensor:
        """The weight as a :class:`tuckerman.TuckerTensor` at its true ranks.

        The arrays are detached views: they share storage with ``core`` and ``factors`` (no copy,
        no autograd graph). Write new values back with :meth:`set_tucker`.
        """
        r = self.ranks
        core = self.core.detach()[tuple(slice(0, k) for k in r)]
        return tm.TuckerTensor(core, [u.detach()[:, :k] for u, k in zip(self.factors, r)])

    def padded(self) -> PaddedTucker:
        """The weight at its capacity with the ranks on the device (detached views; no copy)."""
        return PaddedTucker(
            self.core.detach(), tuple(u.detach() for u in self.factors), self.rank_vector
        )

    def set_tucker(self, x: tm.TuckerTensor) -> None:
        """Make the weight ``x``, whose ranks may differ from the current ones.

        When ``x.ranks`` fit the capacity, the values are written into the existing parameters
        (the same ``nn.Parameter`` objects, so optimizers and hooks stay valid); otherwise the
        parameters are replaced by new ones at capacity ``x.ranks`` (an optimizer holding the
        old ones must be told; ``tuckerman``'s TDLRT does this itself). Values are cast to this
        layer's dtype and device; ``requires_grad`` flags and the bias are kept.

        Any ranks ``1 <= r_k <= weight_shape[k]`` are accepted, including the rank-deficient
        cores of an augmented point (``tm.augment_basis``).

        Raises
        ------
        TypeError
            If ``x`` is not a TuckerTensor of torch tensors.
        ValueError
            If ``x.shape`` differs from :attr:`weight_shape` or a rank exceeds its mode size.
        """
        owner = type(self).__name__
        if not isinstance(x, tm.TuckerTensor):
            raise TypeError(f"{owner}.set_tucker expects a tuckerman.TuckerTensor, got {type(x)}")
        arrays = [x.core, *x.factors]
        if not all(isinstance(a, torch.Tensor) for a in arrays):
            raise TypeError(
                f"{owner}.set_tucker expects a TuckerTensor of torch tensors, got "
                f"{', '.join(sorted({type(a).__name__ for a in arrays}))}"
            )
        if x.shape != self._weight_shape:
            raise ValueError(
                f"{owner}.set_tucker: the Tucker tensor has shape {x.shape} but the layer's "
                f"weight has shape {self._weight_shape}"
            )
        for k, (r, n) in enumerate(zip(x.ranks, x.shape)):
            if not 1 <= r <= n:
                raise ValueError(
                    f"{owner}.set_tucker: ranks {x.ranks} need 1 <= ranks[{k}] <= {n} "
                    f"(weight shape {self._weight_shape})"
                )
        with torch.no_grad():
            if any(r > c for r, c in zip(x.ranks, self.capacity)):
                self._reallocate(x.ranks)
            self._write(x.core, list(x.factors), x.ranks)

    def set_capacity(self, capacity: Sequence[int]) -> None:
        """Hold the parameters at ``capacity`` (new ``nn.Parameter`` objects; values kept).

        Raises
        ------
        ValueError
            If ``capacity`` cannot hold the current ranks or exceeds the mode sizes.
        """
        capacity = tuple(int(c) for c in capacity)
        ranks = self.ranks
        if len(capacity) != len(ranks) or any(
            not r <= c <= n for r, c, n in zip(ranks, capacity, self._weight_shape)
        ):
            raise ValueError(
                f"{type(self).__name__}.set_capacity: capacity {capacity} must hold the ranks "
                f"{ranks} and fit the weight shape {self._weight_shape}"
            )
        if capacity != self.capacity:
            with torch.no_grad():
                x = self.tucker()
                x = tm.TuckerTensor(x.core.clone(), [u.clone() for u in x.factors])
                self._reallocate(capacity)
                self._write(x.core, list(x.factors), ranks)

    def _reallocate(self, capacity: Sequence[int]) -> None:
        """New zero parameters at ``capacity`` (same dtype, device and requires_grad flags)."""
        kw: dict[str, Any] = {"device": self.core.device, "dtype": self.core.dtype}

        def fresh(shape: tuple[int, ...], old: nn.Parameter) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, **kw), requires_grad=old.requires_grad)

        capacity = tuple(int(c) for c in capacity)
        self.core = fresh(capacity, self.core)
        for k, (n, c) in enumerate(zip(self._weight_shape, capacity)):
            self.factors[k] = fresh((n, c), self.factors[k])

    def _write(self, core: torch.Tensor, factors: Sequence[torch.Tensor], ranks: Any) -> None:
        """Write a true-rank (or padded, ``ranks`` given) weight into the parameters in place."""
        ranks = tuple(int(r) for r in ranks)
        live = tuple(slice(0, r) for r in ranks)
        self.core.zero_()
        self.core[live].copy_(core[live])
        for u, f, r in zip(self.factors, factors, ranks):
            u.zero_()
            u[:, :r].copy_(f[:, :r])
        self.rank_vector.copy_(torch.tensor(ranks, dtype=torch.int64))
        self._host_ranks = ranks

    def _commit(self, point: PaddedTucker, host_ranks: tuple[int, ...] | None) -> None:
        """Install a padded point of this layer's capacity (an optimizer step; no host read).

        ``host_ranks`` are the new ranks when the caller knows them on the host (None: they
        stay on the device and the forward pass uses the whole capacity).
        """
        self.core.copy_(point.core)
        for u, f in zip(self.factors, point.factors):
            u.copy_(f)
        self.rank_vector.copy_(point.ranks)
        self._host_ranks = None if host_ranks is None else tuple(int(r) for r in host_ranks)

    # ------------------------------------------------------------------ dense forms and counts
    def dense_weight(self) -> torch.Tensor:
        """The full weight ``C ×_k U_k`` in the dense layer's layout (differentiable).

        Allocates ``prod(weight_shape)`` entries: for tests, merging and export, never used by
        the forward pass.
        """
        core, factors = self.active_weights()
        return tm.TuckerTensor(core, factors).to_dense()

    def num_parameters(self) -> int:
        """Parameters of the weight at its true ranks (core, factors) plus the bias."""
        return count_parameters(self._weight_shape, self.ranks, self.bias is not None)

    def num_parameters_stored(self) -> int:
        """Entries held in memory: core and factors at the capacity, plus the bias."""
        n = self.core.numel() + sum(u.numel() for u in self.factors)
        return n + (self.bias.numel() if self.bias is not None else 0)

    def num_parameters_dense(self) -> int:
        """Parameters of the same dense layer: ``prod(weight_shape)`` plus the bias."""
        n = math.prod(self._weight_shape)
        return n + (self.bias.numel() if self.bias is not None else 0)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Load a core and factors of any ranks the layer can hold.

        Checkpoints store the true ranks (the saved core and factors are trimmed). When the
        saved core and factors are consistent with each other and with :attr:`weight_shape`,
        they are zero-padded to the capacity if they fit it (the parameters keep their
        identity), otherwise the parameters are first replaced by new ones at the saved ranks.
        The ranks become the saved core's shape. Inconsistent shapes are left to PyTorch's
        size-mismatch error.
        """
        key = prefix + "core"
        core = state_dict.get(key)
        found = [state_dict.get(f"{prefix}factors.{k}") for k in range(len(self.factors))]
        factors = [u for u in found if isinstance(u, torch.Tensor)]
        if (
            isinstance(core, torch.Tensor)
            and len(factors) == len(found)
            and core.ndim == len(factors)
            and all(
                tuple(u.shape) == (n, r) for u, n, r in zip(factors, self._weight_shape, core.shape)
            )
        ):
            ranks = tuple(int(r) for r in core.shape)
            if any(r > c for r, c in zip(ranks, self.capacity)):
                with torch.no_grad():
                    self._reallocate(ranks)
            cap = self.capacity
            state_dict[key] = _pad_to(core, cap)
            for k, (u, c) in enumerate(zip(factors, cap)):
                state_dict[f"{prefix}factors.{k}"] = _pad_to(u, (u.shape[0], c))
            self.rank_vector.copy_(torch.tensor(ranks, dtype=torch.int64))
            self._host_ranks = ranks
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# --------------------------------------------------------------------------- Linear
class TuckerLinear(AbstractTuckerLayer):
    r"""``nn.Linear`` with a low-rank weight ``W = U_1 C U_2ᵀ`` (the matrix case of Tucker).

    ``W`` (``out_features × in_features``) is ``C ×_1 U_1 ×_2 U_2``; the forward pass computes
    ``((x U_2) Cᵀ) U_1ᵀ + b`` and never forms ``W``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
        Learn an additive bias (applied once, after the last product).
    ranks : None, int, float or (int, int)
        None: full rank ``min(in, out)``. An int ``r``: ``(r, r)``. A float in (0, 1]: that
        fraction of the full rank. A pair must be equal (a matrix's row and column ranks are).
    adaptive_modes : sequence of int
        Modes a rank-adaptive optimizer may change: 0 (output) and 1 (input) by default.
    device, dtype
        As for ``nn.Linear`` (real floating dtypes only).

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import TuckerLinear
    >>> layer = TuckerLinear(20, 10, ranks=4)
    >>> layer.ranks, layer.num_parameters(), layer(torch.ones(3, 20)).shape
    ((4, 4), 146, torch.Size([3, 10]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        ranks: Any = None,
        adaptive_modes: Sequence[int] = (0, 1),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        owner = "TuckerLinear"
        self.in_features = positive_int(in_features, f"{owner}: in_features")
        self.out_features = positive_int(out_features, f"{owner}: out_features")
        shape = (self.out_features, self.in_features)
        owner = f"TuckerLinear(in_features={in_features}, out_features={out_features})"
        super().__init__(
            shape,
            resolve_ranks(shape, ranks, owner=owner),
            check_adaptive_modes(adaptive_modes, 2, owner),
            bool(bias),
            device,
            _floating_dtype(dtype, owner),
        )

    @property
    def fan_in(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core, (u1, u2) = self.active_weights()
        h = torch.matmul(x, u2)  # (..., r_2)
        h = F.linear(h, core)  # (..., r_1)
        y = F.linear(h, u1, self.bias)  # (..., out), bias once
        self._record(x, y)
        return y

    def _replay(self, x: torch.Tensor, g: torch.Tensor, factors: list[torch.Tensor]) -> Any:
        u1, u2 = factors
        xs = x.reshape(-1, self.in_features).to(u2.dtype)
        gs = g.reshape(-1, self.out_features).to(u1.dtype)
        return (gs @ u1).mT @ (xs @ u2)  # Û_1ᵀ (gᵀ x) Û_2

    @classmethod
    def from_dense(
        cls,
        module: nn.Linear,
        ranks: Any = None,
        tau: float | None = None,
        adaptive_modes: Sequence[int] = (0, 1),
    ) -> TuckerLinear:
        """A TuckerLinear initialized by HOSVD (here: truncated SVD) of ``module.weight``.

        Parameters
        ----------
        module : nn.Linear
        ranks : as in the constructor
            Rank caps (None: full rank, which reproduces ``module`` exactly).
        tau : float, optional
            Relative tolerance: ranks of the adaptive modes are the smallest with
            ``‖W - W_tucker‖_F <= tau ‖W‖_F`` (capped by ``ranks``).
        adaptive_modes : sequence of int

        Notes
        -----
        The bias is copied; dtype and device follow ``module.weight``.
        """
        return cls._from_dense(module, ranks, tau, adaptive_modes, clip=False)

    @classmethod
    def _from_dense(
        cls, module: nn.Linear, ranks: Any, tau: Any, adaptive_modes: Any, clip: bool
    ) -> TuckerLinear:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"TuckerLinear.from_dense expects an nn.Linear, got {type(module)}")
        w = module.weight
        owner = f"TuckerLinear.from_dense({module})"
        r = resolve_ranks(tuple(w.shape), ranks, owner=owner, clip=clip)
        modes = check_adaptive_modes(adaptive_modes, 2, owner)
        layer = cls._like(module, r, modes)
        _copy_from_dense(layer, module, _checked_tucker_of_dense(cls, w, r, tau, modes))
        return layer

    @classmethod
    def _like(cls, module: nn.Linear, ranks: tuple, adaptive_modes: Any) -> TuckerLinear:
        """A randomly initialized layer with ``module``'s hyperparameters, dtype and device."""
        w = module.weight
        return cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            ranks=ranks,
            adaptive_modes=adaptive_modes,
            device=w.device,
            dtype=w.dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, ranks={self.ranks}, "
            f"adaptive_modes={self.adaptive_modes}"
        )


# --------------------------------------------------------------------------- Conv2d
class TuckerConv2d(AbstractTuckerLayer):
    r"""``nn.Conv2d`` with a Tucker weight, evaluated in three stages.

    The weight ``W ∈ R^{C_out × C_in × k_h × k_w}`` is ``C ×_1 U_1 ×_2 U_2 ×_3 U_3 ×_4 U_4``.
    The forward pass never forms it:

    1. a 1×1 convolution ``C_in → r_2`` with ``U_2ᵀ``,
    2. the ``k_h × k_w`` convolution ``r_2 → r_1`` with the small kernel ``C ×_3 U_3 ×_4 U_4``,
       honouring ``stride``, ``padding`` (ints, pairs, ``"same"``, ``"valid"``), ``dilation``
       and ``padding_mode`` exactly as ``nn.Conv2d`` does (non-zero padding modes pad with
       ``F.pad`` first, which commutes with stage 1),
    3. a 1×1 convolution ``r_1 → C_out`` with ``U_1``, adding the bias (once).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode
        As for ``nn.Conv2d``.
    groups : int
        Must be 1. A grouped convolution's weight is block-diagonal in the channel modes; a
        Tucker factorization of the channel modes (dense ``U_1``, ``U_2``) does not preserve that
        structure, so the layer could not compute the grouped convolution it was asked for. A
        ``ValueError`` is raised instead of silently computing something else.
    ranks : None, int, float or tuple
        None: full multilinear rank. An int ``r``: channel ranks ``(r, r)``, kernel modes full.
        A float in (0, 1]: that fraction of each channel mode's full rank, kernel modes full.
        A pair: the channel ranks ``(r_out, r_in)``, kernel modes full. Four ints: every mode.
        Ranks must be feasible (``r_k <= n_k`` and ``r_k <= prod_{j≠k} r_j``).
    adaptive_modes : sequence of int
        Modes a rank-adaptive optimizer may change. Default ``(0, 1)``: the output and input
        channels. The window modes (2, 3) stay at full rank by default: they have 1 to 7
        entries, so compressing them saves little and costs accuracy ("little is gained
        compressing the small window modes", RobustDLRT); they are still factors, so passing
        ``adaptive_modes=(0, 1, 2, 3)`` makes them adaptive too.
    device, dtype
        As for ``nn.Conv2d`` (real floating dtypes only).

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import TuckerConv2d
    >>> layer = TuckerConv2d(16, 32, 3, padding=1, ranks=(8, 4))
    >>> layer.ranks, layer(torch.ones(2, 16, 10, 10)).shape
    ((8, 4, 3, 3), torch.Size([2, 32, 10, 10]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        ranks: Any = None,
        adaptive_modes: Sequence[int] = (0, 1),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        owner = "TuckerConv2d"
        self.in_channels = positive_int(in_channels, f"{owner}: in_channels")
        self.out_channels = positive_int(out_channels, f"{owner}: out_channels")
        self.kernel_size = int_pair(kernel_size, f"{owner}: kernel_size", 1)
        self.stride = int_pair(stride, f"{owner}: stride", 1)
        self.dilation = int_pair(dilation, f"{owner}: dilation", 1)
        self.groups = positive_int(groups, f"{owner}: groups")
        if self.groups != 1:
            raise ValueError(_groups_message(owner, groups, in_channels, out_channels))
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"{owner}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"{owner}: padding string must be 'same' or 'valid', got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(
                    f"{owner}: padding='same' is not supported for strided convolutions "
                    f"(stride={self.stride})"
                )
            self.padding: str | tuple[int, int] = padding
            pads = [0, 0, 0, 0]  # F.pad order: (left, right, top, bottom)
            if padding == "same":
                for i, (dil, k) in enumerate(zip(self.dilation, self.kernel_size)):
                    total = dil * (k - 1)
                    j = 2 * (1 - i)  # height pads go last in F.pad order
                    pads[j], pads[j + 1] = total // 2, total - total // 2
        else:
            self.padding = int_pair(padding, f"{owner}: padding", 0)
            ph, pw = self.padding
            pads = [pw, pw, ph, ph]
        self._reversed_padding_repeated_twice = tuple(pads)
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        owner = (
            f"TuckerConv2d(in_channels={in_channels}, out_channels={out_channels}, "
            f"kernel_size={self.kernel_size})"
        )
        super().__init__(
            shape,
            resolve_ranks(shape, ranks, owner=owner),
            check_adaptive_modes(adaptive_modes, 4, owner),
            bool(bias),
            device,
            _floating_dtype(dtype, owner),
        )

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def kernel(self) -> torch.Tensor:
        """The stage-2 kernel ``C ×_3 U_3 ×_4 U_4``, shape ``(r_1, r_2, k_h, k_w)``."""
        core, (_, _, u3, u4) = self.active_weights()
        return torch.einsum("abij,ki,lj->abkl", core, u3, u4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TuckerConv2d expects input of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        core, (u1, u2, u3, u4) = self.active_weights()
        kernel = torch.einsum("abij,ki,lj->abkl", core, u3, u4)
        n, c, hh, ww = x.shape
        r1, r2 = u1.shape[1], u2.shape[1]
        cpu = x.device.type == "cpu"
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

        # stage 1: C_in -> r_2 (1x1, U_2ᵀ), in the input's memory layout, without a copy of x
        if nhwc:
            h = torch.matmul(x.permute(0, 2, 3, 1), u2).permute(0, 3, 1, 2)  # channels-last
        else:
            h = torch.bmm(u2.mT.expand(n, r2, c), x.reshape(n, c, hh * ww))
            h = h.view(n, r2, hh, ww)

        # stage 2: the small k_h x k_w conv r_2 -> r_1, with nn.Conv2d's padding semantics
        if self.padding_mode != "zeros":
            h = F.pad(h, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: Any = 0
        else:
            padding = self.padding
        if cpu:  # oneDNN is much faster channels-last at these small channel counts
            h = h.contiguous(memory_format=torch.channels_last)
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        h = F.conv2d(h, kernel, None, self.stride, padding, self.dilation)
        _, _, ho, wo = h.shape

        # stage 3: r_1 -> C_out (1x1, U_1) and the bias, once
        if nhwc:
            y = F.linear(h.permute(0, 2, 3, 1), u1, self.bias).permute(0, 3, 1, 2)
        else:
            h = h.contiguous().view(n, r1, ho * wo)
            if self.bias is None:
                y = torch.bmm(u1.expand(n, -1, r1), h)
            else:
                y = torch.baddbmm(self.bias.view(1, -1, 1), u1.expand(n, -1, r1), h)
            y = y.view(n, self.out_channels, ho, wo)
        self._record(x, y)
        return y.squeeze(0) if unbatched else y

    def _replay(self, x: torch.Tensor, g: torch.Tensor, factors: list[torch.Tensor]) -> Any:
        u1, u2, u3, u4 = factors
        x, g = x.to(u2.dtype), g.to(u1.dtype)
        h = torch.einsum("nchw,cr->nrhw", x, u2)  # input in the (augmented) basis of mode 2
        gh = torch.einsum("nohw,or->nrhw", g, u1)  # output gradient in that of mode 1
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            h = F.pad(h, self._reversed_padding_repeated_twice, mode=mode)
            padding: Any = (0, 0)
        else:
            padding = self.padding
        shape = (u1.shape[1], u2.shape[1], *self.kernel_size)
        k = conv2d_weight(h, shape, gh, self.stride, padding, self.dilation)
        return torch.einsum("abij,ik,jl->abkl", k, u3, u4)

    @classmethod
    def from_dense(
        cls,
        module: nn.Conv2d,
        ranks: Any = None,
        tau: float | None = None,
        adaptive_modes: Sequence[int] = (0, 1),
    ) -> TuckerConv2d:
        """A TuckerConv2d initialized by HOSVD of ``module.weight``, same hyperparameters.

        Parameters
        ----------
        module : nn.Conv2d
            ``groups`` must be 1.
        ranks : as in the constructor
            Rank caps (None: full rank, which reproduces ``module`` to rounding).
        tau : float, optional
            Relative tolerance: the adaptive modes get the smallest ranks with
            ``‖W - W_tucker‖_F <= tau ‖W‖_F`` (capped by ``ranks``); the other modes keep
            ``ranks`` (full by default for the kernel modes).
        adaptive_modes : sequence of int

        Notes
        -----
        The bias is copied; dtype and device follow ``module.weight``.
        """
        return cls._from_dense(module, ranks, tau, adaptive_modes, clip=False)

    @classmethod
    def _from_dense(
        cls, module: nn.Conv2d, ranks: Any, tau: Any, adaptive_modes: Any, clip: bool
    ) -> TuckerConv2d:
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"TuckerConv2d.from_dense expects an nn.Conv2d, got {type(module)}")
        w = module.weight
        if module.groups != 1:
            raise ValueError(
                _groups_message(
                    "TuckerConv2d.from_dense",
                    module.groups,
                    module.in_channels,
                    module.out_channels,
                )
            )
        owner = f"TuckerConv2d.from_dense({module})"
        r = resolve_ranks(tuple(w.shape), ranks, owner=owner, clip=clip)
        modes = check_adaptive_modes(adaptive_modes, 4, owner)
        layer = cls._like(module, r, modes)
        _copy_from_dense(layer, module, _checked_tucker_of_dense(cls, w, r, tau, modes))
        return layer

    @classmethod
    def _like(cls, module: nn.Conv2d, ranks: tuple, adaptive_modes: Any) -> TuckerConv2d:
        """A randomly initialized layer with ``module``'s hyperparameters, dtype and device."""
        w = module.weight
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            ranks=ranks,
            adaptive_modes=adaptive_modes,
            device=w.device,
            dtype=w.dtype,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", ranks={self.ranks}, adaptive_modes={self.adaptive_modes}"


def _groups_message(owner: str, groups: int, in_channels: int, out_channels: int) -> str:
    return (
        f"{owner}: groups={groups} is not supported (in_channels={in_channels}, "
        f"out_channels={out_channels}). A grouped convolution's weight is block-diagonal in "
        "the channel modes, which a Tucker factorization of the channel modes does not "
        "preserve; keep the layer dense (tuckerize skips grouped convolutions) or factorize "
        "each group's convolution separately"
    )


def _copy_from_dense(layer: AbstractTuckerLayer, module: nn.Module, x: tm.TuckerTensor) -> None:
    with torch.no_grad():
        if x.ranks != layer.capacity:  # ranks chosen by tolerance: a fresh layer is unpadded
            layer._reallocate(x.ranks)
        layer._write(x.core, list(x.factors), x.ranks)
        if layer.bias is not None:
            layer.bias.copy_(cast(torch.Tensor, module.bias))
    requires_grad = cast(torch.Tensor, module.weight).requires_grad
    for p in (layer.core, *layer.factors):
        p.requires_grad_(requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(cast(torch.Tensor, module.bias).requires_grad)
    layer.train(module.training)


def _checked_tucker_of_dense(
    cls: type, weight: torch.Tensor, ranks: tuple, tau: Any, modes: tuple
) -> tm.TuckerTensor:
    try:
        return tucker_of_dense(weight.detach(), ranks, tau, modes)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{cls.__name__}.from_dense: {err}") from None


def _pad_to(a: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``a`` at the end of each axis to ``shape``."""
    shape = tuple(int(n) for n in shape)
    if tuple(a.shape) == shape:
        return a
    out = torch.zeros(shape, dtype=a.dtype, device=a.device)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _trim_saved_weight(module: AbstractTuckerLayer, state_dict: dict, prefix: str, _meta: Any):
    """State-dict hook: save core and factors at the true ranks (small files, any capacity)."""
    ranks = module.ranks
    if ranks == module.capacity:
        return
    key = prefix + "core"
    if key in state_dict:
        state_dict[key] = state_dict[key][tuple(slice(0, r) for r in ranks)].clone()
    for k, r in enumerate(ranks):
        fk = f"{prefix}factors.{k}"
        if fk in state_dict:
            state_dict[fk] = state_dict[fk][:, :r].clone()
