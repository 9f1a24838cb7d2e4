"""`optserve demo`: the main job in one command.

Starts a server in this process and N worker processes that train an MLP on scikit-learn's bundled
digits data set (no download) through it, each on its own shard, pushing gradients and pulling
parameters. Shows live progress (step, test accuracy, throughput) and ends with a summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train an MLP on digits with N worker processes through a local server")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="pushes per worker")
    p.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: each step averages one gradient of every worker (default); async: each push is a step",
    )
    p.add_argument(
        "--quorum", type=int, default=None, help="sync: gradients that complete a step (default: all workers)"
    )
    p.add_argument(
        "--sync-timeout",
        type=float,
        default=30.0,
        help="sync: apply what has arrived after this many seconds, so a dead worker cannot stall the rest",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")


def _load_digits(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return {"x_train": x[n_test:], "y_train": y[n_test:], "x_test": x[:n_test], "y_test": y[:n_test]}


def run(args: argparse.Namespace) -> int:
    from optserve.client import optim
    from optserve.server import demo_worker
    from optserve.server.server import Server

    data = _load_digits()
    print(
        f"optserve demo: {args.workers} workers, {args.mode} mode, MLP 64-{args.hidden}-10 on digits "
        f"({len(data['y_train'])} train / {len(data['y_test'])} test)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="optserve-demo-") as tmp, Server(port=0) as server:
        path = os.path.join(tmp, "digits.npz")
        np.savez(path, allow_pickle=False, **data)  # numeric arrays only: nothing to pickle
        client = server.client(timeout=60.0)
        params = demo_worker.init_params(np.random.default_rng(0), 64, args.hidden, 10)
        sync = (
            {"mode": "sync", "workers": args.workers, "quorum": args.quorum, "sync_timeout": args.sync_timeout}
            if args.mode == "sync"
            else {}
        )
        model = client.create_model("digits-mlp", params, optimizer=optim.adam(args.learning_rate), **sync)
        print(
            f"server on {server.address}; model 'digits-mlp' with adam({args.learning_rate}), {args.mode} mode",
            flush=True,
        )
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "optserve.server.demo_worker",
                    "--target",
                    server.address,
                    "--model",
                    "digits-mlp",
                    "--data",
                    path,
                    "--index",
                    str(i),
                    "--workers",
                    str(args.workers),
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                ]
            )
            for i in range(args.workers)
        ]
        try:
            last = -1
            while any(p.poll() is None for p in procs):
                if time.monotonic() - start > args.timeout:
                    raise TimeoutError(f"demo did not finish within {args.timeout}s")
                time.sleep(1.0)
                current = model.pull(like=params)
                step = model.last_step
                if step != last:
                    acc = demo_worker.accuracy(current, data["x_test"], data["y_test"])
                    rate = step / (time.monotonic() - start)
                    print(f"  step {step:5d}   test accuracy {acc:.3f}   {rate:6.1f} steps/s", flush=True)
                    last = step
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(10)
        elapsed = time.monotonic() - start
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        info = model.info()
        final = model.pull(like=params)
        acc = demo_worker.accuracy(final, data["x_test"], data["y_test"])
        moved = info["counters"]["bytes_in"] + info["counters"]["bytes_out"]
        print(
            f"done: test accuracy {acc:.4f} after {info['step']} steps in {elapsed:.1f}s "
            f"({info['step'] / elapsed:.1f} steps/s, {info['counters']['pushes_applied']} updates), "
            f"{moved / 1e6:.1f} MB moved",
            flush=True,
        )
        c = info["counters"]
        print(
            f"  stale pushes rejected {c['stale_rejected']}, retries answered as duplicates {c['duplicates']}"
            + (f", steps applied by sync timeout {c['sync_timeouts']}" if args.mode == "sync" else ""),
            flush=True,
        )
        if failed:
            print(f"workers {failed} failed", file=sys.stderr)
            return 1
    return 0
