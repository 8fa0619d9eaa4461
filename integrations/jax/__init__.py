"""JAX integration: Tucker layers as pure functions of pytrees, and optimizers.

* Layers: :func:`tucker_dense`, :func:`tucker_conv` (NHWC, three-stage convolution), with
  :func:`init_tucker_dense`, :func:`init_tucker_conv` and :func:`tucker_from_dense` (HOSVD).
* Rank-adaptive training: :class:`TDLRT` (``init`` / ``step``, jitted once per capacity
  configuration), a driver of the core's device step (:mod:`tuckerman.engine`).
* Fixed-rank Riemannian optimization as optax transformations: :func:`riemannian_gradient`,
  :func:`tangent_momentum`, :func:`riemannian_sgd`, applied with :func:`apply_updates`.
* Data parallelism over devices (``jax.sharding``): :func:`data_parallel`, :func:`data_mesh`,
  :func:`replicate`, :func:`shard_batch`, :func:`replica_divergence`.
* ``jax.vmap`` over batches of Tucker points: :func:`stack_points`, :func:`unstack_points`.

Importing this module registers ``TuckerTensor`` and ``TangentVector`` as JAX pytrees whose
unflattening skips the shape validation, so ``vmap`` can return batches of them.
"""

from tuckerman.integrations.jax._pytree import _register

_register()

from tuckerman.integrations.jax._distributed import (  # noqa: E402
    data_mesh,
    data_parallel,
    replica_divergence,
    replicate,
    shard_batch,
)
from tuckerman.integrations.jax._layers import (  # noqa: E402
    init_tucker_conv,
    init_tucker_dense,
    num_parameters,
    num_parameters_dense,
    tucker_conv,
    tucker_dense,
    tucker_from_dense,
)
from tuckerman.integrations.jax._pytree import stack_points, unstack_points  # noqa: E402
from tuckerman.integrations.jax._riemannian import (  # noqa: E402
    TangentMomentumState,
    apply_updates,
    riemannian_gradient,
    riemannian_sgd,
    tangent_momentum,
)
from tuckerman.integrations.jax._tdlrt import TDLRT, TDLRTState  # noqa: E402

__all__ = [
    "TDLRT",
    "TDLRTState",
    "TangentMomentumState",
    "apply_updates",
    "data_mesh",
    "data_parallel",
    "init_tucker_conv",
    "init_tucker_dense",
    "num_parameters",
    "num_parameters_dense",
    "replica_divergence",
    "replicate",
    "riemannian_gradient",
    "riemannian_sgd",
    "shard_batch",
    "stack_points",
    "tangent_momentum",
    "tucker_conv",
    "tucker_dense",
    "tucker_from_dense",
    "unstack_points",
]
