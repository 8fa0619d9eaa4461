"""tuckerman: optimization on the manifold of fixed-multilinear-rank (Tucker) tensors.

The core is written once against the Python array API standard: it works on NumPy, PyTorch,
JAX, CuPy and array_api_strict arrays, taking the namespace from its inputs.
"""

from tuckerman._manifold import FixedRankTucker, TangentVector, core_condition
from tuckerman._tucker import (
    TuckerTensor,
    add,
    fold,
    hosvd,
    inner,
    mode_product,
    multi_mode_product,
    norm,
    scale,
    truncate,
    unfold,
)

__version__ = "0.1.0"

__all__ = [
    "FixedRankTucker",
    "TangentVector",
    "TuckerTensor",
    "add",
    "core_condition",
    "fold",
    "hosvd",
    "inner",
    "mode_product",
    "multi_mode_product",
    "norm",
    "scale",
    "truncate",
    "unfold",
]
