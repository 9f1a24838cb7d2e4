"""The server's hot path: reading chunk streams into buffers and streaming parameters out.

Requests arrive as raw bytes (the service registers identity deserializers); `split_payload` hands
protobuf only the small header and the payload stays a view into grpcio's buffer until it is
copied, once, into the leaf's aligned buffer.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import math
import queue
import threading
import time

import jax
from jax._src.lib import _jax as _jax_lib  # collect_garbage: see release_host_buffers
import numpy as np

from optserve.wire.assembler import TensorAssembler
from optserve.wire.chunks import Cast, slice_wire_bytes
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.errors import WireError
from optserve.wire.framing import PAYLOAD_FIELD_BYTES, parse_message
from optserve.wire.channel import DEFAULT_RECEIVE_LIMIT, MAX_MESSAGE_BYTES
from optserve.server.core.errors import InvalidArgument, ResourceExhausted
from optserve.v1 import optserve_pb2 as pb


def parse_chunk(raw: bytes, message_type: type) -> tuple[object, memoryview]:
    """(header message, payload view) of one streamed chunk; malformed bytes -> INVALID_ARGUMENT."""
    try:
        return parse_message(raw, message_type)
    except WireError as e:
        raise InvalidArgument(f"{message_type.__name__}: {e}") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"{message_type.__name__}: malformed message ({e})") from None


def first_message(requests: Iterator[bytes], message_type: type, header_field: str) -> tuple[object, memoryview]:
    """The first chunk of a stream, which must carry the header."""
    raw = next(requests, None)
    if raw is None:
        raise InvalidArgument(f"{message_type.__name__}: empty stream (the first message must carry a header)")
    msg, payload = parse_chunk(raw, message_type)
    if not msg.HasField(header_field):
        raise InvalidArgument(f"{message_type.__name__}: the first message must carry a header")
    return msg, payload


def receive_tensors(
    first: object, first_payload: memoryview, rest: Iterable[bytes], message_type: type, assembler: TensorAssembler,
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
REFUSED_DTYPES = {"float64": "the server computes in float32 (float64 parameters would be held and updated as float32); "
                             "cast the parameters to float32"}  # fmt: skip
SCHEMA_DTYPES = tuple(d for d in DTYPES if d not in REFUSED_DTYPES)


def _bad_path(path: str) -> bool:
    """Control, format (bidi overrides), surrogate, private-use, unassigned and separator characters
    other than ' ' are refused (str.isprintable): leaf paths end up in logs, checkpoint manifests and
    other languages' clients."""
    return len(path) > MAX_PATH_CHARS or not path.isprintable()


def shape_extent_ok(dtype: np.dtype, shape: Sequence[int]) -> bool:
    """Whether a shape has no negative dimension and stays within MAX_SHAPE_BYTES (see there)."""
    return all(d >= 0 for d in shape) and math.prod(max(d, 1) for d in shape) * dtype.itemsize < MAX_SHAPE_BYTES


def check_schema(model: str, leaves: Sequence[tuple[str, str, Sequence[int]]], *,
                 max_leaves: int | None = MAX_LEAVES) -> list[LeafSpec]:  # fmt: skip
    """Validates a schema, as (path, dtype, shape) triples with path and dtype str and shape a
    sequence of int: unique non-empty printable paths, supported dtypes, sane shapes. The one
    validation of every door into a model (CreateModel, Upload, checkpoints); INVALID_ARGUMENT
    naming the model and the leaf."""
    if max_leaves is not None and len(leaves) > max_leaves:
        raise InvalidArgument(f"model {model!r}: {len(leaves)} leaves, more than the {max_leaves} a model may have")
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


def schema_from_proto(model: str, leaves: Sequence[pb.LeafSpec], *, max_leaves: int | None = MAX_LEAVES) -> list[LeafSpec]:
    """Validates a schema sent by a client (check_schema)."""
    if max_leaves is not None and len(leaves) > max_leaves:  # before touching a million of them
        raise InvalidArgument(f"model {model!r}: {len(leaves)} leaves, more than the {max_leaves} a model may have")
    return check_schema(model, [(l.path, l.dtype, l.shape) for l in leaves], max_leaves=max_leaves)


def schema_from_json(model: str, leaves: Any, *, max_leaves: int | None = MAX_LEAVES) -> list[LeafSpec]:
    """Validates a schema read from a file (a manifest's "schema"): a list of
    {"path": str, "dtype": str, "shape": [int, ...]} objects, strictly typed, then check_schema."""
    if not isinstance(leaves, list):
        raise InvalidArgument(f"model {model!r}: schema: expected a list of leaves, got {type(leaves).__name__}")
    if max_leaves is not None and len(leaves) > max_leaves:
        raise InvalidArgument(f"model {model!r}: {len(leaves)} leaves, more than the {max_leaves} a model may have")
    triples = []
    for i, leaf in enumerate(leaves):
        if not (isinstance(leaf, dict) and set(leaf) == {"path", "dtype", "shape"} and isinstance(leaf["path"], str)
                and isinstance(leaf["dtype"], str) and isinstance(leaf["shape"], list)
                and all(type(d) is int for d in leaf["shape"])):  # fmt: skip
            raise InvalidArgument(
                f"model {model!r}: schema[{i}]: expected {{\"path\": string, \"dtype\": string, \"shape\": [integers]}}, "
                f"got {_show(leaf)}"
            )
        triples.append((leaf["path"], leaf["dtype"], leaf["shape"]))
    return check_schema(model, triples, max_leaves=max_leaves)


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def schema_bytes(schema: Iterable[LeafSpec]) -> int:
    return sum(leaf_nbytes(DTYPES[l.dtype], l.shape) for l in schema)


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


def check_wire_dtype(wire_dtype: str, model: str) -> None:
    """A pull's wire_dtype: empty (the parameters' dtypes) or a floating dtype the wire supports."""
    if wire_dtype and wire_dtype not in ("float16", "bfloat16", "float32"):
        raise InvalidArgument(f"model {model!r}: wire_dtype must be float16, bfloat16 or float32, got {wire_dtype!r}")


def single_reply_bytes(schema: Iterable[LeafSpec], wire_dtype: str, header_bytes: int) -> int:
    """An upper bound of a one-message pull reply (PullOne, PushPullOne): `header_bytes` of header
    fields, every leaf's slice description and bytes (in the wire dtype), and the payload field."""
    total = header_bytes + PAYLOAD_FIELD_BYTES
    for leaf in schema:
        dtype = leaf.dtype if not wire_dtype or leaf.dtype not in FLOAT_DTYPES else wire_dtype
        total += slice_wire_bytes(leaf.path, dtype, leaf.shape) + leaf_nbytes(DTYPES[dtype], leaf.shape)
    return total


def check_single_reply(model: str, reply_bytes: int, max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED when a unary twin's reply would be larger than the client accepts."""
    if reply_bytes > max_message_bytes:
        raise ResourceExhausted(
            f"model {model!r}: the parameters do not fit in one message: the reply would take up to {reply_bytes} "
            f"bytes, more than max_message_bytes {max_message_bytes} (PullRequest.max_message_bytes; 0 means 4 MiB, "
            "the default receive limit of gRPC clients); use the streaming Pull or PushPull, or raise the "
            "client's receive limit and set max_message_bytes"
        )


def schema_to_proto(schema: Iterable[LeafSpec]) -> list[pb.LeafSpec]:
    return [pb.LeafSpec(path=l.path, dtype=l.dtype, shape=l.shape) for l in schema]


def _on_cpu(x: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def host_leaves(
    schema: list[LeafSpec], arrays: Mapping[str, jax.Array], wire_dtype: str, model: str
) -> list[tuple[str, np.ndarray | Cast]]:
    """Device arrays as host arrays (zero copy on CPU), floats marked for the requested wire dtype.

    On the CPU the narrowing happens chunk by chunk while the reply is framed (`Cast`); on an
    accelerator it happens on the device, so only the narrow bytes cross to the host.
    """
    check_wire_dtype(wire_dtype, model)
    target = DTYPES.get(wire_dtype) if wire_dtype else None
    out: list[tuple[str, np.ndarray | Cast]] = []
    for leaf in schema:
        x = arrays[leaf.path]
        narrow = target is not None and leaf.dtype in FLOAT_DTYPES and x.dtype != target
        if narrow and not _on_cpu(x):
            out.append((leaf.path, np.asarray(x.astype(target))))
        elif narrow:
            out.append((leaf.path, Cast(np.asarray(x), target)))
        else:
            out.append((leaf.path, np.asarray(x)))
    return out


def release_host_buffers() -> None:
    """Lets jax drop the host buffers of device arrays that are already gone.

    jaxlib defers the Python reference drops of freed buffers that alias host memory (a received
    gradient put on the CPU device without a copy; a model's initial parameters) and performs them
    at its next API call. Without this, an idle server would keep the last push's whole gradient
    (and, after creation, the initial parameters) alive: measured +0.87 GB on a 0.4 GB model.
    """
    collect = getattr(_jax_lib, "collect_garbage", None)
    if collect is not None:
        collect()
    else:  # any jax entry point collects too; the private hook above is just the cheapest one
        jax.device_put(0)


class _HostBufferReaper:
    """One daemon thread that waits for dispatched updates, then calls release_host_buffers.

    Updates are dispatched asynchronously, and their inputs can only be dropped once they have run;
    waiting for that in the push path would add the step time to every reply, so it happens here.
    It wakes at most every COALESCE_SECONDS and waits only for the newest update (a device runs its
    updates in order): back-to-back steps cost it one wake-up, not one each.
    """

    COALESCE_SECONDS = 0.05
    SETTLE_SECONDS = 0.02

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def after(self, outputs: object) -> None:
        """Releases host buffers once `outputs` (a pytree of arrays just dispatched) are ready."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="optserve-host-buffer-reaper", daemon=True)
                self._thread.start()
        self._queue.put(outputs)

    def _run(self) -> None:
        while True:
            outputs = self._queue.get()
            time.sleep(self.COALESCE_SECONDS)
            while not self._queue.empty():  # only the newest matters
                outputs = self._queue.get_nowait()
            try:
                jax.block_until_ready(outputs)
            except Exception:  # noqa: BLE001 - donated to a later step meanwhile: that one ran after it
                pass
            del outputs
            # The runtime releases an update's inputs just after its outputs are ready: collect now,
            # and once more a moment later for a release that lands after the first collect.
            release_host_buffers()
            time.sleep(self.SETTLE_SECONDS)
            release_host_buffers()


host_buffer_reaper = _HostBufferReaper()
