"""What a Tucker layer is, independent of the framework that runs it.

The torch, JAX and geoopt layers keep only parameter creation and the forward pass; these
functions decide everything else the same way for all of them: which ranks a rank argument
means (:func:`resolve_ranks`), which modes may adapt (:func:`check_adaptive_modes`), how a
random layer is initialized (:func:`orthonormal_columns`, :func:`init_core_std`,
:func:`bias_bound`), how a dense weight becomes a Tucker weight (:func:`tucker_of_dense`), and
how parameters are counted (:func:`count_parameters`).

A weight has the dense layer's layout: ``(out, in)`` for a linear layer, ``(C_out, C_in, k_h,
k_w)`` for a convolution. Modes 0 and 1 are the channel modes; the others (a kernel's window)
are full rank unless given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from tuckerman._compat import namespace_of
from tuckerman._tdlrt import truncate_core
from tuckerman._tucker import TuckerTensor, hosvd
from tuckerman.validation import feasible_ranks, feasible_ranks_error, full_ranks

__all__ = [
    "resolve_ranks",
    "check_adaptive_modes",
    "orthonormal_columns",
    "init_core_std",
    "bias_bound",
    "tucker_of_dense",
    "count_parameters",
]


def resolve_ranks(
    shape: Sequence[int], ranks: Any, *, owner: str = "ranks", clip: bool = False
) -> tuple[int, ...]:
    """Turn a layer's rank argument into one feasible rank per mode of a weight of ``shape``.

    Parameters
    ----------
    shape : sequence of int
        The weight shape (``(out, in)`` or ``(out, in, k_h, k_w)``).
    ranks : None, int, float, or sequence of int
        None: full rank. An int ``r``: rank ``r`` for both channel modes. A float in (0, 1]: that
        fraction of the full rank of each channel mode (rounded, at least 1). A sequence: one
        rank per mode, or, for a weight of more than two modes, two ranks for the channel modes.
        Window modes are full rank unless given.
    owner : str
        Names the layer in error messages.
    clip : bool
        Lower ranks larger than the mode sizes, or infeasible ones, instead of raising.

    Examples
    --------
    >>> from tuckerman.layers import resolve_ranks
    >>> resolve_ranks((64, 32, 3, 3), 0.25), resolve_ranks((64, 32, 3, 3), 8)
    ((16, 8, 3, 3), (8, 8, 3, 3))
    >>> resolve_ranks((10, 20), None), resolve_ranks((10, 20), 50, clip=True)
    ((10, 10), (10, 10))
    """
    shape = tuple(int(n) for n in shape)
    d = len(shape)
    full = full_ranks(shape)
    if ranks is None:
        return full
    if isinstance(ranks, numbers.Real) and not isinstance(ranks, numbers.Integral):
        f = float(ranks)
        if not (0.0 < f <= 1.0):
            raise ValueError(
                f"{owner}: a fractional rank must be in (0, 1] (a fraction of the full rank), "
                f"got {ranks!r}"
            )
        wanted = [max(1, math.floor(f * full[k] + 0.5)) for k in range(2)] + list(full[2:])
        return feasible_ranks(wanted)
    if isinstance(ranks, bool):
        raise TypeError(f"{owner}: ranks must be an int, a float in (0, 1] or a tuple, got {ranks}")
    if isinstance(ranks, numbers.Integral):
        ranks = (int(ranks), int(ranks))
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(
            f"{owner}: ranks must be None, an int, a float in (0, 1] or a sequence of ints, "
            f"got {ranks!r}"
        )
    ranks = tuple(ranks)
    if len(ranks) == 2 and d > 2:
        ranks = ranks + full[2:]
    if len(ranks) != d:
        allowed = f"{d}" if d == 2 else f"2 (the channel modes) or {d}"
        raise ValueError(
            f"{owner}: ranks {ranks} has {len(ranks)} entries; expected {allowed} for a weight "
            f"of shape {shape}"
        )
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"{owner}: ranks[{k}] must be an integer, got {r!r} in {ranks}")
        if r <= 0:
            raise ValueError(f"{owner}: ranks must be positive, got ranks[{k}] = {r} in {ranks}")
    ranks = tuple(int(r) for r in ranks)
    if clip:
        return feasible_ranks([min(r, n) for r, n in zip(ranks, shape)])
    why = feasible_ranks_error(shape, ranks)
    if why is not None:
        hint = " (a matrix's row and column ranks are equal)" if d == 2 else ""
        raise ValueError(f"{owner}: infeasible ranks {ranks} for weight shape {shape}: {why}{hint}")
    return ranks


def check_adaptive_modes(adaptive_modes: Any, d: int, owner: str = "adaptive_modes") -> tuple:
    """Validate the modes a rank-adaptive optimizer may change: an int or a sequence of modes
    in ``[0, d)``; returned sorted without repeats.

    Examples
    --------
    >>> from tuckerman.layers import check_adaptive_modes
    >>> check_adaptive_modes((1, 0, 1), 4), check_adaptive_modes(2, 4)
    ((0, 1), (2,))
    """
    if isinstance(adaptive_modes, numbers.Integral) and not isinstance(adaptive_modes, bool):
        adaptive_modes = (adaptive_modes,)
    try:
        modes = tuple(adaptive_modes)
    except TypeError:
        raise TypeError(
            f"{owner}: adaptive_modes must be a sequence of modes in [0, {d}), "
            f"got {adaptive_modes!r}"
        ) from None
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= int(m) < d:
            raise ValueError(
                f"{owner}: adaptive_modes entries must be modes in [0, {d}), got {modes!r}"
            )
    return tuple(sorted({int(m) for m in modes}))


def orthonormal_columns(gaussian: Any) -> Any:
    """Orthonormal columns from a Gaussian matrix: its QR factor ``Q`` with the signs fixed by
    ``diag(R) > 0`` (so the distribution is Haar, and a seed gives one answer everywhere).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman.layers import orthonormal_columns
    >>> q = orthonormal_columns(np.random.default_rng(0).standard_normal((5, 3)))
    >>> bool(np.allclose(q.T @ q, np.eye(3)))
    True
    """
    xp = namespace_of(gaussian)
    q, r = xp.linalg.qr(gaussian)
    d = xp.linalg.diagonal(r)
    return q * xp.where(d < 0, -xp.ones_like(d), xp.ones_like(d))[..., None, :]


def init_core_std(shape: Sequence[int], ranks: Sequence[int], fan_in: int) -> float:
    """The entry standard deviation of a Gaussian core that gives the dense weight the mean
    entry variance of PyTorch's default (Kaiming-uniform, ``a=√5``) initialization of the same
    dense layer, ``1 / (3 fan_in)``: with orthonormal factors ``‖W‖_F = ‖C‖_F``.

    Examples
    --------
    >>> from tuckerman.layers import init_core_std
    >>> round(init_core_std((10, 20), (10, 10), fan_in=20), 4)  # sqrt(200 / (60 * 100))
    0.1826
    """
    return math.sqrt(math.prod(shape) / (3.0 * fan_in * math.prod(ranks)))


def bias_bound(fan_in: int) -> float:
    """The bias is uniform in ``±1/√fan_in``, as in ``nn.Linear`` / ``nn.Conv2d``."""
    return 1.0 / math.sqrt(fan_in)


def tucker_of_dense(
    weight: Any,
    ranks: Sequence[int],
    tau: float | None = None,
    adaptive_modes: Sequence[int] = (0, 1),
) -> TuckerTensor:
    """A dense weight as a Tucker weight: HOSVD at ``ranks``, or by tolerance ``tau``.

    With ``tau`` the adaptive modes get the smallest ranks (at most ``ranks``) with
    ``‖W - W_tucker‖_F <= tau ‖W‖_F``; the other modes keep ``ranks``. Computed in at least
    float32 (half-precision weights are promoted), in the weight's library.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerman.layers import tucker_of_dense
    >>> w = np.random.default_rng(0).standard_normal((6, 8))
    >>> x = tucker_of_dense(w, (6, 6))
    >>> x.ranks, bool(np.allclose(x.to_dense(), w))
    ((6, 6), True)
    >>> tucker_of_dense(w, (6, 6), tau=0.5).ranks
    (3, 3)
    """
    xp = namespace_of(weight)
    if xp.isdtype(weight.dtype, "real floating") and weight.dtype not in (xp.float32, xp.float64):
        weight = xp.astype(weight, xp.float32)
    ranks = tuple(int(r) for r in ranks)
    if tau is None:
        return hosvd(weight, ranks)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number or None, got {tau!r}")
    tau = float(tau)
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    modes = tuple(adaptive_modes)
    # exact HOSVD at the ranks of the fixed modes, then per-mode truncation of the
    # (all-orthogonal) core: the adaptive modes keep the smallest ranks whose discarded
    # singular values have norm <= tau ||W|| / sqrt(#adaptive), capped by `ranks`
    full = full_ranks(weight.shape)
    caps = tuple(f if k in modes else r for k, (r, f) in enumerate(zip(ranks, full)))
    x = hosvd(weight, caps)
    if not modes:
        return x
    norm = float(xp.linalg.vector_norm(weight))
    x, _ = truncate_core(
        x,
        tau=tau * norm / math.sqrt(len(modes)),
        absolute=True,
        ranks=ranks,
        max_rank=ranks,
        adaptive_modes=modes,
    )
    return x


def count_parameters(shape: Sequence[int], ranks: Sequence[int], bias: bool) -> int:
    """Parameters of a Tucker layer at ``ranks``: core, factors, and the bias.

    Examples
    --------
    >>> from tuckerman.layers import count_parameters
    >>> count_parameters((10, 20), (4, 4), bias=True)  # 16 + 40 + 80 + 10
    146
    """
    n = math.prod(ranks) + sum(int(s) * int(r) for s, r in zip(shape, ranks))
    return n + (int(shape[0]) if bias else 0)
