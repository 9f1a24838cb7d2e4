"""Download and Upload: a model's complete state as one safetensors file (state/state_file.py).

The file holds parameters, optimizer state and EMA as tensors (`params/...`, `opt/...`, `ema/...`)
and the rest (step, spec, settings, hyperparameters, worker seqs and replies) in `__metadata__`,
so `client.upload(path)` creates a model that continues exactly where the downloaded one was, and
any safetensors reader can open it (README.md, "Checkpoint format").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from optserve.server.api import requests as requests_
from optserve.server.core.errors import InvalidArgument, ResourceExhausted
from optserve.server.core.model import Model
from optserve.server.core.store import ModelStore, check_model_name
from optserve.server.state.errors import StateError
from optserve.server.state.model_state import admit_state, capture
from optserve.server.state.state_file import decode_file, encode_file
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.framing import frame


def download(model: Model, chunk_bytes: int) -> Iterator[bytes]:
    """Framed FileChunk messages of the model's state file, taken from one consistent snapshot."""
    data = encode_file(capture(model).to_host())
    view = memoryview(data)
    total = len(data)
    for offset in range(0, total, chunk_bytes):
        yield frame(
            pb.FileChunk(offset=offset, total_bytes=total).SerializeToString(), [view[offset : offset + chunk_bytes]]
        )


# Room in an uploaded file beyond its tensors: the safetensors header (the manifest, with the
# schema and worker records) and alignment.
UPLOAD_HEADER_ROOM = 64 << 20


def upload_limit(store: ModelStore) -> int:
    """The largest file an upload may declare: what the store could ever hold. Parameters and
    optimizer state count against the configured limits (else the device's memory,
    store.capacity_bytes()); a parameter EMA, at most the parameters' size, comes on top; plus
    room for the header."""
    limits = [x for x in (store.max_model_bytes, store.max_total_bytes) if x is not None]
    most = min(limits) if limits else store.capacity_bytes()
    return 2 * most + UPLOAD_HEADER_ROOM


def upload(store: ModelStore, requests: Iterator[bytes], *, authorize: Callable[[str], str]) -> Model:
    """Creates a model from an uploaded state file; all or nothing.

    The declared size is checked against what the store could hold before any data is read, and
    the buffer grows only with the bytes that actually arrive (never allocated from the header),
    so a header that lies costs nothing. The file is validated as CreateModel validates its request
    (state_file.decode_file and model_state.admit_state)."""
    first, _ = requests_.first_message(requests, pb.UploadRequest, "header")
    header = first.header
    what = f"upload of model {header.name!r}" if header.name else "upload (model name from the file)"
    if header.name:
        check_model_name(header.name)
    total = int(header.total_bytes)
    if total < 8:
        raise InvalidArgument(f"{what}: header.total_bytes {total} is too small for a safetensors file")
    limit = upload_limit(store)
    if total > limit:
        raise ResourceExhausted(
            f"{what}: header.total_bytes {total} exceeds the {limit} bytes this server could hold "
            "(its limits, or its device's memory)"
        )
    data = bytearray()  # grows with the data received (realloc extends in place where it can)
    for raw in requests:
        msg, payload = requests_.parse_chunk(raw, pb.UploadRequest)
        if msg.HasField("header"):
            raise InvalidArgument(f"{what}: UploadRequest: a header may only appear in the first message")
        if msg.offset != len(data) or len(data) + len(payload) > total:
            raise InvalidArgument(
                f"{what}: UploadRequest: chunk at offset {msg.offset} with {len(payload)} bytes; "
                f"expected offset {len(data)} and at most {total} bytes in all"
            )
        data += payload
    if len(data) != total:
        raise InvalidArgument(f"{what}: UploadRequest: received {len(data)} of {total} bytes")
    try:
        state = decode_file(data, "uploaded file", header.name or None)
    except StateError as e:
        raise InvalidArgument(str(e)) from None
    name = authorize(check_model_name(header.name or state.name))
    return admit_state(store, name, state)
