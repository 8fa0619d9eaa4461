"""The rank-adaptive TDLRT step for JAX parameter pytrees, jitted once per rank bucket.

Design (see ``docs/jax.md``): every :class:`~tuckerman.TuckerTensor` node of the parameter
pytree is a Tucker weight. It is stored at *padded* ranks (rank buckets, ``_buckets.py``); the
true ranks live in the optimizer state as small integer arrays, so a rank change inside a
bucket changes values, not shapes, and does not recompile. The whole step (two gradient
evaluations, augmentation, Galerkin step with momentum / Adam, truncation with the rank
decision, the optax step of the other leaves) is one jitted function; the host reads back one
small integer array per step (the new ranks) to move a weight to another bucket when needed.

The mathematics is the core's (``tm.transport_core_state``, ``tm.transport_core_second_moment``,
``tm.unfold``; the torch ``TDLRT`` optimizer does the same steps); what is new here is only the
masking that keeps the padded computation exactly equal to the unpadded one:

* augmentation: the columns ``[U_k[:, :r_k], D_k[:, :r_k]]`` are gathered to the front of a
  ``n_k × 2B_k`` matrix (zeros behind), so the first ``2 r_k`` columns of its Householder ``Q``
  are exactly those of ``qr([U_k, D_k])``; the rest are masked to zero;
* truncation: the rank is chosen on device from the singular values (the same rule as
  ``tm.truncate_core``, feasibility lowering included) and the kept singular vectors are masked
  beyond the new rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tuckerman.integrations.jax._buckets import (
    bucket_of,
    bucket_sizes,
    check_buckets,
    pad_core,
    pad_tucker,
    trim_core,
    trim_tucker,
)

import tuckerman as tm
from tuckerman._validate import full_ranks

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


# --------------------------------------------------------------------------- checks
def _nonneg(value: Any, what: str, *, positive: bool = False, below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0) and (v < 1 or not below_one)
    if not ok:
        rng = "> 0" if positive else (">= 0 and < 1" if below_one else ">= 0")
        raise ValueError(f"{what} must be finite and {rng}, got {value!r}")
    return v


def _rank_bound(value: Any, what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{what} must be a positive int, got {value}")
        return int(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be None, a positive int or one per mode, got {value!r}")
    for v in value:
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"{what} entries must be positive ints or None, got {tuple(value)}")
    return tuple(None if v is None else int(v) for v in value)


def _per_mode(value: Any, d: int, what: str, default: Any) -> tuple:
    if value is None:
        return (default,) * d
    if isinstance(value, int):
        return (value,) * d
    if len(value) != d:
        raise ValueError(
            f"{what} has {len(value)} entries {value} for a Tucker weight of order {d}"
        )
    return tuple(default if v is None else v for v in value)


# --------------------------------------------------------------------------- traced helpers
def _masked_augment(u: Any, direction: Any, r: Any) -> Any:
    """``orth([U[:, :r], D[:, :r]])`` padded with zero columns to ``min(2B, n)`` columns."""
    n, b = u.shape
    j = jnp.arange(2 * b)
    idx = jnp.where(j < r, j, jnp.where(j < 2 * r, b + j - r, 2 * b))
    m = jnp.concatenate([u, direction, jnp.zeros((n, 1), u.dtype)], axis=1)[:, idx]
    q, _ = jnp.linalg.qr(m)
    return q * (jnp.arange(q.shape[1]) < jnp.minimum(2 * r, n)).astype(q.dtype)


def _feasible(r: Any) -> Any:
    """``tm.feasible_ranks`` on a traced int array: lower the largest offender first."""

    def others(r):
        return jnp.prod(r, dtype=r.dtype) // r

    def cond(r):
        return jnp.any(r > others(r))

    def body(r):
        o = others(r)
        k = jnp.argmax(jnp.where(r > o, r, -1))
        return r.at[k].set(o[k])

    return lax.while_loop(cond, body, r)


def _rank_from_tol(s: Any, threshold: Any) -> Any:
    """Smallest r with ``||s[r:]|| <= threshold`` (``s`` sorted descending, zero padded)."""
    tail = jnp.sqrt(jnp.cumsum((s * s)[::-1])[::-1])
    tail = jnp.concatenate([tail, jnp.zeros((1,), s.dtype)])
    return jnp.argmax(tail <= threshold).astype(jnp.int32)


# --------------------------------------------------------------------------- the transform
class TDLRT:
    """Rank-adaptive TDLRT training of the Tucker weights of a JAX parameter pytree.

    Every :class:`~tuckerman.TuckerTensor` node of ``params`` is a Tucker weight (e.g. the
    ``"weight"`` of :func:`init_tucker_dense` / :func:`init_tucker_conv`); every other leaf is
    trained by the optax transformation ``dense``. One :meth:`step` evaluates the gradient at
    the current point, augments every basis with the factor gradients
    (``span[U_k, ∂L/∂U_k]``, the paper's K-step span), evaluates the gradient again in the
    augmented bases, updates the augmented cores with SGD (momentum, Nesterov) or Adam, and
    truncates every mode with tolerance ``tau``. Momentum / Adam moments on the cores follow
    the bases through augmentation and truncation. The step is one ``jax.jit`` function,
    compiled once per rank-bucket configuration (see ``buckets``).

    Parameters
    ----------
    learning_rate : float or callable
        A positive float or an optax schedule ``count -> lr`` (used for the Tucker cores; the
        default ``dense`` transformation uses it too).
    tau : float
        Truncation tolerance, relative to ``||core||_F`` (``absolute=True``: absolute).
    dense : optax.GradientTransformation, optional
        For the non-Tucker leaves (biases, dense layers). Default: ``optax.sgd`` with the same
        learning rate, momentum and Nesterov flag (``inner="sgd"``) or ``optax.adam``
        (``inner="adam"``), with ``weight_decay`` added as decoupled-from-nothing L2 decay.
    inner : {"sgd", "adam"}
        The Galerkin (core) step's optimizer, as in ``torch.optim.SGD`` / ``Adam``.
    momentum, nesterov, betas, eps, weight_decay
        Its settings. Weight decay on a core equals L2 decay of the full weight.
    min_rank, max_rank : int or per-mode tuple, optional
        Bounds on every adaptive rank (a per-mode tuple needs all Tucker weights of one order).
    absolute : bool
    fixed_rank : bool
        Truncate to the current ranks (the fixed-rank integrator).
    adaptive_modes : sequence of int, optional
        Modes whose rank may change, for every Tucker weight (default: all). ``(0, 1)`` keeps
        the window modes of convolutions at their rank, like the torch layers' default.
    buckets : "pow2", "max", None or sequence of int
        Padded sizes per mode: ``"pow2"`` (4, 8, 16, ... up to the maximal feasible rank);
        ``"max"`` (preallocate the maximal rank: one compilation, most padding); a sequence of
        sizes; None (no padding: one compilation per distinct rank configuration).
    on_nonfinite : {"raise", "skip"}
        A NaN/Inf loss or gradient raises ``FloatingPointError`` or skips the step; either way
        nothing is updated.

    Attributes
    ----------
    compilations : int
        How many times the step was traced (compiled).
    buckets_visited : set
        The padded-rank configurations the jitted step has been called with.
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
        adaptive_modes: Any = None,
        buckets: Any = "pow2",
        on_nonfinite: str = "raise",
    ) -> None:
        if not callable(learning_rate):
            _nonneg(learning_rate, "learning_rate", positive=True)
        self.tau = _nonneg(tau, "tau")
        if inner not in ("sgd", "adam"):
            raise ValueError(f"inner must be 'sgd' or 'adam', got {inner!r}")
        self.momentum = _nonneg(momentum, "momentum", below_one=True)
        if nesterov and (inner != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs inner='sgd' and momentum > 0")
        if len(tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        self.betas = tuple(_nonneg(b, "betas entries", below_one=True) for b in betas)
        self.eps = _nonneg(eps, "eps", positive=True)
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.min_rank = _rank_bound(min_rank, "min_rank")
        self.max_rank = _rank_bound(max_rank, "max_rank")
        self.buckets = check_buckets(buckets)
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
        if dense is None:
            if inner == "sgd":
                dense = optax.sgd(learning_rate, momentum=self.momentum or None, nesterov=nesterov)
            else:
                dense = optax.adam(learning_rate, b1=self.betas[0], b2=self.betas[1], eps=self.eps)
            if self.weight_decay:
                dense = optax.chain(optax.add_decayed_weights(self.weight_decay), dense)
        if not isinstance(dense, optax.GradientTransformation):
            raise TypeError(
                f"dense must be an optax.GradientTransformation, got {type(dense).__name__}"
            )
        self.learning_rate = learning_rate
        self.dense = dense
        self.inner, self.nesterov = inner, bool(nesterov)
        self.absolute, self.fixed_rank = bool(absolute), bool(fixed_rank)
        self.on_nonfinite = on_nonfinite
        self.compilations = 0
        self.buckets_visited: set = set()
        self.rank_history: list[list[tuple[int, ...]]] = []
        self._set_placement(None)

    def _set_placement(self, placement: Any) -> None:
        """Data parallelism (``_distributed.data_parallel``): ``placement`` has ``replicated``
        and ``batch`` shardings and ``replicate(tree)`` / ``shard_batch(batch)``; None: plain."""
        self._placement = placement
        shardings = {}
        if placement is not None:  # the inputs are placed by step (jit takes their shardings)
            shardings = {"out_shardings": placement.replicated}
        self._jitted = jax.jit(self._step_impl, static_argnames=("loss_fn",), **shardings)

    # ------------------------------------------------------------------ structure
    def _split(self, params: Any) -> tuple[list, Any, list[int], list[int]]:
        leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_tucker)
        tucker = [i for i, leaf in enumerate(leaves) if _is_tucker(leaf)]
        dense = [i for i, leaf in enumerate(leaves) if not _is_tucker(leaf)]
        return leaves, treedef, tucker, dense

    def _bounds(self, x: tm.TuckerTensor) -> tuple[tuple, tuple, tuple[int, ...]]:
        d = x.ndim
        lows = _per_mode(self.min_rank, d, "min_rank", 1)
        highs = _per_mode(self.max_rank, d, "max_rank", None)
        full = full_ranks(x.shape)
        caps = tuple(f if h is None else min(f, h) for f, h in zip(full, highs))
        return lows, highs, caps

    def _sizes(self, x: tm.TuckerTensor) -> list:
        _, _, caps = self._bounds(x)
        return [bucket_sizes(self.buckets, c) for c in caps]

    def _core_state_len(self) -> int:
        if self.inner == "adam":
            return 2
        return 1 if self.momentum else 0

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
            _, highs, _ = self._bounds(x)
            tm.FixedRankTucker(x.shape, x.ranks)  # feasible ranks, or a clear error
            for k, (r, h) in enumerate(zip(x.ranks, highs)):
                if h is not None and r > h:
                    raise ValueError(
                        f"Tucker weight {t} (shape {x.shape}) has ranks {x.ranks}: ranks[{k}] = "
                        f"{r} exceeds max_rank {h}"
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
            core_state.append(tuple(jnp.zeros_like(x.core) for _ in range(self._core_state_len())))
        dense_state = self.dense.init([leaves[i] for i in dense])
        return TDLRTState(tuple(ranks), tuple(core_state), jnp.zeros((), jnp.int32), dense_state)

    # ------------------------------------------------------------------ the jitted step
    def _inner_update(self, c: Any, g: Any, st: tuple, count: Any) -> tuple[Any, tuple]:
        if self.weight_decay:
            g = g + self.weight_decay * c
        if self.inner == "sgd":
            if not self.momentum:
                return g, ()
            buf = self.momentum * st[0] + g
            return (g + self.momentum * buf if self.nesterov else buf), (buf,)
        b1, b2 = self.betas
        m = b1 * st[0] + (1 - b1) * g
        v = b2 * st[1] + (1 - b2) * g * g
        step = count.astype(c.dtype)
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        return m_hat / (jnp.sqrt(v_hat) + self.eps), (m, v)

    def _move_state(self, st: tuple, maps: tuple) -> tuple:
        if self.inner == "adam":
            return (
                tm.transport_core_state(st[0], maps),
                tm.transport_core_second_moment(st[1], maps),
            )
        return tuple(tm.transport_core_state(s, maps) for s in st)

    def _truncate(self, x: tm.TuckerTensor, r_old: Any, valid: Any) -> tuple:
        """Masked truncation of the augmented point ``x`` into the bucket ``r_old``'s shape."""
        core = x.core
        d = core.ndim
        lows, highs, _ = self._bounds(x)
        nrm = jnp.linalg.norm(core)
        threshold = self.tau if self.absolute else self.tau * nrm
        ps, wanted = [], []
        for k in range(d):
            p, s, _ = jnp.linalg.svd(tm.unfold(core, k), full_matrices=False)
            ps.append(p)
            others = jnp.prod(jnp.delete(valid, k), dtype=valid.dtype) if d > 1 else valid[k]
            available = jnp.minimum(jnp.minimum(valid[k], others), x.shape[k])
            adaptive = self.adaptive_modes is None or k in self.adaptive_modes
            if self.fixed_rank or not adaptive:
                r = r_old[k]
            else:
                r = jnp.maximum(_rank_from_tol(s, threshold), lows[k])
                if highs[k] is not None:
                    r = jnp.minimum(r, highs[k])
            wanted.append(jnp.clip(r, 1, available))
        wanted = _feasible(jnp.stack(wanted).astype(jnp.int32))
        return ps, wanted

    def _step_impl(self, params: Any, state: TDLRTState, batch: Any, loss_fn: Callable) -> tuple:
        self.compilations += 1  # runs only while tracing
        leaves, treedef, tucker, dense = self._split(params)

        def f(ls):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, ls), batch)

        loss, g1 = jax.value_and_grad(f)(leaves)
        count = state.count + 1
        lr = self._lr(state.count)
        aug, aug_state, valids = list(leaves), [], []
        for t, i in enumerate(tucker):  # augmentation: the same weight in larger bases
            x, r = leaves[i], state.ranks[t]
            qs = tuple(
                _masked_augment(u, gu, r[k])
                for k, (u, gu) in enumerate(zip(x.factors, g1[i].factors))
            )
            maps = tuple(q.T @ u for q, u in zip(qs, x.factors))
            aug[i] = tm.TuckerTensor._make((tm.transport_core_state(x.core, maps), qs))
            aug_state.append(self._move_state(state.core_state[t], maps))
            valids.append(jnp.minimum(2 * r, jnp.asarray(x.shape, jnp.int32)))
        g2 = jax.grad(f)(aug)
        checks = [jnp.isfinite(loss)] + [
            jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(g1)
        ]
        checks += [jnp.all(jnp.isfinite(g2[i].core)) for i in tucker]
        finite = jnp.all(jnp.stack(checks))
        new_leaves, new_ranks, new_core_state, wanted_all = list(leaves), [], [], []
        for t, i in enumerate(tucker):  # Galerkin step, then truncation
            xa, bucket = aug[i], leaves[i].ranks
            direction, st = self._inner_update(xa.core, g2[i].core, aug_state[t], count)
            x_gal = tm.TuckerTensor._make((xa.core - lr * direction, xa.factors))
            ps, wanted = self._truncate(x_gal, state.ranks[t], valids[t])
            out = jnp.minimum(wanted, jnp.asarray(bucket, jnp.int32))
            maps = []
            for k, p in enumerate(ps):
                if p.shape[1] < bucket[k]:
                    p = jnp.pad(p, ((0, 0), (0, bucket[k] - p.shape[1])))
                p = p[:, : bucket[k]] * (jnp.arange(bucket[k]) < out[k]).astype(p.dtype)
                maps.append(p.T)
            maps = tuple(maps)
            core = tm.transport_core_state(x_gal.core, maps)
            factors = tuple(q @ m.T for q, m in zip(x_gal.factors, maps))
            new_leaves[i] = tm.TuckerTensor._make((core, factors))
            new_ranks.append(out)
            new_core_state.append(self._move_state(st, maps))
            wanted_all.append(wanted)
        dense_params = [leaves[i] for i in dense]
        updates, dense_state = self.dense.update(
            [g1[i] for i in dense], state.dense_state, dense_params
        )
        for i, p in zip(dense, optax.apply_updates(dense_params, updates)):
            new_leaves[i] = p
        new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
        new_state = TDLRTState(tuple(new_ranks), tuple(new_core_state), count, dense_state)

        def keep(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        return (
            keep(new_params, params),
            keep(new_state, state),
            loss,
            finite,
            keep(tuple(wanted_all), state.ranks),
        )

    # ------------------------------------------------------------------ host side
    def _rebucket(self, params: Any, state: TDLRTState, targets: list) -> tuple[Any, TDLRTState]:
        leaves, treedef, tucker, _ = self._split(params)
        core_state = list(state.core_state)
        for t, i in enumerate(tucker):
            x, target = leaves[i], tuple(targets[t])
            if x.ranks == target:
                continue
            up = tuple(max(a, b) for a, b in zip(x.ranks, target))
            leaves[i] = trim_tucker(pad_tucker(x, up), target)
            core_state[t] = tuple(trim_core(pad_core(s, up), target) for s in core_state[t])
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
        targets = []
        for i in tucker:
            x = leaves[i]
            targets.append(tuple(bucket_of(s, r) for s, r in zip(self._sizes(x), x.ranks)))
        params, state = self._rebucket(params, state, targets)
        for _ in range(8):
            if place is not None:  # a no-op for arrays already replicated
                params, state = place.replicate((params, state))
            config = tuple(targets)
            self.buckets_visited.add(config)
            new_params, new_state, loss, finite, wanted = self._jitted(
                params, state, batch, loss_fn=loss_fn
            )
            finite, wanted = jax.device_get((finite, wanted))  # the one host sync per step
            if not finite:
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(
                        "non-finite loss or gradient: the step was refused; params and state are "
                        "unchanged"
                    )
                return params, state, loss
            grow = [
                tuple(
                    max(b, bucket_of(s, int(w))) for b, s, w in zip(tg, self._sizes(leaves[i]), ws)
                )
                for tg, i, ws in zip(targets, tucker, wanted)
            ]
            if grow == targets:
                break
            targets = grow  # a rank outgrew its bucket: redo the step in the larger bucket
            params, state = self._rebucket(params, state, targets)
        else:  # each retry strictly grows a bucket, and buckets are bounded by the mode sizes
            raise AssertionError(f"rank buckets did not settle after 8 tries: {targets}")
        ranks = [tuple(int(r) for r in ws) for ws in wanted]
        self.rank_history.append(ranks)
        shrink = [
            tuple(bucket_of(s, r) for s, r in zip(self._sizes(leaves[i]), rs))
            for i, rs in zip(tucker, ranks)
        ]
        if shrink != targets:
            new_params, new_state = self._rebucket(new_params, new_state, shrink)
            if place is not None:
                new_params, new_state = place.replicate((new_params, new_state))
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
        for i, r in zip(tucker, self.ranks(state)):
            x = trim_tucker(leaves[i], r)
            leaves[i] = tm.TuckerTensor(x.core, x.factors)
        return jax.tree_util.tree_unflatten(treedef, leaves)
