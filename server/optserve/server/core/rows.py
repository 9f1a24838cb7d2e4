"""Row-sparse gradients (proto RowSparseGradient): the rows of a table that one push touched.

A push names, per leaf, the ids of the rows it sends (PushHeader.rows); the leaf's slices then
carry [k, *row_shape] values. `check_rows` validates the ids against the model before any byte is
read; `RowGradient.receive` turns the received values into what the update takes:

- rows named more than once are summed first, in the order given (a segment sum, in float32);
- under a lazy rule (spec/lazy.py, `lazy`): the distinct ids and their summed rows, padded to a
  bucket of `bucket(k)` rows (powers of two) with ids past the table's end, which the update's
  gather fills with zeros and its scatter drops, so the jitted step compiles once per bucket,
  not once per k (core/step.py, `make_row_step`);
- under any other rule: the dense gradient, the summed rows and zeros elsewhere, exactly what a
  client that densified it the same way would have sent.

A sync round sums a lazy leaf's rows at the union of the ids its contributions sent
(core/round_sums.py, `row_sums` of the assembler) and applies the mean at those rows, padded as above.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec

MIN_BUCKET = 8  # the smallest padded row count: tiny pushes share one compilation


def bucket(k: int) -> int:
    """The padded row count of a push of k distinct rows: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(k - 1, 0).bit_length())


def segment_sum(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids in ascending order, each one's rows summed in float32 in the order given).

    The same sums, bit for bit, as `np.add.at` into zeros (what a client that densifies the rows
    computes: tables.Rows.densify), at a fraction of its cost (np.add.at takes ~5 ms for 4096 rows
    of 64): a stable sort brings each id's rows together in their order, and the n-th rows of every
    id are added in one vectorized step per n (few steps: repeats are rare in a batch)."""
    values = values.astype(np.float32, copy=False)
    summed_shape = values.shape[1:]
    if not len(ids):
        return ids.astype(np.int64), np.zeros((0, *summed_shape), np.float32)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    first = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    starts = np.flatnonzero(first)
    summed = np.zeros((len(starts), *summed_shape), np.float32)
    if len(starts) == len(ids):  # no repeats: one addition to zero each, as np.add.at makes
        summed += values[order]
        return ordered, summed
    segment = np.cumsum(first) - 1
    rank = np.arange(len(ids)) - starts[segment]  # the how-manyth row of its id
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(rank))))
    for lo, hi in itertools.pairwise(bounds):
        pick = by_rank[lo:hi]  # rows of distinct ids, each its id's n-th
        summed[segment[pick]] += values[order[pick]]
    return ordered[starts], summed


@dataclasses.dataclass
class RowGradient:
    """One leaf's row-sparse gradient: its validated ids, and whether its rule is lazy."""

    leaf: LeafSpec
    ids: np.ndarray  # int64 [k], each in [0, rows)
    lazy: bool
    padded_ids: np.ndarray | None = None  # lazy: int32 [bucket], set by `receive`
    distinct: np.ndarray | None = None  # lazy: the distinct ids, ascending (padded_ids' first ones)

    @property
    def wire_shape(self) -> tuple[int, ...]:
        return (len(self.ids), *self.leaf.shape[1:])

    def receive(self, values: np.ndarray) -> np.ndarray:
        """What the update takes for this leaf (module docstring), in float32."""
        row_shape = tuple(self.leaf.shape[1:])
        uniq, summed = segment_sum(self.ids, values)
        if not self.lazy:
            dense = np.zeros(tuple(self.leaf.shape), np.float32)
            dense[uniq] = summed
            return dense
        self.distinct = uniq
        self.padded_ids = padded_ids(uniq, self.leaf.shape[0])
        padded = np.zeros((len(self.padded_ids), *row_shape), np.float32)
        padded[: len(uniq)] = summed
        return padded


def padded_ids(ids: np.ndarray, rows: int) -> np.ndarray:
    """Distinct ids as the row step takes them: int32, padded to `bucket(len(ids))` with `rows` (past
    the table's end: filled with zeros on gather, dropped on scatter)."""
    out = np.full(bucket(len(ids)), rows, np.int32)
    out[: len(ids)] = ids
    return out


def check_rows(
    label: str,
    rows: Sequence[tuple[str, np.ndarray]],
    schema: Mapping[str, LeafSpec],
    packed: Mapping[str, object],
    lazy: frozenset[str],
    what: str = "row-sparse gradient",
) -> dict[str, RowGradient]:
    """The row-sparse leaves of one push, validated; INVALID_ARGUMENT naming the model (`label`)
    and the leaf otherwise. packed: the leaves held in packed tensors (refused: send them dense).
    lazy: the leaves whose rule is lazy and whose update may be row by row. what: how messages name
    the request (a pull of rows uses this check too: `check_row_pull`)."""
    out: dict[str, RowGradient] = {}
    for path, ids in rows:
        where = f"{label}: {what} of leaf {path!r}"
        leaf = schema.get(path)
        if leaf is None:
            raise InvalidArgument(f"{where}: no such leaf in the schema")
        if path in out:
            raise InvalidArgument(f"{where}: named twice")
        if leaf.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(f"{where}: the leaf is {leaf.dtype}, not floating-point (it is never updated)")
        if not leaf.shape:
            raise InvalidArgument(f"{where}: the leaf is a scalar (rank 0) and has no rows; send it dense")
        if path in packed:
            raise InvalidArgument(
                f"{where}: the leaf is held in packed tensor {packed[path]!r} (ModelInfo.packing); send it dense"
            )
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise InvalidArgument(f"{where}: ids must be int64 of shape [k], got {ids.dtype} {list(ids.shape)}")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= leaf.shape[0]:
                bad = lo if lo < 0 else hi
                raise InvalidArgument(f"{where}: id {bad} is outside the leaf's rows [0, {leaf.shape[0]})")
        out[path] = RowGradient(leaf, ids, path in lazy)
    return out


def check_row_pull(
    label: str, rows: Sequence[tuple[str, np.ndarray]], schema: Mapping[str, LeafSpec]
) -> list[tuple[str, np.ndarray]]:
    """A pull's rows (PullRequest.rows), validated as a push's are (any leaf with rows, packed or
    not): (path, ids) in request order."""
    checked = check_rows(label, rows, schema, {}, frozenset(), what="pull of rows")
    return [(path, r.ids) for path, r in checked.items()]
