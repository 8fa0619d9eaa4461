"""The device-grade TDLRT step: padded points with ranks on the device, pure static-shape steps.

The torch optimizer (:class:`tuckerman.integrations.torch.TDLRT`) and the JAX transform
(:class:`tuckerman.integrations.jax.TDLRT`) drive these functions; the literal, unpadded
building blocks (:func:`tuckerman.augment_basis`, :func:`tuckerman.truncate_core`,
:func:`tuckerman.tdlrt_step`, ...) stay the reference they are tested against.
"""

from tuckerman.engine._padded import (
    PaddedTucker,
    capacity_of,
    capacity_sizes,
    check_capacity_policy,
    fit_array,
    next_capacity,
    pad_array,
    rank_mask,
    trim_array,
)
from tuckerman.engine._step import (
    Config,
    Layout,
    all_finite,
    augment,
    check_rank_bound,
    decision_cores,
    init_state,
    inner_update,
    inner_updates,
    make_layout,
    state_size,
    svd_all,
    tangent_core_gradients,
    transport,
    transport_state,
    truncate,
)

__all__ = [
    "Config",
    "Layout",
    "PaddedTucker",
    "all_finite",
    "augment",
    "capacity_of",
    "capacity_sizes",
    "check_capacity_policy",
    "check_rank_bound",
    "decision_cores",
    "fit_array",
    "init_state",
    "inner_update",
    "inner_updates",
    "make_layout",
    "next_capacity",
    "pad_array",
    "rank_mask",
    "state_size",
    "svd_all",
    "tangent_core_gradients",
    "transport",
    "transport_state",
    "trim_array",
    "truncate",
]
