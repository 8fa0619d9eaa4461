"""The shared linear algebra of the core: mode products, unfoldings, partial contractions, the
SVD with its float64 retry and the host rank decision.

Every function takes the array namespace ``xp`` explicitly and checks nothing: callers validate
their inputs. The public, checked forms (:func:`tuckerman.unfold`, :func:`tuckerman.fold`,
:func:`tuckerman.mode_product`) are in ``_tucker``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import tuckerman.backends as backends


# --------------------------------------------------------------------------- mode algebra
def _others(d: int, k: int) -> tuple[int, ...]:
    return tuple(j for j in range(d) if j != k)


def _mp(xp: Any, t: Any, m: Any, k: int) -> Any:
    """``t ×_k m`` without checks; contracts so that modes 0 and d-1 need no transpose copy."""
    d = t.ndim
    if k == 0:
        return xp.tensordot(m, t, axes=((1,), (0,)))
    if k == d - 1:
        return xp.tensordot(t, m, axes=((k,), (1,)))  # new mode last: already in place
    # a middle mode: batched matmul over a reshape, no transpose copy of t
    s = tuple(t.shape)
    y = xp.matmul(m, xp.reshape(t, (math.prod(s[:k]), s[k], math.prod(s[k + 1 :]))))
    return xp.reshape(y, (*s[:k], m.shape[0], *s[k + 1 :]))


def _unfold(xp: Any, t: Any, k: int) -> Any:
    if k != 0:
        t = xp.permute_dims(t, (k, *_others(t.ndim, k)))
    return xp.reshape(t, (t.shape[0], -1))


def _fold(xp: Any, m: Any, k: int, shape: tuple[int, ...]) -> Any:
    d = len(shape)
    moved = (shape[k], *(shape[j] for j in _others(d, k)))
    t = xp.reshape(m, moved)
    if k == 0:
        return t
    return xp.permute_dims(t, (*range(1, k + 1), 0, *range(k + 1, d)))


def _all_but_one(xp: Any, t: Any, mats: list[Any], modes: list[int] | None = None) -> dict:
    """``{k: t ×_{j≠k} mats[j]}`` for every mode ``k`` in ``modes``, sharing partial products.

    Halving: the modes are split in two; each half is obtained by contracting the *other* half,
    then recursion. For d = 3 this is two passes over ``t`` instead of three. Contractions start
    with the outermost mode (0 or d-1), which NumPy can do without a transpose copy.
    """
    if modes is None:
        modes = list(range(t.ndim))
    if len(modes) == 1:
        return {modes[0]: t}
    half = len(modes) // 2
    left, right = modes[:half], modes[half:]
    t_left = t
    for j in reversed(right):
        t_left = _mp(xp, t_left, mats[j], j)
    t_right = t
    for j in left:
        t_right = _mp(xp, t_right, mats[j], j)
    return {**_all_but_one(xp, t_left, mats, left), **_all_but_one(xp, t_right, mats, right)}


# --------------------------------------------------------------------------- SVD and ranks
def _host_values(a: Any) -> Any:
    """Host NumPy copy for a rank decision; a clear error under jit (JAX tracers)."""
    try:
        return backends.to_numpy(a)
    except Exception as err:  # e.g. a JAX tracer under jit
        raise TypeError(
            "choosing ranks by tolerance needs concrete values and cannot run under jit; "
            "pass fixed ranks instead"
        ) from err


def _host_float(a: Any) -> float:
    return float(_host_values(a))


def _rank_from_tol(xp: Any, s: Any, threshold: float) -> int:
    """Smallest r whose discarded singular values s[r:] have 2-norm <= threshold (host decision)."""
    sv = _host_values(s)
    tail = np.sqrt(np.cumsum((sv.astype(np.float64) ** 2)[::-1])[::-1])  # tail[r] = ||s[r:]||
    tail = np.append(tail, 0.0)
    return int(np.argmax(tail <= threshold))


def _svd(xp: Any, a: Any) -> tuple[Any, Any, Any]:
    """``xp.linalg.svd(a, full_matrices=False)``, retried in float64 when LAPACK fails.

    MKL's divide-and-conquer SVD (behind torch on CPU) fails to converge on some rank-deficient
    float32 matrices, e.g. augmented TDLRT cores when the batch is smaller than the ranks; the
    float64 computation of the same matrix succeeds. The result has ``a``'s dtype.
    """
    try:
        return xp.linalg.svd(a, full_matrices=False)
    except Exception as err:  # each library raises its own LinAlgError
        if a.dtype == xp.float64:
            raise
        try:
            u, s, vh = xp.linalg.svd(xp.astype(a, xp.float64), full_matrices=False)
        except Exception:
            raise err from None
        return xp.astype(u, a.dtype), xp.astype(s, a.dtype), xp.astype(vh, a.dtype)
