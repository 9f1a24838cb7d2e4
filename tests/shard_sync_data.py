"""The model and gradients of tests/test_shards_sync.py, in a module of its own so that the worker
process that test kills imports numpy and the light client only."""

from __future__ import annotations

import numpy as np

WEIGHTS = {"w0": 1.0, "w1": 2.0, "w2": 0.5}  # each worker's weight in a round's weighted mean


def params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "embed": rng.normal(size=(100, 8)).astype(np.float32),
        "block": {"w": rng.normal(size=(8, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
        "out": rng.normal(size=(37, 9)).astype(np.float32),
        "scale": np.array(1.5, np.float32),
    }


def grads(worker_id: str, seq: int) -> dict:
    """The gradient worker `worker_id` pushes with `seq` (so the twin can be fed it again)."""
    rng = np.random.default_rng(int(worker_id[1:]) * 1000 + seq)
    return {
        k: (
            {kk: rng.normal(size=np.shape(vv)).astype(np.float32) for kk, vv in v.items()}
            if isinstance(v, dict)
            else rng.normal(size=np.shape(v)).astype(np.float32)
        )
        for k, v in params().items()
    }
