"""Tools to test code built on tuckerman: Hypothesis strategies and manifold conformance checks.

- :mod:`tuckerman.testing.strategies`: shapes/ranks, manifolds, points with controllable core
  conditioning, tangent vectors and ambient tensors, for any array library and dtype
  (needs Hypothesis, ``pip install 'tuckerman[test]'``).
- :mod:`tuckerman.testing.checks`: projection, inner product, retraction, transport, gauge
  invariance, and finite-difference gradient / Hessian checks for any manifold object with the
  :class:`~tuckerman.FixedRankTucker` API.
"""

from tuckerman.testing import checks
from tuckerman.testing._build import conditioned_point, to_library

__all__ = ["checks", "conditioned_point", "to_library"]
