"""Reading request streams and sizing replies: the gRPC side of the data path.

Requests arrive as raw bytes (the service registers identity deserializers); `framing.parse_message`
hands protobuf only the small header and the payload stays a view into grpcio's buffer until it is
copied, once, into the leaf's aligned buffer. Reply sizes are clamped to what gRPC clients receive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message

from optserve.server.core.errors import InvalidArgument, ResourceExhausted
from optserve.wire.assembler import TensorAssembler
from optserve.wire.channel import DEFAULT_RECEIVE_LIMIT, MAX_MESSAGE_BYTES
from optserve.wire.errors import WireError
from optserve.wire.framing import parse_message

# A generated request message class (CreateModelRequest, PushRequest, UploadRequest).
M = TypeVar("M", bound=Message)


def parse_chunk(raw: bytes, message_type: type[M]) -> tuple[M, memoryview]:
    """(header message, payload view) of one streamed chunk; malformed bytes -> INVALID_ARGUMENT."""
    try:
        return parse_message(raw, message_type)
    except WireError as e:
        raise InvalidArgument(f"{message_type.__name__}: {e}") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"{message_type.__name__}: malformed message ({e})") from None


def first_message(requests: Iterator[bytes], message_type: type[M], header_field: str) -> tuple[M, memoryview]:
    """The first chunk of a stream, which must carry the header."""
    raw = next(requests, None)
    if raw is None:
        raise InvalidArgument(f"{message_type.__name__}: empty stream (the first message must carry a header)")
    msg, payload = parse_chunk(raw, message_type)
    if not msg.HasField(header_field):
        raise InvalidArgument(f"{message_type.__name__}: the first message must carry a header")
    return msg, payload


def receive_tensors(
    first: M,
    first_payload: memoryview,
    rest: Iterable[bytes],
    message_type: type[M],
    assembler: TensorAssembler,
    header_field: str = "header",
) -> dict[str, np.ndarray]:
    """Feeds every chunk of a stream into `assembler` and returns the complete arrays."""
    try:
        assembler.add(first.slices, first_payload)
        for raw in rest:
            msg, payload = parse_chunk(raw, message_type)
            if msg.HasField(header_field):
                raise InvalidArgument(f"{message_type.__name__}: a header may only appear in the first message")
            assembler.add(msg.slices, payload)
        return assembler.finish()
    except WireError as e:
        raise InvalidArgument(str(e)) from None


MIN_PULL_CHUNK_BYTES = 1024
MIN_PULL_MESSAGE_BYTES = 64 << 10


def pull_chunk_bytes(requested: int, default: int) -> int:
    """The payload size per pull message: the client's choice (0: the server's), clamped so that a
    reply message stays under the message cap and a tiny value cannot turn one pull into millions
    of messages (the contract documents the clamp: PullRequest.chunk_bytes)."""
    return min(max(int(requested) or default, MIN_PULL_CHUNK_BYTES), MAX_MESSAGE_BYTES // 2)


def pull_message_bytes(requested: int) -> int:
    """The largest reply message a pull may get: the client's receive limit as its PullRequest says
    (0: gRPC's default 4 MiB, which clients in other languages keep), clamped to what the server
    sends at most and to a floor that still holds a header and some tensors."""
    return min(max(int(requested) or DEFAULT_RECEIVE_LIMIT, MIN_PULL_MESSAGE_BYTES), MAX_MESSAGE_BYTES)


# Download's FileChunk: data plus offset and total_bytes fields (< 64 bytes) within 4 MiB.
FILE_CHUNK_BYTES = DEFAULT_RECEIVE_LIMIT - 64


def check_single_reply(model: str, reply_bytes: int, max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED when a unary twin's reply would be larger than the client accepts."""
    if reply_bytes > max_message_bytes:
        raise ResourceExhausted(
            f"model {model!r}: the parameters do not fit in one message: the reply would take up to {reply_bytes} "
            f"bytes, more than max_message_bytes {max_message_bytes} (PullRequest.max_message_bytes; 0 means 4 MiB, "
            "the default receive limit of gRPC clients); use the streaming Pull or PushPull, or raise the "
            "client's receive limit and set max_message_bytes"
        )
