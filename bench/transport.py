"""Push and pull throughput of optserve beside raw grpcio byte streaming, measured in the same run.

    python bench/transport.py [--sizes 1e6,40e6,400e6] [--chunk-bytes 4194304]

Both servers run in their own processes on 127.0.0.1 with the same message caps, keepalive and
chunk size. optserve's push includes validation, assembly, the device transfer and an SGD step;
the raw baseline streams the same bytes into a handler that only counts them. Pull is the same
the other way round.

A second baseline, "raw + copy", is raw streaming whose receiver also copies the chunks into one
contiguous buffer (the server's for push, the client's for pull), allocated once and reused: the
least work any receiver does that hands on a whole tensor rather than a list of 4 MiB pieces. How
close optserve comes to it shows what its framing, validation and update cost on top of that copy.
"pull (out=)" pulls into the arrays of the previous pull (`Model.pull(out=...)`), as a training
loop does; plain "pull" returns fresh arrays, whose pages the OS must map and zero at every pull.

At 400 MB, a receive into fresh memory now and then takes ~1 s instead of ~0.4 s (the kernel
finding and zeroing 400 MB of new pages). The order of the compared calls rotates every round
(`common.interleaved_medians`) so that such stalls hit each side alike, and 400 MB runs 5 rounds.
"""

from __future__ import annotations

import argparse
import functools
import struct

import grpc
import numpy as np
from common import gbps, interleaved_medians, machine, optserve_server, raw_server, repeats_for, stop, table

from optserve.client import Client, optim
from optserve.wire.assembler import aligned_empty
from optserve.wire.channel import CHANNEL_OPTIONS


def _identity(x: bytes) -> bytes:
    return x


def raw_push_fn(channel: grpc.Channel, data: np.ndarray, chunk: int):
    sink = channel.stream_unary("/raw/Sink", _identity, _identity)
    view = memoryview(data.reshape(-1).view(np.uint8))

    def run():
        def chunks():
            for i in range(0, len(view), chunk):
                yield bytes(view[i : i + chunk])

        n = struct.unpack("<Q", sink(chunks()))[0]
        assert n == len(view)

    return run


def raw_push_copy_fn(channel: grpc.Channel, data: np.ndarray, chunk: int):
    sink = channel.stream_unary("/raw/SinkCopy", _identity, _identity)
    view = memoryview(data.reshape(-1).view(np.uint8))
    metadata = (("x-total-bytes", str(len(view))),)

    def run():
        chunks = (bytes(view[i : i + chunk]) for i in range(0, len(view), chunk))
        assert struct.unpack("<Q", sink(chunks, metadata=metadata))[0] == len(view)

    return run


def raw_pull_fn(channel: grpc.Channel, nbytes: int, chunk: int, copy: bool = False):
    source = channel.unary_stream("/raw/Source", _identity, _identity)

    def run():
        got = sum(len(b) for b in source(struct.pack("<QQ", nbytes, chunk)))
        assert got == nbytes

    buf = aligned_empty(nbytes) if copy else None  # allocated once: the copy alone is measured

    def run_copy():
        got = 0
        for b in source(struct.pack("<QQ", nbytes, chunk)):
            buf[got : got + len(b)] = np.frombuffer(b, np.uint8)
            got += len(b)
        assert got == nbytes

    return run_copy if copy else run


def measure(sizes: list[int], chunk: int) -> list[dict]:
    rows = []
    raw_proc, raw_addr = raw_server()
    srv_proc, srv_addr = optserve_server("--chunk-bytes", str(chunk))
    try:
        channel = grpc.insecure_channel(raw_addr, options=CHANNEL_OPTIONS)
        client = Client(srv_addr, chunk_bytes=chunk, timeout=600)
        for i, nbytes in enumerate(sizes):
            n = nbytes // 4
            params = {"w": np.zeros(n, np.float32)}
            grads = {"w": np.full(n, 1e-3, np.float32)}
            model = client.create_model(f"transport-{i}", params, optim.sgd(1e-3))
            reps = repeats_for(nbytes)
            push, raw_push, copy_push = interleaved_medians(
                (
                    functools.partial(model.push, grads),
                    raw_push_fn(channel, grads["w"], chunk),
                    raw_push_copy_fn(channel, grads["w"], chunk),
                ),
                reps,
            )
            previous = model.pull()  # what a training loop pulls into
            pull, pull_out, raw_pull, copy_pull = interleaved_medians(
                (
                    model.pull,
                    functools.partial(model.pull, out=previous),
                    raw_pull_fn(channel, 4 * n, chunk),
                    raw_pull_fn(channel, 4 * n, chunk, copy=True),
                ),
                reps,
            )
            previous = None  # 400 MB: gone before the next size
            client.delete_model(f"transport-{i}")
            rows.append(
                {
                    "size": f"{nbytes / 1e6:g} MB",
                    "push GB/s": gbps(4 * n, push),
                    "raw push GB/s": gbps(4 * n, raw_push),
                    "push ratio": f"{raw_push / push:.2f}x",
                    "raw+copy push GB/s": gbps(4 * n, copy_push),
                    "push vs raw+copy": f"{copy_push / push:.2f}x",
                    "pull GB/s": gbps(4 * n, pull),
                    "raw pull GB/s": gbps(4 * n, raw_pull),
                    "pull ratio": f"{raw_pull / pull:.2f}x",
                    "raw+copy pull GB/s": gbps(4 * n, copy_pull),
                    "pull vs raw+copy": f"{copy_pull / pull:.2f}x",
                    "pull (out=) GB/s": gbps(4 * n, pull_out),
                    "pull (out=) ratio": f"{raw_pull / pull_out:.2f}x",
                }
            )
        client.close()
        channel.close()
    finally:
        stop(srv_proc)
        stop(raw_proc)
    return rows


COLUMNS = [
    "size",
    "push GB/s",
    "raw push GB/s",
    "push ratio",
    "raw+copy push GB/s",
    "push vs raw+copy",
    "pull GB/s",
    "raw pull GB/s",
    "pull ratio",
    "raw+copy pull GB/s",
    "pull vs raw+copy",
    "pull (out=) GB/s",
    "pull (out=) ratio",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,40e6,400e6", help="gradient sizes in bytes (float32)")
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(f"# transport: {machine()}, chunk {args.chunk_bytes} bytes")
    print(table(measure(sizes, args.chunk_bytes), COLUMNS))


if __name__ == "__main__":
    main()
