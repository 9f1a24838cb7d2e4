"""A model spread over several servers: the shard map and the placement that makes it
(docs/design.md, "Shards"; the contract's `ShardMap`).

Each shard server holds an ordinary model whose leaves are the model's leaves it was given: whole
leaves under their own path, and of a leaf split by rows, its row range under the leaf's path (a
shard of `embed` [1000, 64] holding rows 500:1000 holds a leaf `embed` of shape [500, 64]). The
map says which shard holds what; every shard keeps the same map, so any one of them tells a
client where the others are. Client and server share this module (numpy and the standard library
only): the server places a model (`place`) and checks the map a shard is created with
(`ShardMap.check`); the client splits gradients and gathers parameters with it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from optserve.wire.dtypes import DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.errors import WireError

# Leaves larger than this are split by rows over the shards (BytePS partitions at 4 MB: large
# enough that a piece's per-message costs vanish, small enough to spread any large leaf).
DEFAULT_SPLIT_BYTES = 4 << 20
MAX_SHARDS = 1024


@dataclass(frozen=True)
class Piece:
    """Rows `start:stop` (along the first axis) of a leaf, held by shard `shard`. A whole leaf is
    one piece with rows 0:shape[0] (0:0 for a scalar)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardedLeaf:
    """One leaf of the model (its whole shape) and the pieces it is held in, in row order."""

    spec: LeafSpec
    pieces: tuple[Piece, ...]

    @property
    def split(self) -> bool:
        return len(self.pieces) > 1

    def piece_shape(self, piece: Piece) -> tuple[int, ...]:
        if not self.spec.shape:
            return ()
        return (piece.stop - piece.start, *self.spec.shape[1:])

    def row_bytes(self) -> int:
        return leaf_nbytes(DTYPES[self.spec.dtype], self.spec.shape[1:]) if self.spec.shape else 0


@dataclass(frozen=True)
class ShardMap:
    """Where each leaf of a model lives over `targets` (shard i answers at targets[i]).

    model_id: chosen when the model was placed; every shard of that placement holds the same, so a
        shard created or restored from another placement is recognized as a stranger.
    version: 1 when placed; each resharding of the model raises it.
    split_bytes: the threshold leaves were split at.
    global_norm: every push must carry its whole gradient's squared norm (PushHeader.global_norm_sq).
    """

    model_id: str
    version: int
    targets: tuple[str, ...]
    leaves: tuple[ShardedLeaf, ...]
    split_bytes: int = DEFAULT_SPLIT_BYTES
    # the spec starts with clip_by_global_norm: pushes carry the whole gradient's squared norm
    global_norm: bool = False

    @property
    def shards(self) -> int:
        return len(self.targets)

    def schema(self) -> list[LeafSpec]:
        """The model's whole schema."""
        return [leaf.spec for leaf in self.leaves]

    def shard_schema(self, shard: int) -> list[LeafSpec]:
        """What shard `shard` holds: its whole leaves and its row ranges, in the model's leaf order."""
        return [
            LeafSpec(leaf.spec.path, leaf.spec.dtype, leaf.piece_shape(p))
            for leaf in self.leaves
            for p in leaf.pieces
            if p.shard == shard
        ]

    def pieces_of(self, shard: int) -> list[tuple[ShardedLeaf, Piece]]:
        return [(leaf, p) for leaf in self.leaves for p in leaf.pieces if p.shard == shard]

    def shard_bytes(self) -> list[int]:
        """Parameter bytes each shard holds."""
        out = [0] * self.shards
        for leaf in self.leaves:
            if not leaf.spec.shape:
                out[leaf.pieces[0].shard] += leaf_nbytes(DTYPES[leaf.spec.dtype], ())
                continue
            for p in leaf.pieces:
                out[p.shard] += (p.stop - p.start) * leaf.row_bytes()
        return out

    def holder(self, path: str) -> list[int]:
        """The shards that hold (part of) leaf `path`; [] for a path the model does not have."""
        for leaf in self.leaves:
            if leaf.spec.path == path:
                return [p.shard for p in leaf.pieces]
        return []

    def check(self, where: str = "shard map") -> None:
        """WireError naming the field unless the map is whole and consistent: targets distinct and
        non-empty, every leaf's pieces tiling its rows in order over existing shards (a scalar or a
        leaf of fewer rows than pieces cannot be split), every shard holding something."""
        if not self.model_id:
            raise WireError(f"{where}: model_id is empty")
        if self.version < 1:
            raise WireError(f"{where}: version must be >= 1, got {self.version}")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise WireError(f"{where}: {self.shards} targets; a model has 1 to {MAX_SHARDS} shards")
        if any(not t for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise WireError(f"{where}: targets must be distinct and non-empty, got {list(self.targets)}")
        if self.split_bytes < 1:
            raise WireError(f"{where}: split_bytes must be >= 1, got {self.split_bytes}")
        paths = [leaf.spec.path for leaf in self.leaves]
        if len(set(paths)) != len(paths):
            raise WireError(f"{where}: a leaf is listed twice")
        held: set[int] = set()
        for leaf in self.leaves:
            _check_pieces(leaf, self.shards, f"{where}: leaf {leaf.spec.path!r}")
            held.update(p.shard for p in leaf.pieces)
        empty = sorted(set(range(self.shards)) - held)
        if empty:
            raise WireError(f"{where}: shard {empty[0]} ({self.targets[empty[0]]}) holds no leaf")

    # -- JSON (checkpoint manifests and downloaded files keep the map in this form) ---------------

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "version": self.version,
            "targets": list(self.targets),
            "split_bytes": self.split_bytes,
            "global_norm": self.global_norm,
            "leaves": [
                {
                    "path": leaf.spec.path,
                    "dtype": leaf.spec.dtype,
                    "shape": list(leaf.spec.shape),
                    "pieces": [[p.shard, p.start, p.stop] for p in leaf.pieces],
                }
                for leaf in self.leaves
            ],
        }

    @staticmethod
    def from_message(m: Any, where: str = "shard map") -> ShardMap:
        """The map in a contract `ShardMap` message (read by attribute: this module imports no
        protobuf), checked (`check`); WireError names the field at fault."""
        shard_map = ShardMap(
            model_id=m.model_id,
            version=m.version,
            targets=tuple(m.targets),
            leaves=tuple(
                ShardedLeaf(
                    LeafSpec(leaf.leaf.path, leaf.leaf.dtype, tuple(leaf.leaf.shape)),
                    tuple(Piece(p.shard, p.start, p.stop) for p in leaf.pieces),
                )
                for leaf in m.leaves
            ),
            split_bytes=m.split_bytes,
            global_norm=m.global_norm,
        )
        shard_map.check(where)
        return shard_map

    @staticmethod
    def from_json(data: Any, where: str = "shard map") -> ShardMap:
        """The map `to_json` wrote, checked (`check`); WireError names the field at fault."""
        try:
            leaves = tuple(
                ShardedLeaf(
                    LeafSpec(_text(d["path"]), _text(d["dtype"]), tuple(_count(n) for n in d["shape"])),
                    tuple(Piece(*(_count(v) for v in p)) for p in d["pieces"]),
                )
                for d in data["leaves"]
            )
            shard_map = ShardMap(
                _text(data["model_id"]),
                _count(data["version"]),
                tuple(_text(t) for t in data["targets"]),
                leaves,
                _count(data["split_bytes"]),
                bool(data.get("global_norm", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        for leaf in leaves:
            if leaf.spec.dtype not in DTYPES:
                raise WireError(f"{where}: leaf {leaf.spec.path!r}: unknown dtype {leaf.spec.dtype!r}")
        shard_map.check(where)
        return shard_map


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def _check_pieces(leaf: ShardedLeaf, shards: int, where: str) -> None:
    pieces = leaf.pieces
    if not pieces:
        raise WireError(f"{where}: no piece holds it")
    if any(not 0 <= p.shard < shards for p in pieces):
        raise WireError(f"{where}: a piece names a shard outside 0..{shards - 1}")
    if len({p.shard for p in pieces}) != len(pieces):
        raise WireError(f"{where}: two pieces on one shard")
    rows = leaf.spec.shape[0] if leaf.spec.shape else 0
    if len(pieces) > 1 and (not leaf.spec.shape or any(p.stop <= p.start for p in pieces)):
        raise WireError(f"{where}: only a leaf of rank >= 1 can be split, into non-empty row ranges")
    at = 0
    for p in pieces:
        if p.start != at or p.stop < p.start:
            raise WireError(f"{where}: pieces must cover rows 0:{rows} in order, got {p.start}:{p.stop} at row {at}")
        at = p.stop
    if at != rows:
        raise WireError(f"{where}: pieces cover rows 0:{at}, the leaf has {rows}")


def place(
    schema: Sequence[LeafSpec],
    targets: Sequence[str],
    *,
    model_id: str,
    split_bytes: int = DEFAULT_SPLIT_BYTES,
    whole: Collection[str] = (),
    version: int = 1,
    global_norm: bool = False,
) -> ShardMap:
    """Places `schema` over `targets` by bytes.

    Leaves above `split_bytes` (rank >= 1, not in `whole`) are split by rows over every shard (or
    over as many as they have rows), largest leaf first, the larger row ranges going to the shards
    that hold least so far. The other leaves go, largest first, each to the shard that holds least
    (greedy bin packing, the LPT rule): the largest shard then exceeds the mean by less than the
    largest whole leaf. WireError if a shard would hold nothing (fewer leaves and rows than shards).
    `whole`: paths that must stay on one shard (the server's: leaves whose update rule needs the
    whole leaf)."""
    shards = len(targets)
    if shards < 1:
        raise WireError("a model needs at least one shard")
    loads = [0] * shards
    pieces: dict[str, tuple[Piece, ...]] = {}
    sizes = {leaf.path: leaf_nbytes(DTYPES[leaf.dtype], leaf.shape) for leaf in schema}
    order = sorted(schema, key=lambda leaf: (-sizes[leaf.path], leaf.path))
    for leaf in order:
        if not _splits(leaf, sizes[leaf.path], split_bytes, whole) or shards == 1:
            continue
        rows = leaf.shape[0]
        n = min(shards, rows)
        chosen = sorted(range(shards), key=lambda s: (loads[s], s))[:n]
        counts = [rows // n + (1 if i < rows % n else 0) for i in range(n)]  # larger first
        row_bytes = sizes[leaf.path] // rows
        by_shard = {}
        for s, c in zip(chosen, counts, strict=True):
            by_shard[s] = c
            loads[s] += c * row_bytes
        at, out = 0, []
        for s in sorted(by_shard):
            out.append(Piece(s, at, at + by_shard[s]))
            at += by_shard[s]
        pieces[leaf.path] = tuple(out)
    for leaf in order:
        if leaf.path in pieces:
            continue
        s = min(range(shards), key=lambda i: (loads[i], i))
        loads[s] += sizes[leaf.path]
        pieces[leaf.path] = (Piece(s, 0, leaf.shape[0] if leaf.shape else 0),)
    shard_map = ShardMap(
        model_id,
        version,
        tuple(targets),
        tuple(ShardedLeaf(leaf, pieces[leaf.path]) for leaf in schema),
        split_bytes,
        global_norm,
    )
    shard_map.check("placement")
    return shard_map


def _splits(leaf: LeafSpec, nbytes: int, split_bytes: int, whole: Collection[str]) -> bool:
    return nbytes > split_bytes and len(leaf.shape) >= 1 and leaf.shape[0] >= 2 and leaf.path not in whole


def balance(shard_map: ShardMap) -> float:
    """The largest shard's bytes over the mean (1.0: perfectly even)."""
    loads = shard_map.shard_bytes()
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def row_slices(shard_map: ShardMap, shard: int) -> list[tuple[str, slice | None]]:
    """For each leaf piece of `shard`, in its schema order: the leaf path and the rows of the whole
    leaf it holds (None: the whole leaf)."""
    return [(leaf.spec.path, slice(p.start, p.stop) if leaf.split else None) for leaf, p in shard_map.pieces_of(shard)]
