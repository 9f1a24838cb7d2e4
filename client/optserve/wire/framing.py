"""Payload-last framing: bulky messages built and split without protobuf copying the payload.

Every bulky message of the contract (CreateModelRequest, PushRequest, PullResponse, ...) is a small
header followed by one `bytes payload = 1000` field, always last. Protobuf's Python runtime copies
a `bytes` field on every access, so the fast path never lets protobuf see the payload:

- `frame(header, parts)` appends the payload field by hand to a header serialized by protobuf
  (one copy: the join that grpcio needs to get a single `bytes`).
- `split_payload(data)` walks the top-level fields, returns the header bytes for protobuf to parse
  and the payload as a zero-copy memoryview into the received message.

Other languages use the generated messages unchanged; the bytes are identical.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol, Self, TypeVar

from optserve.wire.errors import WireError

PAYLOAD_FIELD = 1000


def varint(value: int) -> bytes:
    """The protobuf base-128 encoding of a non-negative integer."""
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def read_varint(data: memoryview | bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; WireError if it is truncated or too long."""
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


_PAYLOAD_TAG = varint((PAYLOAD_FIELD << 3) | 2)
# An upper bound of the payload field's own bytes: its tag and its length (at most 10 bytes).
PAYLOAD_FIELD_BYTES = len(_PAYLOAD_TAG) + 10


def frame(header: bytes, parts: Sequence[memoryview | bytes]) -> bytes:
    """Serialized message = `header` (a serialized message without payload) + payload field."""
    size = sum(len(p) for p in parts)
    if size == 0:
        return header
    return b"".join((header, _PAYLOAD_TAG, varint(size), *parts))


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
        key, pos = read_varint(view, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = read_varint(view, pos)
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


class ChunkMessage(Protocol):
    """What this module uses of a generated chunk message class (so that it needs no protobuf)."""

    DESCRIPTOR: Any

    @classmethod
    def FromString(cls, data: bytes, /) -> Self: ...


M = TypeVar("M", bound=ChunkMessage)


@functools.cache
def _payload_name(message_type: type[ChunkMessage]) -> str:
    """The name of field PAYLOAD_FIELD in a chunk message type ("payload", or "data" for files)."""
    return message_type.DESCRIPTOR.fields_by_number[PAYLOAD_FIELD].name


def parse_message(data: bytes, message_type: type[M]) -> tuple[M, memoryview]:
    """(message, payload view) of one serialized chunk message of a generated `message_type`.

    Large messages go through `split_payload` (the payload is never copied); small ones are parsed
    whole by protobuf, which is faster than the Python field walk, at the price of copying a few
    kilobytes.
    """
    if len(data) <= SMALL_MESSAGE_BYTES:
        msg = message_type.FromString(data)
        return msg, memoryview(getattr(msg, _payload_name(message_type)))
    head, payload = split_payload(data)
    return message_type.FromString(head), payload
