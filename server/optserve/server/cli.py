"""The `optserve` command: serve, demo, and admin commands against a running server.

optserve serve [--host 127.0.0.1] [--port 8470] [--unix-socket PATH [--no-tcp]] [--checkpoint-dir DIR] ...
optserve demo [--workers 4] [--steps 300] [--mode sync|async]
optserve ls | info MODEL | save MODEL | restore MODEL [--step N] | delete MODEL | rules | health
    [--target HOST:PORT | unix:///PATH] [--token-file F] [--tls-ca F]
optserve top [--url http://HOST:STATUS_PORT] [--token-file F] [--once]
optserve reshard --model NAME --from DIR [DIR ...] --to DIR [DIR ...] [--targets HOST:PORT,...] [--step N]
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from optserve.server import unix_socket
from optserve.server.core.errors import ConfigError
from optserve.wire.channel import tls_options

DEFAULT_PORT = 8470


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class OneLineErrors(argparse.ArgumentParser):
    """A subcommand's parser whose mistakes are one line naming the flag (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _add_serve(sub: argparse._SubParsersAction) -> None:
    # Every flag's help ends with its default, so `serve --help` is the reference (tests/test_cli_serve.py).
    port, count, positive = _int_at_least(0, 65535), _int_at_least(0), _int_at_least(1)
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
        type=_seconds,
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
        type=_seconds,
        default=20.0,
        help="seconds to finish calls in flight on SIGTERM, then the final checkpoints (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default="INFO",
        help=f"{', '.join(LOG_LEVELS)} (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or json: one JSON object per line (default: %(default)s)",
    )


def _check_listen(host_flag: str, host: str, port_flag: str, port: int) -> None:
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


def _check_writable_dir(flag: str, path: str, fix: str) -> None:
    """The directory exists (created if missing), and can be listed and written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a directory; {fix}")
    try:
        os.makedirs(path, exist_ok=True)
        os.listdir(path)
        with tempfile.TemporaryFile(dir=path, prefix=".optserve-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}; {fix}") from None


def _check_checkpoint_dir(path: str) -> None:
    _check_writable_dir(
        "--checkpoint-dir", path, "give a writable directory (created if missing), or '' for no checkpoints"
    )


def _compile_cache(args: argparse.Namespace, default: str) -> str:
    """The compilation cache directory ('' : none), checked like --checkpoint-dir; `default` is the
    one under the checkpoint directory, used when the flag is not given."""
    path = default if args.compile_cache is None else args.compile_cache
    if path.strip().lower() in ("", "none"):
        return ""
    flag = "--compile-cache" if args.compile_cache is not None else "--compile-cache (default, in --checkpoint-dir)"
    _check_writable_dir(flag, path, "give a writable directory (created if missing), or '' for none")
    return path


def _check_serve_args(args: argparse.Namespace) -> dict[str, Any]:
    """Checks what can be checked before the server starts; returns security's Server options."""
    if args.checkpoint_dir:
        _check_checkpoint_dir(args.checkpoint_dir)
    if args.no_tcp and not args.unix_socket:
        raise ConfigError("--no-tcp: then the server needs --unix-socket PATH to listen on; give one, or drop --no-tcp")
    if args.unix_socket is not None:
        unix_socket.check(args.unix_socket)  # again in Server, just before it binds
    if not args.no_tcp:
        _check_listen("--host", args.host, "--port", args.port)
    if args.metrics_port is not None:
        _check_listen(
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
            _check_listen(
                "--status-host" if args.status_host else "--host", status_host, "--status-port", args.status_port
            )
        if args.status_port and not args.no_tcp and args.status_port == args.port and status_host == args.host:
            raise ConfigError(f"--status-port {args.status_port}: the same as --port; give another (0: a free one)")
    from optserve.server.api import auth as security  # imports the client (numpy, ml_dtypes): after the cheap checks

    return security.server_options(args)


def serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGINT/SIGTERM. Exit status: 0; 2 for an option that cannot work (one
    line on stderr naming the flag and the fix); 1 if a final checkpoint failed at shutdown."""
    from optserve.server import logs

    asked = [x for x in (args.device, args.devices) if x]
    if asked and all(x.lower().partition(":")[0] == "cpu" for x in asked):
        # Asked for the CPU: JAX need not probe for (and log about) accelerators it will not use.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logs.setup(args.log_level, args.log_format)
    try:
        options = _check_serve_args(args)
        from optserve.server.server import Server, default_compile_cache, resolve_placement

        resolve_placement(args.device, args.devices)  # before anything starts or logs: a usage mistake
        compile_cache = _compile_cache(args, default_compile_cache(args.checkpoint_dir or None))
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
        return _usage_error(str(e))
    except RuntimeError as e:
        if "Failed to bind" not in str(e):  # grpc's words when the port was taken after our check
            raise
        return _usage_error(
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


def _usage_error(message: str) -> int:
    print(f"optserve serve: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


def _add_admin(sub: argparse._SubParsersAction) -> None:
    def target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--target",
            default=f"127.0.0.1:{DEFAULT_PORT}",
            help="server HOST:PORT, or unix:///PATH of its --unix-socket",
        )
        p.add_argument("--token-file", default=None, help="file whose first token is sent")
        p.add_argument("--tls-ca", default=None, help="CA file: connect with TLS")
        p.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
        p.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
        return p

    target(sub.add_parser("ls", help="list models"))
    p = target(sub.add_parser("health", help="exit 0 if the server reports SERVING (for container health checks)"))
    p.add_argument("--service", default="", help="service name to check ('' : the whole server)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds to wait for the answer; a probe's own timeout must exceed it plus this "
        "command's start-up, ~1-3 s (default: %(default)s)",
    )
    target(sub.add_parser("info", help="describe a model")).add_argument("model")
    target(sub.add_parser("save", help="checkpoint a model now")).add_argument("model")
    p = target(sub.add_parser("restore", help="restore a model from a checkpoint"))
    p.add_argument("model")
    p.add_argument("--step", type=int, default=0, help="checkpoint step (default: newest that verifies)")
    p = target(sub.add_parser("delete", help="delete a model"))
    p.add_argument("model")
    p.add_argument("--checkpoints", action="store_true", help="also delete its checkpoints")
    p = target(sub.add_parser("rules", help="list the rules, presets and schedules the server knows"))
    p.add_argument("--local", action="store_true", help="list this installation's rules without a server")
    p.add_argument("--json", action="store_true")


def _client(args: argparse.Namespace) -> Any:
    from optserve.client import Client

    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = next((line.split()[0] for line in f if line.strip() and not line.startswith("#")), None)
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = {k: v for k, v in {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}.items() if v}
    return Client(args.target, token=token, tls=tls, timeout=60.0)


def _print_rules(rules: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rules, indent=1))
        return
    for r in rules:
        hp = ", ".join(f"{h['name']}={json.dumps(h['default'])}" for h in r["hyperparams"])
        print(f"{r['name']:<34} {r['kind']:<10} {r['library']:<8} {hp}")


def health(args: argparse.Namespace) -> int:
    """Asks the standard gRPC health service (open without a token); prints the status."""
    # Only grpc: this runs as a container probe, where the client's imports (numpy, ml_dtypes: ~1 s
    # on a loaded machine) would eat the probe's timeout.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    if args.tls_ca or args.tls_cert or args.tls_key:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.tls_ca), private_key=read(args.tls_key), certificate_chain=read(args.tls_cert)
        )
        channel = grpc.secure_channel(args.target, credentials, options=tls_options(args.target))
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        try:
            request = health_pb2.HealthCheckRequest(service=args.service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"optserve health: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def admin(args: argparse.Namespace) -> int:
    if args.command == "health":
        return health(args)
    from optserve.client import OptserveError

    if args.command == "rules" and args.local:
        from optserve.server.spec import list_rules

        _print_rules(list_rules(), args.json)
        return 0
    try:
        with _client(args) as client:
            if args.command == "ls":
                for m in client.list_models():
                    print(
                        f"{m['name']:<24} step {m['step']:<10} {m['mode']:<6} "
                        f"{m['leaves']} leaves, {m['param_bytes']} bytes"
                    )
            elif args.command == "info":
                print(json.dumps(client.model(args.model).info(), indent=1, default=str))
            elif args.command == "save":
                print(f"saved {args.model} at step {client.model(args.model).save()}")
            elif args.command == "restore":
                print(f"restored {args.model} to step {client.model(args.model).restore(args.step)}")
            elif args.command == "delete":
                client.delete_model(args.model, delete_checkpoints=args.checkpoints)
                print(f"deleted {args.model}")
            elif args.command == "rules":
                _print_rules(client.rules(), args.json)
    except OptserveError as e:
        print(f"optserve {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


def _add_top(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "top", help="watch a server's models and workers in the terminal, refreshed in place (needs --status-port)"
    )
    p.add_argument(
        "--url",
        default="http://127.0.0.1:9480",
        help="the server's status page: http://HOST:PORT of its --status-port (default: %(default)s)",
    )
    p.add_argument("--token-file", default=None, help="file whose first token is sent (Authorization: Bearer)")
    p.add_argument("--interval", type=_seconds, default=2.0, help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--model", default=None, help="whose workers to list (default: the first model)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (scripts, pipes)")


def _targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",")]
    for t in targets:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{t!r} is not HOST:PORT (give them comma-separated, e.g. a:8470,b:8470)")
    if len(set(targets)) != len(targets):
        raise argparse.ArgumentTypeError(f"the addresses must be distinct, got {text!r}")
    return targets


def _add_reshard(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "reshard",
        help="move a model's checkpoints from N shard servers' directories to M, offline",
        description="Reshard a model offline, with its servers stopped: read the newest step committed in "
        "every --from directory (each a shard server's --checkpoint-dir), verify and gather it, place it "
        "over the --targets, and commit one checkpoint per --to directory, from which servers started on "
        "those directories restore the new shards. A model directory already in a --to directory (the "
        'old shard\'s) is moved to DIR/.archive/ first (README.md, "Sharded models").',
    )
    p.add_argument("--model", metavar="NAME", required=True, help="the model to reshard")
    p.add_argument(
        "--from",
        dest="sources",
        metavar="DIR",
        nargs="+",
        required=True,
        help="the checkpoint directories of every server holding the model now, in any order (one for an "
        "unsharded model)",
    )
    p.add_argument(
        "--to",
        dest="dests",
        metavar="DIR",
        nargs="+",
        required=True,
        help="the checkpoint directories of the new shard servers, in shard order (one: the model unsharded); "
        "they may be --from directories",
    )
    p.add_argument(
        "--targets",
        metavar="HOST:PORT,...",
        type=_targets,
        default=None,
        help="the new shards' addresses as clients reach them, comma-separated in --to's order "
        "(needed for more than one --to directory)",
    )
    p.add_argument(
        "--step",
        metavar="N",
        type=_int_at_least(0),
        default=None,
        help="the step to reshard (default: the newest committed in every --from directory)",
    )
    p.add_argument(
        "--split-bytes",
        metavar="BYTES",
        type=_int_at_least(1),
        default=None,
        help="split leaves larger than this by rows over the shards (default: 4194304, as create_model)",
    )
    return p


def reshard(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`optserve reshard`. Exit status: 0; 2 for flags that cannot work (one line naming the flag);
    1 when the checkpoints cannot be resharded (one line saying why; nothing was written)."""
    if len(args.dests) > 1 and args.targets is None:
        parser.error(f"--targets: needed for {len(args.dests)} --to directories (one address per directory)")
    if args.targets is not None and len(args.targets) != len(args.dests):
        parser.error(f"--targets: {len(args.targets)} addresses for {len(args.dests)} --to directories")
    for flag, dirs in (("--from", args.sources), ("--to", args.dests)):
        real = [os.path.realpath(d) for d in dirs]
        if len(set(real)) != len(real):
            parser.error(f"{flag}: a directory is given twice")
    for d in args.sources:
        if not os.path.isdir(d):
            parser.error(f"--from {d}: not a directory")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # it compiles nothing: no accelerator to probe for
    from optserve.server.checkpoint import resharding

    try:
        done = resharding.reshard(
            args.model,
            args.sources,
            args.dests,
            args.targets or (),
            step=args.step,
            split_bytes=args.split_bytes or 0,
        )
    except resharding.ReshardUsageError as e:
        parser.error(str(e))
    except resharding.ReshardError as e:
        print(f"optserve reshard: error: {' '.join(str(e).split())} (nothing was written)", file=sys.stderr)
        return 1
    except resharding.ReshardIncomplete as e:
        print(f"optserve reshard: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    placed = "unsharded" if done.shard_map is None else f"over {done.shard_map.shards} shards"
    print(f"model {args.model!r} step {done.step}: read {', '.join(done.sources)}; placed {placed}")
    for w in done.written:
        what = "whole model" if w.index is None else f"shard {w.index} ({w.target})"
        moved = f"; the model directory there before is now {w.archived}" if w.archived else ""
        print(f"  {what}: {w.path}{moved}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description="optimizer-as-a-service parameter server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    _add_serve(sub)
    from optserve.server import demo

    demo.add_parser(sub)
    _add_admin(sub)
    _add_top(sub)
    reshard_parser = _add_reshard(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "reshard":
        return reshard(args, reshard_parser)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "top":
        from optserve.server import top  # rich: loaded only for `optserve top`

        return top.run(args)
    return admin(args)


if __name__ == "__main__":
    sys.exit(main())
