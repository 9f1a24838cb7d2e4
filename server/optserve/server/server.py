"""`Server`: an optserve server running inside the current process.

    from optserve.server import Server

    with Server(port=0) as server:          # 127.0.0.1, a free port
        client = server.client()
        ...

    Server(port=None, unix_socket="/run/optserve.sock")    # a Unix socket only (unix_socket.py)

`optserve serve` runs the same object until SIGINT/SIGTERM. The standard gRPC health service
reports NOT_SERVING until the server is ready (checkpoints restored) and again while it shuts down;
server reflection lists the optserve service.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Any

import grpc
import jax
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optserve.client import Client
from optserve.server.api.auth import Token, TokenAuth
from optserve.server.api.metrics import ServerMetrics
from optserve.server.api.service import OptserveService
from optserve.server.checkpoint.files import COMPILE_CACHE_DIR
from optserve.server.checkpoint.manager import CheckpointManager
from optserve.server.core import compilation
from optserve.server.core.errors import ConfigError
from optserve.server.core.placement import Placement
from optserve.server.core.store import ModelStore
from optserve.server.shared_memory_socket import SharedMemorySocket
from optserve.server.status_page.page import History, StatusPage
from optserve.server.status_page.report import Sources
from optserve.server.unix_socket import UnixSocket
from optserve.wire.channel import SERVER_OPTIONS, SERVICE
from optserve.wire.chunks import DEFAULT_CHUNK_BYTES

log = logging.getLogger("optserve.server")


def resolve_device(name: str | None) -> jax.Device:
    """'cpu', 'gpu', 'gpu:1', 'cuda:0', 'tpu' ... or None for JAX's default device (a GPU if any).

    A device that cannot be had is a ConfigError naming --device and what to use instead.
    """
    if not name:
        return jax.devices()[0]
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform.lower(), platform.lower())
    if platform not in ("cpu", "gpu", "tpu"):
        raise ConfigError(f"--device {name}: not a JAX platform; use cpu, gpu or tpu, optionally with an index (gpu:1)")
    if index and not index.isdigit():
        raise ConfigError(f"--device {name}: the index after ':' must be a number, e.g. --device {platform}:0")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ConfigError(
            f"--device {name}: JAX finds no {platform} device here (it has {jax.default_backend()}); "
            f"use --device {jax.default_backend()}, or install jax with {platform} support"
        ) from None
    i = int(index) if index else 0
    if not 0 <= i < len(devices):
        raise ConfigError(
            f"--device {name}: there are only {len(devices)} {platform} device(s), "
            f"{platform}:0 to {platform}:{len(devices) - 1}"
        )
    return devices[i]


def resolve_devices(spec: str) -> list[jax.Device]:
    """The devices of `--devices`: 'all' (every device of JAX's default platform), a platform
    ('gpu': all of its devices), a range ('gpu:0-3'), or a comma list ('gpu:0,2', 'cpu:0-1,cpu:3').
    One platform, no device twice. A mistake is a ConfigError naming --devices and the fix.

    Several CPU devices exist only when XLA is told to make them
    (XLA_FLAGS=--xla_force_host_platform_device_count=N): fake devices sharing the host's cores,
    for tests (correctness, not speed)."""
    text = spec.strip().lower()
    if text == "all":
        return list(jax.devices())
    out: list[jax.Device] = []
    platform = ""
    for item in (x.strip() for x in text.split(",")):
        head, colon, index = item.partition(":")
        if not colon and (head.isdigit() or "-" in head) and platform:
            index = head  # 'gpu:0,2': a bare index continues the platform before it
        else:
            platform = {"cuda": "gpu", "rocm": "gpu"}.get(head, head)
        if platform not in ("cpu", "gpu", "tpu"):
            raise ConfigError(
                f"--devices {spec}: {item!r} is not a JAX platform; use all, or cpu, gpu or tpu with optional "
                "indices (gpu:0-3, gpu:0,2)"
            )
        try:
            have = jax.devices(platform)
        except RuntimeError:
            raise ConfigError(
                f"--devices {spec}: JAX finds no {platform} device here (it has {jax.default_backend()}); "
                f"use --devices {jax.default_backend()}:..., or install jax with {platform} support"
            ) from None
        first, dash, last = index.partition("-")
        if index and not (first.isdigit() and (not dash or last.isdigit())):
            raise ConfigError(f"--devices {spec}: {item!r}: indices are a number or a range, e.g. {platform}:0-3")
        lo, hi = (int(first), int(last) if dash else int(first)) if index else (0, len(have) - 1)
        if lo > hi:
            raise ConfigError(f"--devices {spec}: {item!r}: a range goes up, e.g. {platform}:{hi}-{lo}")
        if hi >= len(have):
            fake = (
                f"; for fake CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count={hi + 1}"
                if platform == "cpu"
                else ""
            )
            raise ConfigError(
                f"--devices {spec}: {item!r}: there are {len(have)} {platform} device(s), "
                f"{platform}:0 to {platform}:{len(have) - 1}{fake}"
            )
        for d in have[lo : hi + 1]:
            if d in out:
                raise ConfigError(f"--devices {spec}: {platform}:{have.index(d)} is named twice")
            out.append(d)
    if len({d.platform for d in out}) > 1:
        raise ConfigError(f"--devices {spec}: the devices of one mesh must be of one platform")
    return out


def resolve_placement(device: str | None, devices: str | None) -> Placement:
    """The placement of `device` (one, or JAX's default) or `devices` (a mesh); not both."""
    if device and devices:
        raise ConfigError(
            f"--device {device} and --devices {devices}: give one (--device for one device, --devices for several)"
        )
    return Placement(resolve_devices(devices) if devices else [resolve_device(device)])


def default_compile_cache(checkpoint_dir: str | None) -> str:
    """`optserve serve`'s compilation cache when --compile-cache is not given: `.compile-cache` in
    the checkpoint directory (never taken for a model: not a model name), or none ('')."""
    return os.path.join(checkpoint_dir, COMPILE_CACHE_DIR) if checkpoint_dir else ""


class Server:
    """An optserve gRPC server in this process; started on construction.

    host/port: where to listen (port 0 picks a free port; see `.port`; None: no TCP, only the Unix
    socket). unix_socket: also (or only) listen on a Unix domain socket at this path, owner-only,
    a stale one replaced, another server's refused, removed at stop (unix_socket.py); tokens, TLS
    and limits apply to it as to TCP. checkpoint_dir: where models
    are checkpointed and restored from (None or '': no checkpoints). device: JAX device for the models;
    devices: or several, which hold every model sharded over a 1-D mesh (`resolve_devices`;
    docs/design.md, "Devices and meshes"); not both.
    max_workers: threads serving RPCs (each stream holds one while it runs; calls waiting for a step
    are bounded below it, see data_plane.waiting_call_limit, so that the rest stay free for others).
    tokens: bearer tokens (api/auth.py; None: no authentication): calls without a known one are
    refused, and a token limited to some models may touch only those. interceptors: more gRPC
    server interceptors, after the token check.
    metrics_port: serve Prometheus metrics over HTTP there (0: a free port, see `.metrics.port`;
    None: not served, though `.metrics.registry` is still kept). metrics_host defaults to `host`.
    status_port: serve the status page (/status, /status.json; status_page/) there (0: a free port,
    see `.status_port`; None: not served); the same port as metrics_port (not 0) serves both on one
    listener. status_host defaults to metrics_host when the port is shared, else to `host`.
    compile_cache: the directory of JAX's persistent compilation cache ('' : none), so that a
    restarted server does not compile its models' steps again (core/compilation.py); JAX's setting is
    the process's, so the last server started in a process decides it. None: left as it is.
    packed: hold each model's alike small leaves in flat buffers (docs/design.md, "Packed layouts");
    False keeps every leaf as itself (the comparison the packing tests make; results are the same).

    Everything is built here and handed over at construction: the store, the metrics (which read the
    store), the checkpoint manager (which reports to the metrics) and the service (which uses all three).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 0,
        *,
        unix_socket: str | None = None,
        checkpoint_dir: str | None = None,
        device: str | None = None,
        devices: str | None = None,
        max_workers: int = 64,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_models: int | None = None,
        max_model_bytes: int | None = None,
        max_total_bytes: int | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        tokens: list[Token] | None = None,
        interceptors: list[Any] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        status_port: int | None = None,
        status_host: str | None = None,
        compile_cache: str | None = None,
        packed: bool = True,
        shared_memory: bool = False,
    ):
        if port is None and not unix_socket:
            raise ConfigError(
                "--no-tcp (port=None) without --unix-socket (unix_socket=PATH): nothing to listen on; "
                "give a socket path"
            )
        self.host = host
        self.unix_socket = UnixSocket(unix_socket) if unix_socket else None
        if compile_cache is not None:  # before any model (restored ones too) is compiled
            compilation.configure_cache(compile_cache)
        self.store = ModelStore(
            resolve_placement(device, devices),
            max_models=max_models,
            max_model_bytes=max_model_bytes,
            max_total_bytes=max_total_bytes,
            packed=packed,
        )
        self.metrics = ServerMetrics(self.store)  # its own registry: several servers may share a process
        checkpoints = None
        # '' is no checkpoints, as `serve --checkpoint-dir ''` (not the working directory). The manager
        # reports periodic, explicit and final saves alike to the metrics.
        if checkpoint_dir:
            checkpoints = CheckpointManager(checkpoint_dir, metrics=self.metrics, **(checkpoint_options or {}))
            self.metrics.watch_checkpoints(checkpoints)
        self.checkpoints = checkpoints
        # Same-host clients' memfd regions (docs/design.md, "Shared memory"): off unless asked for.
        self.shared_memory = SharedMemorySocket(tokens) if shared_memory else None
        # with checkpoints, calls are UNAVAILABLE until every model is restored (ready.set() below)
        self.service = OptserveService(
            self.store,
            metrics=self.metrics,
            checkpoints=checkpoints,
            tokens=tokens,
            chunk_bytes=chunk_bytes,
            max_workers=max_workers,
            ready=checkpoints is None,
            shared=self.shared_memory.regions if self.shared_memory is not None else None,
            shared_memory_socket=self.shared_memory.name if self.shared_memory is not None else "",
        )
        # the status page's history is sampled only when the page is served
        self.status: StatusPage | None = None
        self.status_port: int | None = None
        shared_port = status_port is not None and bool(status_port) and status_port == metrics_port
        if status_port is not None:
            sources = Sources(
                self.store,
                self.metrics,
                History(self.store.models),
                checkpoints,
                self.service.started_unix,
                self.service.incarnation,
            )
            self.status = StatusPage(sources, tokens, self.metrics.registry if shared_port else None)
        self.health = health.HealthServicer()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="optserve-rpc"),
            options=SERVER_OPTIONS,
            interceptors=([TokenAuth(tokens)] if tokens is not None else []) + list(interceptors or ()),
        )
        self._grpc.add_generic_rpc_handlers((self.service.handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)

        def add_port(address: str) -> int:
            if server_credentials is not None:
                return self._grpc.add_secure_port(address, server_credentials)
            return self._grpc.add_insecure_port(address)

        self.port: int | None = None
        self._stopped = False
        try:
            if self.unix_socket is not None:  # first: it refuses a live socket before anything listens
                self.unix_socket.bind(add_port)
            if port is not None:
                self.port = add_port(f"{host}:{port}")
                if not self.port:
                    raise OSError(f"cannot listen on {host}:{port}")
            self._grpc.start()
            if checkpoints is not None:
                checkpoints.start(self.store)  # restores every model before we report SERVING
                self.service.ready.set()
            if metrics_port is not None and not shared_port:
                self.metrics.start_http(metrics_port, metrics_host or host)
            if self.status is not None and status_port is not None:
                self.status_port = self.status.start(status_port, status_host or metrics_host or host)
                if shared_port:
                    self.metrics.port = self.status_port
        except BaseException:
            self._grpc.stop(None)
            if self.unix_socket is not None:  # no socket file outlives a server that did not start
                self.unix_socket.remove()
            if self.shared_memory is not None:
                self.shared_memory.stop()
            if self.status is not None:
                self.status.stop()
            self.metrics.stop_http()
            raise
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "optserve listening on %s (%s, incarnation %s)",
            " and ".join(self.addresses),
            self.store.describe_devices(),
            self.service.incarnation,
            extra={"event": "serving"},
        )

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE, status)
        log.info(
            "health %s",
            health_pb2.HealthCheckResponse.ServingStatus.Name(status),
            extra={"event": "health", "status": health_pb2.HealthCheckResponse.ServingStatus.Name(status)},
        )

    @property
    def addresses(self) -> list[str]:
        """Where it listens, as client targets: "host:port" for TCP, "unix:///path" for the socket."""
        tcp = [f"{self.host}:{self.port}"] if self.port is not None else []
        return tcp + ([self.unix_socket.target] if self.unix_socket is not None else [])

    @property
    def address(self) -> str:
        """The TCP "host:port", or the Unix socket's "unix:///path" when there is no TCP listener."""
        return self.addresses[0]

    def client(self, **kwargs: Any) -> Client:
        """A Client connected to this server: over its Unix socket if it has one (same host, and
        cheaper than TCP), else over TCP."""
        return Client(self.unix_socket.target if self.unix_socket is not None else self.address, **kwargs)

    def stop(self, grace: float = 10.0) -> list[str]:
        """Stops accepting pushes, finishes the calls in flight (up to `grace` s), checkpoints, stops.

        Returns one description per model whose final checkpoint failed, naming the model and the
        acknowledged steps no checkpoint holds (empty: every model's state is committed, or the
        server keeps no checkpoints; also empty when called again)."""
        if self._stopped:
            return []
        self._stopped = True
        log.info("optserve stopping: finishing calls in flight (up to %gs)", grace, extra={"event": "stopping"})
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.accepting.clear()
        for model in self.store.models():  # release pulls waiting for a step
            model.wake_waiters()
        self._grpc.stop(grace).wait(grace + 5)
        if self.unix_socket is not None:
            self.unix_socket.remove()
        if self.shared_memory is not None:  # after the calls: none still reads a region
            self.shared_memory.stop()
        failures = self.checkpoints.shutdown(self.store) if self.checkpoints is not None else []
        compilation.finish_warm_ups()  # nothing pushes any more; no compilation may outlive the process
        self.metrics.stop_http()
        if self.status is not None:
            self.status.stop()
        if failures:
            log.error(
                "optserve stopped; final checkpoints failed for %d model(s), acknowledged work is lost: %s",
                len(failures),
                "; ".join(failures),
                extra={"event": "stopped"},
            )
        else:
            log.info("optserve stopped", extra={"event": "stopped"})
        return failures

    def wait(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
