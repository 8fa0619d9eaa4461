"""A linear layer whose low-rank weight is one packed ``geoopt.ManifoldParameter``."""

from __future__ import annotations

import math
from typing import Any

import geoopt
import torch
from torch import nn
from torch.nn import functional as F
from tuckerman.integrations.geoopt._manifold import TuckerManifold

from tuckerman.layers import resolve_ranks
from tuckerman.validation import positive_int

__all__ = ["GeooptTuckerLinear"]


class GeooptTuckerLinear(nn.Module):
    r"""``nn.Linear`` whose weight ``W = U_1 C U_2ᵀ`` (``out × in``, rank ``r``) is one
    :class:`geoopt.ManifoldParameter` on :class:`TuckerManifold`, for geoopt's optimizers.

    The forward pass computes ``((x U_2) Cᵀ) U_1ᵀ + b`` from the unpacked views and never forms
    ``W``. The weight starts at a random point whose Frobenius norm matches ``nn.Linear``'s
    default initialization (``‖W‖² = out / 3`` in expectation); the bias as in ``nn.Linear``.
    For rank-adaptive training use :class:`tuckerman.integrations.torch.TuckerLinear` with the
    TDLRT optimizer instead.

    Parameters
    ----------
    in_features, out_features : int
    rank : None, int or float
        As the torch layers' ``ranks`` (:func:`tuckerman.layers.resolve_ranks`): an int
        ``1 <= rank <= min(in_features, out_features)``, a fraction in (0, 1] of that, or None
        (full rank).
    bias : bool
    key : int or torch.Generator, optional
        Seed for the initialization (None: torch's global generator).
    dtype : torch.dtype, optional
        float32 or float64 (default: torch's default dtype).
    device : optional

    Attributes
    ----------
    manifold : TuckerManifold
        The manifold of ``weight`` (shape ``(out_features, in_features)``, ranks ``(r, r)``).
    weight : geoopt.ManifoldParameter
        The packed point ``[vec(C), vec(U_1), vec(U_2)]``.
    bias : torch.nn.Parameter or None

    Examples
    --------
    >>> import geoopt, torch
    >>> from tuckerman.integrations.geoopt import GeooptTuckerLinear
    >>> layer = GeooptTuckerLinear(20, 10, rank=3, key=0)
    >>> layer(torch.ones(4, 20)).shape, layer.weight.shape
    (torch.Size([4, 10]), torch.Size([99]))
    >>> opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-2)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: Any,
        bias: bool = True,
        *,
        key: Any = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        shape = (self.out_features, self.in_features)
        ranks = resolve_ranks(shape, rank, owner=f"GeooptTuckerLinear{shape[::-1]}")
        self.manifold = TuckerManifold(shape, ranks)
        if isinstance(key, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=key))
        else:
            seed = int(torch.randint(0, 2**62, (1,))) if key is None else int(key)
        point = self.manifold.random(key=seed, dtype=dtype, device=device)
        generator = torch.Generator().manual_seed(seed + 1)  # the bias, drawn on the host
        x = self.manifold.unpack(point)
        scale = math.sqrt(self.out_features / 3.0) / float(torch.linalg.vector_norm(x.core))
        with torch.no_grad():
            x.core.mul_(scale)  # a view into ``point``: same factors, scaled core
        self.weight = geoopt.ManifoldParameter(point, manifold=self.manifold)
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            b = torch.rand(self.out_features, generator=generator, dtype=point.dtype)
            self.bias = nn.Parameter((2 * b - 1).mul_(bound).to(point.device))
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        """The weight's rank."""
        return self.manifold.ranks[0]

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``out × in`` matrix (for inspection and tests)."""
        return self.manifold.unpack(self.weight).to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.manifold.unpack(self.weight)
        u1, u2 = w.factors
        h = torch.matmul(x, u2)  # (..., r)
        h = F.linear(h, w.core)  # (..., r)
        return F.linear(h, u1, self.bias)  # (..., out), bias once

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
