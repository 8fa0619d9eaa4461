"""Data-parallel TDLRT with ``jax.sharding``: replicated parameters, a batch split over devices.

Design (see ``docs/distributed.md``, "JAX data parallelism"): a :class:`jax.sharding.Mesh` with
a data axis; the parameters and the :class:`TDLRTState` are *replicated* on every device of the
mesh (``NamedSharding(mesh, P())``) and each batch is *split* along its leading axis
(``NamedSharding(mesh, P(axis))``). The jitted TDLRT step is the single-device program: the loss
is the mean over the global batch, and XLA inserts the all-reduce of its gradients (twice per
step: once for the gradient at the point, once in the augmented bases). Everything after the
gradients (QR, SVDs, the rank decision) is computed from replicated values by the same program,
and its outputs are pinned to the replicated sharding. The host reads one copy of the new ranks
to choose the padded shapes, so there is one decision per process.

The step itself is unchanged: :func:`data_parallel` only gives :class:`TDLRT` the shardings
of its jitted step and of its inputs, so the rank-bucket logic (host reads, re-padding when a
bucket is outgrown) works on sharded arrays and the step still compiles once per bucket.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["data_mesh", "data_parallel", "replica_divergence", "replicate", "shard_batch"]


def _check_mesh(mesh: Any, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis {axis!r} is not an axis of the mesh (axis names {tuple(mesh.axis_names)}, "
            f"shape {dict(mesh.shape)})"
        )


def data_mesh(devices: Any = None, axis: str = "data") -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices, every process).

    Parameters
    ----------
    devices : sequence of jax.Device, optional
        Default ``jax.devices()``: every device of every process (multi-host included, after
        ``jax.distributed.initialize()``).
    axis : str
        The name of the data axis.

    Returns
    -------
    jax.sharding.Mesh

    Examples
    --------
    >>> import jax
    >>> from tuckerman.integrations.jax import data_mesh
    >>> mesh = data_mesh()
    >>> mesh.axis_names, mesh.shape["data"] == len(jax.devices())
    (('data',), True)
    """
    if not isinstance(axis, str) or not axis:
        raise TypeError(f"axis must be a non-empty str, got {axis!r}")
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty: a mesh needs at least one device")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise TypeError(f"devices must be jax.Device objects, got {bad[0]!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices contains duplicates: {devices}")
    return Mesh(np.array(devices, dtype=object), (axis,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` replicated on every device of ``mesh`` (``NamedSharding(mesh,
    P())``); arrays already replicated there are returned as they are (no copy).

    With several processes every process must pass the same values (e.g. parameters
    initialized from the same key), as for any replicated ``jax.Array``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tuckerman.integrations.jax import data_mesh, replicate
    >>> x = replicate({"w": jnp.ones((3, 2))}, data_mesh())
    >>> x["w"].sharding.is_fully_replicated
    True
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Split every array of ``batch`` along its leading axis over the ``axis`` of ``mesh``.

    Parameters
    ----------
    batch : pytree of arrays
        Every leaf has a leading batch axis whose size divides by the number of devices along
        ``axis`` (of this process). With one process, ``batch`` is the global batch. With
        several processes (``jax.distributed.initialize``), each passes its own part of the
        global batch (``jax.make_array_from_process_local_data``), in process order.
    mesh : jax.sharding.Mesh
    axis : str
        The mesh axis the batch is split over (the other mesh axes hold copies).

    Returns
    -------
    pytree of jax.Array
        The same structure, each leaf a global array sharded as ``P(axis)``; a leaf that is
        already sharded so is returned as it is.

    Raises
    ------
    ValueError
        A leaf without a leading axis, or whose leading size does not divide by the number of
        devices (the message names the leaf, its shape and the device count).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tuckerman.integrations.jax import data_mesh, shard_batch
    >>> mesh = data_mesh()
    >>> x, y = shard_batch((jnp.ones((8, 3)), jnp.zeros(8, dtype=jnp.int32)), mesh)
    >>> x.shape, len(x.addressable_shards) == mesh.shape["data"]
    ((8, 3), True)
    """
    _check_mesh(mesh, axis)
    sharding = NamedSharding(mesh, P(axis))
    multi = jax.process_count() > 1
    n_dev = mesh.local_mesh.shape[axis] if multi else mesh.shape[axis]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError("batch has no arrays to shard")
    out = []
    for path, leaf in leaves:
        name = "batch" + jax.tree_util.keystr(path)
        shape = tuple(np.shape(leaf))
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, len(shape)):
            out.append(leaf)
            continue
        if not shape:
            raise ValueError(
                f"{name} is a scalar (shape ()): every batch leaf needs a leading batch axis to "
                f"split over the {n_dev} devices of mesh axis {axis!r}"
            )
        if shape[0] % n_dev:
            raise ValueError(
                f"{name} has shape {shape}: its leading (batch) size {shape[0]} does not divide "
                f"by the {n_dev} devices of mesh axis {axis!r}; use a batch size that is a "
                f"multiple of {n_dev}"
            )
        if multi:
            out.append(jax.make_array_from_process_local_data(sharding, np.asarray(leaf)))
        else:
            out.append(jax.device_put(leaf, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def replica_divergence(tree: Any) -> float:
    """The largest difference between the copies of the replicated arrays of ``tree``.

    For every ``jax.Array`` leaf that is fully replicated, the maximum absolute difference
    between its addressable shards (the per-device copies in this process) and its first one;
    0.0 when every copy is bit-identical (or for a single device). NaNs count as different.

    Raises
    ------
    ValueError
        A leaf is not a fully replicated ``jax.Array`` (the message names it and its
        sharding).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tuckerman.integrations.jax import data_mesh, replica_divergence, replicate
    >>> replica_divergence(replicate({"w": jnp.arange(4.0)}, data_mesh()))
    0.0
    """
    worst = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "tree" + jax.tree_util.keystr(path)
        if not isinstance(leaf, jax.Array) or not leaf.sharding.is_fully_replicated:
            what = leaf.sharding if isinstance(leaf, jax.Array) else type(leaf).__name__
            raise ValueError(f"{name} is not a fully replicated jax.Array: {what}")
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        first = shards[0]
        for s in shards[1:]:
            if first.size == 0 or np.array_equal(s, first, equal_nan=True):
                continue
            diff = np.abs(s.astype(np.float64) - first.astype(np.float64))
            worst = max(worst, float(np.max(diff)) if not np.isnan(diff).any() else np.inf)
    return worst


class _DataParallelPlacement:
    """What :class:`TDLRT` calls in ``step`` when it trains data-parallel."""

    def __init__(self, mesh: Mesh, axis: str) -> None:
        self.mesh, self.axis = mesh, axis
        self.replicated = NamedSharding(mesh, P())

    def replicate(self, tree: Any) -> Any:
        return replicate(tree, self.mesh)

    def shard_batch(self, batch: Any) -> Any:
        return shard_batch(batch, self.mesh, self.axis)


def data_parallel(tx: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Make :class:`TDLRT` ``tx`` train data-parallel over the ``axis`` of ``mesh``.

    ``tx`` is configured in place and returned. Its jitted step then takes the parameters and
    the state replicated on every device and the batch split along its leading axis over
    ``axis``, and returns replicated parameters, state and loss. :meth:`TDLRT.step` places its
    inputs so (a no-op for inputs already placed, e.g. by :func:`replicate` and
    :func:`shard_batch`), so a plain training loop is unchanged. The loss and its gradients are
    those of the global batch (XLA all-reduces the gradients); the rank decisions are made from
    replicated values, so every device takes the same ones, and the result equals a
    single-device step on the same global batch up to the rounding of the reduction.

    Parameters
    ----------
    tx : TDLRT
    mesh : jax.sharding.Mesh
        E.g. :func:`data_mesh` (all devices). Other mesh axes hold copies of the batch.
    axis : str
        The data axis of ``mesh``.

    Returns
    -------
    TDLRT
        ``tx`` itself. Its compiled steps so far are dropped (the next step compiles again).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tuckerman.integrations.jax import (
    ...     TDLRT, data_mesh, data_parallel, init_tucker_dense, tucker_dense)
    >>> params = {"fc": init_tucker_dense(jax.random.key(0), 8, 6, ranks=4)}
    >>> def loss_fn(p, batch):
    ...     x, y = batch
    ...     return jnp.mean((tucker_dense(p["fc"], x) - y) ** 2)
    >>> tx = data_parallel(TDLRT(0.1, tau=0.1), data_mesh())
    >>> state = tx.init(params)
    >>> batch = (jnp.ones((16, 8)), jnp.zeros((16, 6)))  # 16 must divide by the device count
    >>> params, state, loss = tx.step(params, state, loss_fn, batch)
    >>> params["fc"]["weight"].core.sharding.is_fully_replicated
    True
    """
    from tuckerman.integrations.jax._tdlrt import TDLRT

    if not isinstance(tx, TDLRT):
        raise TypeError(f"tx must be a TDLRT, got {type(tx).__name__}")
    _check_mesh(mesh, axis)
    tx._set_placement(_DataParallelPlacement(mesh, axis))
    return tx
