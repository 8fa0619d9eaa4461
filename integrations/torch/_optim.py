"""The TDLRT optimizer for torch models with Tucker layers: a driver of the core's device step.

The mathematics and the step itself live in :mod:`tuckerman.engine` (augmentation, the core's
SGD/Adam update with its state carried by the basis maps, the rank decision and the
truncation, all on padded static shapes with the ranks on the device). This module keeps
torch's conventions: param groups with ``lr`` (so LR schedulers work), ``zero_grad``,
``state_dict`` / ``load_state_dict``, ``step(closure)``, parameters updated in place, and the
other parameters trained by torch's own functional SGD / Adam / AdamW.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.optim import adam as _adam
from torch.optim import adamw as _adamw
from torch.optim import sgd as _sgd
from tuckerman.integrations.torch._distributed import resolve_model
from tuckerman.integrations.torch._layers import AbstractTuckerLayer

from tuckerman import engine
from tuckerman.validation import positive_int, real_number

__all__ = ["TDLRT"]

_HALF = (torch.float16, torch.bfloat16)


class TDLRT(torch.optim.Optimizer):
    """Rank-adaptive, geometry-aware training of the Tucker layers of a model (TDLRT).

    Each :meth:`step` on the Tucker layers (all at once, :mod:`tuckerman.engine`): augment every
    basis with the factor gradients (``span[U_k, ∂L/∂U_k]``, the paper's K-step span),
    represent the weight exactly in the augmented bases, recompute the core gradient there
    (second closure call, or from the first pass with ``one_pass=True``), update the core with
    the inner optimizer (SGD with momentum / Nesterov, Adam or AdamW), and truncate each
    adaptive mode by the tolerance ``tau``. Momentum and Adam moments on the core follow the
    bases through augmentation and truncation. Every other parameter (biases, dense layers)
    gets torch's own SGD / Adam / AdamW step with the same settings.

    The layers' parameters are updated in place: they keep their identity while the ranks stay
    within the layers' *capacity* (``capacity``), and are replaced only when a layer outgrows
    its capacity or shrinks well below it. Every rank decision is taken on the device; the host
    reads one small tensor per step (all new ranks and the finiteness flag), and none at all
    with ``fixed_rank=True`` or ``capacity="max"`` together with ``on_nonfinite="skip"``.

    Parameters
    ----------
    model : nn.Module
        The model; its :class:`~tuckerman.integrations.torch.AbstractTuckerLayer` modules whose
        parameters require gradients are trained by TDLRT (frozen ones are left untouched), all
        other parameters by the inner optimizer. For data-parallel training pass the
        :class:`~tuckerman.integrations.torch.TuckerDDP` wrapper: ranks are then decided on
        rank 0 and broadcast, and a non-finite loss or gradient on any replica refuses the
        step on all (see ``docs/distributed.md``). A plain ``DistributedDataParallel`` or an
        FSDP model is refused with a ``TypeError``.
    lr : float
    tau : float
        Truncation tolerance, relative to ``||core||`` (``absolute=True``: absolute).
    momentum, weight_decay, nesterov, betas, eps
        Inner optimizer settings, as in ``torch.optim.SGD`` / ``Adam`` / ``AdamW``. Weight
        decay on a Tucker layer is applied to the core, which equals decay of the full weight
        (orthonormal factors).
    inner : {"sgd", "adam", "adamw"}
        The cores' optimizer. Its moments live in the geometry: they follow the bases through
        augmentation and truncation (Adam's second moment with the squared maps).
    min_rank, max_rank : int or per-mode tuple
        Bounds for the adaptive modes of every Tucker layer.
    fixed_rank : bool
        Truncate back to the current ranks (the fixed-rank integrator).
    rank_rule : {"update", "gradient"} or None
        What decides the ranks (:func:`tuckerman.engine.decision_cores`): the spectrum of the
        updated core (``"update"``, the paper's rule; default for SGD) or of the core moved by
        a plain gradient step of the update's length (``"gradient"``; default for Adam and
        AdamW, whose normalized steps give every new direction the same weight, so that a
        relative ``tau`` would keep them all and the ranks run to their maximum).
    one_pass : bool
        Use one gradient evaluation per step: the gradient in the augmented bases is replaced by
        the tangent-space (Riemannian) gradient at the current point, computed from the same
        backward pass (GeoLoRA-style). Cheaper (no second forward/backward); it needs the small
        Gram matrices ``C_(k)C_(k)ᵀ`` to be invertible and drops the gradient components that
        couple two new directions. ``step()`` may then be called without a closure after
        ``loss.backward()``.
    augment_every : int
        Augment and truncate every ``augment_every``-th step; the steps in between update the
        cores with the bases fixed (one gradient evaluation, no QR/SVD, ranks unchanged), as the
        authors' later code does. 1 (default): every step is a full TDLRT step.
    capacity : {"pow2", "max", "exact"} or sequence of int
        Sizes the layers' capacity may take per adaptive mode (see
        :func:`tuckerman.engine.capacity_sizes`): ``"pow2"`` reallocates when a rank crosses a
        power of two, ``"max"`` preallocates the largest rank (never reallocates), ``"exact"``
        holds exactly the ranks. Modes that are not adaptive (all with ``fixed_rank``) are held
        at their rank.
    on_nonfinite : {"raise", "skip"}
        A NaN/Inf loss or gradient raises ``FloatingPointError`` (default) or skips the step;
        either way parameters and state are left exactly as they were.

    Attributes
    ----------
    rank_history : list of dict
        After each step, ``{layer name: ranks}``.

    Raises
    ------
    TypeError, ValueError
        Bad hyperparameters, rank bounds or models, at construction (nothing is changed).

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
        rank_rule: str | None = None,
        one_pass: bool = False,
        second_pass: str = "replay",
        augment_every: int = 1,
        capacity: Any = "pow2",
        on_nonfinite: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                "TDLRT needs the model (an nn.Module) to find its Tucker layers and update their "
                f"parameters when ranks change; got {type(model).__name__}"
            )
        wrapper = model
        model, replicas = resolve_model(model)
        real_number(lr, "lr", positive=True)
        config = engine.Config(
            tau=real_number(tau, "tau"),
            absolute=bool(absolute),
            inner=inner,
            momentum=momentum,
            nesterov=bool(nesterov),
            betas=tuple(betas),  # type: ignore[arg-type]
            eps=eps,
            weight_decay=weight_decay,
            rank_rule=rank_rule,
        ).checked()
        augment_every = positive_int(augment_every, "augment_every")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if second_pass not in ("replay", "closure"):
            raise ValueError(f"second_pass must be 'replay' or 'closure', got {second_pass!r}")
        policy = engine.check_capacity_policy(capacity)
        layers: dict[str, AbstractTuckerLayer] = {}
        for name, m in model.named_modules():
            if not isinstance(m, AbstractTuckerLayer):
                continue
            flags = {p.requires_grad for p in (m.core, *m.factors)}
            if flags == {False}:
                continue  # frozen: neither augmented nor truncated nor updated
            if len(flags) > 1:
                raise ValueError(
                    f"TDLRT: Tucker layer {name!r} has a core and factors of which only some "
                    "require gradients; freeze the whole layer (core and factors) or none of it"
                )
            if m.core.dtype not in (torch.float32, torch.float64, *_HALF):
                raise TypeError(f"TDLRT: layer {name!r} has dtype {m.core.dtype}")
            layers[name] = m
        self._config, self._policy = config, policy
        self.min_rank, self.max_rank = min_rank, max_rank
        self.absolute, self.fixed_rank, self.one_pass = bool(absolute), fixed_rank, one_pass
        self.augment_every = int(augment_every)
        self.on_nonfinite = on_nonfinite
        self.second_pass = second_pass
        self._layers = layers
        # validate the bounds on every layer's real shape before anything is changed
        self._layouts = {name: self._layout(m) for name, m in layers.items()}
        for name, m in layers.items():
            target = self._layouts[name].capacity
            if target != m.capacity:
                m.set_capacity(target)
            if second_pass == "replay" and not one_pass:
                m._records = []  # the layer keeps its inputs and output gradients until step
        self._replicas = replicas
        self._wrapper = wrapper if replicas is not None else None
        tucker_ids = {id(p) for m in layers.values() for p in (m.core, *m.factors)}
        frozen_ids = {
            id(p)
            for m in model.modules()
            if isinstance(m, AbstractTuckerLayer) and m not in layers.values()
            for p in (m.core, *m.factors)
        }
        dense = [
            p for p in model.parameters() if id(p) not in tucker_ids and id(p) not in frozen_ids
        ]
        defaults = dict(
            lr=lr,
            tau=config.tau,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
            betas=config.betas,
            eps=config.eps,
        )
        groups = [{"params": self._tucker_params(), "tucker": True}]
        if dense:
            groups.append({"params": dense, "tucker": False})
        super().__init__(groups, defaults)
        self.inner = config.inner
        self._steps = 0
        self._history: list[Any] = []

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        if self.__dict__.get("_replicas") is not None:
            raise TypeError(
                "a TDLRT optimizer bound to a process group (TuckerDDP) cannot be pickled or "
                "copied: save opt.state_dict() and build a new optimizer on each replica"
            )
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ bookkeeping
    def _layout(self, m: AbstractTuckerLayer, capacity: Any = None) -> engine.Layout:
        """The layer's static layout at ``capacity`` (default: the policy's for its ranks)."""
        adaptive = () if self.fixed_rank else m.adaptive_modes
        bounds = engine.make_layout(
            m.weight_shape,
            m.ranks,
            adaptive_modes=adaptive,
            min_rank=self.min_rank,
            max_rank=self.max_rank,
        )
        for k in range(len(m.weight_shape)):
            if bounds.adaptive[k] and bounds.min_rank[k] > bounds.max_rank[k]:
                raise ValueError(
                    f"min_rank {self.min_rank} exceeds max_rank {self.max_rank} in mode {k} of "
                    f"the Tucker layer with weight shape {m.weight_shape} (largest rank there: "
                    f"{bounds.max_rank[k]})"
                )
        if capacity is None:
            capacity = tuple(
                max(engine.capacity_of(self._sizes(bounds, k), r), r) if bounds.adaptive[k] else r
                for k, r in enumerate(m.ranks)
            )
        return engine.make_layout(
            m.weight_shape,
            capacity,
            adaptive_modes=adaptive,
            min_rank=self.min_rank,
            max_rank=self.max_rank,
        )

    def _sizes(self, lay: engine.Layout, k: int) -> tuple[int, ...] | None:
        return engine.capacity_sizes(self._policy, lay.max_rank[k])

    def _tucker_params(self) -> list[nn.Parameter]:
        return [p for m in self._layers.values() for p in (m.core, *m.factors)]

    def _refresh_group(self) -> None:
        self.param_groups[0]["params"] = self._tucker_params()

    @property
    def rank_history(self) -> list[dict[str, tuple[int, ...]]]:
        """After each step, ``{layer name: ranks}`` (read from the device on first access when
        the step did not read them)."""
        for i, entry in enumerate(self._history):
            if not isinstance(entry, dict):
                names, flat = entry
                self._history[i] = _split_ranks(names, self._orders(names), flat.tolist())
        return self._history

    @rank_history.setter
    def rank_history(self, value: list) -> None:
        self._history = [dict(h) for h in value]

    def _orders(self, names: list[str]) -> list[int]:
        return [len(self._layers[n].weight_shape) for n in names]

    def _needs_read(self) -> bool:
        """Whether a step must read its decisions on the host: to raise on non-finite values,
        or because a rank may leave its capacity class."""
        if self.on_nonfinite == "raise":
            return True
        if self.fixed_rank:
            return False
        return any(
            lay.adaptive[k] and len(self._sizes(lay, k) or (0, 0)) > 1
            for lay in self._layouts.values()
            for k in range(len(lay.shape))
        )

    def _nonfinite(self, flags: list[int]) -> None:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{_NONFINITE[flags.index(0)]}: the step was refused; parameters and optimizer "
                "state are unchanged"
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's optimizer state plus the rank history; core states at the true ranks."""
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._tucker_params())}
        ranks = {}
        for m in self._layers.values():
            i = index[id(m.core)]
            ranks[i] = m.ranks
            st = sd["state"].get(i)
            if st:
                sd["state"][i] = {
                    k: engine.trim_array(v, m.ranks).clone() if _core_shaped(v, m) else v
                    for k, v in st.items()
                }
        sd["tucker_ranks"] = ranks
        sd["tucker_capacity"] = {index[id(m.core)]: m.capacity for m in self._layers.values()}
        sd["rank_history"] = [dict(h) for h in self.rank_history]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after ``model.load_state_dict`` (which sets the Tucker layers' ranks).

        Raises
        ------
        ValueError
            If the saved core states have other ranks than the model's layers (both named).
        """
        state_dict = dict(state_dict)
        history = state_dict.pop("rank_history", [])
        saved_ranks = state_dict.pop("tucker_ranks", None)
        saved_capacity = state_dict.pop("tucker_capacity", {})
        self._refresh_group()
        index = {id(p): i for i, p in enumerate(self._tucker_params())}
        for name, m in self._layers.items():
            i = index[id(m.core)]
            st = state_dict.get("state", {}).get(i, {})
            shapes = {tuple(v.shape) for v in st.values() if torch.is_tensor(v) and v.ndim}
            want = m.ranks
            if saved_ranks is not None and i in saved_ranks:
                shapes.add(tuple(saved_ranks[i]))
            bad = [s for s in shapes if s != want]
            if bad:
                raise ValueError(
                    f"TDLRT.load_state_dict: the saved state of Tucker layer {name!r} has ranks "
                    f"{bad[0]} but the layer has ranks {want}; load the model's state_dict of the "
                    "same checkpoint first"
                )
        # the saved capacities: the same padded shapes make the resumed steps bit-identical
        by_index = {i: m for i, m in enumerate(self._tucker_params())}
        for i, cap in saved_capacity.items():
            layer = next(m for m in self._layers.values() if m.core is by_index[int(i)])
            layer.set_capacity(tuple(cap))
        self._refresh_group()
        super().load_state_dict(state_dict)
        for m in self._layers.values():
            st = self.state.get(m.core)
            if st:
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and tuple(v.shape) == m.ranks:
                        st[k] = engine.pad_array(_xp(), v, m.capacity)
        self._layouts = {name: self._layout(m, m.capacity) for name, m in self._layers.items()}
        self.rank_history = history
        self._steps = len(history)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops what the Tucker layers recorded for a replay."""
        for m in self._layers.values():
            if m._records is not None:
                m._records.clear()
        super().zero_grad(set_to_none=set_to_none)

    def _recorded(self, layers: list[AbstractTuckerLayer], required: bool) -> bool:
        """Whether every layer that got gradients recorded a complete forward/backward pass
        (not under torch.compile, which records nothing); with ``required``, at least one."""
        seen = False
        for m in layers:
            has_grad = any(p.grad is not None for p in (m.core, *m.factors))
            done = any(g is not None for _, g in (m._records or ()))
            if has_grad and not done:
                return False
            seen |= done
        return seen or not required

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One TDLRT step.

        ``closure`` zeroes the gradients, recomputes the loss, calls ``backward`` and returns
        the loss. It is called once: the gradient in the augmented bases is then replayed from
        the Tucker layers' recorded inputs and output gradients (``second_pass="replay"``;
        exact, since the augmented weights equal the current ones), or the closure is called a
        second time with the layers evaluating their augmented weights
        (``second_pass="closure"``, or when the forward pass ran under ``torch.compile``). It
        may be None (gradients from the user's own ``loss.backward()``) with ``one_pass=True``,
        on the core-only steps of ``augment_every`` and, after a recorded backward pass, with
        ``second_pass="replay"``. Returns the loss of the (first) evaluation.
        """
        try:
            return self._step(closure)
        finally:
            for m in self._layers.values():
                if m._records is not None:
                    m._records.clear()

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        full = self._steps % self.augment_every == 0
        needs_closure = full and not self.one_pass and self.second_pass == "closure"
        if closure is None and needs_closure:
            raise TypeError(
                "TDLRT.step needs a closure with second_pass='closure' (two gradient "
                "evaluations per step: at the current point and in the augmented bases); pass "
                "one, or use second_pass='replay' or one_pass=True"
            )
        loss = None
        if closure is not None:
            for m in self._layers.values():
                if m._records is not None:
                    m._records.clear()
            with torch.enable_grad():
                loss = closure()
        names = list(self._layers)
        layers = [self._layers[n] for n in names]
        layouts = [self._layouts[n] for n in names]
        group = self.param_groups[0]
        config = self._config._replace(tau=float(group["tau"]))
        lr = group["lr"]
        points = [_work(m.padded()) for m in layers]
        core_grads = [_work_grad(m.core) for m in layers]
        factor_grads = [[_work_grad(u) for u in m.factors] for m in layers]
        dense = [p for g in self.param_groups[1:] for p in g["params"] if p.grad is not None]
        checks = [p.grad for p in dense] + core_grads + [g for gs in factor_grads for g in gs]
        if loss is not None:
            checks.append(torch.as_tensor(loss).detach())
        finite = engine.all_finite(checks) if checks else torch.ones((), dtype=torch.bool)
        finite2 = torch.ones_like(finite)
        # the step runs on finite inputs whatever happens (no host check before the end); a
        # refused step discards its results
        core_grads = [_finite_or_zero(g, finite) for g in core_grads]
        factor_grads = [[_finite_or_zero(g, finite) for g in gs] for gs in factor_grads]
        states = [self._core_state(m) for m in layers]
        counts = [self._count(m) + 1 for m in layers]
        if not full:  # a core-only step: the bases stay
            new_points, new_states, finite3 = engine.inner_updates(
                config, points, core_grads, states, counts, lr
            )
            wanted = [p.ranks for p in points]
        else:
            aug, maps = engine.augment(layouts, points, factor_grads)
            moved = [engine.transport_state(config, st, m) for st, m in zip(states, maps)]
            if self.one_pass or not layers:
                grads2 = engine.tangent_core_gradients(
                    layouts, points, aug, maps, core_grads, factor_grads
                )
            else:
                if self.second_pass == "replay" and self._recorded(layers, closure is None):
                    grads2 = [
                        m.replay_core_gradient(a.factors).to(a.core.dtype)
                        for m, a in zip(layers, aug)
                    ]
                    if self._replicas is not None:  # linear in the gradient: average it
                        grads2 = self._replicas.average(grads2)
                elif closure is None:
                    raise TypeError(
                        "TDLRT.step needs a closure: the Tucker layers recorded no "
                        "forward/backward pass to replay (a forward pass under torch.compile, or "
                        "no backward since zero_grad)"
                    )
                else:
                    grads2 = self._second_pass(closure, layers, layouts, aug)
                if grads2:
                    finite2 = engine.all_finite(grads2)
                    grads2 = [_finite_or_zero(g, finite2) for g in grads2]
            updated, upd_states, finite3 = engine.inner_updates(
                config, aug, grads2, moved, counts, lr
            )
            agree = self._replicas.broadcast_ranks if self._replicas is not None else None
            decide = engine.decision_cores(
                config, [a.core for a in aug], [u.core for u in updated], grads2
            )
            new_points, tmaps, wanted = engine.truncate(
                layouts,
                config,
                updated,
                [p.ranks for p in points],
                fixed_rank=self.fixed_rank,
                agree=agree,
                decide=decide,
            )
            new_states = [engine.transport_state(config, st, m) for st, m in zip(upd_states, tmaps)]
        if finite3 is None:
            finite3 = torch.ones_like(finite)
        flags = torch.stack([finite, finite2, finite3]).to(torch.int64)
        if self._replicas is not None:
            flags = self._replicas.all_true_each(flags)
        finite = torch.all(flags.bool())
        decision = torch.cat([flags, *[w.reshape(-1) for w in wanted]])
        if self._needs_read():
            host = decision.tolist()  # the one device-to-host transfer of the step
            if not all(host[:3]):
                self._nonfinite(host[:3])
                return loss
            ranks = _split_ranks(names, self._orders(names), host[3:])
            self._commit(layers, layouts, new_points, new_states, counts, ranks)
            self._dense_step(dense)
            self._history.append(ranks)
        else:
            self._commit_on_device(layers, layouts, new_points, new_states, counts, finite)
            self._dense_step(dense, finite)
            self._history.append((names, decision[3:]))
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ pieces of the step
    def _state_keys(self) -> tuple[str, ...]:
        if self._config.inner in ("adam", "adamw"):
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self._config.momentum else ()

    def _core_state(self, m: AbstractTuckerLayer) -> tuple:
        """The core's optimizer state at the layer's capacity, in the working dtype."""
        st = self.state.get(m.core, {})
        dtype = _work_dtype(m.core.dtype)
        return tuple(
            st[k].to(dtype)
            if k in st
            else torch.zeros(m.capacity, dtype=dtype, device=m.core.device)
            for k in self._state_keys()
        )

    def _count(self, m: AbstractTuckerLayer) -> torch.Tensor:
        """Steps taken on the core (Adam's bias correction), a 0-d tensor as in torch's Adam."""
        c = self.state.get(m.core, {}).get("step")
        dtype = _work_dtype(m.core.dtype)  # float64 counts keep Adam's bias correction exact
        if c is None:
            return torch.zeros((), dtype=dtype, device=m.core.device)
        return torch.as_tensor(c, dtype=dtype, device=m.core.device)

    def _second_pass(
        self,
        closure: Callable[[], Any],
        layers: list[AbstractTuckerLayer],
        layouts: list[engine.Layout],
        aug: list,
    ) -> list[torch.Tensor]:
        """The core gradients at the augmented points: the closure again, with each layer
        evaluating its augmented weight and only those cores requiring gradients."""
        leaves: list[torch.Tensor] = []
        self._set_overrides(layers, layouts, aug, leaves)
        others = [p for g in self.param_groups[1:] for p in g["params"]]
        saved = [(p, p.grad, p.requires_grad) for p in others]
        try:
            for p in others:
                p.requires_grad_(False)  # only the augmented cores need gradients now
            with torch.enable_grad(), self._no_sync():
                closure()
        finally:
            for m in layers:
                m._override = None
            for p, grad, flag in saved:
                p.requires_grad_(flag)
                p.grad = grad
        grads = [
            (c.grad if c.grad is not None else torch.zeros_like(c)).to(a.core.dtype)
            for c, a in zip(leaves, aug)
        ]
        if self._replicas is not None:
            grads = self._replicas.average(grads)
        return grads

    @staticmethod
    def _set_overrides(layers, layouts, aug, leaves: list) -> None:
        """Point each layer's forward pass at its augmented weight (a fresh leaf core), with the
        live sizes ``min(2r, n)`` when the ranks are known on the host."""
        for m, lay, a in zip(layers, layouts, aug):
            core = a.core.to(m.core.dtype).requires_grad_(True)
            factors = [f.to(m.core.dtype) for f in a.factors]
            leaves.append(core)
            r = m._host_ranks
            live = None
            if r is not None:
                live = tuple(
                    c if s else min(2 * k, n)
                    for k, c, s, n in zip(r, lay.capacity, lay.skip, lay.shape)
                )
            m._override = (core, factors, live)

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        """DDP's no_sync for the second pass (its gradients are averaged by us, once)."""
        if self._wrapper is None:
            yield
            return
        with cast(Any, self._wrapper).no_sync():
            yield

    def _commit(self, layers, layouts, points, states, counts, ranks) -> None:
        """Install the step's results (host-known ranks): in place within the capacity, in new
        parameters at a new capacity when a layer leaves its size class."""
        moved_params = False
        for name, m, lay, p, st, c in zip(self._layers, layers, layouts, points, states, counts):
            r = ranks[name]
            target = self._next_layout(m, lay, r)
            if target.capacity != m.capacity:
                old = m.core
                m._reallocate(target.capacity)
                self.state.pop(old, None)
                self._layouts[name] = target
                moved_params = True
            cap = m.capacity
            m._commit(_to(p.with_capacity(cap), m.core.dtype), r)
            self._store_state(m, st, c, cap)
        if moved_params:
            self._refresh_group()

    def _next_layout(self, m: AbstractTuckerLayer, lay: engine.Layout, r: tuple) -> engine.Layout:
        cap = tuple(
            engine.next_capacity(self._sizes(lay, k), c, rk) if lay.adaptive[k] else c
            for k, (c, rk) in enumerate(zip(lay.capacity, r))
        )
        return lay if cap == lay.capacity else self._layout(m, cap)

    def _commit_on_device(self, layers, layouts, points, states, counts, finite) -> None:
        """Install without reading anything on the host: capacities cannot change here
        (fixed ranks or the largest capacity), and a non-finite step selects the old values."""
        for m, lay, p, st, c in zip(layers, layouts, points, states, counts):
            p = _to(p.with_capacity(lay.capacity), m.core.dtype)
            old = m.padded()
            p = engine.PaddedTucker(
                torch.where(finite, p.core, old.core),
                tuple(torch.where(finite, a, b) for a, b in zip(p.factors, old.factors)),
                torch.where(finite, p.ranks, old.ranks),
            )
            m._commit(p, m._host_ranks if self.fixed_rank else None)
            prev = self._core_state(m)
            st = tuple(
                torch.where(finite, engine.fit_array(_xp(), s, lay.capacity), q)
                for s, q in zip(st, prev)
            )
            self._store_state(m, st, torch.where(finite, c, c - 1), lay.capacity)

    def _store_state(self, m, st, count, cap) -> None:
        keys = self._state_keys()
        if not keys:
            return
        entry = self.state.setdefault(m.core, {})
        for k, s in zip(keys, st):
            entry[k] = engine.fit_array(_xp(), s, cap).to(_work_dtype(m.core.dtype))
        if self._config.inner in ("adam", "adamw"):
            entry["step"] = count

    def _dense_step(self, params: list[torch.Tensor], finite: torch.Tensor | None = None) -> None:
        """torch's functional SGD / Adam / AdamW on the non-Tucker parameters."""
        if not params:
            return
        group = self.param_groups[1]
        if finite is not None:  # on-device refusal: step copies, then select
            before = [p.detach().clone() for p in params]
            state_before = {
                id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state[p].items()}
                for p in params
                if p in self.state
            }
        grads = [cast(torch.Tensor, p.grad) for p in params]
        cfg = self._config
        if cfg.inner == "sgd":
            bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            _sgd.sgd(
                params,
                grads,
                bufs,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=0.0,
                nesterov=group["nesterov"],
                maximize=False,
            )
            if group["momentum"]:
                for p, b in zip(params, bufs):
                    self.state.setdefault(p, {})["momentum_buffer"] = b
        else:
            for p in params:
                st = self.state.setdefault(p, {})
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)  # torch's layout
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            update = _adamw.adamw if cfg.inner == "adamw" else _adam.adam
            update(
                params,
                grads,
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
                [],
                [self.state[p]["step"] for p in params],
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        if finite is not None:
            for p, b in zip(params, before):
                p.copy_(torch.where(finite, p, b))
            for p in params:
                old = state_before.get(id(p))
                if old is None:
                    continue
                for k, v in self.state[p].items():
                    if torch.is_tensor(v):
                        v.copy_(torch.where(finite, v, old[k]))


# --------------------------------------------------------------------------- helpers
def _xp() -> Any:
    import array_api_compat.torch as xp

    return xp


def _work(p: engine.PaddedTucker) -> engine.PaddedTucker:
    """The point in the working dtype of the step (float32 for half-precision layers)."""
    if p.core.dtype not in _HALF:
        return p
    return engine.PaddedTucker(p.core.float(), tuple(u.float() for u in p.factors), p.ranks)


def _work_grad(p: nn.Parameter) -> torch.Tensor:
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    return g.float() if g.dtype in _HALF else g


#: What a zero flag of the step's finiteness check means, in the order of the flags.
_NONFINITE = (
    "non-finite loss or gradient at the current point",
    "non-finite gradient in the augmented bases",
    "the inner update of a core overflowed (non-finite core or optimizer state; is the "
    "learning rate too large?)",
)


def _finite_or_zero(g: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``g`` where the step's inputs are finite, zeros otherwise (keeps LAPACK off NaNs)."""
    return torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))


def _to(p: engine.PaddedTucker, dtype: torch.dtype) -> engine.PaddedTucker:
    if p.core.dtype == dtype:
        return p
    return engine.PaddedTucker(p.core.to(dtype), tuple(u.to(dtype) for u in p.factors), p.ranks)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _core_shaped(v: Any, m: AbstractTuckerLayer) -> bool:
    return torch.is_tensor(v) and tuple(v.shape) == m.capacity and v.ndim == len(m.capacity)


def _split_ranks(names: list[str], orders: list[int], flat: list[int]) -> dict:
    out, i = {}, 0
    for n, d in zip(names, orders):
        out[n] = tuple(int(v) for v in flat[i : i + d])
        i += d
    return out
