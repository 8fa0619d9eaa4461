"""LeNet5 on the bundled MNIST digits with rank-adaptive TDLRT, in JAX (offline, CPU).

conv 1→20 5×5 (dense) → max-pool → conv 20→50 5×5 (Tucker) → max-pool → fc 800→500 (Tucker)
→ fc 500→10 (dense); activations NHWC. The Tucker layers start from random orthonormal factors
(no pretraining) at ranks (32, 16, 5, 5) and 48; TDLRT adapts the channel ranks (tolerance
``--tau``, relative; at most ``--max-rank``) and keeps the 5×5 window modes. SGD with momentum
0.9 and a cosine learning-rate schedule for the cores, and through optax for the dense layers
and biases. The last line printed is ``test_accuracy=<float> compression_rate=<float>``, with
the paper's compression rate ``1 - factorized / dense parameters`` of the two Tucker layers
(biases included).

Run: ``python examples/jax_mnist.py --seed 0`` (a few minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tuckerman.datasets import load_mnist

try:  # --help works without JAX; running needs it (main says how to install it)
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax
    from tuckerman.integrations.jax import (
        TDLRT,
        init_tucker_conv,
        init_tucker_dense,
        num_parameters,
        num_parameters_dense,
        tucker_conv,
        tucker_dense,
    )
except ImportError as err:
    _MISSING: ImportError | None = err
else:
    _MISSING = None

DIMS = ("NHWC", "OIHW", "NHWC")


def init_params(key, conv_ranks=(32, 16), fc_rank=48):
    k = jax.random.split(key, 4)

    def uniform(key, shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, minval=-bound, maxval=bound)

    kw1, kb1 = jax.random.split(k[0])
    kw4, kb4 = jax.random.split(k[3])
    return {
        "conv1": {"w": uniform(kw1, (20, 1, 5, 5), 25), "b": uniform(kb1, (20,), 25)},
        "conv2": init_tucker_conv(k[1], 20, 50, 5, ranks=conv_ranks),
        "fc1": init_tucker_dense(k[2], 800, 500, ranks=fc_rank),
        "fc2": {"w": uniform(kw4, (10, 500), 500), "b": uniform(kb4, (10,), 500)},
    }


def _pool(h):
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def forward(params, x):
    """x: (N, 28, 28, 1) → logits (N, 10)."""
    h = lax.conv_general_dilated(x, params["conv1"]["w"], (1, 1), "VALID", dimension_numbers=DIMS)
    h = _pool(jax.nn.relu(h + params["conv1"]["b"]))
    h = _pool(jax.nn.relu(tucker_conv(params["conv2"], h)))
    h = jax.nn.relu(tucker_dense(params["fc1"], h.reshape(h.shape[0], -1)))
    return h @ params["fc2"]["w"].T + params["fc2"]["b"]


def loss_fn(params, batch):
    x, y = batch
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _correct(params, x, y):
    return jnp.sum(jnp.argmax(forward(params, x), axis=1) == y)


def accuracy(params, x, y, batch=500):
    correct = jax.jit(_correct)  # jax caches the compiled function across calls
    hits = sum(
        int(correct(params, x[i : i + batch], y[i : i + batch])) for i in range(0, len(x), batch)
    )
    return hits / len(x)


def compression_rate(params):
    fact = dense = 0
    for name in ("conv2", "fc1"):
        fact += num_parameters(params[name])
        dense += num_parameters_dense(params[name])
    return 1.0 - fact / dense


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03, help="peak of the cosine schedule")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--conv-ranks", type=int, nargs=2, default=(32, 16), metavar=("R1", "R2"))
    parser.add_argument("--fc-rank", type=int, default=48)
    parser.add_argument("--max-rank", type=int, default=48)
    args = parser.parse_args(argv)
    if _MISSING is not None:
        parser.exit(
            1, f"this example needs JAX and optax ({_MISSING}): pip install 'tuckerman[jax]'\n"
        )

    jax.config.update("jax_enable_x64", False)
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    to_nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
    x_train, x_test = to_nhwc(x_train), to_nhwc(x_test)
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)

    params = init_params(jax.random.key(args.seed), tuple(args.conv_ranks), args.fc_rank)
    n = len(x_train)
    steps = args.epochs * (n // args.batch_size)
    schedule = optax.cosine_decay_schedule(args.lr, steps)  # cores and dense leaves alike
    # channel modes adaptive, 5x5 window modes kept (the torch layers' default)
    tx = TDLRT(schedule, tau=args.tau, momentum=0.9, max_rank=args.max_rank, adaptive_modes=(0, 1))
    state = tx.init(params)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(n)
        for i in range(0, n - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            params, state, loss = tx.step(params, state, loss_fn, (x_train[idx], y_train[idx]))
        ranks = tx.ranks(state)
        print(
            f"epoch {epoch + 1}: loss {float(loss):.4f}, ranks conv2 {ranks[0]} fc1 {ranks[1]}, "
            f"test accuracy {accuracy(params, x_test, y_test):.4f}, "
            f"{time.perf_counter() - start:.1f} s, {tx.compilations} compilations",
            flush=True,
        )
    compact = tx.compact(params, state)
    acc = accuracy(compact, x_test, y_test)
    print(f"test_accuracy={acc:.4f} compression_rate={compression_rate(compact):.4f}")


if __name__ == "__main__":
    main()
