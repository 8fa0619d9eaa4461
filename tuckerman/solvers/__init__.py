"""Solvers for optimization problems on Tucker tensors.

- :class:`Problem`: a cost on a :class:`~tuckerman.FixedRankTucker` manifold or a rank-adaptive
  :class:`TuckerDomain`, with its Euclidean gradient (and optionally Hessian), or with
  gradients from torch / JAX autodiff.
- :func:`rgd` (Riemannian gradient descent, Armijo backtracking), :func:`rcg` (Riemannian
  conjugate gradients), :func:`trust_region` (Riemannian trust region with truncated CG),
  :func:`rank_adaptive` (TDLRT steps).
- Each returns a :class:`Result` with a per-iteration log of :class:`LogEntry` records.
"""

from tuckerman.solvers._adaptive import rank_adaptive
from tuckerman.solvers._autodiff import rgrad_from_factor_grads
from tuckerman.solvers._problem import Problem, TuckerDomain
from tuckerman.solvers._rcg import BETA_RULES, rcg
from tuckerman.solvers._result import STOP_REASONS, LogEntry, Result
from tuckerman.solvers._rgd import rgd
from tuckerman.solvers._trust_region import trust_region

__all__ = [
    "BETA_RULES",
    "LogEntry",
    "Problem",
    "Result",
    "STOP_REASONS",
    "TuckerDomain",
    "rank_adaptive",
    "rcg",
    "rgd",
    "rgrad_from_factor_grads",
    "trust_region",
]
