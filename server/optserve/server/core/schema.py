"""A model's schema (its leaves' paths, dtypes and shapes): the one validation of every door into a
model (CreateModel, Upload, checkpoints, see core/admission.py), and the sanity caps it enforces."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.wire.dtypes import DTYPES, LeafSpec, leaf_nbytes

# Sanity caps on a schema. A model with more leaves than this would take minutes to jit-compile;
# such a request is far more likely hostile than real (large transformers have a few thousand).
MAX_LEAVES = 100_000
MAX_PATH_CHARS = 4096
MAX_RANK = 64  # XLA's limit on array rank
# A shape's extent (the product of its dimensions, 0 counted as 1) times the item size must stay
# below this: numpy, XLA and safetensors readers compute strides and byte offsets in int64 even for
# a leaf with a zero dimension, so [0, 2**63 - 1] or [2**32, 2**32, 0, 7] overflow them. (A
# non-empty leaf that large is refused by the memory limits first: RESOURCE_EXHAUSTED.)
MAX_SHAPE_BYTES = 2**62
# Stored as float32 by the server (jax_enable_x64 is off): refused rather than silently narrowed.
REFUSED_DTYPES = {
    "float64": "the server computes in float32 (float64 parameters would be held and updated as float32); "
    "cast the parameters to float32"
}
SCHEMA_DTYPES = tuple(d for d in DTYPES if d not in REFUSED_DTYPES)


def _bad_path(path: str) -> bool:
    """Control, format (bidi overrides), surrogate, private-use, unassigned and separator characters
    other than ' ' are refused (str.isprintable): leaf paths end up in logs, checkpoint manifests and
    other languages' clients."""
    return len(path) > MAX_PATH_CHARS or not path.isprintable()


def shape_extent_ok(dtype: np.dtype, shape: Sequence[int]) -> bool:
    """Whether a shape has no negative dimension and stays within MAX_SHAPE_BYTES (see there)."""
    return all(d >= 0 for d in shape) and math.prod(max(d, 1) for d in shape) * dtype.itemsize < MAX_SHAPE_BYTES


def check_leaf_count(model: str, count: int, max_leaves: int | None = MAX_LEAVES) -> None:
    """Refuses more than `max_leaves` leaves, before a caller touches a million of them."""
    if max_leaves is not None and count > max_leaves:
        raise InvalidArgument(f"model {model!r}: {count} leaves, more than the {max_leaves} a model may have")


def check_schema(
    model: str, leaves: Sequence[tuple[str, str, Sequence[int]]], *, max_leaves: int | None = MAX_LEAVES
) -> list[LeafSpec]:
    """Validates a schema, as (path, dtype, shape) triples with path and dtype str and shape a
    sequence of int: unique non-empty printable paths, supported dtypes, sane shapes. The one
    validation of every door into a model (CreateModel, Upload, checkpoints); INVALID_ARGUMENT
    naming the model and the leaf."""
    check_leaf_count(model, len(leaves), max_leaves)
    schema: list[LeafSpec] = []
    seen: set[str] = set()
    for path, dtype, shape in leaves:
        where = f"model {model!r}: leaf {path!r}"
        if not path:
            raise InvalidArgument(f"model {model!r}: a leaf has an empty path")
        if _bad_path(path):
            raise InvalidArgument(
                f"{where}: path longer than {MAX_PATH_CHARS} characters or containing control or format characters"
            )
        if len(shape) > MAX_RANK:
            raise InvalidArgument(f"{where}: {len(shape)} dimensions, more than {MAX_RANK}")
        if path in seen:
            raise InvalidArgument(f"{where}: appears twice in the schema")
        seen.add(path)
        if dtype in REFUSED_DTYPES:
            raise InvalidArgument(f"{where}: dtype {dtype} is not supported: {REFUSED_DTYPES[dtype]}")
        if dtype not in DTYPES:
            raise InvalidArgument(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(SCHEMA_DTYPES)}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{where}: negative dimension in shape {list(shape)}")
        if math.prod(shape) == 0 and not shape_extent_ok(DTYPES[dtype], shape):
            raise InvalidArgument(
                f"{where}: shape {list(shape)} is out of range: even for an empty leaf, its dimensions (0 counted "
                "as 1) times the item size must stay below 2**62 bytes"
            )
        schema.append(LeafSpec(path, dtype, tuple(int(d) for d in shape)))
    if not schema:
        raise InvalidArgument(f"model {model!r}: the parameters have no leaves")
    return schema


def schema_from_json(model: str, leaves: Any, *, max_leaves: int | None = MAX_LEAVES) -> list[LeafSpec]:
    """Validates a schema read from a file (a manifest's "schema"): a list of
    {"path": str, "dtype": str, "shape": [int, ...]} objects, strictly typed, then check_schema."""
    if not isinstance(leaves, list):
        raise InvalidArgument(f"model {model!r}: schema: expected a list of leaves, got {type(leaves).__name__}")
    check_leaf_count(model, len(leaves), max_leaves)
    triples = []
    for i, leaf in enumerate(leaves):
        if not (
            isinstance(leaf, dict)
            and set(leaf) == {"path", "dtype", "shape"}
            and isinstance(leaf["path"], str)
            and isinstance(leaf["dtype"], str)
            and isinstance(leaf["shape"], list)
            and all(type(d) is int for d in leaf["shape"])
        ):
            raise InvalidArgument(
                f'model {model!r}: schema[{i}]: expected {{"path": string, "dtype": string, "shape": [integers]}}, '
                f"got {_show(leaf)}"
            )
        triples.append((leaf["path"], leaf["dtype"], leaf["shape"]))
    return check_schema(model, triples, max_leaves=max_leaves)


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def schema_bytes(schema: Iterable[LeafSpec]) -> int:
    """Bytes of the parameters a schema describes."""
    return sum(leaf_nbytes(DTYPES[leaf.dtype], leaf.shape) for leaf in schema)
