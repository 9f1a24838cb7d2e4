"""The Python client: `Client` (a connection) and `Model` (a handle on one model of the server).

    from optserve.client import Client, optim

    with Client("127.0.0.1:8470") as client:
        model = client.create_model("mlp", params, optimizer=optim.adam(1e-3))
        step = model.push(grads)
        params = model.pull()

Bulky calls (create, push, pull, push_pull, download, upload) stream chunks framed by `codec`, so
payloads are never copied by protobuf; everything else uses the generated messages.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from optserve.client import codec, pytree
from optserve.client.errors import InvalidArgumentError, OptserveError, from_rpc_error
from optserve.client.transport import CHANNEL_OPTIONS, method
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc


def _identity(x: bytes) -> bytes:
    return x


def _read_file(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _credentials(tls: Any) -> grpc.ChannelCredentials:
    """tls: True (system roots), a CA file path, or a dict {ca, cert, key} (cert/key for mutual TLS)."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=_read_file(tls))
    if isinstance(tls, dict):
        unknown = set(tls) - {"ca", "cert", "key"}
        if unknown:
            raise ValueError(f"tls: unknown keys {sorted(unknown)}; expected ca, cert, key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_file(tls.get("ca")),
            private_key=_read_file(tls.get("key")),
            certificate_chain=_read_file(tls.get("cert")),
        )
    raise TypeError("tls must be True, a CA file path, or a dict with ca, cert and key")


def _slice_msgs(slices: Sequence[codec.Slice]) -> list[pb.TensorSlice]:
    return [pb.TensorSlice(path=s.path, dtype=s.dtype, shape=s.shape, offset=s.offset, length=s.length) for s in slices]


def chunk_messages(first: Any, leaves: Sequence[tuple[str, np.ndarray]], chunk_bytes: int) -> Iterator[bytes]:
    """Frames leaves as a stream of messages of `first`'s type; `first` (carrying the header fields)
    becomes the first message, holding the first chunk too, so a small tensor set is one message."""
    msg = first
    for slices, parts in codec.plan_chunks(leaves, chunk_bytes):
        msg.slices.extend(_slice_msgs(slices))
        yield codec.frame(msg.SerializeToString(), parts)
        msg = type(first)()
    if msg is first:
        yield first.SerializeToString()


def schema_of(leaves: Sequence[tuple[str, np.ndarray]]) -> list[pb.LeafSpec]:
    return [pb.LeafSpec(path=p, dtype=codec.dtype_name(a.dtype), shape=a.shape) for p, a in leaves]


def _to_wire(leaves: list[tuple[str, np.ndarray]], wire_dtype: str | None) -> list[tuple[str, np.ndarray]]:
    """Converts floating-point leaves to a narrower wire dtype ("bfloat16", "float16")."""
    if not wire_dtype:
        return leaves
    target = codec.wire_dtype(wire_dtype)
    if wire_dtype not in codec.FLOAT_DTYPES:
        raise ValueError(f"wire_dtype must be a floating-point dtype, got {wire_dtype!r}")
    return [(p, a.astype(target) if a.dtype.name in codec.FLOAT_DTYPES else a) for p, a in leaves]


def info_to_dict(info: pb.ModelInfo) -> dict:
    """A ModelInfo as plain Python data."""
    s = info.settings
    settings = {
        "mode": s.mode or "async",
        "workers": s.workers or None,
        "quorum": s.quorum or None,
        "max_staleness": s.max_staleness if s.HasField("max_staleness") else None,
        "sync_timeout": s.sync_timeout_seconds or None,
        "staleness_scaling": s.staleness_scaling or "none",
        "ema": s.ema_decay if s.HasField("ema_decay") else None,
        "ema_debias": s.ema_debias,
    }
    c = info.counters
    return {
        "name": info.name,
        "step": info.step,
        "schema": [{"path": l.path, "dtype": l.dtype, "shape": tuple(l.shape)} for l in info.schema],
        "spec": json.loads(info.optimizer_json) if info.optimizer_json else None,
        "settings": settings,
        "hyperparams": {h.name: h.value for h in info.hyperparams},
        "workers": {
            w.worker_id: {"last_seq": w.last_seq, "last_base_step": w.last_base_step} for w in info.workers
        },
        "pending_contributions": info.pending_contributions,
        "counters": {f.name: getattr(c, f.name) for f in c.DESCRIPTOR.fields},
        "param_bytes": info.param_bytes,
        "state_bytes": info.state_bytes,
        "last_checkpoint_step": info.last_checkpoint_step,
        "last_checkpoint_error": info.last_checkpoint_error or None,
        "incarnation": info.incarnation,
    }


def settings_message(
    *, mode: str, workers: int | None, quorum: int | None, max_staleness: int | None,
    sync_timeout: float | None, staleness_scaling: str | None, ema: float | None, ema_debias: bool,
) -> pb.ModelSettings:  # fmt: skip
    s = pb.ModelSettings(
        mode=mode,
        workers=workers or 0,
        quorum=quorum or 0,
        sync_timeout_seconds=sync_timeout or 0.0,
        staleness_scaling=staleness_scaling or "",
        ema_debias=ema_debias,
    )
    if max_staleness is not None:
        s.max_staleness = max_staleness
    if ema is not None:
        s.ema_decay = ema
    return s


class Client:
    """A connection to an optserve server.

    target: "host:port". token: bearer token sent on every call. tls: True, a CA file, or
    {"ca": ..., "cert": ..., "key": ...} for mutual TLS. timeout: default deadline in seconds for
    each call (None: no deadline). chunk_bytes: payload bytes per streamed message.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: Any = None,
        timeout: float | None = None,
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ):
        if not isinstance(target, str) or not target:
            raise ValueError("target must be 'host:port'")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        opts = [*CHANNEL_OPTIONS, *options]
        if tls:
            self._channel = grpc.secure_channel(target, _credentials(tls), options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.OptserveStub(self._channel)
        ch = self._channel
        self._create = ch.stream_unary(method("CreateModel"), _identity, pb.ModelInfo.FromString)
        self._push = ch.stream_unary(method("Push"), _identity, pb.PushResponse.FromString)
        # Unary twins: one message each way, for tensors that fit in one chunk (small models).
        self._push_one = ch.unary_unary(method("PushOne"), _identity, pb.PushResponse.FromString)
        self._pull_one = ch.unary_unary(method("PullOne"), pb.PullRequest.SerializeToString, _identity)
        self._push_pull_one = ch.unary_unary(method("PushPullOne"), _identity, _identity)
        self._pull = ch.unary_stream(method("Pull"), pb.PullRequest.SerializeToString, _identity)
        self._push_pull = ch.stream_stream(method("PushPull"), _identity, _identity)
        self._upload = ch.stream_unary(method("Upload"), _identity, pb.ModelInfo.FromString)
        self._download = ch.unary_stream(method("Download"), pb.DownloadRequest.SerializeToString, _identity)

    # -- plumbing ---------------------------------------------------------------------------------

    def call(self, fn: Any, request: Any, *, timeout: float | None = None) -> Any:
        """Invokes a unary or stream-unary callable, raising OptserveError subclasses."""
        try:
            return fn(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def stream(self, fn: Any, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Invokes a server-streaming callable; yields responses, raising OptserveError subclasses."""
        call = fn(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected (bounded)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise OptserveError(f"server at {self.target} not reachable within {timeout}s", grpc.StatusCode.UNAVAILABLE) from None

    # -- models -----------------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        params: Any,
        optimizer: Any,
        *,
        mode: str = "async",
        workers: int | None = None,
        quorum: int | None = None,
        max_staleness: int | None = None,
        sync_timeout: float | None = None,
        staleness_scaling: str | None = None,
        ema: float | None = None,
        ema_debias: bool = False,
    ) -> Model:
        """Creates a model from initial parameters (any pytree) and an optimizer spec."""
        leaves, structure = pytree.flatten(params)
        settings = settings_message(
            mode=mode, workers=workers, quorum=quorum, max_staleness=max_staleness, sync_timeout=sync_timeout,
            staleness_scaling=staleness_scaling, ema=ema, ema_debias=ema_debias,
        )  # fmt: skip
        header = pb.CreateModelHeader(
            name=name, optimizer_json=json.dumps(optimizer), settings=settings, schema=schema_of(leaves)
        )
        msgs = chunk_messages(pb.CreateModelRequest(header=header), leaves, self.chunk_bytes)
        info = self.call(self._create, msgs)
        return Model(self, name, structure, info)

    def model(self, name: str) -> Model:
        """A handle on an existing model (raises NotFoundError if there is none)."""
        info = self.call(self._stub.GetModel, pb.GetModelRequest(model=name))
        return Model(self, name, None, info)

    def list_models(self) -> list[dict]:
        resp = self.call(self._stub.ListModels, pb.ListModelsRequest())
        return [
            {"name": m.name, "step": m.step, "mode": m.mode, "leaves": m.leaves, "param_bytes": m.param_bytes}
            for m in resp.models
        ]

    def delete_model(self, name: str, *, delete_checkpoints: bool = False) -> None:
        self.call(self._stub.DeleteModel, pb.DeleteModelRequest(model=name, delete_checkpoints=delete_checkpoints))

    def upload(self, path: str | os.PathLike, name: str | None = None) -> Model:
        """Creates a model from a file written by `Model.download`."""
        size = os.path.getsize(path)

        def messages() -> Iterator[bytes]:
            yield pb.UploadRequest(header=pb.UploadHeader(name=name or "", total_bytes=size)).SerializeToString()
            with open(path, "rb") as f:
                offset = 0
                while chunk := f.read(self.chunk_bytes):
                    yield codec.frame(pb.UploadRequest(offset=offset).SerializeToString(), [chunk])
                    offset += len(chunk)

        info = self.call(self._upload, messages())
        return Model(self, info.name, None, info)

    def rules(self) -> list[dict]:
        """Every rule, preset, schedule and custom transform the server knows."""
        resp = self.call(self._stub.ListRules, pb.ListRulesRequest())
        return [
            {
                "name": r.name,
                "kind": r.kind,
                "library": r.library,
                "doc": r.doc,
                "hyperparams": [
                    {"name": h.name, "default": json.loads(h.default_json or "null"), "required": h.required, "doc": h.doc}
                    for h in r.hyperparams
                ],
            }
            for r in resp.rules
        ]

    def server_info(self) -> dict:
        i = self.call(self._stub.GetServerInfo, pb.GetServerInfoRequest())
        return {"version": i.version, "incarnation": i.incarnation, "device": i.device, "models": i.models,
                "started_unix": i.started_unix}  # fmt: skip


class Model:
    """A handle on one model. Cheap to create; holds no server resources."""

    def __init__(self, client: Client, name: str, structure: pytree.Structure | None, info: pb.ModelInfo | None):
        self.client = client
        self.name = name
        self._structure = structure
        self._schema = {l.path: l for l in info.schema} if info is not None else None
        # Parameters that fit in one chunk come back through the unary twins (PullOne, PushPullOne).
        self._params_fit_one_chunk = info is not None and info.param_bytes <= client.chunk_bytes

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self.client.target})"

    # -- data path --------------------------------------------------------------------------------

    def _push_header(
        self, base_step: int | None, weight: float | None, worker_id: str = "", seq: int = 0
    ) -> pb.PushHeader:
        h = pb.PushHeader(model=self.name, worker_id=worker_id, seq=seq, weight=weight or 0.0)
        if base_step is not None:
            h.base_step = base_step
        return h

    def _grad_leaves(self, grads: Any, wire_dtype: str | None) -> list[tuple[str, np.ndarray]]:
        leaves, structure = pytree.flatten(grads)
        if self._structure is None:
            self._structure = structure
        return _to_wire(leaves, wire_dtype)

    def _push_messages(self, header: pb.PushHeader, leaves: list[tuple[str, np.ndarray]]) -> tuple[bytes | None, Iterator[bytes]]:
        """(the only message, or None) and the message stream: a gradient that frames into one
        message goes through a unary twin; a bigger one starts streaming after one lookahead."""
        msgs = chunk_messages(pb.PushRequest(header=header), leaves, self.client.chunk_bytes)
        first = next(msgs)
        second = next(msgs, None)
        if second is None:
            return first, iter((first,))
        return None, itertools.chain((first, second), msgs)

    def push_raw(self, header: pb.PushHeader, leaves: list[tuple[str, np.ndarray]], timeout: float | None = None) -> pb.PushResponse:
        only, msgs = self._push_messages(header, leaves)
        if only is not None:
            return self.client.call(self.client._push_one, only, timeout=timeout)
        return self.client.call(self.client._push, msgs, timeout=timeout)

    def push(
        self, grads: Any, *, base_step: int | None = None, weight: float | None = None, wire_dtype: str | None = None
    ) -> int:
        """Sends a gradient pytree. Returns (async) the step after the update, (sync) the step it joins."""
        resp = self.push_raw(self._push_header(base_step, weight), self._grad_leaves(grads, wire_dtype))
        return resp.step

    def _pull_request(
        self, *, min_step: int | None, timeout: float | None, ema: bool, wire_dtype: str | None,
        if_newer_than: int | None,
    ) -> pb.PullRequest:  # fmt: skip
        req = pb.PullRequest(model=self.name, timeout_seconds=timeout or 0.0, ema=ema, wire_dtype=wire_dtype or "")
        if min_step is not None:
            req.min_step = min_step
        if if_newer_than is not None:
            req.if_newer_than = if_newer_than
        return req

    def pull(
        self,
        *,
        like: Any = None,
        min_step: int | None = None,
        timeout: float | None = None,
        ema: bool = False,
        wire_dtype: str | None = None,
        if_newer_than: int | None = None,
    ) -> Any:
        """Fetches the parameters as a pytree (the structure of `like`, of the create/push, or nested dicts).

        min_step: wait (up to `timeout` seconds) until the model reaches that step.
        if_newer_than: return None when the model's step is not greater than this.
        """
        req = self._pull_request(min_step=min_step, timeout=timeout, ema=ema, wire_dtype=wire_dtype,
                                 if_newer_than=if_newer_than)  # fmt: skip
        deadline = None if timeout is None else timeout + (self.client.timeout or 30.0)
        if self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._pull_one, req, timeout=deadline),)
        else:
            replies = self.client.stream(self.client._pull, req, timeout=deadline)
        step, params = self.read_pull_stream(replies, like)
        self.last_step = step
        return params

    def push_pull(
        self, grads: Any, *, base_step: int | None = None, weight: float | None = None,
        wire_dtype: str | None = None, like: Any = None,
    ) -> Any:  # fmt: skip
        """Pushes a gradient and returns the updated parameters in one round trip."""
        header = self._push_header(base_step, weight)
        header.pull.CopyFrom(self._pull_request(min_step=None, timeout=None, ema=False, wire_dtype=wire_dtype,
                                                if_newer_than=None))  # fmt: skip
        return self.push_pull_raw(header, self._grad_leaves(grads, wire_dtype), like)[1]

    def push_pull_raw(
        self, header: pb.PushHeader, leaves: list[tuple[str, np.ndarray]], like: Any = None, timeout: float | None = None
    ) -> tuple[pb.PushResponse, Any]:
        only, msgs = self._push_messages(header, leaves)
        if only is not None and self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._push_pull_one, only, timeout=timeout),)
        else:
            replies = self.client.stream(self.client._push_pull, msgs, timeout=timeout)
        box: list[pb.PushResponse] = []
        step, params = self.read_pull_stream(replies, like, push_reply=box)
        self.last_step = step
        return box[0], params

    def read_pull_stream(self, replies: Iterable[bytes], like: Any, push_reply: list | None = None) -> tuple[int, Any]:
        """Assembles a PullResponse stream into (step, pytree or None when not modified)."""
        assembler = None
        step, schema = -1, None
        for raw in replies:
            head, payload = codec.split_payload(raw)
            msg = pb.PullResponse.FromString(head)
            if msg.HasField("header"):
                if push_reply is not None and msg.HasField("push"):
                    push_reply.append(msg.push)
                step = msg.header.step
                self.last_incarnation = msg.header.incarnation
                if msg.header.not_modified:
                    return step, None
                schema = {l.path: codec.LeafSpec(l.path, l.dtype, tuple(l.shape)) for l in msg.header.schema}
                assembler = codec.TensorAssembler(schema, what=f"model {self.name!r}", cast_floats=True)
            if assembler is None:
                raise InvalidArgumentError(f"model {self.name!r}: pull stream did not start with a header")
            if msg.slices:
                assembler.add(msg.slices, payload)
        if assembler is None:
            raise OptserveError(f"model {self.name!r}: empty pull stream")
        arrays = assembler.finish()
        for path, a in arrays.items():  # undo a narrower wire dtype
            if a.dtype.name != schema[path].dtype:
                arrays[path] = a.astype(codec.wire_dtype(schema[path].dtype))
        return step, self._rebuild(arrays, like)

    def _rebuild(self, arrays: dict[str, np.ndarray], like: Any) -> Any:
        structure = pytree.flatten(like)[1] if like is not None else self._structure
        if structure is None:
            return pytree.nested_dicts(list(arrays.items()))
        missing = [p for p in structure.paths if p not in arrays]
        if missing or len(structure.paths) != len(arrays):
            raise InvalidArgumentError(
                f"model {self.name!r}: the structure given has {len(structure.paths)} leaves, the model "
                f"{len(arrays)}" + (f"; no leaf {missing[0]!r} on the server" if missing else "")
            )
        return pytree.unflatten(structure, [arrays[p] for p in structure.paths])

    # -- management -------------------------------------------------------------------------------

    def info(self) -> dict:
        """Step, schema, spec, settings, hyperparameters, per-worker state and counters."""
        return info_to_dict(self.client.call(self.client._stub.GetModel, pb.GetModelRequest(model=self.name)))

    @property
    def step(self) -> int:
        return self.info()["step"]

    def set_hyperparams(self, **values: float) -> dict:
        """Changes tunable hyperparameters (e.g. learning_rate=1e-4) without resetting state."""
        req = pb.SetHyperparamsRequest(
            model=self.name, values=[pb.Hyperparam(name=k, value=float(v)) for k, v in values.items()]
        )
        return info_to_dict(self.client.call(self.client._stub.SetHyperparams, req))["hyperparams"]

    def worker(self, worker_id: str, **kwargs: Any) -> Any:
        """A Worker: push/pull/push_pull that track base_step and a retry-safe sequence number."""
        from optserve.client.worker import Worker

        return Worker(self, worker_id, **kwargs)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> int:
        """Takes a checkpoint now; returns its step once it is committed to disk."""
        return self.client.call(self.client._stub.SaveCheckpoint, pb.SaveCheckpointRequest(model=self.name)).step

    def checkpoints(self) -> list[dict]:
        resp = self.client.call(self.client._stub.ListCheckpoints, pb.ListCheckpointsRequest(model=self.name))
        return [{"step": c.step, "name": c.name, "bytes": c.bytes, "created_unix": c.created_unix} for c in resp.checkpoints]

    def restore(self, step: int = 0) -> int:
        """Restores a committed checkpoint (0: the newest that verifies); returns the model's step."""
        req = pb.RestoreCheckpointRequest(model=self.name, step=step)
        return self.client.call(self.client._stub.RestoreCheckpoint, req).step

    def download(self, path: str | os.PathLike) -> int:
        """Writes the model's complete state into one safetensors file; returns its size in bytes."""
        tmp = f"{os.fspath(path)}.part"
        size = 0
        with open(tmp, "wb") as f:
            for raw in self.client.stream(self.client._download, pb.DownloadRequest(model=self.name)):
                head, data = codec.split_payload(raw)
                msg = pb.FileChunk.FromString(head)
                if msg.offset != size:
                    raise InvalidArgumentError(f"model {self.name!r}: download chunk at offset {msg.offset}, expected {size}")
                f.write(data)
                size += len(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return size
