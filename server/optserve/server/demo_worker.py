"""A demo worker: trains a small MLP on its shard of the digits data through an optserve server.

Runs as its own process (`python -m optserve.server.demo_worker`) and imports only the light client
and numpy: the gradients are computed in plain numpy, as any framework's would be.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from optserve.client import Client
from optserve.client.errors import FailedPreconditionError


def init_params(rng: np.random.Generator, n_in: int, n_hidden: int, n_out: int) -> dict:
    return {
        "hidden": {
            "w": (rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32),
            "b": np.zeros(n_hidden, np.float32),
        },
        "out": {
            "w": (rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32),
            "b": np.zeros(n_out, np.float32),
        },
    }


def logits(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"], h


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(params, x)[0].argmax(1) == y).mean())


def gradients(params: dict, x: np.ndarray, y: np.ndarray) -> tuple[dict, float]:
    """Softmax cross-entropy gradients of the mean loss over the batch."""
    z, h = logits(params, x)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    dz = p
    dz[np.arange(len(y)), y] -= 1.0
    dz /= len(y)
    dh = (dz @ params["out"]["w"].T) * (1.0 - h * h)
    grads = {
        "hidden": {"w": x.T @ dh, "b": dh.sum(0)},
        "out": {"w": h.T @ dz, "b": dz.sum(0)},
    }
    return {k: {n: v.astype(np.float32) for n, v in d.items()} for k, d in grads.items()}, loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help=".npz with x_train, y_train")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)

    data = np.load(args.data)
    x, y = data["x_train"][args.index :: args.workers], data["y_train"][args.index :: args.workers]
    rng = np.random.default_rng(1000 + args.index)
    with Client(args.target, timeout=120.0) as client:
        worker = client.model(args.model).worker(f"digits-{args.index}")
        params = worker.pull()
        for _ in range(args.steps):
            idx = rng.integers(0, len(x), args.batch)
            grads, _loss = gradients(params, x[idx], y[idx])
            try:
                params = worker.push_pull(grads, weight=len(idx))
            except FailedPreconditionError:  # stale: the step went on without us; catch up and go on
                params = worker.pull()
    return 0


if __name__ == "__main__":
    sys.exit(main())
