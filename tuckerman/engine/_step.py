"""The rank-adaptive TDLRT step on padded points: static shapes, decisions on the device.

The step of :func:`tuckerman.tdlrt_step` (Algorithm 1 of Zangrando et al., NeurIPS 2024),
written for many Tucker weights at once on :class:`~tuckerman.engine.PaddedTucker` points:

1. :func:`augment` — ``Û_k = orth([U_k, ∂L/∂U_k])`` for every mode (one batched QR per
   distinct matrix shape over all weights) and the exact representation ``C ×_k Û_kᵀU_k`` of
   each weight in the augmented bases, at the *workspace* capacity ``min(2 B_k, n_k)``;
2. the driver evaluates the core gradient there (a second backward pass), or
   :func:`tangent_core_gradients` builds it from the first pass (the one-pass variant);
3. :func:`inner_update` — SGD (momentum, Nesterov), Adam or AdamW on the augmented core, its
   state carried by :func:`transport`;
4. :func:`truncate` — per-mode SVDs (batched over equal shapes; one SVD for both modes of a
   matrix), the rank decision by tolerance on the device, feasibility, and the truncated point.

Nothing here reads an array on the host: ranks are integer arrays, masks make padding exact, and
every shape depends only on the static :class:`Layout` of each weight. The functions are pure
and array-API generic: the torch optimizer runs them eagerly, the JAX transform under
``jax.jit``.

Modes that can never change (not adaptive, at full rank ``n_k``, and not lowerable by the
feasibility rule) are *skipped*: their basis is already the whole space, so augmenting and
truncating them would only rotate it. The window modes of a convolution are the common case.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tuckerman.backends as backends
from tuckerman._compat import device_of, namespace_of
from tuckerman._kernels import _mp, _others, _svd, _unfold
from tuckerman.engine._padded import PaddedTucker, rank_mask
from tuckerman.validation import feasible_ranks_error, full_ranks, per_mode, real_number

__all__ = [
    "Layout",
    "Config",
    "make_layout",
    "check_rank_bound",
    "state_size",
    "init_state",
    "augment",
    "tangent_core_gradients",
    "inner_update",
    "decision_cores",
    "svd_all",
    "truncate",
    "transport",
    "transport_state",
    "all_finite",
]

INNER = ("sgd", "adam", "adamw")


# --------------------------------------------------------------------------- static description
class Layout(NamedTuple):
    """Static description of one Tucker weight in the step (hashable: a jit static argument).

    Attributes
    ----------
    shape : tuple of int
        The weight's shape ``n``.
    capacity : tuple of int
        The padded ranks ``B`` of the point (``core.shape``).
    adaptive : tuple of bool
        Per mode: may the step change its rank (by tolerance)?
    min_rank, max_rank : tuple of int
        Per mode bounds of an adaptive rank (``max_rank`` at most the full rank).
    skip : tuple of bool
        Per mode: never augmented or truncated (not adaptive, full rank ``n_k``, and never
        lowered by feasibility); see the module docstring.
    """

    shape: tuple[int, ...]
    capacity: tuple[int, ...]
    adaptive: tuple[bool, ...]
    min_rank: tuple[int, ...]
    max_rank: tuple[int, ...]
    skip: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def workspace(self) -> tuple[int, ...]:
        """Capacity of the augmented point: ``min(2 B_k, n_k)`` (``B_k`` for skipped modes)."""
        return tuple(
            b if s else min(2 * b, n) for b, s, n in zip(self.capacity, self.skip, self.shape)
        )


def check_rank_bound(value: Any, what: str) -> Any:
    """Validate a rank bound without a shape: None, a positive int, or one entry per mode
    (positive ints or None). Returns it as None, an int or a tuple."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value}")
        return int(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be None, a positive int or one per mode, got {value!r}")
    for k, v in enumerate(value):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"{what}[{k}] must be a positive integer or None, got {v!r}")
    return tuple(None if v is None else int(v) for v in value)


def make_layout(
    shape: Sequence[int],
    capacity: Sequence[int],
    *,
    adaptive_modes: Any = None,
    min_rank: Any = 1,
    max_rank: Any = None,
) -> Layout:
    """Build and validate the :class:`Layout` of one Tucker weight.

    Parameters
    ----------
    shape : sequence of int
        The weight's shape.
    capacity : sequence of int
        Its padded ranks. A mode that is not adaptive keeps its rank, so its capacity is that
        rank.
    adaptive_modes : sequence of int, optional
        Modes whose rank the step may change (default: every mode). ``()``: fixed rank.
    min_rank, max_rank : int or per-mode sequence, optional
        Bounds of the adaptive ranks (``max_rank`` default: the full rank).

    Examples
    --------
    >>> from tuckerman.engine import make_layout
    >>> lay = make_layout((64, 32, 3, 3), (16, 8, 3, 3), adaptive_modes=(0, 1))
    >>> lay.workspace, lay.skip
    ((32, 16, 3, 3), (False, False, True, True))
    """
    shape = tuple(int(n) for n in shape)
    d = len(shape)
    capacity = tuple(int(c) for c in capacity)
    if len(capacity) != d:
        raise ValueError(f"capacity {capacity} has {len(capacity)} entries for shape {shape}")
    if adaptive_modes is None:
        modes: tuple[int, ...] = tuple(range(d))
    else:
        modes = tuple(adaptive_modes)
        for m in modes:
            if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not -d <= m < d:
                raise ValueError(f"adaptive_modes entries must be modes in [0, {d}), got {m!r}")
        modes = tuple(sorted({int(m) % d for m in modes}))
    adaptive = tuple(k in modes for k in range(d))
    full = full_ranks(shape)
    lows = per_mode(min_rank, d, "min_rank", 1)
    highs = tuple(
        f if h is None else min(h, f) for h, f in zip(per_mode(max_rank, d, "max_rank", None), full)
    )
    for k in range(d):
        if not 1 <= capacity[k] <= shape[k]:
            raise ValueError(f"capacity {capacity} must lie in [1, {shape}] mode by mode")
    # a mode is skipped when it is fixed at full rank and no rank decision can lower it: its
    # size must not exceed the product of the other modes' smallest possible ranks
    skip = [not adaptive[k] and capacity[k] == shape[k] for k in range(d)]
    while True:
        smallest = [
            shape[j] if skip[j] else (lows[j] if adaptive[j] else capacity[j]) for j in range(d)
        ]
        drop = [k for k in range(d) if skip[k] and shape[k] > math.prod(smallest) // smallest[k]]
        if not drop:
            break
        for k in drop:
            skip[k] = False
    return Layout(shape, capacity, adaptive, lows, highs, tuple(skip))


class Config(NamedTuple):
    """Hyperparameters of the step that shape the computation (hashable: jit-static).

    The learning rate is an argument of :func:`inner_update`, so schedules need no new trace.

    Attributes
    ----------
    tau : float
        Truncation tolerance: discarded singular values of each mode have 2-norm ``<= tau
        ||C||_F`` (``absolute``: ``<= tau``).
    absolute : bool
    inner : {"sgd", "adam", "adamw"}
        The core's optimizer: SGD with optional momentum / Nesterov (as ``torch.optim.SGD``),
        Adam (L2 ``weight_decay`` added to the gradient, as ``torch.optim.Adam``) or AdamW
        (decoupled decay, as ``torch.optim.AdamW``).
    momentum, nesterov, betas, eps, weight_decay
        As in torch's optimizers.
    rank_rule : {"update", "gradient"} or None
        What the truncation's rank decision looks at (:func:`decision_cores`): the updated core
        (``"update"``, the paper's rule), or the core moved by a plain gradient step of the
        update's length (``"gradient"``). None: ``"update"`` for SGD, ``"gradient"`` for Adam
        and AdamW, whose per-entry normalization gives every new direction an O(lr) entry and
        so a flat spectrum that a relative tolerance cannot cut.
    """

    tau: float = 0.1
    absolute: bool = False
    inner: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank_rule: str | None = None

    def checked(self) -> Config:
        """The same config after validation (a clear error for every bad value)."""
        real_number(self.tau, "tau")
        if self.inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {self.inner!r}")
        real_number(self.momentum, "momentum", below_one=True)
        if self.nesterov and (self.inner != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs inner='sgd' and momentum > 0")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"betas must be a pair, got {self.betas!r}")
        for b in self.betas:
            real_number(b, "betas entries", below_one=True)
        real_number(self.eps, "eps", positive=True)
        real_number(self.weight_decay, "weight_decay")
        rule = self.rank_rule
        if rule is None:
            rule = "update" if self.inner == "sgd" else "gradient"
        if rule not in ("update", "gradient"):
            raise ValueError(f"rank_rule must be 'update', 'gradient' or None, got {rule!r}")
        return self._replace(
            rank_rule=rule,
            tau=float(self.tau),
            absolute=bool(self.absolute),
            momentum=float(self.momentum),
            nesterov=bool(self.nesterov),
            betas=(float(self.betas[0]), float(self.betas[1])),
            eps=float(self.eps),
            weight_decay=float(self.weight_decay),
        )


def state_size(config: Config) -> int:
    """Number of core-shaped state arrays per weight: 0 (SGD), 1 (momentum) or 2 (Adam)."""
    if config.inner in ("adam", "adamw"):
        return 2
    return 1 if config.momentum else 0


def init_state(config: Config, core: Any) -> tuple:
    """Zero state for a core (padded or not)."""
    xp = namespace_of(core)
    return tuple(
        xp.zeros(core.shape, dtype=core.dtype, device=device_of(core))
        for _ in range(state_size(config))
    )


# --------------------------------------------------------------------------- batching helper
def _grouped(xp: Any, mats: list[Any], fn: Callable[[Any], tuple]) -> list[tuple]:
    """``fn`` on every matrix of ``mats``, one batched call per distinct shape.

    ``fn`` takes a stack ``(g, m, n)`` and returns a tuple of stacks; the result lists, per
    input matrix, the tuple of its slices.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(mats):
        groups.setdefault(tuple(a.shape), []).append(i)
    out: list[Any] = [None] * len(mats)
    for idx in groups.values():
        stacked = xp.stack([mats[i] for i in idx])
        results = fn(stacked)
        for j, i in enumerate(idx):
            out[i] = tuple(r[j, ...] for r in results)
    return out


def _full(xp: Any, value: Any, like: Any) -> Any:
    """A 0-d array of ``like``'s dtype and device (a fill on the device, not a host copy)."""
    return xp.full((), value, dtype=like.dtype, device=device_of(like))


def svd_all(xp: Any, mats: list[Any]) -> list[tuple[Any, Any, Any]]:
    """Reduced SVDs ``(u, s, vh)`` of all matrices with one SVD call.

    An SVD checks its convergence on the host (on a GPU: a device synchronization per call;
    QR has no such check). Each ``m × n`` matrix is first reduced by a QR (batched per shape) to
    a square factor of size ``min(m, n)``; the factors are then placed in one batch of the
    largest size ``N``, each padded with the diagonal block ``c I`` where
    ``c = 1.5 ||S||_F`` exceeds its largest singular value. The padded singular values come
    first and the block structure is exact, so the last ``s`` singular triplets are those of the
    factor, to the SVD's accuracy relative to ``c``. Each matrix is first scaled by the power of
    two nearest its largest entry (exact), so entries near the dtype's limit (a diverging run's
    cores) neither overflow in the norms nor reach LAPACK as infinities; the singular values
    are scaled back.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman.engine import svd_all
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.standard_normal((3, 7)), rng.standard_normal((5, 2))
    >>> [bool(np.allclose(u * s @ vh, m)) for (u, s, vh), m in zip(svd_all(np, [a, b]), [a, b])]
    [True, True]
    """
    if not mats:
        return []
    scales = [_power_of_two_scale(xp, m) for m in mats]
    mats = [m * sc for m, sc in zip(mats, scales)]
    reduced: list[Any] = [None] * len(mats)
    wide = [i for i, m in enumerate(mats) if m.shape[0] < m.shape[1]]
    tall = [i for i, m in enumerate(mats) if m.shape[0] > m.shape[1]]
    for i, m in enumerate(mats):
        if m.shape[0] == m.shape[1]:
            reduced[i] = (None, m, None)
    for (q, r), i in zip(_grouped(xp, [mats[i].mT for i in wide], xp.linalg.qr), wide):
        reduced[i] = (None, r.mT, q)  # m = rᵀ qᵀ: left vectors of rᵀ, right ones through q
    for (q, r), i in zip(_grouped(xp, [mats[i] for i in tall], xp.linalg.qr), tall):
        reduced[i] = (q, r, None)  # m = q r
    sizes = [int(f.shape[0]) for _, f, _ in reduced]
    n = max(sizes)
    padded = []
    for (_, f, _), size in zip(reduced, sizes):
        if size == n:
            padded.append(f)
            continue
        dev, dt = device_of(f), f.dtype
        c = 1.5 * xp.linalg.vector_norm(f)
        c = xp.where(c > 0, c, xp.ones_like(c))
        corner = xp.eye(n - size, dtype=dt, device=dev) * c
        top = xp.concat([f, xp.zeros((size, n - size), dtype=dt, device=dev)], axis=1)
        bottom = xp.concat([xp.zeros((n - size, size), dtype=dt, device=dev), corner], axis=1)
        padded.append(xp.concat([top, bottom], axis=0))
    u_all, s_all, vh_all = _svd(xp, xp.stack(padded))
    out = []
    for i, ((left, _, right), size) in enumerate(zip(reduced, sizes)):
        lo = n - size  # the padding's singular values come first
        u = u_all[i, :size, lo:]
        v = vh_all[i, lo:, :size].mT
        if left is not None:
            u = left @ u
        if right is not None:
            v = right @ v
        out.append((u, s_all[i, lo:] / scales[i], v.mT))
    return out


def _power_of_two_scale(xp: Any, m: Any) -> Any:
    """``2**-e`` with ``2**e`` the power of two nearest ``max |m|`` (1 for a zero matrix)."""
    if not math.prod(m.shape):
        return xp.ones((), dtype=m.dtype, device=device_of(m))
    big = xp.max(xp.abs(m))
    big = xp.where(big > 0, big, xp.ones_like(big))
    return xp.pow(xp.asarray(2.0, dtype=m.dtype, device=device_of(m)), -xp.round(xp.log2(big)))


# --------------------------------------------------------------------------- 1: augmentation
def _compaction(xp: Any, r: Any, b: int, dtype: Any, device: Any) -> Any:
    """Stack of ``2b × 2b`` 0/1 matrices moving columns ``[0, r)`` and ``[b, b + r)`` of
    ``[U, D]`` to the front (``r`` a stack of ranks); the other columns become zero at the end.

    Householder QR of the compacted matrix gives, in its first ``2r`` columns, exactly the
    ``Q`` of ``qr([U[:, :r], D[:, :r]])``; zero columns in between would not.
    """
    j = xp.arange(2 * b, device=device)
    r = r[:, None]
    src = xp.where(j < r, j, xp.where(j < 2 * r, b + j - r, -1))  # (g, 2b)
    i = xp.arange(2 * b, device=device)
    return xp.astype(i[None, :, None] == src[:, None, :], dtype)


def augment(
    layouts: Sequence[Layout], points: Sequence[PaddedTucker], factor_grads: Sequence[Any]
) -> tuple[list[PaddedTucker], list[tuple]]:
    """Augment every basis with its factor gradient; represent each weight exactly there.

    ``Û_k = orth([U_k, ∂L/∂U_k])`` (the span of the paper's K-step: ``[U_k, K_k^new]``), with
    ``min(2 r_k, n_k)`` live columns in a workspace of ``min(2 B_k, n_k)``; the core becomes
    ``C ×_k (Û_kᵀ U_k)``. One batched QR per distinct ``(n_k, B_k)`` over all weights and modes.

    Parameters
    ----------
    layouts : sequence of Layout
    points : sequence of PaddedTucker
        At the layouts' capacities.
    factor_grads : sequence of sequences of arrays
        ``factor_grads[i][k]``: ``∂L/∂U_k`` of weight ``i``, shape ``(n_k, B_k)`` (padded
        columns are ignored).

    Returns
    -------
    (list of PaddedTucker, list of tuples)
        The augmented points (capacity ``layout.workspace``, ranks ``min(2r, n)`` in the
        augmented modes) and per weight the maps ``Û_kᵀU_k`` (None for skipped modes): state
        ``S`` on the old core moves to the augmented core as :func:`transport` ``(S, maps)``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman import engine
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> lay = engine.make_layout(x.shape, (4, 4, 4))
    >>> p = engine.PaddedTucker.from_tucker(x, lay.capacity)
    >>> g = [np.ones((n, 4)) for n in x.shape]
    >>> (a,), (maps,) = engine.augment([lay], [p], [g])
    >>> a.capacity, a.host_ranks(), bool(np.allclose(a.to_dense(), x.to_dense()))
    ((6, 7, 8), (4, 4, 4), True)
    """
    if not (len(layouts) == len(points) == len(factor_grads)):
        raise ValueError(
            f"got {len(layouts)} layouts, {len(points)} points and {len(factor_grads)} "
            "gradient lists"
        )
    if not points:
        return [], []
    xp = namespace_of(points[0].core)
    jobs, mats, ranks = [], [], []
    for i, (lay, p, grads) in enumerate(zip(layouts, points, factor_grads)):
        dev, dt = device_of(p.core), p.core.dtype
        for k in range(lay.ndim):
            if lay.skip[k]:
                continue
            u, g = p.factors[k], grads[k]
            g = g * rank_mask(xp, p.ranks[k], lay.capacity[k], dt, dev)[None, :]
            jobs.append((i, k))
            mats.append(xp.concat([u, g], axis=1))
            ranks.append(p.ranks[k])
    qs: dict[tuple[int, int], Any] = {}
    if mats:
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, m in enumerate(mats):
            groups.setdefault(tuple(m.shape), []).append(j)
        for idx in groups.values():
            n, two_b = (int(s) for s in mats[idx[0]].shape)
            b = two_b // 2
            stack = xp.stack([mats[j] for j in idx])
            r = xp.stack([ranks[j] for j in idx])
            perm = _compaction(xp, r, b, stack.dtype, device_of(stack))
            q, _ = xp.linalg.qr(stack @ perm)  # (g, n, min(n, 2b))
            valid = xp.minimum(2 * r, _full(xp, n, r))
            q = q * rank_mask(xp, valid, q.shape[-1], q.dtype, device_of(q))[:, None, :]
            for g_idx, j in enumerate(idx):
                qs[jobs[j]] = q[g_idx, ...]
    out_points, out_maps = [], []
    for i, (lay, p) in enumerate(zip(layouts, points)):
        core, factors = p.core, []
        maps: list[Any] = []
        for k in range(lay.ndim):
            if lay.skip[k]:
                factors.append(p.factors[k])
                maps.append(None)
                continue
            q = qs[(i, k)]
            m = q.mT @ p.factors[k]
            core = _mp(xp, core, m, k)
            factors.append(q)
            maps.append(m)
        ranks_aug = xp.stack(
            [
                p.ranks[k] if lay.skip[k] else xp.minimum(2 * p.ranks[k], _full(xp, n, p.ranks))
                for k, n in enumerate(lay.shape)
            ]
        )
        out_points.append(PaddedTucker(core, tuple(factors), ranks_aug))
        out_maps.append(tuple(maps))
    return out_points, out_maps


# --------------------------------------------------------------------------- 2': one-pass gradient
def tangent_core_gradients(
    layouts: Sequence[Layout],
    points: Sequence[PaddedTucker],
    augmented: Sequence[PaddedTucker],
    maps: Sequence[tuple],
    core_grads: Sequence[Any],
    factor_grads: Sequence[Sequence[Any]],
) -> list[Any]:
    """The core gradients in the augmented bases from one backward pass (one-pass variant).

    The gradient in the augmented bases is replaced by that of the Riemannian gradient
    ``ξ = Ċ ×_k U_k + Σ_k C ×_k U̇_k ×_{j≠k} U_j`` at the current point
    (``Ċ = ∂L/∂C``, ``U̇_k = (I - U_kU_kᵀ)(∂L/∂U_k)(C_(k)C_(k)ᵀ)⁻¹``):
    ``ξ ×_k Û_kᵀ = Ċ ×_k M_k + Σ_k C ×_k (Û_kᵀU̇_k) ×_{j≠k} M_j`` with ``M_k = Û_kᵀU_k``. The
    Gram inverse goes through the QR factor of ``C_(k)ᵀ`` (padded with the identity on the
    unused rows, which leaves the live block of ``R`` unchanged), one batched QR per distinct
    shape over all weights and modes, and two triangular solves.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman import engine
    >>> x = tm.FixedRankTucker((6, 7, 8), 2).random_point(key=0)
    >>> lay = engine.make_layout(x.shape, (2, 2, 2))
    >>> p = engine.PaddedTucker.from_tucker(x)
    >>> G = np.random.default_rng(1).standard_normal(x.shape)
    >>> dC = tm.multi_mode_product(G, x.factors, transpose=True)
    >>> dU = [tm.unfold(tm.multi_mode_product(G, [u for j, u in enumerate(x.factors) if j != k],
    ...       [j for j in range(3) if j != k], transpose=True), k) @ tm.unfold(x.core, k).T
    ...       for k in range(3)]
    >>> (a,), (maps,) = engine.augment([lay], [p], [dU])
    >>> (g,) = engine.tangent_core_gradients([lay], [p], [a], [maps], [dC], [dU])
    >>> M = tm.FixedRankTucker(x.shape, x.ranks)
    >>> xi = M.tangent_to_dense(x, M.egrad_to_rgrad(x, G))
    >>> ref = tm.multi_mode_product(xi, a.factors, transpose=True)
    >>> bool(np.allclose(g, ref))
    True
    """
    if not points:
        return []
    xp = namespace_of(points[0].core)
    jobs, padded = [], []
    for i, (lay, p) in enumerate(zip(layouts, points)):
        dev, dt = device_of(p.core), p.core.dtype
        for k in range(lay.ndim):
            if lay.skip[k]:
                continue  # U_k spans everything: its tangent part (I - U_kU_kᵀ)(...) vanishes
            unused = 1 - rank_mask(xp, p.ranks[k], lay.capacity[k], dt, dev)
            jobs.append((i, k))
            padded.append(xp.concat([_unfold(xp, p.core, k).mT, _diag(xp, unused)], axis=0))
    rs = {job: r for job, (_, r) in zip(jobs, _grouped(xp, padded, xp.linalg.qr))}
    out = []
    for i, (lay, p, a, m, gc, gu) in enumerate(
        zip(layouts, points, augmented, maps, core_grads, factor_grads)
    ):
        dev, dt = device_of(p.core), p.core.dtype
        g = _apply_maps(xp, gc, m)
        for k in range(lay.ndim):
            if lay.skip[k]:
                continue
            u = p.factors[k]
            b = gu[k] * rank_mask(xp, p.ranks[k], lay.capacity[k], dt, dev)[None, :]
            b = b - u @ (u.mT @ b)
            r = rs[(i, k)]
            # b (C_(k)C_(k)ᵀ)⁻¹ = b R⁻¹ R⁻ᵀ: two triangular solves (no inverse, no host check)
            y = backends.solve_triangular(r.mT, b.mT, upper=False).mT  # y R = b
            du = backends.solve_triangular(r, y.mT, upper=True).mT  # du Rᵀ = y
            t = _mp(xp, p.core, a.factors[k].mT @ du, k)
            for j in _others(lay.ndim, k):
                if m[j] is not None:
                    t = _mp(xp, t, m[j], j)
            g = g + t
        out.append(g)
    return out


def _diag(xp: Any, v: Any) -> Any:
    n = v.shape[0]
    eye = xp.eye(n, dtype=v.dtype, device=device_of(v))
    return eye * v[None, :]


# --------------------------------------------------------------------------- 3: inner update
def inner_update(
    config: Config, core: Any, grad: Any, state: tuple, count: Any, lr: Any
) -> tuple[Any, tuple]:
    """One step of the core's optimizer: returns ``(new_core, new_state)``.

    ``count`` is the 1-based step number (Adam's bias correction), ``lr`` a number or a 0-d
    array. Padded entries stay zero (their gradient and state are zero).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman import engine
    >>> cfg = engine.Config(inner="sgd", momentum=0.9)
    >>> c, (buf,) = engine.inner_update(cfg, np.ones(2), np.ones(2), (np.zeros(2),), 1, 0.5)
    >>> c.tolist(), buf.tolist()
    ([0.5, 0.5], [1.0, 1.0])
    """
    wd = config.weight_decay
    if config.inner == "sgd":
        g = grad + wd * core if wd else grad
        if not config.momentum:
            return core - lr * g, ()
        buf = config.momentum * state[0] + g
        direction = g + config.momentum * buf if config.nesterov else buf
        return core - lr * direction, (buf,)
    b1, b2 = config.betas
    g = grad + wd * core if (wd and config.inner == "adam") else grad
    m = b1 * state[0] + (1 - b1) * g
    v = b2 * state[1] + (1 - b2) * g * g
    xp = namespace_of(core)
    step_size = lr / _one_minus_power(xp, b1, count, core)
    denom = xp.sqrt(v / _one_minus_power(xp, b2, count, core)) + config.eps
    new = core - step_size * (m / denom)
    if wd and config.inner == "adamw":
        new = new - lr * wd * core
    return new, (m, v)


def inner_updates(
    config: Config,
    points: Sequence[PaddedTucker],
    grads: Sequence[Any],
    states: Sequence[tuple],
    counts: Any,
    lr: Any,
) -> tuple[list[PaddedTucker], list[tuple], Any]:
    """:func:`inner_update` of every point's core, and a 0-d flag: every new core and state is
    finite.

    The inner step can overflow even when the gradients are finite (a large learning rate on a
    diverging run). Where the flag is false the new cores are zeros, so the truncation's SVDs
    never see a non-finite value; the driver refuses such a step. ``counts`` is one count for
    all points or one per point. With no points the flag is ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman import engine
    >>> x = engine.PaddedTucker(np.ones((2, 2)), (np.eye(2), np.eye(2)), np.array([2, 2]))
    >>> cfg = engine.Config(inner="sgd")
    >>> _, _, ok = engine.inner_updates(cfg, [x], [np.ones((2, 2))], [()], 1, 0.5)
    >>> bool(ok)
    True
    >>> with np.errstate(over="ignore"):  # NumPy warns of the overflow the flag reports
    ...     new, _, ok = engine.inner_updates(cfg, [x], [np.full((2, 2), 1e308)], [()], 1, -10.0)
    >>> bool(ok), new[0].core.tolist()
    (False, [[0.0, 0.0], [0.0, 0.0]])
    """
    if not isinstance(counts, Sequence):
        counts = [counts] * len(points)
    new_points, new_states = [], []
    for p, g, st, c in zip(points, grads, states, counts):
        core, st = inner_update(config, p.core, g, st, c, lr)
        new_points.append(p._replace(core=core))
        new_states.append(st)
    if not new_points:
        return [], [], None
    finite = all_finite([p.core for p in new_points] + [a for st in new_states for a in st])
    xp = namespace_of(finite)
    new_points = [
        p._replace(core=xp.where(finite, p.core, xp.zeros_like(p.core))) for p in new_points
    ]
    return new_points, new_states, finite


def _one_minus_power(xp: Any, beta: float, count: Any, like: Any) -> Any:
    """``1 - beta**count`` (Adam's bias correction) without cancellation.

    For ``beta`` near 1, ``1 - beta**count`` in float32 loses most digits (``1 - 0.999`` is off
    by 1e-5); ``-expm1(count log(beta))`` keeps them. A Python count is computed in float64.
    """
    if isinstance(count, numbers.Real):
        return 1.0 - beta ** float(count)
    if beta == 0.0:
        return xp.ones_like(xp.astype(count, like.dtype))
    return -xp.expm1(xp.astype(count, like.dtype) * math.log(beta))


def decision_cores(
    config: Config, before: Sequence[Any], after: Sequence[Any], grads: Sequence[Any]
) -> list[Any] | None:
    """The cores whose spectra decide the ranks (None: the updated cores themselves).

    With ``config.rank_rule == "gradient"`` (the default for Adam and AdamW), the core moved
    by the un-preconditioned Galerkin step of the same length as the actual update,
    ``C̃ - η ∇_C̃ L`` with ``η = ||C̃_new - C̃||_F / ||∇_C̃ L||_F``: a direction is kept when the
    gradient, not the optimizer's normalization, puts weight on it. The truncation itself still
    cuts the updated core, in its own singular bases.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman import engine
    >>> cfg = engine.Config(inner="adam").checked()
    >>> c, g = np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 1e-6]])
    >>> new, _ = engine.inner_update(cfg, c, g, engine.init_state(cfg, c), 1, 0.1)
    >>> np.round(np.diag(new), 3).tolist()  # Adam: both directions move by about lr
    [-0.1, -0.099]
    >>> (d,) = engine.decision_cores(cfg, [c], [new], [g])
    >>> bool(abs(d[1, 1]) < 1e-5 * abs(d[0, 0]))  # the gradient step: only the first one
    True
    """
    if config.rank_rule != "gradient":
        return None
    out = []
    for c, n, g in zip(before, after, grads):
        xp = namespace_of(c)
        step = xp.linalg.vector_norm(n - c)
        gnorm = xp.linalg.vector_norm(g)
        eta = xp.where(gnorm > 0, step / xp.where(gnorm > 0, gnorm, xp.ones_like(gnorm)), 0 * step)
        out.append(c - eta * g)
    return out


# --------------------------------------------------------------------------- 4: truncation
def _rank_from_tol(xp: Any, s: Any, threshold: Any, itype: Any) -> Any:
    """Smallest r with ``||s[r:]|| <= threshold`` for descending ``s`` (device int array)."""
    sq = xp.flip(s * s, axis=-1)
    tail = xp.flip(xp.sqrt(xp.cumulative_sum(sq, axis=-1)), axis=-1)  # tail[r] = ||s[r:]||
    return xp.sum(xp.astype(tail > threshold, itype), axis=-1)


def truncate(
    layouts: Sequence[Layout],
    config: Config,
    points: Sequence[PaddedTucker],
    ranks_before: Sequence[Any],
    *,
    fixed_rank: bool = False,
    out_capacity: Sequence[Sequence[int]] | None = None,
    agree: Callable[[list[Any]], Sequence[Any]] | None = None,
    decide: Sequence[Any] | None = None,
) -> tuple[list[PaddedTucker], list[tuple], list[Any]]:
    """Per-mode truncation of augmented points with the rank decision on the device.

    For each mode the SVD ``C_(k) = P_k Σ_k V_kᵀ`` (one batched call per distinct unfolding
    shape over all weights; one SVD of ``C`` for both modes of a matrix). Adaptive modes keep the
    smallest rank whose discarded singular values have 2-norm ``<= ϑ`` (``ϑ = tau ||C||_F`` or
    ``tau``), clipped to ``[min_rank, max_rank]``; the others (and all with ``fixed_rank``)
    keep ``ranks_before``. Ranks are then lowered to the live size and to feasibility
    (``r_k <= prod_{j≠k} r_j``), exactly as :func:`tuckerman.truncate_core` does. The new point
    is ``U_k P_k``, ``C ×_k P_kᵀ`` with the kept columns of ``P_k`` masked to the new rank.

    Parameters
    ----------
    layouts, config
    points : sequence of PaddedTucker
        Augmented points (capacity ``layout.workspace``) after the core update.
    ranks_before : sequence of arrays
        The ranks before augmentation (the targets of the modes that are not adaptive).
    fixed_rank : bool
        Truncate every mode back to ``ranks_before``.
    out_capacity : sequence of capacities, optional
        Capacity of each result (default: the workspace). A rank larger than its output
        capacity is cut to it; the returned ``wanted`` ranks say when that happened.
    agree : callable, optional
        Maps the list of decided rank arrays to the ranks to apply (same shapes), e.g. a
        broadcast of one replica's decisions in data-parallel training.
    decide : sequence of arrays, optional
        Per weight a core of the same shape whose singular values (and norm, for a relative
        ``tau``) decide the adaptive ranks instead of the point's own (:func:`decision_cores`);
        the point is still truncated in its own singular bases. Its SVDs join the same call.

    Returns
    -------
    (points, maps, wanted)
        The truncated points, per weight the maps ``P_kᵀ`` (None for skipped modes; state moves
        as :func:`transport` ``(S, maps)``), and per weight the decided ranks before any cut to
        ``out_capacity``.

    Examples
    --------
    >>> import numpy as np, tuckerman as tm
    >>> from tuckerman import engine
    >>> x = tm.FixedRankTucker((6, 7, 8), 3).random_point(key=0)
    >>> lay = engine.make_layout(x.shape, (3, 3, 3))
    >>> p = engine.PaddedTucker.from_tucker(x)
    >>> (y,), _, (w,) = engine.truncate([lay], engine.Config(tau=0.5), [p], [p.ranks])
    >>> ref, _ = tm.truncate_core(x, tau=0.5)
    >>> y.host_ranks() == ref.ranks, bool(np.allclose(y.to_dense(), ref.to_dense()))
    (True, True)
    """
    if not points:
        return [], [], []
    xp = namespace_of(points[0].core)
    if out_capacity is None:
        out_capacity = [lay.workspace for lay in layouts]
    # the SVD jobs: (weight, mode or -1 for "both modes of a matrix", of the decision core?)
    jobs, mats = [], []
    for i, (lay, p) in enumerate(zip(layouts, points)):
        cores = [(p.core, False)]
        if decide is not None and not fixed_rank and any(lay.adaptive):
            cores.append((decide[i], True))
        for core, dec in cores:
            if lay.ndim == 2 and not all(lay.skip):
                jobs.append((i, -1, dec))
                mats.append(core)
                continue
            for k in range(lay.ndim):
                if not lay.skip[k] and (not dec or lay.adaptive[k]):
                    jobs.append((i, k, dec))
                    mats.append(_unfold(xp, core, k))
    svds = svd_all(xp, mats)
    bases: dict[tuple[int, int], tuple[Any, Any]] = {}
    spectra: dict[tuple[int, int], Any] = {}  # the singular values that decide each rank
    for (i, k, dec), (u, s, vh) in zip(jobs, svds):
        modes = ((0, u), (1, vh.mT)) if k == -1 else ((k, u),)
        for mode, basis in modes:
            if dec:
                spectra[(i, mode)] = s
            else:
                bases[(i, mode)] = (basis, s)
                spectra.setdefault((i, mode), s)
    new_points, all_maps, wanted_all, decided = [], [], [], []
    for i, (lay, p) in enumerate(zip(layouts, points)):
        d = lay.ndim
        itype = p.ranks.dtype
        judged = p.core if decide is None or fixed_rank else decide[i]
        nrm = xp.linalg.vector_norm(judged)
        threshold = config.tau if config.absolute else config.tau * nrm
        valid = p.ranks  # live sizes of the augmented point
        others = xp.prod(valid) // valid
        chosen = []
        for k in range(d):
            if lay.skip[k]:
                chosen.append(_full(xp, lay.capacity[k], valid))
                continue
            available = xp.minimum(xp.minimum(valid[k], others[k]), _full(xp, lay.shape[k], valid))
            if lay.adaptive[k] and not fixed_rank:
                r = _rank_from_tol(xp, spectra[(i, k)], threshold, itype)
                r = xp.maximum(r, _full(xp, lay.min_rank[k], valid))
                r = xp.minimum(r, _full(xp, lay.max_rank[k], valid))
            else:
                r = xp.astype(ranks_before[i][k], itype)
            chosen.append(xp.maximum(xp.minimum(r, available), _full(xp, 1, valid)))
        r_new = xp.stack(chosen)
        # feasibility: at most one mode can exceed the product of the others; lower it
        decided.append(xp.minimum(r_new, xp.prod(r_new) // r_new))
    if agree is not None:  # e.g. replicas taking rank 0's decisions (a device collective)
        decided = list(agree(decided))
    for i, (lay, p) in enumerate(zip(layouts, points)):
        d = lay.ndim
        dev, dt = device_of(p.core), p.core.dtype
        r_new = decided[i]
        wanted_all.append(r_new)
        cap = tuple(int(c) for c in out_capacity[i])
        r_out = xp.stack([xp.minimum(r_new[k], _full(xp, c, r_new)) for k, c in enumerate(cap)])
        core, factors = p.core, []
        maps: list[Any] = []
        for k in range(d):
            if lay.skip[k]:
                maps.append(None)
                factors.append(p.factors[k])
                continue
            pk, _ = bases[(i, k)]
            w = int(pk.shape[0])
            if pk.shape[1] < cap[k]:
                pk = xp.concat(
                    [pk, xp.zeros((w, cap[k] - int(pk.shape[1])), dtype=dt, device=dev)], axis=1
                )
            pk = pk[:, : cap[k]] * rank_mask(xp, r_out[k], cap[k], dt, dev)[None, :]
            m = pk.mT
            maps.append(m)
            core = _mp(xp, core, m, k)
            factors.append(p.factors[k] @ pk)
        new_points.append(PaddedTucker(core, tuple(factors), r_out))
        all_maps.append(tuple(maps))
    return new_points, all_maps, wanted_all


# --------------------------------------------------------------------------- state transport
def _apply_maps(xp: Any, a: Any, maps: Sequence[Any]) -> Any:
    for k, m in enumerate(maps):
        if m is not None:
            a = _mp(xp, a, m, k)
    return a


def transport(state: Any, maps: Sequence[Any], *, second_moment: bool = False) -> Any:
    """Move a core-shaped state along basis maps: ``S ×_k maps[k]`` (None: identity).

    ``second_moment=True`` uses the squared entries of the maps (Adam's ``v``; see
    :func:`tuckerman.transport_core_second_moment`).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman import engine
    >>> engine.transport(np.ones((2, 2)), (np.eye(3, 2), None)).shape
    (3, 2)
    """
    xp = namespace_of(state)
    if second_moment:
        maps = [None if m is None else m * m for m in maps]
    return _apply_maps(xp, state, maps)


def transport_state(config: Config, state: tuple, maps: Sequence[Any]) -> tuple:
    """Move a weight's whole optimizer state (see :func:`state_size`) along ``maps``."""
    if config.inner in ("adam", "adamw"):
        return (transport(state[0], maps), transport(state[1], maps, second_moment=True))
    return tuple(transport(s, maps) for s in state)


def all_finite(arrays: Sequence[Any]) -> Any:
    """A 0-d boolean array: every entry of every array is finite (no host read)."""
    arrays = [a for a in arrays if a is not None]
    xp = namespace_of(*arrays)
    flags = [xp.all(xp.isfinite(a)) for a in arrays]
    return xp.all(xp.stack(flags))


def check_layout_ranks(layout: Layout, ranks: Sequence[int]) -> None:
    """Raise when host ``ranks`` do not fit ``layout`` (capacity, fixed modes, feasibility)."""
    ranks = tuple(int(r) for r in ranks)
    for k, (r, c) in enumerate(zip(ranks, layout.capacity)):
        if r > c:
            raise ValueError(f"ranks {ranks} exceed the capacity {layout.capacity} (mode {k})")
        if not layout.adaptive[k] and layout.skip[k] and r != c:
            raise ValueError(f"mode {k} is fixed at rank {c}, got ranks {ranks}")
    why = feasible_ranks_error(layout.shape, ranks)
    if why is not None:
        raise ValueError(f"infeasible ranks {ranks} for shape {layout.shape}: {why}")
