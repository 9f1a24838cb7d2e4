"""Leaves created on the server from a declaration (CreateModelHeader.init) instead of received.

An embedding table of millions of rows need not cross the wire to be created: the client names an
initializer and a seed, and the server draws the values. Drawing is deterministic and row-blocked:
the leaf's rows are cut into blocks of `rows_per_block` rows (a function of the row size only) and
block j is drawn from numpy's PCG64 seeded with (seed, j). So the same declaration gives the same
values bit for bit, and a shard holding rows start..stop of a table (core/sharding.py) draws just
the blocks it needs and gets exactly the rows the whole table would have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec

INITIALIZERS = ("zeros", "constant", "normal", "truncated_normal", "uniform")
RANDOM = frozenset({"normal", "truncated_normal", "uniform"})
BLOCK_ELEMENTS = 1 << 16  # elements drawn per stream (rounded to whole rows)
TRUNCATE_STDDEVS = 2.0  # truncated_normal keeps values within mean +- 2 stddev (as jax and TF do)
MAX_REDRAWS = 64  # a draw falls outside with p = 0.0455: 64 redraws leave none for any real table


@dataclasses.dataclass(frozen=True)
class LeafInit:
    """One declared leaf (the proto's LeafInit as a domain value)."""

    path: str
    initializer: str
    value: float = 0.0
    mean: float = 0.0
    stddev: float = 1.0
    minval: float = 0.0
    maxval: float = 1.0
    seed: int = 0


def check_inits(model: str, schema: Sequence[LeafSpec], inits: Iterable[LeafInit]) -> dict[str, LeafInit]:
    """The declarations by path, validated against the schema; INVALID_ARGUMENT naming the model and
    the leaf at fault otherwise."""
    by_path = {leaf.path: leaf for leaf in schema}
    out: dict[str, LeafInit] = {}
    for init in inits:
        where = f"model {model!r}: init of leaf {init.path!r}"
        leaf = by_path.get(init.path)
        if leaf is None:
            raise InvalidArgument(f"{where}: no such leaf in the schema")
        if init.path in out:
            raise InvalidArgument(f"{where}: declared twice")
        if init.initializer not in INITIALIZERS:
            raise InvalidArgument(
                f"{where}: unknown initializer {init.initializer!r} (one of {', '.join(INITIALIZERS)})"
            )
        if init.initializer in RANDOM and leaf.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"{where}: {init.initializer!r} needs a floating-point leaf, this one is {leaf.dtype}"
            )
        numbers = {"value": init.value, "mean": init.mean, "stddev": init.stddev, "minval": init.minval}
        numbers["maxval"] = init.maxval
        for name, x in numbers.items():
            if not math.isfinite(x):
                raise InvalidArgument(f"{where}: {name} must be finite, got {x}")
        if init.stddev < 0:
            raise InvalidArgument(f"{where}: stddev must be >= 0, got {init.stddev}")
        if init.minval > init.maxval:
            raise InvalidArgument(f"{where}: minval {init.minval} is above maxval {init.maxval}")
        if init.initializer == "constant" and leaf.dtype not in FLOAT_DTYPES:
            info = np.iinfo(DTYPES[leaf.dtype]) if leaf.dtype != "bool" else None
            if init.value != int(init.value) or (info is not None and not info.min <= init.value <= info.max):
                raise InvalidArgument(f"{where}: value {init.value} is not a {leaf.dtype}")
        if not 0 <= init.seed < 2**64:
            raise InvalidArgument(f"{where}: seed must be in [0, 2**64), got {init.seed}")
        out[init.path] = init
    return out


def rows_per_block(shape: Sequence[int]) -> int:
    """Rows drawn from one stream for a leaf of `shape` (a scalar is one row of one element)."""
    row = math.prod(shape[1:]) if len(shape) > 0 else 1
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def materialize(init: LeafInit, leaf: LeafSpec, first_row: int = 0) -> np.ndarray:
    """The leaf's values: rows first_row.. of the table `init` declares (first_row > 0 on a shard
    holding a later piece of a table split by rows; `leaf.shape` is the piece's shape)."""
    dtype = DTYPES[leaf.dtype]
    shape = tuple(leaf.shape)
    if init.initializer == "zeros":
        return np.zeros(shape, dtype)
    if init.initializer == "constant":
        return np.full(shape, init.value, np.float32 if leaf.dtype in FLOAT_DTYPES else dtype).astype(dtype)
    rows = shape[0] if shape else 1
    row_shape = shape[1:]
    row = math.prod(row_shape)
    per = rows_per_block(shape)
    out = np.empty((rows, row), np.float32)
    first, last = first_row // per, (first_row + rows - 1) // per if rows else -1
    for block in range(first, last + 1):
        drawn = _draw(init, block, per * row).reshape(per, row)
        lo, hi = max(block * per, first_row), min((block + 1) * per, first_row + rows)
        out[lo - first_row : hi - first_row] = drawn[lo - block * per : hi - block * per]
    return out.reshape(shape).astype(dtype, copy=False)


def _draw(init: LeafInit, block: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([init.seed, block])))
    if init.initializer == "uniform":
        span = np.float32(init.maxval) - np.float32(init.minval)
        return rng.random(n, dtype=np.float32) * span + np.float32(init.minval)
    z = rng.standard_normal(n, dtype=np.float32)
    if init.initializer == "truncated_normal":
        for _ in range(MAX_REDRAWS):
            out = np.abs(z) > TRUNCATE_STDDEVS
            bad = int(out.sum())
            if not bad:
                break
            z[out] = rng.standard_normal(bad, dtype=np.float32)
        np.clip(z, -TRUNCATE_STDDEVS, TRUNCATE_STDDEVS, out=z)
    return z * np.float32(init.stddev) + np.float32(init.mean)


def materialize_all(
    inits: Mapping[str, LeafInit], schema: Sequence[LeafSpec], first_rows: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Every declared leaf's values, by path (first_rows: a shard's piece starts, by path)."""
    starts = first_rows or {}
    return {
        leaf.path: materialize(inits[leaf.path], leaf, starts.get(leaf.path, 0))
        for leaf in schema
        if leaf.path in inits
    }
