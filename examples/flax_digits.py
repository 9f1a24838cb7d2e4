"""A small Flax (NNX) CNN trained on scikit-learn's digits by 2-4 worker processes through optserve.

Each worker is an ordinary optax loop (`updates, state = tx.update(grads, state, params)`,
`optax.apply_updates`) whose transformation is `optserve.jax.remote`: the one-line change from
`tx = optax.adam(lr)`. The gradients are computed by a jitted function; the remote update runs
outside jit (it is I/O). The server (in this process, or `--target HOST:PORT`) holds the parameters
and Adam's state; every worker trains on its own shard. At the end this process pulls the
parameters and measures the accuracy on the held-out test set.

    python examples/flax_digits.py                       # 2 workers, async
    python examples/flax_digits.py --workers 4 --mode sync --steps 300

Needs `optserve[server,jax,demo]` (scikit-learn for the data, which ships with it: no download).
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import sys
import time
from typing import Any

import numpy as np

MODEL = "flax-digits"


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8 images in [0, 1] as (N, 8, 8, 1); a fifth held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def build() -> tuple:
    """(graphdef, params, loss_and_grads, predict): the CNN split into its structure and its
    parameters (an nnx.State, a pytree), and jitted functions of the parameters."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen, nnx

    class CNN(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
            self.hidden = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
            self.out = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            x = linen.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
            return self.out(nnx.relu(self.hidden(x)))

    graphdef, params = nnx.split(CNN(nnx.Rngs(0)), nnx.Param)  # the same start in every worker

    @jax.jit
    def loss_and_grads(params, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, jnp.mean(logits.argmax(-1) == y), grads

    @jax.jit
    def predict(params, x):
        return nnx.merge(graphdef, params)(x).argmax(-1)

    return graphdef, params, loss_and_grads, predict


def worker(rank: int, args: argparse.Namespace, target: str, ready: Any) -> None:
    import optax

    import optserve.jax
    from optserve.client import Client, optim

    x_train, y_train, _, _ = load_digits()
    x, y = x_train[rank :: args.workers], y_train[rank :: args.workers]  # this worker's shard
    _, params, loss_and_grads, _ = build()
    sync = {"mode": "sync", "workers": args.workers, "sync_timeout": 30.0} if args.mode == "sync" else {}
    with Client(target, timeout=60.0) as client, optserve.jax.remote(client, MODEL, optim.adam(args.lr), **sync) as tx:
        state = tx.init(params)  # tx was: optax.adam(args.lr); `with` stops its heartbeat before the client closes
        ready.wait(timeout=args.timeout)  # sync: see examples/torch_digits.py
        rng = np.random.default_rng(rank)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = rng.choice(len(y), args.batch, replace=False)
            loss, acc, grads = loss_and_grads(params, x[batch], y[batch])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                rate = step / (time.perf_counter() - start)
                print(
                    f"step {step:4d}/{args.steps}  server step {state.step:5d}  loss {float(loss):.4f}  "
                    f"batch acc {float(acc):.3f}  {rate:6.1f} steps/s per worker",
                    flush=True,
                )


def run_workers(procs: list, timeout: float) -> list[int]:
    """Starts the worker processes and waits for them, at most `timeout` seconds; the ranks of
    those that failed (or were still running then). When one fails the others are stopped: in sync
    mode they would wait for its pushes until sync_timeout at every step."""
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    while any(proc.exitcode is None for proc in procs):
        left = deadline - time.monotonic()
        if left > 0:
            multiprocessing.connection.wait([proc.sentinel for proc in procs if proc.exitcode is None], left)
        if left <= 0 or any(proc.exitcode not in (None, 0) for proc in procs):
            if left <= 0:
                print(f"workers still running after {timeout:.0f} s: stopping them", file=sys.stderr)
            for proc in procs:
                if proc.exitcode is None:
                    proc.terminate()
                proc.join()
    return [r for r, proc in enumerate(procs) if proc.exitcode != 0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, choices=range(1, 9), metavar="N")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per worker")
    p.add_argument("--mode", choices=("async", "sync"), default="async")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--timeout", type=float, default=600.0, help="stop the workers after this many seconds")
    p.add_argument("--target", help="an optserve server (HOST:PORT); default: one started in this process")
    args = p.parse_args(argv)

    import optserve.jax
    from optserve.client import Client

    x_train, _, x_test, y_test = load_digits()
    print(
        f"flax_digits: NNX CNN on digits ({len(x_train)} train / {len(x_test)} test), {args.workers} worker "
        f"processes, {args.mode} mode, optserve.jax.remote(adam({args.lr})), {args.steps} steps each",
        flush=True,
    )
    server = None
    target = args.target
    if target is None:
        from optserve.server import Server

        server = Server(port=0)
        target = server.address
    try:
        with Client(target, timeout=60.0) as client:
            if MODEL in {m["name"] for m in client.list_models()}:
                client.delete_model(MODEL)
            start = time.perf_counter()
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Barrier(args.workers)  # every worker attached before the first step
            procs = [ctx.Process(target=worker, args=(r, args, target, ready)) for r in range(args.workers)]
            failed = run_workers(procs, args.timeout)
            elapsed = time.perf_counter() - start
            if failed:
                print(f"workers {failed} failed", file=sys.stderr)
                return 1
            _, params, _, predict = build()
            params = optserve.jax.remote(client, MODEL).pull(params)  # the trained parameters, as an nnx.State
            steps = client.model(MODEL).step
            acc = float(np.mean(np.asarray(predict(params, x_test)) == y_test))
    finally:
        if server is not None:
            server.stop(grace=1.0)
    print(
        f"done: test accuracy {acc:.4f} after {steps} server steps ({args.workers} workers x {args.steps}) "
        f"in {elapsed:.1f} s with start-up, {steps / elapsed:.1f} steps/s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
