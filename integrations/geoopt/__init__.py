"""geoopt bridge: the fixed-rank Tucker manifold for geoopt's Riemannian optimizers.

Installed as ``tuckerman.integrations.geoopt``; needs ``geoopt`` (the ``geoopt`` extra:
``pip install ".[geoopt]"`` from a checkout).

- :class:`TuckerManifold`: a :class:`geoopt.Manifold` whose points are packed 1-D tensors
  ``[vec(C), vec(U_1), ..., vec(U_d)]``, so that one :class:`geoopt.ManifoldParameter` holds a
  Tucker tensor (or, as in every geoopt manifold, a stack of them along leading batch
  dimensions); :meth:`~TuckerManifold.unpack` gives the differentiable
  :class:`~tuckerman.TuckerTensor` for the forward pass. The mathematics is
  :class:`tuckerman.FixedRankTucker`'s.
- :class:`GeooptTuckerLinear`: a low-rank ``nn.Linear`` built on it.
- :func:`load_optimizer_state`: resume a geoopt optimizer from a checkpoint exactly
  (``RiemannianAdam``'s step counters stay integers).
"""

try:
    import geoopt as _geoopt  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without geoopt
    raise ImportError(
        "tuckerman.integrations.geoopt needs geoopt: pip install geoopt, or the geoopt extra "
        "(pip install '.[geoopt]' from a checkout of tuckerman)"
    ) from err

from tuckerman.integrations.geoopt._checkpoint import load_optimizer_state
from tuckerman.integrations.geoopt._layers import GeooptTuckerLinear
from tuckerman.integrations.geoopt._manifold import TuckerManifold

__all__ = ["GeooptTuckerLinear", "TuckerManifold", "load_optimizer_state"]
