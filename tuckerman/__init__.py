"""tuckerman: optimization on the manifold of fixed-multilinear-rank (Tucker) tensors.

The core is written once against the Python array API standard: it works on NumPy, PyTorch,
JAX, CuPy and array_api_strict arrays, taking the namespace from its inputs.
"""

from tuckerman._factor_grads import rgrad_from_factor_grads
from tuckerman._manifold import FixedRankTucker, TangentVector, core_condition
from tuckerman._sparse import SparseTensor, entries
from tuckerman._tdlrt import (
    augment,
    augment_basis,
    core_gradient,
    fixed_rank_step,
    galerkin_step,
    tdlrt_step,
    transport_core_second_moment,
    transport_core_state,
    truncate_core,
)
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
from tuckerman.validation import feasible_ranks

__version__ = "0.1.0"

__all__ = [
    "FixedRankTucker",
    "SparseTensor",
    "augment",
    "augment_basis",
    "core_gradient",
    "entries",
    "feasible_ranks",
    "fixed_rank_step",
    "galerkin_step",
    "tdlrt_step",
    "transport_core_second_moment",
    "transport_core_state",
    "truncate_core",
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
    "rgrad_from_factor_grads",
    "scale",
    "truncate",
    "unfold",
]
