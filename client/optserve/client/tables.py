"""Embedding tables: leaves declared instead of sent (`Init`) and gradients of some rows (`Rows`).

Both stand in a pytree where an array would: `Init` in the parameters of `create_model` (the server
draws the values: proto LeafInit), `Rows` in the gradient of a push (proto RowSparseGradient).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from optserve.client.errors import OptserveError
from optserve.v1 import optserve_pb2 as pb
from optserve.wire import dtypes
from optserve.wire.assembler import TensorAssembler
from optserve.wire.errors import WireError
from optserve.wire.framing import parse_message

INITIALIZERS = ("zeros", "constant", "normal", "truncated_normal", "uniform")


class Init:
    """A leaf the server creates: `Init((1_000_000, 64), "float32", "normal", stddev=0.01, seed=0)`.

    initializer: "zeros", "constant" (value), "normal" (mean, stddev), "truncated_normal" (mean,
    stddev; within mean +- 2 stddev) or "uniform" (in [minval, maxval)). The same declaration gives
    the same values bit for bit (the server's draw is seeded by `seed` and blocks of rows)."""

    __slots__ = ("dtype", "initializer", "kwargs", "seed", "shape")

    def __init__(
        self,
        shape: Sequence[int],
        dtype: Any = "float32",
        initializer: str = "zeros",
        *,
        value: float = 0.0,
        mean: float = 0.0,
        stddev: float = 1.0,
        minval: float = 0.0,
        maxval: float = 1.0,
        seed: int = 0,
    ):
        if initializer not in INITIALIZERS:
            raise ValueError(f"unknown initializer {initializer!r} (one of {', '.join(INITIALIZERS)})")
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtypes.dtype_name(np.dtype(dtypes.DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype))
        self.initializer = initializer
        self.kwargs = {"value": value, "mean": mean, "stddev": stddev, "minval": minval, "maxval": maxval}
        self.seed = int(seed)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.DTYPES[self.dtype].itemsize

    def spec(self, path: str) -> pb.LeafSpec:
        return pb.LeafSpec(path=path, dtype=self.dtype, shape=self.shape)

    def message(self, path: str) -> pb.LeafInit:
        return pb.LeafInit(path=path, initializer=self.initializer, seed=self.seed, **self.kwargs)

    def __repr__(self) -> str:
        return f"Init({self.shape}, {self.dtype!r}, {self.initializer!r}, seed={self.seed})"


class Rows:
    """The gradient of some rows of a leaf: `Rows(ids, values)`, ids of shape [k] (any integers,
    sent as int64), values of shape [k, *row_shape]. Rows named twice are summed on the server.
    Under a lazy rule (lazy_adam, rowwise_adagrad, sparse_sgd) only these rows change; under any
    other rule it is applied as the dense gradient with zeros elsewhere."""

    __slots__ = ("ids", "values")

    def __init__(self, ids: Any, values: Any):
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"Rows: ids must have shape [k], got {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Rows: ids must be integers, got {ids.dtype}")
        values = np.asarray(values)
        if values.ndim < 1 or values.shape[0] != ids.shape[0]:
            raise ValueError(f"Rows: values must have shape [k={ids.shape[0]}, *row_shape], got {values.shape}")
        self.ids = ids.astype(np.int64, copy=False)
        self.values = values

    def densify(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """The dense gradient these rows stand for: the rows summed in order, zeros elsewhere."""
        out = np.zeros(tuple(shape), dtype)
        np.add.at(out, self.ids, self.values.astype(dtype, copy=False))
        return out

    def __repr__(self) -> str:
        return f"Rows(k={self.ids.shape[0]}, row_shape={self.values.shape[1:]})"


TABLE_LEAVES = (Init, Rows)


def row_selections(rows: Mapping[str, Any]) -> list[pb.RowSelection]:
    """PullRequest.rows of `pull_rows({path: ids})` (ids: any integers, sent as int64)."""
    out = []
    for path, ids in rows.items():
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"pull_rows: ids of {path!r} must be integers of shape [k], got {ids.dtype} {ids.shape}")
        out.append(pb.RowSelection(path=path, ids=ids.astype(np.int64, copy=False)))
    return out


def read_rows(
    replies: Iterable[bytes], model: str, push_reply: list | None = None
) -> tuple[int, dict[str, np.ndarray]]:
    """(step, {path: [k, *row_shape] array}) of the reply to a pull of rows (PullRequest.rows)."""
    assembler = TensorAssembler(None, what=f"model {model!r}")
    step = -1
    for raw in replies:
        msg, payload = parse_message(raw, pb.PullResponse)
        if msg.HasField("header"):
            step = msg.header.step
            if push_reply is not None and msg.HasField("push"):
                push_reply.append(msg.push)
        try:
            assembler.add(msg.slices, payload)
        except WireError as e:
            raise OptserveError(f"model {model!r}: pull of rows: {e}") from None
    return step, assembler.finish()


def merge_rows(rows: Mapping[str, Any], where: dict, got: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The shards' answers to a routed pull of rows (client/sharded.py, `ShardedModel._route_rows`),
    in the order the rows were asked."""
    out = {}
    for path, ids in rows.items():
        parts = where[path]
        first = got[parts[0][0]][path]
        result = np.empty((len(np.asarray(ids)), *first.shape[1:]), first.dtype)
        for shard, mask in parts:
            result[mask] = got[shard][path]
        out[path] = result
    return out
