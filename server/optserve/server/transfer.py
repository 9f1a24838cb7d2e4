"""Download and Upload: a model's complete state as one safetensors file (state_io.encode_file).

The file holds parameters, optimizer state and EMA as tensors (`params/...`, `opt/...`, `ema/...`)
and the rest (step, spec, settings, hyperparameters, worker seqs and replies) in `__metadata__`,
so `client.upload(path)` creates a model that continues exactly where the downloaded one was, and
any safetensors reader can open it (README.md, "Checkpoint format").
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from optserve.client import codec
from optserve.server import datapath, state_io
from optserve.server.errors import InvalidArgument, ResourceExhausted
from optserve.server.store import ModelStore, check_model_name
from optserve.v1 import optserve_pb2 as pb


def download(model: Any, chunk_bytes: int) -> Iterator[bytes]:
    """Framed FileChunk messages of the model's state file, taken from one consistent snapshot."""
    data = state_io.encode_file(model.checkpoint_snapshot().to_host())
    view = memoryview(data)
    total = len(data)
    for offset in range(0, total, chunk_bytes):
        yield codec.frame(pb.FileChunk(offset=offset, total_bytes=total).SerializeToString(),
                          [view[offset : offset + chunk_bytes]])  # fmt: skip


def _upload_limit(store: ModelStore) -> int | None:
    """Largest file accepted: what the store's limits could ever hold (parameters plus optimizer
    state), plus room for the header; None when the store has no limit."""
    limits = [x for x in (store.max_model_bytes, store.max_total_bytes) if x is not None]
    return min(limits) + (64 << 20) if limits else None


def upload(store: ModelStore, requests: Iterator[bytes], *, authorize: Callable[[str], str]) -> Any:
    """Creates a model from an uploaded state file; all or nothing."""
    first, _ = datapath.first_message(requests, pb.UploadRequest, "header")
    header = first.header
    if header.name:
        check_model_name(header.name)
    total = int(header.total_bytes)
    if total < 8:
        raise InvalidArgument(f"upload {header.name or '(name from file)'}: header.total_bytes {total} is too small for a safetensors file")
    limit = _upload_limit(store)
    if limit is not None and total > limit:
        raise ResourceExhausted(f"upload {header.name or '(name from file)'}: {total} bytes exceed the server's limits")
    data = bytearray(total)
    received = 0
    for raw in requests:
        msg, payload = datapath.parse_chunk(raw, pb.UploadRequest)
        if msg.HasField("header"):
            raise InvalidArgument("UploadRequest: a header may only appear in the first message")
        if msg.offset != received or received + len(payload) > total:
            raise InvalidArgument(f"UploadRequest: chunk at offset {msg.offset} with {len(payload)} bytes; expected offset "
                                  f"{received} and at most {total} bytes in all")  # fmt: skip
        data[received : received + len(payload)] = payload
        received += len(payload)
    if received != total:
        raise InvalidArgument(f"UploadRequest: received {received} of {total} bytes")
    try:
        state = state_io.decode_file(data)
    except state_io.StateError as e:
        raise InvalidArgument(str(e)) from None
    name = authorize(check_model_name(header.name or state.name))
    return state_io.create_model(store, name, state)
