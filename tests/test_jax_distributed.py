"""Data-parallel TDLRT in JAX (``jax.sharding``): on two (forced host) devices with the batch
split, the training run equals the one-device run on the same global batches, every rank
decision included, and the per-device copies of the parameters and state stay bit-identical.

The two-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX
starts, so it runs in a subprocess (this process has already initialized JAX with one CPU
device); the worker is this file run as a script, and reports back through a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from tuckerman.integrations.jax import (  # noqa: E402
    TDLRT,
    data_mesh,
    data_parallel,
    init_tucker_conv,
    init_tucker_dense,
    replica_divergence,
    replicate,
    shard_batch,
    tucker_conv,
    tucker_dense,
)

DIMS = ("NHWC", "OIHW", "NHWC")
STEPS = 20
GLOBAL_BATCH = 16


# --------------------------------------------------------------------------- the model
def _init_params(key, dtype=jnp.float64):
    k = jax.random.split(key, 3)
    w1 = jax.random.uniform(k[0], (6, 1, 3, 3), dtype, -1 / 3, 1 / 3)
    return {
        "conv1": {"w": w1, "b": jnp.zeros((6,), dtype)},
        "conv2": init_tucker_conv(k[1], 6, 12, 3, ranks=(2, 2), dtype=dtype),
        "fc": init_tucker_dense(k[2], 48, 10, ranks=2, dtype=dtype),
    }


def _pool(h):
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _loss_fn(params, batch):
    x, y = batch  # x: (N, 14, 14, 1)
    h = lax.conv_general_dilated(x, params["conv1"]["w"], (1, 1), "VALID", dimension_numbers=DIMS)
    h = _pool(jax.nn.relu(h + params["conv1"]["b"]))  # (N, 6, 6, 6)
    h = _pool(jax.nn.relu(tucker_conv(params["conv2"], h)))  # (N, 2, 2, 12)
    logits = tucker_dense(params["fc"], h.reshape(h.shape[0], -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data(n):
    from tuckerman.datasets import load_mnist

    images, labels = load_mnist("train")
    x = images[:n, 0].reshape(n, 14, 2, 14, 2).mean(axis=(2, 4))[..., None]
    return x.astype(np.float64), labels[:n].astype(np.int32)


def _make_tx():
    return TDLRT(0.2, tau=0.01, momentum=0.9, adaptive_modes=(0, 1))


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


# --------------------------------------------------------------------------- the worker
def _train(tx, params, x, y, *, sharded):
    """STEPS steps on fixed global batches; per-step checks of the replicas when sharded."""
    state = tx.init(params)
    losses, divergence, not_replicated, shards = [], 0.0, [], set()
    for step in range(STEPS):
        lo = (step * GLOBAL_BATCH) % len(x)
        batch = (x[lo : lo + GLOBAL_BATCH], y[lo : lo + GLOBAL_BATCH])
        if sharded:
            batch = shard_batch(batch, tx._placement.mesh)
            shards.add(tuple(s.data.shape[0] for s in batch[0].addressable_shards))
        params, state, loss = tx.step(params, state, _loss_fn, batch)
        losses.append(float(loss))
        if sharded:
            for a in jax.tree_util.tree_leaves((params, state, loss)):
                if not a.sharding.is_fully_replicated:
                    not_replicated.append(str(a.sharding))
            divergence = max(divergence, replica_divergence((params, state, loss)))
    return (
        params,
        state,
        {
            "losses": losses,
            "divergence": divergence,
            "not_replicated": not_replicated,
            "shard_sizes": sorted(shards),
        },
    )


def _worker(out_path):
    report = {"devices": len(jax.devices()), "x64": bool(jax.config.jax_enable_x64)}
    x, y = _data(8 * GLOBAL_BATCH)
    params0 = _init_params(jax.random.key(0))
    mesh = data_mesh()
    t0 = time.perf_counter()
    tx2 = data_parallel(_make_tx(), mesh)
    p2, s2, r2 = _train(tx2, replicate(params0, mesh), x, y, sharded=True)
    report["seconds_2dev"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tx1 = _make_tx()
    one = jax.devices()[0]
    p1, s1, r1 = _train(tx1, jax.device_put(params0, one), x, y, sharded=False)
    report["seconds_1dev"] = time.perf_counter() - t0
    report.update(
        {
            "two": r2,
            "one": r1,
            "rank_history_2dev": tx2.rank_history,
            "rank_history_1dev": tx1.rank_history,
            "compilations": [tx2.compilations, tx1.compilations],
            "capacities_visited": [len(tx2.capacities_visited), len(tx1.capacities_visited)],
            "param_shapes_equal": [a.shape for a in _leaves(p2)] == [a.shape for a in _leaves(p1)],
            "max_param_diff": max(
                float(np.max(np.abs(a - b))) for a, b in zip(_leaves(p2), _leaves(p1))
            ),
            "max_state_diff": max(
                float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                for a, b in zip(_leaves(s2), _leaves(s1))
            ),
        }
    )
    # a batch that does not divide by the device count is refused before anything changes
    n_hist = len(tx2.rank_history)
    try:
        tx2.step(p2, s2, _loss_fn, (x[:15], y[:15]))
        report["indivisible_error"] = None
    except ValueError as e:
        report["indivisible_error"] = str(e)
    report["history_unchanged"] = len(tx2.rank_history) == n_hist
    with open(out_path, "w") as f:
        json.dump(report, f)


def _run_worker(tmp_path, devices):
    out = tmp_path / f"report_{devices}.json"
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- tests
def test_two_devices_equal_one_device_with_identical_replicas(tmp_path):
    rep = _run_worker(tmp_path, devices=2)
    assert rep["devices"] == 2 and rep["x64"]
    # the batch really was split: 8 examples on each device
    assert rep["two"]["shard_sizes"] == [[GLOBAL_BATCH // 2] * 2]
    # the ranks changed during the run, across buckets, and every decision agrees
    hist = rep["rank_history_2dev"]
    assert len(hist) == STEPS
    assert len({json.dumps(h) for h in hist}) >= 3, hist
    assert rep["capacities_visited"][0] >= 3  # rank buckets outgrown: steps redone, re-padded
    assert hist == rep["rank_history_1dev"]
    # the trajectory equals the one-device run on the same global batches (float64)
    assert rep["param_shapes_equal"]
    assert rep["max_param_diff"] < 1e-10, rep["max_param_diff"]
    assert rep["max_state_diff"] < 1e-10, rep["max_state_diff"]
    np.testing.assert_allclose(rep["two"]["losses"], rep["one"]["losses"], rtol=1e-12)
    # per-device copies bit-identical after every step, and everything stays replicated
    assert rep["two"]["divergence"] == 0.0
    assert rep["two"]["not_replicated"] == []
    # compiled once per bucket configuration, like the one-device run
    assert rep["compilations"][0] == rep["compilations"][1] <= rep["capacities_visited"][0]
    # an indivisible batch: a clear error, nothing changed
    err = rep["indivisible_error"]
    assert err is not None and "(15, 14, 14, 1)" in err and "2 devices" in err, err
    assert rep["history_unchanged"]


def test_one_device_mesh_equals_plain_step():
    """In this process (one device): ``data_parallel`` changes placement, not arithmetic."""
    params = {"fc": init_tucker_dense(jax.random.key(1), 8, 6, ranks=2, dtype=jnp.float64)}
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((4, 8, 8)), rng.standard_normal((4, 8, 6))

    def loss_fn(p, batch):
        x, y = batch
        return jnp.mean((tucker_dense(p["fc"], x) - y) ** 2)

    txp, txd = TDLRT(0.5, tau=0.01), data_parallel(TDLRT(0.5, tau=0.01), data_mesh())
    pp, sp = params, txp.init(params)
    pd, sd = params, txd.init(params)
    for x, y in zip(xs, ys):
        pp, sp, lp = txp.step(pp, sp, loss_fn, (x, y))
        pd, sd, ld = txd.step(pd, sd, loss_fn, (x, y))
    assert txp.rank_history == txd.rank_history and txd.rank_history[-1] != [(2, 2)]
    for a, b in zip(_leaves((pp, sp, lp)), _leaves((pd, sd, ld))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert all(
        isinstance(a.sharding, jax.sharding.NamedSharding) and a.sharding.mesh.shape == {"data": 1}
        for a in jax.tree_util.tree_leaves((pd, sd))
    )
    assert replica_divergence((pd, sd)) == 0.0


def test_helpers_and_bad_inputs():
    mesh = data_mesh()
    n = mesh.shape["data"]
    assert n == len(jax.devices())
    b = shard_batch({"x": np.ones((4 * n, 3)), "y": np.arange(4 * n)}, mesh)
    assert b["x"].shape == (4 * n, 3) and b["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert shard_batch(b, mesh)["x"] is b["x"]  # already sharded: returned as it is
    with pytest.raises(ValueError, match=r"batch\['s'\] is a scalar"):
        shard_batch({"s": np.float64(1.0), "x": np.ones((n, 2))}, mesh)
    with pytest.raises(ValueError, match="no arrays"):
        shard_batch((), mesh)
    with pytest.raises(ValueError, match="axis 'batch' is not an axis"):
        shard_batch(np.ones((n, 2)), mesh, axis="batch")
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        shard_batch(np.ones((n, 2)), "data")
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        replicate({"w": np.ones(3)}, None)
    with pytest.raises(TypeError, match="must be a TDLRT"):
        data_parallel(optax.sgd(0.1), mesh)
    with pytest.raises(ValueError, match="not an axis"):
        data_parallel(_make_tx(), mesh, axis="model")
    with pytest.raises(ValueError, match="empty"):
        data_mesh([])
    with pytest.raises(TypeError, match="jax.Device"):
        data_mesh(["cpu"])
    with pytest.raises(ValueError, match=r"tree\['w'\] is not a fully replicated"):
        replica_divergence({"w": np.ones(3)})
    w = replicate({"w": jnp.arange(3.0)}, mesh)
    assert replica_divergence(w) == 0.0 and replicate(w, mesh)["w"] is w["w"]  # no copy


if __name__ == "__main__":  # the worker, run by _run_worker in a fresh process
    jax.config.update("jax_enable_x64", True)
    _worker(sys.argv[1])
