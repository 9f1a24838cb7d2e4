"""The baseline: raw grpcio byte streaming with no framing, validation or optimizer.

Run as its own process, like optserve's server, on 127.0.0.1 and, given a path as its argument, on
that Unix domain socket too. Methods (bytes in, bytes out, no protobuf):
- /raw/Sink    client streaming: consumes chunks, replies with the byte count;
- /raw/SinkCopy the same, copying each chunk into one buffer of the size given in the call's
               `x-total-bytes` metadata (allocated once per size and reused, so the figure is the
               copy alone): the least any receiver that hands on a contiguous tensor does;
- /raw/Source  server streaming: request = 16 bytes (total, chunk) little-endian; streams that many bytes;
- /raw/Echo    unary: replies with the request.
"""

from __future__ import annotations

import os
import struct
import sys
from concurrent import futures

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optserve.wire.channel import SERVER_OPTIONS  # same caps and keepalive as optserve

_BLOCK = os.urandom(1 << 20) * 64  # 64 MiB of bytes to serve slices of


def identity(x: bytes) -> bytes:
    return x


def sink(requests, context) -> bytes:
    n = 0
    for chunk in requests:
        n += len(chunk)
    return struct.pack("<Q", n)


_BUFFERS: dict[int, np.ndarray] = {}  # SinkCopy's buffers by size (the benchmarks call it from one thread)


def sink_copy(requests, context) -> bytes:
    total = int(dict(context.invocation_metadata())["x-total-bytes"])
    buf = _BUFFERS.get(total)
    if buf is None:
        buf = _BUFFERS[total] = np.empty(total, np.uint8)
    n = 0
    for chunk in requests:
        buf[n : n + len(chunk)] = np.frombuffer(chunk, np.uint8)
        n += len(chunk)
    return struct.pack("<Q", n)


def source(request: bytes, context):
    total, chunk = struct.unpack("<QQ", request)
    view = memoryview(_BLOCK)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield bytes(view[:n])  # one copy per chunk, as any sender of a numpy buffer makes
        sent += n


def echo(request: bytes, context) -> bytes:
    return request


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(8), options=SERVER_OPTIONS)
    handlers = {
        "Sink": grpc.stream_unary_rpc_method_handler(sink, identity, identity),
        "SinkCopy": grpc.stream_unary_rpc_method_handler(sink_copy, identity, identity),
        "Source": grpc.unary_stream_rpc_method_handler(source, identity, identity),
        "Echo": grpc.unary_unary_rpc_method_handler(echo, identity, identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("raw", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    if len(sys.argv) > 1:  # the same methods over a Unix socket (bench/roundtrip.py compares over both)
        server.add_insecure_port(f"unix:{sys.argv[1]}")
    server.start()
    print(f"raw grpc listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
