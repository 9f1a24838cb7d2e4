"""The Python client's connection: `Client` (models are handled by `optserve.client.model.Model`).

    from optserve.client import Client, optim

    with Client("127.0.0.1:8470") as client:
        model = client.create_model("mlp", params, optimizer=optim.adam(1e-3))
        step = model.push(grads)
        params = model.pull()

Bulky calls (create, push, pull, push_pull, download, upload) stream chunks framed by
`optserve.wire`, so payloads are never copied by protobuf; everything else uses the generated
messages.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from optserve.client import pytree

from optserve.wire.channel import CHANNEL_OPTIONS, DEFAULT_RECEIVE_LIMIT, method
from optserve.wire.chunks import DEFAULT_CHUNK_BYTES, chunk_messages
from optserve.wire.framing import frame
from optserve.client.errors import OptserveError, from_rpc_error
from optserve.client.messages import schema_of, settings_message
from optserve.client.model import Model
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
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
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
        # Told to the server in every pull (PullRequest.max_message_bytes) so that its replies use
        # what this channel accepts; the last setting of the option wins, as in grpc.
        receive = [v for k, v in opts if k == "grpc.max_receive_message_length"]
        self.max_receive_bytes = int(receive[-1]) if receive and int(receive[-1]) > 0 else DEFAULT_RECEIVE_LIMIT
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
        reject_nonfinite: bool = False,
    ) -> Model:
        """Creates a model from initial parameters (any pytree) and an optimizer spec.

        reject_nonfinite: refuse (FailedPreconditionError, state unchanged) any update that would make
        parameters, optimizer state or EMA non-finite; each push then waits for its update to run.
        """
        leaves, structure = pytree.flatten(params)
        settings = settings_message(
            mode=mode, workers=workers, quorum=quorum, max_staleness=max_staleness, sync_timeout=sync_timeout,
            staleness_scaling=staleness_scaling, ema=ema, ema_debias=ema_debias, reject_nonfinite=reject_nonfinite,
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
                    yield frame(pb.UploadRequest(offset=offset).SerializeToString(), [chunk])
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
                    {"name": h.name, "default": json.loads(h.default_json or "null"), "required": h.required,
                     "doc": h.doc, "type": h.type, "tunable": h.tunable}
                    for h in r.hyperparams
                ],
            }
            for r in resp.rules
        ]

    def server_info(self) -> dict:
        i = self.call(self._stub.GetServerInfo, pb.GetServerInfoRequest())
        return {"version": i.version, "incarnation": i.incarnation, "device": i.device, "models": i.models,
                "started_unix": i.started_unix}  # fmt: skip
