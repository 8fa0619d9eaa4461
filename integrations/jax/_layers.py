"""Pure Tucker layer functions and their initializers (parameters are pytrees).

A Tucker layer's parameters are a dict ``{"weight": TuckerTensor, "bias": array or None}``.
The weight ``W = C ×_1 U_1 ⋯ ×_d U_d`` keeps the torch layout: ``(out, in)`` for a dense
layer, ``(C_out, C_in, k_h, k_w)`` for a convolution; the full ``W`` is never formed in the
forward pass. Activations of convolutions are **NHWC** (JAX's native layout).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import tuckerman as tm
from tuckerman.layers import (
    bias_bound,
    check_adaptive_modes,
    count_parameters,
    init_core_std,
    orthonormal_columns,
    resolve_ranks,
    tucker_of_dense,
)
from tuckerman.validation import int_pair

__all__ = [
    "tucker_dense",
    "tucker_conv",
    "init_tucker_dense",
    "init_tucker_conv",
    "tucker_from_dense",
    "num_parameters",
    "num_parameters_dense",
]

_CONV_DIMS = ("NHWC", "OIHW", "NHWC")


# --------------------------------------------------------------------------- checks
def _weight(params: Any, order: int, owner: str) -> tm.TuckerTensor:
    if not isinstance(params, dict) or "weight" not in params:
        raise TypeError(
            f"{owner}: params must be a dict with a 'weight' TuckerTensor (and an optional "
            f"'bias'), got {type(params).__name__}"
        )
    w = params["weight"]
    if not isinstance(w, tm.TuckerTensor) or w.ndim != order:
        raise TypeError(
            f"{owner}: params['weight'] must be a TuckerTensor of order {order}, got "
            f"{type(w).__name__}"
            + (f" of order {w.ndim}" if isinstance(w, tm.TuckerTensor) else "")
        )
    return w


def _bias(params: dict, n_out: int, owner: str) -> Any:
    b = params.get("bias")
    if b is not None and tuple(b.shape) != (n_out,):
        raise ValueError(f"{owner}: bias has shape {tuple(b.shape)}, expected ({n_out},)")
    return b


def _padding(padding: Any) -> Any:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        return ((int(padding), int(padding)),) * 2
    try:
        pads = [tuple(p) if isinstance(p, Sequence) else (p, p) for p in padding]
    except TypeError:
        raise TypeError(
            f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}"
        ) from None
    if len(pads) != 2 or any(
        len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in p)
        for p in pads
    ):
        raise ValueError(
            f"padding must be two (low, high) int pairs or two ints (height, width), got "
            f"{padding!r}"
        )
    return tuple((int(a), int(b)) for a, b in pads)


# --------------------------------------------------------------------------- forward passes
def tucker_dense(params: dict, x: Any) -> Any:
    """``x @ W.T + b`` for a Tucker weight of shape ``(out, in)``, without forming ``W``.

    Computed as ``((x U_2) Cᵀ) U_1ᵀ + b``: ``O(b (in r_2 + r_1 r_2 + out r_1))``.

    Parameters
    ----------
    params : dict
        ``{"weight": TuckerTensor of shape (out, in), "bias": (out,) array or None}``.
    x : array
        Input of shape ``(..., in)``.

    Returns
    -------
    array of shape ``(..., out)``

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tuckerman.integrations.jax import init_tucker_dense, tucker_dense
    >>> p = init_tucker_dense(jax.random.key(0), 8, 6, ranks=3)
    >>> tucker_dense(p, jnp.ones((5, 8))).shape
    (5, 6)
    """
    w = _weight(params, 2, "tucker_dense")
    n_out, n_in = w.shape
    if x.ndim < 1 or x.shape[-1] != n_in:
        raise ValueError(
            f"tucker_dense: input of shape {tuple(x.shape)} does not match the weight "
            f"(out, in) = {w.shape}: expected (..., {n_in})"
        )
    b = _bias(params, n_out, "tucker_dense")
    u_out, u_in = w.factors
    y = ((x @ u_in) @ w.core.T) @ u_out.T
    return y if b is None else y + b


def tucker_conv(
    params: dict,
    x: Any,
    *,
    strides: Any = 1,
    padding: Any = "VALID",
    dilation: Any = 1,
) -> Any:
    """2-D convolution with a Tucker kernel in three stages; NHWC activations.

    Stage 1: 1×1 conv ``C_in → r_2`` (``x U_2``); stage 2: the ``k_h × k_w`` conv
    ``r_2 → r_1`` with the small kernel ``C ×_3 U_3 ×_4 U_4`` (``lax.conv_general_dilated``,
    with ``strides``, ``padding`` and ``dilation``); stage 3: 1×1 conv ``r_1 → C_out``
    (``U_1``) and the bias, once. The full kernel of shape ``(C_out, C_in, k_h, k_w)`` is
    never formed. Grouped convolutions are not supported (there is no ``groups`` argument).

    Parameters
    ----------
    params : dict
        ``{"weight": TuckerTensor of shape (C_out, C_in, k_h, k_w), "bias": (C_out,) or None}``.
    x : array
        Input of shape ``(N, H, W, C_in)`` (NHWC).
    strides, dilation : int or (int, int)
        Window strides and kernel (``rhs``) dilation.
    padding : "VALID", "SAME", int, or ((lo, hi), (lo, hi))
        As in ``lax.conv_general_dilated``; an int pads both sides of both spatial axes.

    Returns
    -------
    array of shape ``(N, H', W', C_out)``

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tuckerman.integrations.jax import init_tucker_conv, tucker_conv
    >>> p = init_tucker_conv(jax.random.key(0), 3, 8, (3, 3), ranks=(4, 2))
    >>> tucker_conv(p, jnp.ones((2, 10, 10, 3), jnp.float32), padding="SAME").shape
    (2, 10, 10, 8)
    """
    w = _weight(params, 4, "tucker_conv")
    c_out, c_in = w.shape[0], w.shape[1]
    if x.ndim != 4 or x.shape[-1] != c_in:
        raise ValueError(
            f"tucker_conv: input of shape {tuple(x.shape)} does not match the weight "
            f"{w.shape} (C_out, C_in, k_h, k_w): expected NHWC (N, H, W, {c_in})"
        )
    strides = int_pair(strides, "strides", 1)
    dilation = int_pair(dilation, "dilation", 1)
    padding = _padding(padding)
    b = _bias(params, c_out, "tucker_conv")
    u1, u2, u3, u4 = w.factors
    kernel = jnp.einsum("abij,ki,lj->abkl", w.core, u3, u4)  # (r_1, r_2, k_h, k_w)
    h = x @ u2  # stage 1
    h = lax.conv_general_dilated(
        h, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=_CONV_DIMS
    )
    y = h @ u1.T  # stage 3
    return y if b is None else y + b


# --------------------------------------------------------------------------- initializers
@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))  # one compilation, not one per operation
def _init(key: Any, shape: tuple, ranks: tuple, fan_in: int, bias: bool, dtype: Any) -> dict:
    keys = jax.random.split(key, len(shape) + 2)
    factors = [
        orthonormal_columns(jax.random.normal(k, (n, r), dtype=dtype))
        for k, n, r in zip(keys, shape, ranks)
    ]
    core = init_core_std(shape, ranks, fan_in) * jax.random.normal(keys[-2], ranks, dtype=dtype)
    b = None
    if bias:
        bound = bias_bound(fan_in)
        b = jax.random.uniform(keys[-1], (shape[0],), dtype=dtype, minval=-bound, maxval=bound)
    return {"weight": tm.TuckerTensor(core, factors), "bias": b}


def init_tucker_dense(
    key: Any,
    in_features: int,
    out_features: int,
    ranks: Any,
    *,
    bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict:
    """Random parameters for :func:`tucker_dense`: orthonormal factors, Gaussian core.

    The dense weight gets torch's default entry variance ``1 / (3 in_features)``
    (``‖W‖_F = ‖C‖_F`` with orthonormal factors); the bias is uniform in ``±1/√in_features``.

    Parameters
    ----------
    key : jax PRNG key
    in_features, out_features : int
    ranks : int or (int, int)
        Ranks of the ``(out, in)`` modes (a matrix: they must be equal).
    bias : bool
    dtype : floating dtype

    Examples
    --------
    >>> import jax
    >>> from tuckerman.integrations.jax import init_tucker_dense
    >>> init_tucker_dense(jax.random.key(0), 800, 500, ranks=20)["weight"].ranks
    (20, 20)
    """
    shape = (int(out_features), int(in_features))
    ranks = resolve_ranks(shape, ranks, owner="init_tucker_dense")
    return _init(key, shape, ranks, shape[1], bias, dtype)


def init_tucker_conv(
    key: Any,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    ranks: Any,
    *,
    bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict:
    """Random parameters for :func:`tucker_conv` (weight shape ``(C_out, C_in, k_h, k_w)``).

    ``ranks``: an int or two ints for the channel modes (window modes full rank), or four ints.

    Examples
    --------
    >>> import jax
    >>> from tuckerman.integrations.jax import init_tucker_conv
    >>> init_tucker_conv(jax.random.key(0), 20, 50, 5, ranks=(10, 8))["weight"].ranks
    (10, 8, 5, 5)
    """
    kh, kw = int_pair(kernel_size, "kernel_size", 1)
    shape = (int(out_channels), int(in_channels), kh, kw)
    ranks = resolve_ranks(shape, ranks, owner="init_tucker_conv")
    return _init(key, shape, ranks, shape[1] * kh * kw, bias, dtype)


def tucker_from_dense(
    weight: Any,
    ranks: Any = None,
    bias: Any = None,
    *,
    tau: float | None = None,
    adaptive_modes: Sequence[int] = (0, 1),
) -> dict:
    """Layer parameters from a dense weight by truncated HOSVD (``tuckerman.layers``).

    Parameters
    ----------
    weight : array
        ``(out, in)`` or ``(C_out, C_in, k_h, k_w)`` (torch layout; transpose a flax
        ``(in, out)`` kernel first).
    ranks : None, int, float in (0, 1], pair, or one int per mode
        As for the torch layers (:func:`tuckerman.layers.resolve_ranks`); None: full rank.
    bias : array, optional
    tau : float, optional
        Relative tolerance: the adaptive modes get the smallest ranks (capped by ``ranks``)
        with ``‖W - W_tucker‖_F <= tau ‖W‖_F``.
    adaptive_modes : sequence of int

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tuckerman.integrations.jax import tucker_from_dense
    >>> p = tucker_from_dense(jnp.eye(6, 4), ranks=4)
    >>> bool(jnp.allclose(p["weight"].to_dense(), jnp.eye(6, 4), atol=1e-6))
    True
    """
    shape = tuple(int(n) for n in weight.shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"weight must have 2 or 4 modes, got shape {shape}")
    ranks = resolve_ranks(shape, ranks, owner="tucker_from_dense")
    modes = check_adaptive_modes(adaptive_modes, len(shape), "tucker_from_dense")
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({shape[0]},)")
    return {"weight": tucker_of_dense(weight, ranks, tau, modes), "bias": bias}


def num_parameters(params: dict) -> int:
    """Parameters of a Tucker layer: core, factors and bias (the torch layers' count).

    Counts at the padded shapes; use :meth:`TDLRT.compact` first for the true ranks.

    Examples
    --------
    >>> import jax
    >>> from tuckerman.integrations.jax import init_tucker_dense, num_parameters
    >>> num_parameters(init_tucker_dense(jax.random.key(0), 8, 6, ranks=2))
    38
    """
    w = _weight(params, len(params["weight"].factors), "num_parameters")
    return count_parameters(w.shape, w.ranks, params.get("bias") is not None)


def num_parameters_dense(params: dict) -> int:
    """Parameters of the same dense layer: ``prod(weight shape)`` plus the bias.

    Examples
    --------
    >>> import jax
    >>> from tuckerman.integrations.jax import init_tucker_dense, num_parameters_dense
    >>> num_parameters_dense(init_tucker_dense(jax.random.key(0), 8, 6, ranks=2))
    54
    """
    w = _weight(params, len(params["weight"].factors), "num_parameters_dense")
    return math.prod(w.shape) + (0 if params.get("bias") is None else int(w.shape[0]))
