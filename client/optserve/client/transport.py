"""`Connection`: the channel to an optserve server, what every part of the client calls through.

It holds the channel, the callables of the contract's methods, the default deadline, the chunk
sizes, and turns grpc's errors into `OptserveError`s. `Client` is a Connection with the calls that
manage models; `Model` and `Worker` need only the Connection, so they import nothing from
`optserve.client.client`.

Bulky calls (create, push, pull, push_pull, download, upload) send and receive raw bytes framed by
`optserve.wire`, so payloads are never copied by protobuf; everything else uses the generated
messages (`_stub`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Self

import grpc

from optserve.client.errors import OptserveError, from_rpc_error
from optserve.client.shared_memory import DEFAULT_MIN_BYTES, SharedMemory
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from optserve.wire.channel import CHANNEL_OPTIONS, DEFAULT_RECEIVE_LIMIT, method, tls_options
from optserve.wire.chunks import DEFAULT_CHUNK_BYTES


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


class Connection:
    """A channel to an optserve server.

    target: "host:port", or "unix:///abs/path" for a server's Unix socket on this host (`optserve
    serve --unix-socket`; grpc's own target syntax, so "unix:relative/path" works too; TLS over it
    checks the server's certificate against "localhost", wire/channel.py). token: bearer token
    sent on every call. tls: True, a CA file, or {"ca": ..., "cert": ..., "key": ...} for mutual
    TLS. timeout: default deadline in seconds for each call (None: no deadline). chunk_bytes:
    payload bytes per streamed message. options: more grpc channel options (after the defaults, so
    they win). packed: push and pull the packed tensors of a model's layout (ModelInfo.packing) as
    one tensor each, not leaf by leaf; False sends every leaf alone, as clients did before packed
    layouts (each `Model` has its own `packed` too). shared_memory: move the tensors of pushes and
    pulls of at least `shared_memory_min_bytes` through shared memory when the server offers it and
    is on this host with this uid (docs/design.md, "Shared memory"); otherwise, and with False, the
    byte stream.
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
        packed: bool = True,
        shared_memory: bool = True,
        shared_memory_min_bytes: int = DEFAULT_MIN_BYTES,
    ):
        if not isinstance(target, str) or not target:
            raise ValueError("target must be 'host:port' or 'unix:///path'")
        if target.startswith("unix://") and not target.startswith("unix:///"):
            # grpc would read what follows // as an authority and fail every call with UNAVAILABLE
            raise ValueError(f"target {target!r}: a Unix socket target is unix:///ABSOLUTE/PATH (three slashes)")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.target = target
        # what `sibling` connects with: the same credentials, deadline, sizes and options
        self._settings = dict(
            token=token,
            tls=tls,
            timeout=timeout,
            chunk_bytes=chunk_bytes,
            options=options,
            packed=packed,
            shared_memory=shared_memory,
            shared_memory_min_bytes=shared_memory_min_bytes,
        )
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.packed = packed
        opts = [*CHANNEL_OPTIONS, *(tls_options(target) if tls else ()), *options]
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
        self.shared_memory = (
            SharedMemory(target, self._server_info_message, token, shared_memory_min_bytes) if shared_memory else None
        )

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

    def sibling(self, target: str) -> Connection:
        """A new connection to `target` with this one's token, TLS, deadline, sizes and options (the
        other shards of a model over several servers)."""
        return Connection(target, **self._settings)

    def close(self) -> None:
        self._channel.close()  # first: it cancels calls in flight, which hold the region
        if self.shared_memory is not None:
            self.shared_memory.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected (bounded)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise OptserveError(
                f"server at {self.target} not reachable within {timeout}s", grpc.StatusCode.UNAVAILABLE
            ) from None

    def _server_info_message(self) -> pb.ServerInfo:
        return self.call(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    def server_info(self) -> dict:
        """The server's version, incarnation (new at every start), device, model count, start time,
        and the devices the models live on with the bytes each holds."""
        i = self._server_info_message()
        return {
            "version": i.version,
            "incarnation": i.incarnation,
            "device": i.device,
            "models": i.models,
            "started_unix": i.started_unix,
            "devices": list(i.devices),
            "device_bytes": list(i.device_bytes),
            "shared_memory_socket": i.shared_memory_socket,
            "host_id": i.host_id,
            "uid": i.uid,
        }
