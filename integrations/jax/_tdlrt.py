"""The rank-adaptive TDLRT step for JAX parameter pytrees: a jitted driver of the core's step.

Every :class:`~tuckerman.TuckerTensor` node of the parameter pytree is a Tucker weight, stored
at a padded *capacity* (:mod:`tuckerman.engine`); the true ranks live in the optimizer state as
small integer arrays, so a rank change inside the capacity changes values, not shapes, and does
not recompile. The whole step (two gradient evaluations, or one with ``one_pass``, then
:func:`tuckerman.engine.augment`, :func:`~tuckerman.engine.inner_update` and
:func:`~tuckerman.engine.truncate`, and the optax step of the other leaves) is one jitted
function; the host reads back one small integer array per step (the finiteness flag and the new
ranks) to move a weight to another capacity when needed.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tuckerman.backends as backends

import tuckerman as tm
from tuckerman import engine
from tuckerman.engine import PaddedTucker
from tuckerman.validation import positive_int, real_number

backends.get("jax")  # imported once, not while tracing

__all__ = ["TDLRT", "TDLRTState"]


def _is_tucker(x: Any) -> bool:
    return isinstance(x, tm.TuckerTensor)


class TDLRTState(NamedTuple):
    """State of :class:`TDLRT` (a pytree).

    Attributes
    ----------
    ranks : tuple of int32 arrays
        The true ranks of each Tucker weight (in pytree order), shape ``(d,)``.
    core_state : tuple
        Per Tucker weight: ``()`` (plain SGD), ``(momentum_buffer,)`` or ``(exp_avg,
        exp_avg_sq)``; core-shaped, padded like the core.
    count : int32 array
        Number of steps taken.
    dense_state : optax state
        State of the transformation of the other leaves.
    """

    ranks: tuple
    core_state: tuple
    count: Any
    dense_state: Any


class TDLRT:
    """Rank-adaptive TDLRT training of the Tucker weights of a JAX parameter pytree.

    Every :class:`~tuckerman.TuckerTensor` node of ``params`` is a Tucker weight (e.g. the
    ``"weight"`` of :func:`init_tucker_dense` / :func:`init_tucker_conv`); every other leaf is
    trained by the optax transformation ``dense``. One :meth:`step` evaluates the gradient at
    the current point, augments every basis with the factor gradients
    (``span[U_k, ∂L/∂U_k]``, the paper's K-step span), evaluates the gradient again in the
    augmented bases, updates the augmented cores with SGD (momentum, Nesterov), Adam or AdamW,
    and truncates every mode with tolerance ``tau``: the core's device step
    (:mod:`tuckerman.engine`), the same one the torch ``TDLRT`` drives. The step is one
    ``jax.jit`` function, compiled once per capacity configuration (see ``capacity``).

    Parameters
    ----------
    learning_rate : float or callable
        A positive float or an optax schedule ``count -> lr`` (used for the Tucker cores; the
        default ``dense`` transformation uses it too). (The torch optimizer calls it ``lr``, as
        torch.optim does; optax calls it ``learning_rate``.)
    tau : float
        Truncation tolerance, relative to ``||core||_F`` (``absolute=True``: absolute).
    dense : optax.GradientTransformation, optional
        For the non-Tucker leaves (biases, dense layers). Default: ``optax.sgd`` with the same
        learning rate, momentum and Nesterov flag (``inner="sgd"``), ``optax.adam``
        (``"adam"``) or ``optax.adamw`` (``"adamw"``); for SGD and Adam ``weight_decay`` is
        added to the gradients as L2 decay, as in torch.
    inner : {"sgd", "adam", "adamw"}
        The Galerkin (core) step's optimizer, as in ``torch.optim.SGD`` / ``Adam`` / ``AdamW``.
    momentum, nesterov, betas, eps, weight_decay
        Its settings. Weight decay on a core equals decay of the full weight.
    min_rank, max_rank : int or per-mode tuple, optional
        Bounds on every adaptive rank (a per-mode tuple needs all Tucker weights of one order).
    absolute : bool
    fixed_rank : bool
        Truncate to the current ranks (the fixed-rank integrator).
    rank_rule : {"update", "gradient"} or None
        What decides the ranks, as in the torch ``TDLRT`` (default: ``"update"`` for SGD,
        ``"gradient"`` for Adam and AdamW; :func:`tuckerman.engine.decision_cores`).
    one_pass : bool
        One gradient evaluation per step: the core gradient in the augmented bases is that of
        the Riemannian gradient at the current point (see the torch ``TDLRT``).
    augment_every : int
        Augment and truncate every ``augment_every``-th step; in between the cores are updated
        with the bases fixed (one gradient evaluation, ranks unchanged).
    adaptive_modes : sequence of int, optional
        Modes whose rank may change, for every Tucker weight (default: all). ``(0, 1)`` keeps
        the window modes of convolutions at their rank, like the torch layers' default.
    capacity : "pow2", "max", "exact" (or None) or sequence of int
        Padded sizes per adaptive mode (:func:`tuckerman.engine.capacity_sizes`): ``"pow2"``
        (4, 8, 16, ... up to the maximal feasible rank); ``"max"`` (preallocate the maximal
        rank: one compilation, most padding); a sequence of sizes; ``"exact"`` / None (no
        padding: one compilation per distinct rank configuration).
    on_nonfinite : {"raise", "skip"}
        A NaN/Inf loss or gradient raises ``FloatingPointError`` or skips the step; either way
        nothing is updated.

    Attributes
    ----------
    compilations : int
        How many times the step was traced (compiled).
    capacities_visited : set
        The capacity configurations the jitted step has been called with.
    rank_history : list
        After each step, the true ranks of each Tucker weight.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tuckerman.integrations.jax import TDLRT, init_tucker_dense, tucker_dense
    >>> params = {"fc": init_tucker_dense(jax.random.key(0), 8, 6, ranks=4)}
    >>> def loss_fn(p, batch):
    ...     x, y = batch
    ...     return jnp.mean((tucker_dense(p["fc"], x) - y) ** 2)
    >>> tx = TDLRT(0.1, tau=0.1, momentum=0.9)
    >>> state = tx.init(params)
    >>> batch = (jnp.ones((16, 8)), jnp.zeros((16, 6)))
    >>> for _ in range(3):
    ...     params, state, loss = tx.step(params, state, loss_fn, batch)
    >>> tx.compilations, len(tx.ranks(state))
    (1, 1)
    """

    def __init__(
        self,
        learning_rate: float | Callable[[Any], Any],
        tau: float = 0.1,
        *,
        dense: optax.GradientTransformation | None = None,
        inner: str = "sgd",
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_rank: Any = 1,
        max_rank: Any = None,
        absolute: bool = False,
        fixed_rank: bool = False,
        rank_rule: str | None = None,
        one_pass: bool = False,
        augment_every: int = 1,
        adaptive_modes: Any = None,
        capacity: Any = "pow2",
        on_nonfinite: str = "raise",
    ) -> None:
        if not callable(learning_rate):
            real_number(learning_rate, "learning_rate", positive=True)
        self.config = engine.Config(
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
        self.min_rank = engine.check_rank_bound(min_rank, "min_rank")
        self.max_rank = engine.check_rank_bound(max_rank, "max_rank")
        self.capacity = engine.check_capacity_policy(capacity)
        if adaptive_modes is not None:
            modes = tuple(adaptive_modes)
            if any(
                isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0 for m in modes
            ):
                raise ValueError(
                    "adaptive_modes must be None or non-negative mode indices, got "
                    f"{adaptive_modes!r}"
                )
            adaptive_modes = tuple(sorted({int(m) for m in modes}))
        self.adaptive_modes = adaptive_modes
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        cfg = self.config
        if dense is None:
            if cfg.inner == "sgd":
                dense = optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=nesterov)
            elif cfg.inner == "adam":
                dense = optax.adam(learning_rate, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps)
            else:
                dense = optax.adamw(
                    learning_rate,
                    b1=cfg.betas[0],
                    b2=cfg.betas[1],
                    eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                )
            if cfg.weight_decay and cfg.inner != "adamw":
                dense = optax.chain(optax.add_decayed_weights(cfg.weight_decay), dense)
        if not isinstance(dense, optax.GradientTransformation):
            raise TypeError(
                f"dense must be an optax.GradientTransformation, got {type(dense).__name__}"
            )
        self.learning_rate = learning_rate
        self.dense = dense
        self.inner = cfg.inner
        self.fixed_rank, self.one_pass = bool(fixed_rank), bool(one_pass)
        self.augment_every = int(augment_every)
        self.on_nonfinite = on_nonfinite
        self.compilations = 0
        self.capacities_visited: set = set()
        self._returned: list | None = None  # the capacities the last step returned
        self.rank_history: list[list[tuple[int, ...]]] = []
        self._set_placement(None)

    def _set_placement(self, placement: Any) -> None:
        """Data parallelism (``_distributed.data_parallel``): ``placement`` has ``replicated``
        and ``batch`` shardings and ``replicate(tree)`` / ``shard_batch(batch)``; None: plain."""
        self._placement = placement
        shardings = {}
        if placement is not None:  # the inputs are placed by step (jit takes their shardings)
            shardings = {"out_shardings": placement.replicated}
        self._jitted = jax.jit(self._step_impl, static_argnames=("loss_fn", "full"), **shardings)

    # ------------------------------------------------------------------ structure
    def _split(self, params: Any) -> tuple[list, Any, list[int], list[int]]:
        leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_tucker)
        tucker = [i for i, leaf in enumerate(leaves) if _is_tucker(leaf)]
        dense = [i for i, leaf in enumerate(leaves) if not _is_tucker(leaf)]
        return leaves, treedef, tucker, dense

    def _modes(self, d: int) -> tuple[int, ...]:
        if self.fixed_rank:
            return ()
        if self.adaptive_modes is None:
            return tuple(range(d))
        return tuple(m for m in self.adaptive_modes if m < d)

    def _layout(self, x: tm.TuckerTensor, capacity: Any = None) -> engine.Layout:
        """The static layout of a weight at ``capacity`` (default: its padded shape)."""
        return engine.make_layout(
            x.shape,
            x.ranks if capacity is None else capacity,
            adaptive_modes=self._modes(x.ndim),
            min_rank=self.min_rank,
            max_rank=self.max_rank,
        )

    def _sizes(self, lay: engine.Layout, k: int) -> tuple[int, ...] | None:
        if not lay.adaptive[k]:
            return None  # a fixed mode is held exactly at its rank
        return engine.capacity_sizes(self.capacity, lay.max_rank[k])

    def _lr(self, count: Any) -> Any:
        return self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate

    # ------------------------------------------------------------------ init
    def init(self, params: Any) -> TDLRTState:
        """The initial state; every TuckerTensor of ``params`` must be at its true ranks.

        Raises
        ------
        ValueError
            No TuckerTensor in ``params``, non-orthonormal factors, ranks above ``max_rank``,
            or per-mode bounds that do not match a weight's order.
        """
        leaves, _, tucker, dense = self._split(params)
        if not tucker:
            raise ValueError(
                "params contain no TuckerTensor: TDLRT trains Tucker weights (use an optax "
                "transformation for dense parameters)"
            )
        ranks, core_state = [], []
        for t, i in enumerate(tucker):
            x = leaves[i]
            lay = self._layout(x)
            tm.FixedRankTucker(x.shape, x.ranks)  # feasible ranks, or a clear error
            for k, (r, h) in enumerate(zip(x.ranks, lay.max_rank)):
                if lay.adaptive[k] and r > h:
                    raise ValueError(
                        f"Tucker weight {t} (shape {x.shape}) has ranks {x.ranks}: ranks[{k}] = "
                        f"{r} exceeds max_rank {h}"
                    )
                if lay.adaptive[k] and lay.min_rank[k] > h:
                    raise ValueError(
                        f"min_rank {self.min_rank} exceeds max_rank {self.max_rank} in mode {k} "
                        f"of Tucker weight {t} (shape {x.shape}, largest rank {h})"
                    )
            gram_err = max(  # on the host: no compilation per factor shape
                float(np.max(np.abs(u.T @ u - np.eye(u.shape[1]))))
                for u in (np.asarray(f, dtype=np.float64) for f in x.factors)
            )
            # float32 factors from QR are orthonormal to ~1e-6; 1e3 eps allows for sizes
            if gram_err > 1e3 * float(jnp.finfo(x.core.dtype).eps):
                raise ValueError(
                    f"Tucker weight {t} (shape {x.shape}, ranks {x.ranks}) has factors that are "
                    f"not orthonormal (max |UᵀU - I| = {gram_err:.3g}); build it with "
                    "init_tucker_dense / init_tucker_conv / tucker_from_dense or tm.hosvd"
                )
            ranks.append(jnp.asarray(x.ranks, dtype=jnp.int32))
            core_state.append(engine.init_state(self.config, x.core))
        dense_state = self.dense.init([leaves[i] for i in dense])
        return TDLRTState(tuple(ranks), tuple(core_state), jnp.zeros((), jnp.int32), dense_state)

    # ------------------------------------------------------------------ the jitted step
    def _step_impl(
        self, params: Any, state: TDLRTState, batch: Any, loss_fn: Callable, full: bool
    ) -> tuple:
        self.compilations += 1  # runs only while tracing
        leaves, treedef, tucker, dense = self._split(params)
        cfg = self.config

        def f(ls):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, ls), batch)

        loss, g1 = jax.value_and_grad(f)(leaves)
        count = state.count + 1
        lr = self._lr(state.count)
        layouts = [self._layout(leaves[i]) for i in tucker]
        points = [
            PaddedTucker(leaves[i].core, tuple(leaves[i].factors), state.ranks[t])
            for t, i in enumerate(tucker)
        ]
        finite = jnp.all(
            jnp.stack(
                [jnp.isfinite(loss)]
                + [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(g1)]
            )
        )
        core_grads = [_where_finite(finite, g1[i].core) for i in tucker]
        factor_grads = [[_where_finite(finite, g) for g in g1[i].factors] for i in tucker]
        if not full:  # core-only step: fixed bases, no rank change
            new_points, new_states, updated_finite = engine.inner_updates(
                cfg, points, core_grads, state.core_state, count, lr
            )
            wanted = [p.ranks for p in points]
        else:
            aug, maps = engine.augment(layouts, points, factor_grads)
            moved = [engine.transport_state(cfg, st, m) for st, m in zip(state.core_state, maps)]
            if self.one_pass:
                grads2 = engine.tangent_core_gradients(
                    layouts, points, aug, maps, core_grads, factor_grads
                )
            else:
                aug_leaves = list(leaves)
                for a, i in zip(aug, tucker):
                    aug_leaves[i] = tm.TuckerTensor._make((a.core, a.factors))
                g2 = jax.grad(f)(aug_leaves)
                grads2 = [g2[i].core for i in tucker]
                finite = finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads2]))
                grads2 = [_where_finite(finite, g) for g in grads2]
            updated, upd_states, updated_finite = engine.inner_updates(
                cfg, aug, grads2, moved, count, lr
            )
            new_points, tmaps, wanted = engine.truncate(
                layouts,
                cfg,
                updated,
                [p.ranks for p in points],
                fixed_rank=self.fixed_rank,
                out_capacity=[lay.capacity for lay in layouts],
                decide=engine.decision_cores(
                    cfg, [a.core for a in aug], [u.core for u in updated], grads2
                ),
            )
            new_states = [engine.transport_state(cfg, st, m) for st, m in zip(upd_states, tmaps)]
        if updated_finite is not None:  # the inner step can overflow on finite gradients
            finite = finite & updated_finite
        new_leaves = list(leaves)
        for p, i in zip(new_points, tucker):
            new_leaves[i] = tm.TuckerTensor._make((p.core, p.factors))
        dense_params = [leaves[i] for i in dense]
        updates, dense_state = self.dense.update(
            [g1[i] for i in dense], state.dense_state, dense_params
        )
        for i, p in zip(dense, optax.apply_updates(dense_params, updates)):
            new_leaves[i] = p
        new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
        new_state = TDLRTState(
            tuple(jnp.astype(p.ranks, jnp.int32) for p in new_points),
            tuple(new_states),
            count,
            dense_state,
        )

        def keep(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        decision = jnp.concatenate(
            [jnp.reshape(finite, (1,)).astype(jnp.int32)]
            + [jnp.astype(w, jnp.int32) for w in wanted]
        )
        return keep(new_params, params), keep(new_state, state), loss, decision

    # ------------------------------------------------------------------ host side
    def _recapacity(self, params: Any, state: TDLRTState, targets: list) -> tuple[Any, TDLRTState]:
        leaves, treedef, tucker, _ = self._split(params)
        core_state = list(state.core_state)
        for t, i in enumerate(tucker):
            x, target = leaves[i], tuple(targets[t])
            if x.ranks == target:
                continue
            p = PaddedTucker(x.core, tuple(x.factors), state.ranks[t]).with_capacity(target)
            leaves[i] = tm.TuckerTensor._make((p.core, p.factors))
            core_state[t] = tuple(engine.fit_array(jnp, s, target) for s in core_state[t])
        params = jax.tree_util.tree_unflatten(treedef, leaves)
        return params, state._replace(core_state=tuple(core_state))

    def _check(self, params: Any, state: Any, loss_fn: Any) -> tuple[list, list[int]]:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (params, batch) -> loss, got {loss_fn!r}")
        if not isinstance(state, TDLRTState):
            raise TypeError(f"state must be the TDLRTState from init, got {type(state).__name__}")
        leaves, _, tucker, _ = self._split(params)
        if len(tucker) != len(state.ranks):
            raise ValueError(
                f"params have {len(tucker)} Tucker weights but the state was made for "
                f"{len(state.ranks)}"
            )
        for t, i in enumerate(tucker):
            x = leaves[i]
            if (
                tuple(state.ranks[t].shape) != (x.ndim,)
                or tuple(state.core_state[t][0].shape if state.core_state[t] else x.ranks)
                != x.ranks
            ):
                raise ValueError(
                    f"Tucker weight {t} (shape {x.shape}, padded ranks {x.ranks}) does not match "
                    f"the state (ranks of shape {tuple(state.ranks[t].shape)})"
                )
        return leaves, tucker

    def _initial_capacity(self, x: tm.TuckerTensor, ranks: tuple) -> tuple:
        lay = self._layout(x, ranks)
        return tuple(
            max(engine.capacity_of(self._sizes(lay, k), r), r) if lay.adaptive[k] else r
            for k, r in enumerate(ranks)
        )

    def _capacity_for(self, x: tm.TuckerTensor, capacity: tuple, ranks: tuple) -> tuple:
        lay = self._layout(x, capacity)
        return tuple(
            engine.next_capacity(self._sizes(lay, k), c, r) if lay.adaptive[k] else c
            for k, (c, r) in enumerate(zip(capacity, ranks))
        )

    def step(self, params: Any, state: TDLRTState, loss_fn: Callable, batch: Any) -> tuple:
        """One TDLRT step; returns ``(params, state, loss)``.

        Parameters
        ----------
        params : pytree
            The parameters (TuckerTensor nodes are Tucker weights, possibly padded).
        state : TDLRTState
        loss_fn : callable
            ``loss_fn(params, batch) -> scalar``, traceable by JAX. Pass the same function
            object every step: it is a static argument of the jitted step.
        batch : pytree
            Passed to ``loss_fn``.

        Returns
        -------
        (params, state, loss)
            The new parameters (Tucker weights at padded ranks: use :meth:`compact` for the
            true ranks), the new state, and the loss at the current point (before the step).
        """
        leaves, tucker = self._check(params, state, loss_fn)
        place = self._placement
        if place is not None:  # data parallel: the batch split over devices, the rest copied
            batch = place.shard_batch(batch)
        full = len(self.rank_history) % self.augment_every == 0
        targets = [leaves[i].ranks for i in tucker]
        if targets != self._returned:  # params from init (or elsewhere): the policy's capacity
            targets = [
                self._initial_capacity(leaves[i], r) for i, r in zip(tucker, self.ranks(state))
            ]
            params, state = self._recapacity(params, state, targets)
        for _ in range(8):
            if place is not None:  # a no-op for arrays already replicated
                params, state = place.replicate((params, state))
            self.capacities_visited.add((tuple(targets), full))
            new_params, new_state, loss, decision = self._jitted(
                params, state, batch, loss_fn=loss_fn, full=full
            )
            host = [int(v) for v in np.asarray(jax.device_get(decision))]  # the one host read
            if not host[0]:
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(
                        "non-finite loss or gradient, or an inner update of a core that "
                        "overflowed (is the learning rate too large?): the step was refused; "
                        "params and state are unchanged"
                    )
                return params, state, loss
            wanted, pos = [], 1
            for i in tucker:
                d = leaves[i].ndim
                wanted.append(tuple(host[pos : pos + d]))
                pos += d
            grow = [
                tuple(max(c, w) for c, w in zip(target, self._capacity_for(leaves[i], target, ws)))
                for target, i, ws in zip(targets, tucker, wanted)
            ]
            if all(all(w <= c for w, c in zip(ws, tg)) for ws, tg in zip(wanted, targets)):
                break
            targets = grow  # a rank outgrew its capacity: redo the step at the larger one
            params, state = self._recapacity(params, state, targets)
        else:  # each retry strictly grows a capacity, and capacities are bounded by mode sizes
            raise AssertionError(f"capacities did not settle after 8 tries: {targets}")
        self.rank_history.append(wanted)
        shrink = [
            self._capacity_for(leaves[i], tg, ws) for i, tg, ws in zip(tucker, targets, wanted)
        ]
        if shrink != targets:
            new_params, new_state = self._recapacity(new_params, new_state, shrink)
            if place is not None:
                new_params, new_state = place.replicate((new_params, new_state))
        self._returned = shrink
        return new_params, new_state, loss

    def ranks(self, state: TDLRTState) -> list[tuple[int, ...]]:
        """The true ranks of each Tucker weight (host ints; one device sync)."""
        return [tuple(int(r) for r in np.asarray(a)) for a in jax.device_get(state.ranks)]

    def compact(self, params: Any, state: TDLRTState) -> Any:
        """``params`` with every Tucker weight cut to its true ranks (exact).

        The result is valid input for :meth:`init` and for the layer functions; keep training
        with the padded ``params`` and ``state``.
        """
        leaves, treedef, tucker, _ = self._split(params)
        for t, (i, r) in enumerate(zip(tucker, self.ranks(state))):
            x = leaves[i]
            leaves[i] = PaddedTucker(x.core, tuple(x.factors), state.ranks[t]).to_tucker(r)
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _where_finite(finite: Any, g: Any) -> Any:
    """``g`` when the step's inputs are finite, zeros otherwise (keeps the LAPACK calls on
    finite values; a refused step discards its results)."""
    return jnp.where(finite, g, jnp.zeros((), g.dtype))
