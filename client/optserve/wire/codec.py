"""Tensors on the wire: dtype names, payload-last framing, chunk planning and assembly.

Every bulky message of the contract (CreateModelRequest, PushRequest, PullResponse, ...) is a small
header followed by one `bytes payload = 1000` field, always last. Protobuf's Python runtime copies
a `bytes` field on every access, so the fast path never lets protobuf see the payload:

- `frame(header, parts)` serializes the header with protobuf and appends the payload field by hand
  (one copy: the join that grpcio needs to get a single `bytes`).
- `split_payload(data)` walks the top-level fields, returns the header bytes for protobuf to parse
  and the payload as a zero-copy memoryview into the received message.

Other languages use the generated messages unchanged; the bytes are identical.

`plan_chunks` splits a list of leaves into chunks (large leaves by byte offset, small ones packed
together) and `TensorAssembler` puts received slices into preallocated 64-byte-aligned buffers,
validating every offset so a malformed stream is rejected before anything is used.
"""
from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import ml_dtypes
import numpy as np

DEFAULT_CHUNK_BYTES = 4 << 20  # measured best on loopback with grpcio (docs/design.md, "The wire format")
PAYLOAD_FIELD = 1000
ALIGNMENT = 64  # jax.device_put aliases host memory (zero copy on CPU) only when 64-byte aligned

# The dtypes a tensor may have on the wire, by numpy name.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "float32": np.float32,
        "float64": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
    }.items()
}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class WireError(ValueError):
    """A malformed tensor stream; the message names the leaf or field at fault."""


_NAME_OF = {dtype: name for name, dtype in DTYPES.items()}  # numpy's dtype.name is slow Python code


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; raises WireError for dtypes that cannot travel."""
    name = _NAME_OF.get(dtype)
    if name is not None:
        return name
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise WireError(f"dtype {name!r} cannot be sent; supported: {', '.join(DTYPES)}")
    return name


def wire_dtype(name: str, *, path: str = "") -> np.dtype:
    """The numpy dtype for a wire name; raises WireError naming the leaf for unknown names."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        where = f"leaf {path!r}: " if path else ""
        raise WireError(f"{where}unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None


# bfloat16 has no fast numpy isfinite: its exponent bits are all ones exactly for Inf and NaN, i.e.
# when the bits without the sign are >= 0x7F80 (one mask and a max: ~0.07 ms per 2 MiB).
_BF16_ABS = np.uint16(0x7FFF)
_BF16_INF = 0x7F80


def all_finite(raw: np.ndarray, dtype_name: str) -> bool:
    """Whether the floats in the uint8 buffer `raw` (whole elements) are all finite."""
    if dtype_name == "bfloat16":
        bits = raw.view(np.uint16)
        return bits.size == 0 or int(np.bitwise_and(bits, _BF16_ABS).max()) < _BF16_INF
    return bool(np.isfinite(raw.view(DTYPES[dtype_name])).all())


def leaf_nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Framing


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


_PAYLOAD_TAG = _varint((PAYLOAD_FIELD << 3) | 2)


def frame(header: bytes, parts: Sequence[memoryview | bytes]) -> bytes:
    """Serialized message = `header` (a serialized message without payload) + payload field."""
    size = sum(len(p) for p in parts)
    if size == 0:
        return header
    return b"".join((header, _PAYLOAD_TAG, _varint(size), *parts))


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("malformed message: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def split_payload(data: bytes) -> tuple[bytes, memoryview]:
    """Splits a serialized chunk message into (header bytes, payload view) without copying the payload.

    Walks only the top-level fields (a handful per chunk). Accepts the payload anywhere, as protobuf
    requires of parsers; our writers always put it last, so the header is then a prefix.
    """
    view = memoryview(data)
    pos, start, end = 0, -1, -1
    n = len(view)
    while pos < n:
        tag_pos = pos
        key, pos = _read_varint(view, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(view, pos)
            if field == PAYLOAD_FIELD:
                if start >= 0:
                    raise WireError("malformed message: payload field repeated")
                start, end = tag_pos, pos + length
                payload_start = pos
            pos += length
        else:
            raise WireError(f"malformed message: unsupported wire type {wire}")
        if pos > n:
            raise WireError("malformed message: field runs past the end")
    if start < 0:
        return data, memoryview(b"")
    header = data[:start] if end == n else bytes(view[:start]) + bytes(view[end:])
    return header, view[payload_start:end]


SMALL_MESSAGE_BYTES = 1 << 16  # below this, protobuf's C parser beats walking the fields in Python


@functools.cache
def _payload_name(message_type: type) -> str:
    """The name of field PAYLOAD_FIELD in a chunk message type ("payload", or "data" for files)."""
    return message_type.DESCRIPTOR.fields_by_number[PAYLOAD_FIELD].name


def parse_message(data: bytes, message_type: type) -> tuple[object, memoryview]:
    """(message, payload view) of one serialized chunk message.

    Large messages go through `split_payload` (the payload is never copied); small ones are parsed
    whole by protobuf, which is faster than the Python field walk, at the price of copying a few
    kilobytes.
    """
    if len(data) <= SMALL_MESSAGE_BYTES:
        msg = message_type.FromString(data)
        return msg, memoryview(getattr(msg, _payload_name(message_type)))
    head, payload = split_payload(data)
    return message_type.FromString(head), payload


# ---------------------------------------------------------------------------------------------
# Sending: plan chunks over a list of leaves


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
    return memoryview(array.reshape(-1).view(np.uint8))


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
        return memoryview(self.array[start:stop].astype(self.dtype).view(np.uint8))


# Upper bounds of what a message spends besides its payload bytes: the payload field's tag and
# length (2 + at most 10 bytes), and per slice its entry in the repeated field (tag + length) with
# its path, dtype, shape, offset and length fields (each a tag, a length or varint value).
PAYLOAD_FIELD_BYTES = len(_PAYLOAD_TAG) + 10
_SLICE_FIXED_BYTES = 1 + 5 + (1 + 5) + (1 + 1) + (1 + 5) + (1 + 10) + (1 + 10)


def slice_wire_bytes(path: str, dtype_name: str, shape: Sequence[int]) -> int:
    """An upper bound of one TensorSlice's serialized size inside a chunk message (any offset and
    length): what a slice list costs besides the payload."""
    return _SLICE_FIXED_BYTES + (len(path) if path.isascii() else len(path.encode())) + len(dtype_name) + 10 * len(shape)


def plan_chunks(
    leaves: Sequence[tuple[str, np.ndarray | Cast]], chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
    max_message_bytes: int | None = None, first_message_bytes: int = 0,
) -> Iterator[tuple[list[Slice], list[memoryview]]]:  # fmt: skip
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
        cast = array if isinstance(array, Cast) else None
        name = dtype_name(cast.dtype if cast else array.dtype)
        shape = tuple(int(d) for d in array.shape)
        if cast:
            unit, size = cast.dtype.itemsize, cast.array.size * cast.dtype.itemsize
        else:
            data = as_bytes(array)
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
                parts.append(cast.piece(offset // unit, (offset + take) // unit) if cast else data[offset : offset + take])
            offset += take
            used += take
            meta += cost
            if offset >= size:
                break
    if slices or (bounded and meta):
        yield slices, parts


# ---------------------------------------------------------------------------------------------
# Receiving: assemble slices into aligned buffers


CHECK_BLOCK_BYTES = 1 << 20  # copy-and-check granularity: fits in L2 with its source (a multiple of 8)
ALIGN_MIN_BYTES = 1 << 16  # smaller buffers are copied by any transfer anyway: skip the alignment work


def aligned_empty(nbytes: int) -> np.ndarray:
    """A fresh uint8 buffer whose data pointer is ALIGNMENT-aligned (from ALIGN_MIN_BYTES on)."""
    if nbytes < ALIGN_MIN_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.__array_interface__["data"][0]) % ALIGNMENT
    return raw[start : start + nbytes]


@dataclass(frozen=True)
class LeafSpec:
    """What a leaf must look like: parameter dtype name and shape."""

    path: str
    dtype: str
    shape: tuple[int, ...]


class _Leaf:
    __slots__ = ("dtype_name", "dtype", "shape", "nbytes", "buffer", "received", "intervals", "check",
                 "check_at_end", "done")  # fmt: skip

    def __init__(self, dtype_name: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int, check: bool,
                 buffer: np.ndarray | None = None):  # fmt: skip
        self.check = check  # reject NaN/Inf, block by block as the bytes are copied (see _copy_checked)
        self.check_at_end = False  # a slice split an element: check the whole leaf once complete
        self.done = False
        self.dtype_name = dtype_name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.buffer = aligned_empty(nbytes) if buffer is None else buffer
        self.received = 0
        self.intervals: list[tuple[int, int]] = []  # sorted, disjoint, merged when adjacent

    def array(self) -> np.ndarray:
        return self.buffer.view(self.dtype).reshape(self.shape)

    def claim(self, start: int, end: int) -> bool:
        """Records [start, end) as received; False if it overlaps data already received."""
        iv = self.intervals
        if iv and iv[-1][1] == start:  # the common in-order case
            iv[-1] = (iv[-1][0], end)
        else:
            i = bisect.bisect_left(iv, (start, end))
            if (i > 0 and iv[i - 1][1] > start) or (i < len(iv) and iv[i][0] < end):
                return False
            iv.insert(i, (start, end))
        self.received += end - start
        return True


class TensorAssembler:
    """Collects the slices of one stream into one aligned buffer per leaf, validating everything.

    expected: the schema the stream must match (None: any leaves, e.g. a new model's parameters).
    cast_floats: accept float16/bfloat16/float32 on the wire for a floating-point leaf of another
        float dtype (the caller converts); otherwise the wire dtype must equal the leaf's dtype.
    finite: reject NaN and Inf in floating-point leaves (gradients), naming the leaf. The check runs
        block by block as each slice is copied, overlapping the network rather than the update.
    on_complete: called as on_complete(path, array) the moment a leaf's last byte arrives, so the
        receiver can start moving it to the device while later chunks are still in flight.
    max_bytes: upper bound on the total bytes declared by the stream (guards huge shapes).
    what: names the model in messages, e.g. "model 'mlp'".
    buffers: arrays to receive leaves into instead of fresh buffers (a pull into the caller's
        arrays, a push into an earlier push's buffers), used for each leaf whose wire dtype and shape
        they have and that is C-contiguous (writable: the caller's promise).
    """

    def __init__(
        self,
        expected: Mapping[str, LeafSpec] | None,
        *,
        what: str,
        cast_floats: bool = False,
        max_bytes: int | None = None,
        finite: bool = False,
        on_complete: Callable[[str, np.ndarray], None] | None = None,
        buffers: Mapping[str, np.ndarray] | None = None,
    ):
        self._buffers = buffers or {}
        self._finite = finite
        self._on_complete = on_complete
        self._expected = expected
        self._what = what
        self._cast = cast_floats
        self._max_bytes = max_bytes
        self._declared = 0
        self._leaves: dict[str, _Leaf] = {}

    @property
    def received_bytes(self) -> int:
        return sum(leaf.received for leaf in self._leaves.values())

    def _err(self, msg: str) -> WireError:
        return WireError(f"{self._what}: {msg}")

    def _open(self, path: str, dtype_name: str, shape: tuple[int, ...]) -> _Leaf:
        if not isinstance(path, str) or not path:
            raise self._err("a slice has an empty leaf path")
        try:
            dtype = wire_dtype(dtype_name, path=path)
        except WireError as e:
            raise self._err(str(e)) from None
        if any(d < 0 for d in shape):
            raise self._err(f"leaf {path!r}: negative dimension in shape {list(shape)}")
        if self._expected is not None:
            spec = self._expected.get(path)
            if spec is None:
                raise self._err(f"unexpected leaf {path!r} (not in the model's schema)")
            if shape != spec.shape:
                raise self._err(f"leaf {path!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
            if dtype_name != spec.dtype and not (
                self._cast and dtype_name in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES
            ):
                raise self._err(f"leaf {path!r}: dtype {dtype_name} does not match the model's {spec.dtype}")
        nbytes = leaf_nbytes(dtype, shape)
        self._declared += nbytes
        if self._max_bytes is not None and self._declared > self._max_bytes:
            raise self._err(
                f"leaf {path!r}: declared tensors total {self._declared} bytes, over the limit of {self._max_bytes}"
            )
        given = self._buffers.get(path)
        fits = given is not None and given.dtype == dtype and given.shape == shape and given.flags.c_contiguous
        buffer = given.reshape(-1).view(np.uint8) if fits else None
        leaf = _Leaf(dtype_name, dtype, shape, nbytes, self._finite and dtype_name in FLOAT_DTYPES, buffer)
        self._leaves[path] = leaf
        return leaf

    def add(self, slices: Sequence, payload: memoryview) -> int:
        """Copies one chunk's slices out of its payload; returns the bytes taken."""
        pos = 0
        total = len(payload)
        for s in slices:
            path, shape = s.path, tuple(s.shape)
            leaf = self._leaves.get(path)
            if leaf is None:
                leaf = self._open(path, s.dtype, shape)
            elif s.dtype != leaf.dtype_name or shape != leaf.shape:
                raise self._err(f"leaf {path!r}: slices disagree on dtype or shape")
            start, length = int(s.offset), int(s.length)
            end = start + length
            if end > leaf.nbytes:
                raise self._err(f"leaf {path!r}: byte range [{start}, {end}) is outside its {leaf.nbytes} bytes")
            if pos + length > total:
                raise self._err(f"leaf {path!r}: slice runs past the end of the chunk payload")
            if length:
                if not leaf.claim(start, end):
                    raise self._err(f"leaf {path!r}: byte range [{start}, {end}) overlaps data already received")
                source = np.frombuffer(payload, dtype=np.uint8, count=length, offset=pos)
                size = leaf.dtype.itemsize
                if not leaf.check or start % size or length % size:
                    leaf.buffer[start:end] = source
                    leaf.check_at_end |= leaf.check  # a slice split an element: check the whole leaf at the end
                else:
                    self._copy_checked(path, leaf, start, source)
            if leaf.received == leaf.nbytes and not leaf.done:
                self._complete(path, leaf)
            pos += length
        if pos != total:
            raise self._err(f"chunk payload has {total - pos} bytes not described by any slice")
        return total

    def _copy_checked(self, path: str, leaf: _Leaf, start: int, source: np.ndarray) -> None:
        """Copies whole elements and checks them for NaN/Inf block by block, each block while it is
        still in cache: a separate pass over a 4 MiB chunk would read it from memory again
        (measured: the check costs 5 ms per 160 MB this way, 13 ms as a second pass)."""
        for a in range(0, len(source), CHECK_BLOCK_BYTES):
            block = leaf.buffer[start + a : start + min(a + CHECK_BLOCK_BYTES, len(source))]
            block[:] = source[a : a + len(block)]
            if not all_finite(block, leaf.dtype_name):
                raise self._nonfinite(path)

    def _complete(self, path: str, leaf: _Leaf) -> None:
        if leaf.check_at_end and not all_finite(leaf.buffer, leaf.dtype_name):
            raise self._nonfinite(path)
        leaf.done = True
        if self._on_complete is not None:
            self._on_complete(path, leaf.array())

    def _nonfinite(self, path: str) -> WireError:
        return self._err(f"leaf {path!r}: gradient has NaN or Inf")

    def finish(self) -> dict[str, np.ndarray]:
        """Checks completeness and returns {path: array in its wire dtype}, in schema order if known."""
        for path, leaf in self._leaves.items():
            if leaf.received != leaf.nbytes:
                raise self._err(f"leaf {path!r}: received {leaf.received} of {leaf.nbytes} bytes")
            if not leaf.done:  # a zero-size leaf: complete without any bytes
                self._complete(path, leaf)
        if self._expected is not None:
            missing = [p for p in self._expected if p not in self._leaves]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise self._err(f"missing leaf {missing[0]!r}{more}")
            order = list(self._expected)
        else:
            order = list(self._leaves)
        return {p: self._leaves[p].array() for p in order}
