"""What a pull sends: a snapshot's leaves as host arrays in the requested wire dtype, and the size
bound of a one-message reply."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.server.core.model import Model
from optserve.server.core.rows import bucket
from optserve.wire.chunks import Cast, slice_wire_bytes
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.framing import PAYLOAD_FIELD_BYTES

WIRE_DTYPES = ("float16", "bfloat16", "float32")  # what a pull may narrow floating-point leaves to


def check_wire_dtype(wire_dtype: str, model: str) -> None:
    """A pull's wire_dtype: empty (the parameters' dtypes) or a floating dtype the wire supports."""
    if wire_dtype and wire_dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"model {model!r}: wire_dtype must be float16, bfloat16 or float32, got {wire_dtype!r}")


def single_reply_bytes(schema: Iterable[LeafSpec], wire_dtype: str, header_bytes: int) -> int:
    """An upper bound of a one-message pull reply (PullOne, PushPullOne): `header_bytes` of header
    fields, every leaf's slice description and bytes (in the wire dtype), and the payload field."""
    total = header_bytes + PAYLOAD_FIELD_BYTES
    for leaf in schema:
        dtype = leaf.dtype if not wire_dtype or leaf.dtype not in FLOAT_DTYPES else wire_dtype
        total += slice_wire_bytes(leaf.path, dtype, leaf.shape) + leaf_nbytes(DTYPES[dtype], leaf.shape)
    return total


def first_leaf_past(schema: Iterable[LeafSpec], wire_dtype: str, length: int) -> tuple[str, int] | None:
    """The first leaf (and the bytes needed up to its end) whose bytes in the wire dtype, laid one
    after the other, end past `length`; None when all of them fit (a shared-memory pull's span)."""
    total = 0
    for leaf in schema:
        dtype = leaf.dtype if not wire_dtype or leaf.dtype not in FLOAT_DTYPES else wire_dtype
        total += leaf_nbytes(DTYPES[dtype], leaf.shape)
        if total > length:
            return leaf.path, total
    return None


def _on_cpu(x: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def _host(x: jax.Array, target: np.dtype | None, narrow: bool) -> np.ndarray | Cast:
    """One device array on the host (zero copy on CPU), narrowed to `target` when `narrow`: chunk by
    chunk while the reply is framed on the CPU (`Cast`), on the device elsewhere, so that only the
    narrow bytes cross to the host."""
    if target is None or not narrow or x.dtype == target:
        return np.asarray(x)
    if _on_cpu(x):
        return Cast(np.asarray(x), target)
    return np.asarray(x.astype(target))


def host_leaves(
    model: Model, arrays: Mapping[str, jax.Array], wire_dtype: str, *, packed: bool = False
) -> list[tuple[str, np.ndarray | Cast]]:
    """A snapshot's buffers (`arrays`, by `model.layout` key) as host arrays to send, floats marked
    for the requested wire dtype: with `packed`, each pack as one flat tensor under its name, then
    the loose leaves; otherwise every leaf of the schema in order (a pack's leaves as views of it).
    """
    check_wire_dtype(wire_dtype, model.name)
    target = DTYPES.get(wire_dtype) if wire_dtype else None
    layout = model.layout
    floats = model.float_leaves
    placement = model.placement

    def host_pack(name: str) -> np.ndarray | Cast:
        """A pack on the host without the padding a mesh may hold it with (core/placement.py)."""
        host = _host(arrays[name], target, True)
        if isinstance(host, Cast):
            return Cast(placement.host(name, host.array), host.dtype)
        return placement.host(name, host)

    if packed:
        out: list[tuple[str, np.ndarray | Cast]] = [(p.name, host_pack(p.name)) for p in layout.packs]
        out += [(k, _host(arrays[k], target, k in floats)) for k in layout.loose]
        return out
    if not layout.packs:
        return [(leaf.path, _host(arrays[leaf.path], target, leaf.path in floats)) for leaf in model.schema]
    by_leaf: dict[str, np.ndarray | Cast] = {k: _host(arrays[k], target, k in floats) for k in layout.loose}
    for p in layout.packs:
        host = host_pack(p.name)
        if isinstance(host, Cast):
            by_leaf.update((k, Cast(v, host.dtype)) for k, v in p.views(host.array).items())
        else:
            by_leaf.update(p.views(host))
    return [(leaf.path, by_leaf[leaf.path]) for leaf in model.schema]


@jax.jit
def _gather_rows(x: jax.Array, ids: jax.Array) -> jax.Array:
    return x[ids]


def row_leaves(
    model: Model, arrays: Mapping[str, jax.Array], rows: Sequence[tuple[str, np.ndarray]], wire_dtype: str
) -> list[tuple[str, np.ndarray]]:
    """A pull of rows (PullRequest.rows, validated: core/rows.py, `check_row_pull`): per entry the
    leaf's rows `ids` as a [k, *row_shape] host array in the wire dtype. A loose leaf's rows are
    gathered on the device (ids padded to a bucket: one compilation per bucket, not per k), so only
    they cross to the host; a packed leaf (small) is read from its pack's host view."""
    check_wire_dtype(wire_dtype, model.name)
    target = DTYPES.get(wire_dtype) if wire_dtype else None
    layout = model.layout
    out: list[tuple[str, np.ndarray]] = []
    for path, ids in rows:
        slot = layout.pack_of.get(path)
        if slot is None:
            padded = np.zeros(bucket(len(ids)), np.int32)
            padded[: len(ids)] = ids
            got = np.asarray(_gather_rows(arrays[path], padded))[: len(ids)]
        else:
            pack = slot[0]
            got = pack.views(model.placement.host(pack.name, np.asarray(arrays[pack.name])))[path][ids]
        if target is not None and path in model.float_leaves and got.dtype != target:
            got = got.astype(target)
        out.append((path, np.ascontiguousarray(got)))
    return out
