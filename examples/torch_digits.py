"""A small CNN trained on scikit-learn's digits by 2-4 worker processes through one optserve server.

Each worker is an ordinary PyTorch loop (`loss.backward(); optimizer.step()`) whose optimizer is
`optserve.torch.RemoteOptimizer`: the one-line change from `torch.optim.Adam(net.parameters(), lr)`.
The server (in this process, or `--target HOST:PORT`) holds the parameters and Adam's state; every
worker trains on its own shard of the training set. At the end this process pulls the parameters
and measures the accuracy on the held-out test set.

    python examples/torch_digits.py                       # 2 workers, async
    python examples/torch_digits.py --workers 4 --mode sync --steps 300

Needs `optserve[server,torch,demo]` (scikit-learn for the data, which ships with it: no download).
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from optserve.client import Client, optim
from optserve.torch import RemoteOptimizer

MODEL = "torch-digits"


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8 images in [0, 1] as (N, 1, 8, 8); a fifth held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)  # every worker starts from the same weights (the first one creates the model)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def accuracy(net: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def worker(rank: int, args: argparse.Namespace, target: str, ready: Any) -> None:
    torch.set_num_threads(1)  # the workers share the machine's cores
    x_train, y_train, _, _ = load_digits()
    x, y = x_train[rank :: args.workers], y_train[rank :: args.workers]  # this worker's shard
    net = cnn()
    sync = {"mode": "sync", "workers": args.workers, "sync_timeout": 30.0} if args.mode == "sync" else {}
    with (
        Client(target, timeout=60.0) as client,
        RemoteOptimizer(net.named_parameters(), client, MODEL, optim.adam(args.lr), **sync) as opt,
    ):  # `with` stops the worker's heartbeat before the client closes
        # sync: a round closes when every worker pushed (or at sync_timeout): a worker still starting
        # would make the first rounds wait for it and close without it, out of step with the others
        ready.wait(timeout=args.timeout)
        rng = np.random.default_rng(rank)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = rng.choice(len(y), args.batch, replace=False)
            xb, yb = torch.from_numpy(x[batch]), torch.from_numpy(y[batch])
            opt.zero_grad()
            logits = net(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                rate = step / (time.perf_counter() - start)
                acc = float((logits.argmax(1) == yb).float().mean())
                print(
                    f"step {step:4d}/{args.steps}  server step {opt.last_step:5d}  loss {loss.item():.4f}  "
                    f"batch acc {acc:.3f}  {rate:6.1f} steps/s per worker",
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

    x_train, _, x_test, y_test = load_digits()
    print(
        f"torch_digits: CNN on digits ({len(x_train)} train / {len(x_test)} test), {args.workers} worker "
        f"processes, {args.mode} mode, RemoteOptimizer(adam({args.lr})), {args.steps} steps each",
        flush=True,
    )
    server = None
    target = args.target
    if target is None:
        from optserve.server import Server  # the server's extra (jax): only when this process runs one

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
            net = cnn()
            pulled = client.model(MODEL).pull()
            net.load_state_dict({k: torch.from_numpy(v) for k, v in pulled.items()})
            steps = client.model(MODEL).step
            acc = accuracy(net, x_test, y_test)
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
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
