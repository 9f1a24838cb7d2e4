"""Sending: leaves split into chunks (big leaves by byte offset, small ones packed together) and
framed as a stream of chunk messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from optserve.wire.dtypes import dtype_name
from optserve.wire.framing import PAYLOAD_FIELD_BYTES, frame

DEFAULT_CHUNK_BYTES = 4 << 20  # measured best on loopback with grpcio (docs/design.md, "The wire format")


class Slice(NamedTuple):
    """One byte range of one leaf (mirrors the proto's TensorSlice)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


def as_bytes(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous little-endian array (works for ml_dtypes too)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8).data


class Cast:
    """A leaf that travels in another dtype (bfloat16 or float16 on the wire), converted chunk by
    chunk as it is framed: no converted copy of the whole tensor is ever held, and the first chunk
    leaves after one chunk's conversion instead of the whole tensor's (~5 ms per 10M values). On 2
    busy cores the total push time measured the same either way: the conversion is CPU work that
    the network does not hide there (BENCHMARKS.md)."""

    __slots__ = ("array", "dtype", "shape")

    def __init__(self, array: np.ndarray, dtype: np.dtype):
        self.array = np.ascontiguousarray(array).reshape(-1)
        self.dtype = np.dtype(dtype)
        self.shape = array.shape

    def piece(self, start: int, stop: int) -> memoryview:
        """Elements [start, stop) in the wire dtype, as bytes."""
        return self.array[start:stop].astype(self.dtype).view(np.uint8).data


# A leaf as the framer takes it: (path, array), the array possibly marked for a narrower wire dtype.
WireLeaf = tuple[str, np.ndarray | Cast]


# An upper bound of what one slice costs in a message besides its payload bytes: its entry in the
# repeated field (tag + length) with its path, dtype, shape, offset and length fields (each a tag,
# a length or varint value).
_SLICE_FIXED_BYTES = 1 + 5 + (1 + 5) + (1 + 1) + (1 + 5) + (1 + 10) + (1 + 10)


def slice_wire_bytes(path: str, dtype_name: str, shape: Sequence[int]) -> int:
    """An upper bound of one TensorSlice's serialized size inside a chunk message (any offset and
    length): what a slice list costs besides the payload."""
    return (
        _SLICE_FIXED_BYTES + (len(path) if path.isascii() else len(path.encode())) + len(dtype_name) + 10 * len(shape)
    )


def plan_chunks(
    leaves: Sequence[WireLeaf],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    max_message_bytes: int | None = None,
    first_message_bytes: int = 0,
) -> Iterator[tuple[list[Slice], list[memoryview]]]:
    """Yields (slices, payload parts) per chunk: big leaves split by offset, small ones packed.

    Every leaf appears at least once (a zero-size leaf as one empty slice), so the receiver can tell
    a present empty leaf from a missing one. A `Cast` leaf is split on element boundaries and
    converted only when its chunk is produced. A chunk's payload is at most `chunk_bytes` (one
    element more when an element is larger).

    max_message_bytes: also keep each whole message within this: payload, its slice list (bounded by
    `slice_wire_bytes`) and, for the first chunk, `first_message_bytes` (the serialized fields that
    message carries besides slices and payload, e.g. a pull's header). A first chunk that could not
    take even one slice next to those fields is yielded empty, so that the header travels alone.
    None: no bound besides chunk_bytes (the receiver takes large messages).
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    bounded = max_message_bytes is not None
    limit = (max_message_bytes or 0) - PAYLOAD_FIELD_BYTES
    slices: list[Slice] = []
    parts: list[memoryview] = []
    used = 0  # payload bytes of the chunk being built
    meta = first_message_bytes if bounded else 0  # its other bytes (header, slice list)
    for path, array in leaves:
        name = dtype_name(array.dtype)
        shape = tuple(int(d) for d in array.shape)
        if isinstance(array, Cast):
            cast, data = array, memoryview(b"")  # converted chunk by chunk (`Cast.piece`), never whole
            unit, size = array.dtype.itemsize, array.array.size * array.dtype.itemsize
        else:
            cast, data = None, as_bytes(array)
            unit, size = 1, len(data)
        cost = slice_wire_bytes(path, name, shape) if bounded else 0
        offset = 0
        while True:
            room = chunk_bytes - used
            if bounded:
                room = min(room, limit - meta - cost - used)
            take = min(size - offset, max(room, 0))
            take -= take % unit
            # Full: no room for one more element, or (bounded) not even for the slice's description.
            full = (take == 0 and size > offset) or (bounded and room < 0)
            if full and (slices or meta):
                yield slices, parts
                slices, parts, used, meta = [], [], 0, 0
                continue
            if full:  # an empty chunk smaller than one element: send the element anyway
                take = min(unit, size - offset)
            slices.append(Slice(path, name, shape, offset, take))
            if take:
                parts.append(
                    cast.piece(offset // unit, (offset + take) // unit) if cast else data[offset : offset + take]
                )
            offset += take
            used += take
            meta += cost
            if offset >= size:
                break
    if slices or (bounded and meta):
        yield slices, parts


def chunk_messages(
    first: Any,
    leaves: Sequence[WireLeaf],
    chunk_bytes: int,
    max_message_bytes: int | None = None,
) -> Iterator[bytes]:
    """Frames leaves as a stream of messages of `first`'s type; `first` (carrying the header fields)
    becomes the first message, holding the first chunk too, so a small tensor set is one message.
    max_message_bytes: every message, header and slice list included, stays within it (a header
    alone larger than that still goes out whole); None: payloads are bounded by chunk_bytes only.

    `first` is a generated chunk message (PushRequest, PullResponse, CreateModelRequest, ...): only
    its `slices`, `ByteSize` and `SerializeToString` are used, so this module needs no protobuf."""
    msg = first
    header_bytes = first.ByteSize() if max_message_bytes is not None else 0
    for slices, parts in plan_chunks(
        leaves, chunk_bytes, max_message_bytes=max_message_bytes, first_message_bytes=header_bytes
    ):
        add = msg.slices.add
        for s in slices:
            add(path=s.path, dtype=s.dtype, shape=s.shape, offset=s.offset, length=s.length)
        yield frame(msg.SerializeToString(), parts)
        msg = type(first)()
    if msg is first:
        yield first.SerializeToString()
