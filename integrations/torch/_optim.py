"""The TDLRT optimizer for torch models with Tucker layers.

All the mathematics comes from the core (``tm.augment_basis``, ``tm.truncate_core``,
``tm.transport_core_state``, ...); this module keeps torch's conventions: param groups with
``lr`` (so LR schedulers work), ``zero_grad``, ``state_dict`` / ``load_state_dict`` and
``step(closure)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tuckerman.integrations.torch._distributed import resolve_model
from tuckerman.integrations.torch._layers import AbstractTuckerLayer

import tuckerman as tm

__all__ = ["TDLRT"]


def _positive(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{what} must be finite and {'>=' if allow_zero else '>'} 0, got {value}")
    return value


class TDLRT(torch.optim.Optimizer):
    """Rank-adaptive, geometry-aware training of the Tucker layers of a model (TDLRT).

    Each :meth:`step` on a Tucker layer: augment every basis with the factor gradients
    (``span[U_k, ∂L/∂U_k]``, the paper's K-step span), represent the weight exactly in the
    augmented bases, recompute the gradients there (second closure call), update the core with
    the inner optimizer (SGD with momentum / Nesterov, or Adam), and truncate each adaptive mode
    by the tolerance ``tau``. Momentum and Adam moments on the core follow the bases through
    augmentation and truncation (``tm.transport_core_state``,
    ``tm.transport_core_second_moment``). Every other parameter (biases, dense layers) gets the
    inner optimizer's ordinary step.

    Parameters
    ----------
    model : nn.Module
        The model; its :class:`~tuckerman.integrations.torch.AbstractTuckerLayer` modules are
        trained by TDLRT, all other parameters by the inner optimizer. For data-parallel
        training pass the :class:`~tuckerman.integrations.torch.TuckerDDP` wrapper: the
        truncated ranks are then decided on rank 0 and broadcast, and a non-finite loss or
        gradient on any replica refuses the step on all (see ``docs/distributed.md``). A plain
        ``DistributedDataParallel`` or an FSDP model is refused with a ``TypeError``.
    lr : float
    tau : float
        Truncation tolerance, relative to ``||core||`` (``absolute=True``: absolute).
    momentum, weight_decay, nesterov, betas, eps
        Inner optimizer settings, as in ``torch.optim.SGD`` / ``torch.optim.Adam``. Weight decay
        on a Tucker layer is applied to the core, which equals L2 decay of the full weight
        (orthonormal factors).
    inner : {"sgd", "adam"}
    min_rank, max_rank : int or per-mode tuple
        Bounds for the adaptive modes of every Tucker layer.
    fixed_rank : bool
        Truncate back to the current ranks (the fixed-rank integrator).
    one_pass : bool
        Use one gradient evaluation per step: the gradient in the augmented bases is replaced by
        the tangent-space (Riemannian) gradient at the current point, computed from the same
        backward pass (GeoLoRA-style). Cheaper (no second forward/backward); it needs the small
        Gram matrices ``C_(k)C_(k)ᵀ`` to be invertible and drops the gradient components that
        couple two new directions. ``step()`` may then be called without a closure after
        ``loss.backward()``.
    on_nonfinite : {"raise", "skip"}
        A NaN/Inf loss or gradient raises ``FloatingPointError`` (default) or skips the step;
        either way parameters and state are left exactly as they were.

    Attributes
    ----------
    rank_history : list of dict
        After each step, ``{layer name: ranks}``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import TuckerLinear, TDLRT
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(TuckerLinear(8, 6, ranks=4), nn.ReLU(), nn.Linear(6, 1))
    >>> opt = TDLRT(model, lr=0.1, tau=0.1)
    >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> sorted(opt.rank_history[-1])
    ['0']
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        tau: float = 0.1,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        inner: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_rank: Any = 1,
        max_rank: Any = None,
        absolute: bool = False,
        fixed_rank: bool = False,
        one_pass: bool = False,
        on_nonfinite: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "TDLRT needs the model (an nn.Module) to find its Tucker layers and replace their "
                f"parameters when ranks change; got {type(model).__name__}"
            )
        model, self._replicas = resolve_model(model)
        _positive(lr, "lr")
        _positive(tau, "tau", allow_zero=True)
        _positive(momentum, "momentum", allow_zero=True)
        _positive(weight_decay, "weight_decay", allow_zero=True)
        _positive(eps, "eps")
        if inner not in ("sgd", "adam"):
            raise ValueError(f"inner must be 'sgd' or 'adam', got {inner!r}")
        if nesterov and (inner != "sgd" or momentum <= 0):
            raise ValueError("nesterov needs inner='sgd' and momentum > 0")
        for b in betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self._layers: dict[str, AbstractTuckerLayer] = {
            name: m for name, m in model.named_modules() if isinstance(m, AbstractTuckerLayer)
        }
        tucker_ids = {id(p) for m in self._layers.values() for p in (m.core, *m.factors)}
        dense = [p for p in model.parameters() if id(p) not in tucker_ids]
        defaults = dict(
            lr=lr,
            tau=tau,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            betas=tuple(betas),
            eps=eps,
        )
        groups = [{"params": self._tucker_params(), "tucker": True}]
        if dense:
            groups.append({"params": dense, "tucker": False})
        super().__init__(groups, defaults)
        self.inner = inner
        self.min_rank, self.max_rank = min_rank, max_rank
        self.absolute, self.fixed_rank, self.one_pass = absolute, fixed_rank, one_pass
        self.on_nonfinite = on_nonfinite
        self.rank_history: list[dict[str, tuple[int, ...]]] = []
        for layer in self._layers.values():  # validate the bounds once, on real shapes
            tm.truncate_core(
                layer.tucker(),
                tau=tau,
                ranks=layer.ranks,
                min_rank=min_rank,
                max_rank=max_rank,
                adaptive_modes=layer.adaptive_modes,
            )

    # ------------------------------------------------------------------ bookkeeping
    def _tucker_params(self) -> list[nn.Parameter]:
        return [p for m in self._layers.values() for p in (m.core, *m.factors)]

    def _refresh_group(self) -> None:
        self.param_groups[0]["params"] = self._tucker_params()

    def _snapshot(self) -> dict:
        """Parameter objects and core state of every Tucker layer, to restore on failure."""
        return {
            name: (m.core, list(m.factors), dict(self.state.get(m.core, {})))
            for name, m in self._layers.items()
        }

    def _restore(self, snap: dict) -> None:
        for name, (core, factors, state) in snap.items():
            m = self._layers[name]
            self.state.pop(m.core, None)
            m.core = core
            for k, u in enumerate(factors):
                m.factors[k] = u
            if state:
                self.state[core] = state
        self._refresh_group()

    def _grads_finite(self, loss: Any) -> bool:
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return False
        return True

    def _all_finite(self, loss: Any) -> bool:
        """Whether the loss and gradients are finite, on every replica when distributed."""
        finite = self._grads_finite(loss)
        if self._replicas is None:
            return finite
        return not self._replicas.any_rank(not finite)

    def _nonfinite(self, snap: dict | None, when: str) -> None:
        if snap is not None:
            self._restore(snap)
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss or gradient {when}: the step was refused; parameters and "
                "optimizer state are unchanged"
            )

    def _move_state(self, layer: AbstractTuckerLayer, x: tm.TuckerTensor, maps: tuple) -> None:
        """Install ``x`` in ``layer`` and carry the core's state along ``maps``."""
        state = self.state.pop(layer.core, {})
        moved = {}
        for key, value in state.items():
            if key in ("momentum_buffer", "exp_avg"):
                moved[key] = tm.transport_core_state(value, maps)
            elif key == "exp_avg_sq":
                moved[key] = tm.transport_core_second_moment(value, maps)
            else:
                moved[key] = value
        layer.set_tucker(x)
        if moved:
            self.state[layer.core] = moved

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:  # type: ignore[override]
        """torch's optimizer state plus the rank history; state tensors have the current ranks."""
        sd = super().state_dict()
        sd["rank_history"] = [dict(h) for h in self.rank_history]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Load after ``model.load_state_dict`` (which resizes the Tucker layers to the saved
        ranks): the param groups are first re-pointed at the layers' current parameters."""
        state_dict = dict(state_dict)
        history = state_dict.pop("rank_history", [])
        self._refresh_group()
        super().load_state_dict(state_dict)
        self.rank_history = [dict(h) for h in history]

    # ------------------------------------------------------------------ inner optimizer
    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        """The inner optimizer's step direction (to be scaled by -lr), updating ``state``."""
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p
        if self.inner == "sgd":
            if not group["momentum"]:
                return grad
            buf = state.get("momentum_buffer")
            buf = grad.clone() if buf is None else buf * group["momentum"] + grad
            state["momentum_buffer"] = buf
            return grad + group["momentum"] * buf if group["nesterov"] else buf
        beta1, beta2 = group["betas"]
        step = state.get("step", 0) + 1
        m = state.get("exp_avg", torch.zeros_like(p)) * beta1 + (1 - beta1) * grad
        v = state.get("exp_avg_sq", torch.zeros_like(p)) * beta2 + (1 - beta2) * grad * grad
        state.update(step=step, exp_avg=m, exp_avg_sq=v)
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        return m_hat / (v_hat.sqrt() + group["eps"])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One TDLRT step.

        ``closure`` zeroes the gradients, recomputes the loss, calls ``backward`` and returns
        the loss. It is called twice (at the current point and in the augmented bases); with
        ``one_pass=True`` at most once, and not at all when it is None (gradients from the
        user's own ``loss.backward()``). Returns the loss of the first evaluation.
        """
        if closure is None and not self.one_pass:
            raise TypeError(
                "TDLRT.step needs a closure (two gradient evaluations per step: at the current "
                "point and in the augmented bases); pass one, or use one_pass=True"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all_finite(loss):
            self._nonfinite(None, "at the current point")
            return loss
        group = self.param_groups[0]
        snap = self._snapshot()
        try:
            done = self._tucker_step(closure, group, snap)
        except BaseException:  # a failed step leaves parameters and state as they were
            self._restore(snap)
            raise
        if not done:
            return loss
        for group_dense in self.param_groups[1:]:
            for p in group_dense["params"]:
                if p.grad is None:
                    continue
                direction = self._update(p, p.grad, self.state.setdefault(p, {}), group_dense)
                p.add_(direction, alpha=-group_dense["lr"])
        self.rank_history.append({name: m.ranks for name, m in self._layers.items()})
        return loss

    def _tucker_step(self, closure: Callable[[], Any] | None, group: dict, snap: dict) -> bool:
        """Augment, re-evaluate (or use the one-pass gradient), Galerkin step and truncation of
        every Tucker layer; False when the step was refused for non-finite values."""
        old_ranks = {name: m.ranks for name, m in self._layers.items()}
        tangent = {}
        for name, m in self._layers.items():  # augment: same weight, larger bases
            x = m.tucker()
            directions = [u.grad if u.grad is not None else torch.zeros_like(u) for u in m.factors]
            if self.one_pass:
                core_grad = m.core.grad if m.core.grad is not None else torch.zeros_like(m.core)
                tangent[name] = _tangent_tucker(x, core_grad, directions)
            x_aug, maps = tm.augment_basis(x, directions)
            self._move_state(m, x_aug, maps)
        self._refresh_group()
        if self.one_pass:
            core_grads = {
                name: tm.core_gradient(m.tucker(), tangent[name])
                for name, m in self._layers.items()
            }
        else:
            with torch.enable_grad():
                closure()  # type: ignore[misc]
            if not self._all_finite(None):
                self._nonfinite(snap, "in the augmented bases")
                return False
            core_grads = {
                name: m.core.grad if m.core.grad is not None else torch.zeros_like(m.core)
                for name, m in self._layers.items()
            }
        galerkin, truncated = {}, {}
        for name, m in self._layers.items():  # Galerkin step, then truncation
            state = self.state.setdefault(m.core, {})
            direction = self._update(m.core.detach(), core_grads[name], state, group)
            x_gal = tm.TuckerTensor(m.core.detach() - group["lr"] * direction, m.tucker().factors)
            galerkin[name] = x_gal
            truncated[name] = tm.truncate_core(
                x_gal,
                tau=None if self.fixed_rank else group["tau"],
                ranks=old_ranks[name],
                min_rank=self.min_rank,
                max_rank=self.max_rank,
                absolute=self.absolute,
                adaptive_modes=m.adaptive_modes,
            )
        if self._replicas is not None and not self.fixed_rank and self._layers:
            # replicas take rank 0's decisions: the shapes agree by construction
            agreed = self._replicas.agree_ranks({n: t[0].ranks for n, t in truncated.items()})
            for name, ranks in agreed.items():
                if ranks != truncated[name][0].ranks:
                    truncated[name] = tm.truncate_core(galerkin[name], ranks=ranks)
        for name, m in self._layers.items():
            self._move_state(m, *truncated[name])
        self._refresh_group()
        return True


def _tangent_tucker(x: tm.TuckerTensor, core_grad: Any, factor_grads: list) -> tm.TuckerTensor:
    """The Riemannian gradient at ``x`` from one backward pass, as a Tucker tensor."""
    manifold = tm.FixedRankTucker(x.shape, x.ranks)
    g = tm.rgrad_from_factor_grads(manifold, x, core_grad, factor_grads)
    return manifold.tangent_to_tucker(x, g)
