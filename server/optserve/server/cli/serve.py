"""`optserve serve`: its flags, the checks made before anything starts (each mistake one line
naming the flag, exit status 2), and the server's run until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import threading
from typing import Any

from optserve.server import unix_socket
from optserve.server.cli.flags import (
    DEFAULT_PORT,
    LOG_LEVELS,
    check_writable_dir,
    int_at_least,
    log_level,
    seconds,
    usage_error,
)
from optserve.server.core.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Every flag's help ends with its default, so `serve --help` is the reference (tests/test_cli_serve.py).
    port, count, positive = int_at_least(0, 65535), int_at_least(0), int_at_least(1)
    p = sub.add_parser(
        "serve",
        help="run a server until SIGINT/SIGTERM",
        description="Run an optserve server until "
        "SIGINT/SIGTERM; then it finishes the calls in flight and checkpoints every model.",
    )
    p.add_argument(
        "--host",
        metavar="ADDRESS",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0: every interface (default: %(default)s)",
    )
    p.add_argument(
        "--port",
        metavar="N",
        type=port,
        default=DEFAULT_PORT,
        help="gRPC port; 0 picks a free one (default: %(default)s)",
    )
    p.add_argument(
        "--unix-socket",
        metavar="PATH",
        default=None,
        help="also listen on a Unix domain socket there (clients: unix:///PATH), created owner-only (0600) and "
        "removed on exit; a stale socket left by a killed server is replaced, one another server listens on "
        "is refused; tokens, TLS and limits apply as on TCP (default: none)",
    )
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="let clients on this host with this server's uid (and token) move tensors through shared memory: "
        "memfd regions registered over a side socket in the abstract namespace (nothing on disk, nothing "
        "left after a kill); clients use it on their own and fall back to the byte stream (default: off)",
    )
    p.add_argument(
        "--no-tcp",
        action="store_true",
        help="listen only on --unix-socket, not on --host/--port (default: TCP as well)",
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="JAX platform or device holding the models: cpu, gpu, gpu:1 "
        "(default: JAX's default device, a GPU if there is one)",
    )
    p.add_argument(
        "--devices",
        metavar="DEVICES",
        default=None,
        help="several devices holding every model sharded over them (a mesh): all, gpu:0-3, gpu:0,2, "
        "cpu:0-3 with XLA_FLAGS=--xla_force_host_platform_device_count=N for fake CPU devices; not with --device "
        "(default: one device, --device)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        default="./optserve-checkpoints",
        help="where models are checkpointed, and restored from at start; '' disables checkpoints "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="JAX's persistent compilation cache: compiled update steps are kept there, so that a restarted "
        "server, or another with the same model layouts, does not compile them again; trusted like the "
        "checkpoints (whoever writes to it can run code in the server); '' or none disables it "
        "(default: DIR/.compile-cache of --checkpoint-dir, none without checkpoints)",
    )
    p.add_argument(
        "--checkpoint-every-steps",
        metavar="N",
        type=count,
        default=0,
        help="checkpoint each model every N steps; 0: off (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every-seconds",
        metavar="S",
        type=seconds,
        default=0.0,
        help="checkpoint each model every S seconds; 0: off (default: %(default)s)",
    )
    p.add_argument(
        "--keep",
        metavar="N",
        type=positive,
        default=3,
        help="committed checkpoints kept per model (default: %(default)s)",
    )
    p.add_argument(
        "--chunk-bytes",
        metavar="BYTES",
        type=positive,
        default=4 << 20,
        help="tensor payload bytes per streamed message (default: %(default)s)",
    )
    p.add_argument(
        "--max-workers",
        metavar="N",
        type=positive,
        default=64,
        help="threads serving RPCs; each stream holds one while it runs (default: %(default)s)",
    )
    p.add_argument(
        "--max-models",
        metavar="N",
        type=positive,
        default=None,
        help="refuse to create more models than this (default: no limit)",
    )
    p.add_argument(
        "--max-model-bytes",
        metavar="BYTES",
        type=positive,
        default=None,
        help="refuse a model whose parameters and optimizer state exceed this (default: no limit)",
    )
    p.add_argument(
        "--max-total-bytes",
        metavar="BYTES",
        type=positive,
        default=None,
        help="refuse a model that would take all models past this (default: no limit)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="require a bearer token from this file: one per line, TOKEN [MODEL ...] (default: none, no token asked)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="serve TLS with this PEM certificate; needs --tls-key (default: none, plaintext)",
    )
    p.add_argument("--tls-key", metavar="FILE", default=None, help="PEM private key of --tls-cert (default: none)")
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        default=None,
        help="require client certificates signed by this CA (mutual TLS; needs --tls-cert) (default: none)",
    )
    p.add_argument(
        "--metrics-port",
        metavar="N",
        type=port,
        default=None,
        help="serve Prometheus metrics on this port; 0 picks a free one (default: not served)",
    )
    p.add_argument(
        "--metrics-host", metavar="ADDRESS", default=None, help="address for the metrics endpoint (default: --host)"
    )
    p.add_argument(
        "--status-port",
        metavar="N",
        type=port,
        default=None,
        help="serve the status page there: /status (HTML, reloads itself) and /status.json; tokens apply as to "
        "the RPCs (Authorization: Bearer, or ?token=); the same port as --metrics-port serves both; 0 picks a "
        "free one (default: not served)",
    )
    p.add_argument(
        "--status-host",
        metavar="ADDRESS",
        default=None,
        help="address for the status page (default: --metrics-host when it shares the metrics port, else --host)",
    )
    p.add_argument(
        "--shutdown-grace",
        metavar="S",
        type=seconds,
        default=20.0,
        help="seconds to finish calls in flight on SIGTERM, then the final checkpoints (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=log_level,
        default="INFO",
        help=f"{', '.join(LOG_LEVELS)} (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or json: one JSON object per line (default: %(default)s)",
    )


def check_listen(host_flag: str, host: str, port_flag: str, port: int) -> None:
    """Fails early, naming the flag, if the server could not listen on host:port.

    Binding a throwaway socket (no SO_REUSEPORT, unlike grpc's) also catches another optserve on the
    port, which grpc would otherwise share it with.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(
            f"{host_flag} {host}: cannot resolve it ({e.strerror}); give an address of this machine, "
            "e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    failures = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{port_flag} {port}: {host}:{port} is already in use (another server?); "
                        f"stop it, or pick another port (0: a free one)"
                    ) from None
                failures.append(e)
    if failures and len(failures) == len(addresses):  # grpc listens if any address binds
        first = failures[0]
        if first.errno == errno.EACCES:
            raise ConfigError(
                f"{port_flag} {port}: permission denied (ports below 1024 need privileges); pick a port from 1024 up"
            ) from None
        raise ConfigError(
            f"{host_flag} {host}: cannot listen there ({first.strerror}); give an address of this "
            "machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None


def check_checkpoint_dir(path: str) -> None:
    check_writable_dir(
        "--checkpoint-dir", path, "give a writable directory (created if missing), or '' for no checkpoints"
    )


def compile_cache_dir(args: argparse.Namespace, default: str) -> str:
    """The compilation cache directory ('' : none), checked like --checkpoint-dir; `default` is the
    one under the checkpoint directory, used when the flag is not given."""
    path = default if args.compile_cache is None else args.compile_cache
    if path.strip().lower() in ("", "none"):
        return ""
    flag = "--compile-cache" if args.compile_cache is not None else "--compile-cache (default, in --checkpoint-dir)"
    check_writable_dir(flag, path, "give a writable directory (created if missing), or '' for none")
    return path


def check_serve_args(args: argparse.Namespace) -> dict[str, Any]:
    """Checks what can be checked before the server starts; returns security's Server options."""
    if args.checkpoint_dir:
        check_checkpoint_dir(args.checkpoint_dir)
    if args.no_tcp and not args.unix_socket:
        raise ConfigError("--no-tcp: then the server needs --unix-socket PATH to listen on; give one, or drop --no-tcp")
    if args.unix_socket is not None:
        unix_socket.check(args.unix_socket)  # again in Server, just before it binds
    if not args.no_tcp:
        check_listen("--host", args.host, "--port", args.port)
    if args.metrics_port is not None:
        check_listen(
            "--metrics-host" if args.metrics_host else "--host",
            args.metrics_host or args.host,
            "--metrics-port",
            args.metrics_port,
        )
        same_host = (args.metrics_host or args.host) == args.host
        if args.metrics_port and not args.no_tcp and args.metrics_port == args.port and same_host:
            raise ConfigError(f"--metrics-port {args.metrics_port}: the same as --port; give another (0: a free one)")
    if args.status_port is not None:
        shared = bool(args.status_port) and args.status_port == args.metrics_port
        status_host = args.status_host or (args.metrics_host if shared else None) or args.host
        if shared and status_host != (args.metrics_host or args.host):
            raise ConfigError(
                f"--status-host {status_host}: the status page shares --metrics-port {args.metrics_port}, which "
                f"listens on {args.metrics_host or args.host}; give the same address, or another --status-port"
            )
        if not shared:
            check_listen(
                "--status-host" if args.status_host else "--host", status_host, "--status-port", args.status_port
            )
        if args.status_port and not args.no_tcp and args.status_port == args.port and status_host == args.host:
            raise ConfigError(f"--status-port {args.status_port}: the same as --port; give another (0: a free one)")
    from optserve.server.api import auth as security  # imports the client (numpy, ml_dtypes): after the cheap checks

    return security.server_options(args)


def run(args: argparse.Namespace) -> int:
    """Runs the server until SIGINT/SIGTERM. Exit status: 0; 2 for an option that cannot work (one
    line on stderr naming the flag and the fix); 1 if a final checkpoint failed at shutdown."""
    from optserve.server import logs

    asked = [x for x in (args.device, args.devices) if x]
    if asked and all(x.lower().partition(":")[0] == "cpu" for x in asked):
        # Asked for the CPU: JAX need not probe for (and log about) accelerators it will not use.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logs.setup(args.log_level, args.log_format)
    try:
        options = check_serve_args(args)
        from optserve.server.server import Server, default_compile_cache, resolve_placement

        resolve_placement(args.device, args.devices)  # before anything starts or logs: a usage mistake
        compile_cache = compile_cache_dir(args, default_compile_cache(args.checkpoint_dir or None))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        server = Server(
            args.host,
            None if args.no_tcp else args.port,
            unix_socket=args.unix_socket,
            checkpoint_dir=args.checkpoint_dir or None,
            device=args.device,
            devices=args.devices,
            max_workers=args.max_workers,
            chunk_bytes=args.chunk_bytes,
            max_models=args.max_models,
            max_model_bytes=args.max_model_bytes,
            max_total_bytes=args.max_total_bytes,
            checkpoint_options={
                "every_steps": args.checkpoint_every_steps,
                "every_seconds": args.checkpoint_every_seconds,
                "keep": args.keep,
            },
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            status_port=args.status_port,
            status_host=args.status_host,
            compile_cache=compile_cache,
            shared_memory=args.shared_memory,
            **options,
        )
    except ConfigError as e:
        return usage_error(str(e))
    except RuntimeError as e:
        if "Failed to bind" not in str(e):  # grpc's words when the port was taken after our check
            raise
        return usage_error(
            f"--port {args.port}: cannot listen on {args.host}:{args.port}; pick another port (0: a free one)"
        )
    if args.metrics_port is not None:
        print(f"optserve metrics on {args.metrics_host or args.host}:{server.metrics.port}", flush=True)
    if args.status_port is not None:
        shared = bool(args.status_port) and args.status_port == args.metrics_port
        host = args.status_host or (args.metrics_host if shared else None) or args.host
        print(f"optserve status on http://{host}:{server.status_port}/status", flush=True)
    if not args.no_tcp:
        print(f"optserve listening on {args.host}:{server.port}", flush=True)
    if args.unix_socket:
        print(f"optserve listening on {unix_socket.target(args.unix_socket)}", flush=True)
    if server.shared_memory is not None:
        print(f"optserve shared memory on {server.shared_memory.name}", flush=True)
    while not stop.wait(0.5):
        pass
    # Server.stop returns the final checkpoints that failed (acknowledged steps lost): not a clean exit.
    failures = server.stop(args.shutdown_grace)
    for failure in failures:
        print(f"optserve serve: {failure}", file=sys.stderr, flush=True)
    return 1 if failures else 0
