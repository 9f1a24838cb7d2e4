"""The `optserve` command: serve, demo, and admin commands against a running server.

    optserve serve [--host 127.0.0.1] [--port 8470] [--checkpoint-dir DIR] [--device gpu:0] ...
    optserve demo [--workers 4] [--steps 300] [--mode sync|async]
    optserve ls | info MODEL | save MODEL | restore MODEL [--step N] | delete MODEL | rules | health
        [--target HOST:PORT] [--token-file F] [--tls-ca F]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

DEFAULT_PORT = 8470


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a server until SIGINT/SIGTERM")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default 8470)")
    p.add_argument("--device", default=None, help="JAX platform or device: cpu, gpu, gpu:1 (default: JAX's default)")
    p.add_argument("--checkpoint-dir", default="./optserve-checkpoints",
                   help="where models are checkpointed and restored from (default ./optserve-checkpoints); "
                        "'' disables checkpoints")  # fmt: skip
    p.add_argument("--checkpoint-every-steps", type=int, default=0, help="checkpoint each model every N steps")
    p.add_argument("--checkpoint-every-seconds", type=float, default=0.0, help="checkpoint each model every S seconds")
    p.add_argument("--keep", type=int, default=3, help="committed checkpoints kept per model (default 3)")
    p.add_argument("--chunk-bytes", type=int, default=4 << 20, help="payload bytes per streamed message")
    p.add_argument("--max-workers", type=int, default=64, help="threads serving RPCs")
    p.add_argument("--max-models", type=int, default=None)
    p.add_argument("--max-model-bytes", type=int, default=None)
    p.add_argument("--max-total-bytes", type=int, default=None)
    p.add_argument("--token-file", default=None, help="bearer tokens, one per line: TOKEN [MODEL ...]")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--metrics-host", default=None, help="address for the metrics endpoint (default: --host)")
    p.add_argument("--shutdown-grace", type=float, default=20.0, help="seconds to finish calls in flight on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=("text", "json"), default="text")


def serve(args: argparse.Namespace) -> int:
    from optserve.server import logs

    logs.setup(args.log_level, args.log_format)
    from optserve.server import security
    from optserve.server.server import Server

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(
        args.host,
        args.port,
        checkpoint_dir=args.checkpoint_dir or None,
        device=args.device,
        max_workers=args.max_workers,
        chunk_bytes=args.chunk_bytes,
        max_models=args.max_models,
        max_model_bytes=args.max_model_bytes,
        max_total_bytes=args.max_total_bytes,
        checkpoint_options={"every_steps": args.checkpoint_every_steps, "every_seconds": args.checkpoint_every_seconds,
                            "keep": args.keep},  # fmt: skip
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        **security.server_options(args),
    )
    if args.metrics_port is not None:
        print(f"optserve metrics on {args.metrics_host or args.host}:{server.metrics.port}", flush=True)
    print(f"optserve listening on {args.host}:{server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    failures = server.stop(args.shutdown_grace)  # logged by stop(); acknowledged steps were lost
    return 1 if failures else 0


def _add_admin(sub: argparse._SubParsersAction) -> None:
    def target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}", help="server HOST:PORT")
        p.add_argument("--token-file", default=None, help="file whose first token is sent")
        p.add_argument("--tls-ca", default=None, help="CA file: connect with TLS")
        p.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
        p.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
        return p

    target(sub.add_parser("ls", help="list models"))
    p = target(sub.add_parser("health", help="exit 0 if the server reports SERVING (for container health checks)"))
    p.add_argument("--service", default="", help="service name to check ('' : the whole server)")
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
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from optserve.client.client import _credentials

    tls = {k: v for k, v in {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}.items() if v}
    channel = grpc.secure_channel(args.target, _credentials(tls)) if tls else grpc.insecure_channel(args.target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=5)
        except grpc.RpcError as e:
            print(f"optserve health: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def admin(args: argparse.Namespace) -> int:
    from optserve.client import OptserveError

    if args.command == "health":
        return health(args)
    if args.command == "rules" and args.local:
        from optserve.server.spec import list_rules

        _print_rules(list_rules(), args.json)
        return 0
    try:
        with _client(args) as client:
            if args.command == "ls":
                for m in client.list_models():
                    print(f"{m['name']:<24} step {m['step']:<10} {m['mode']:<6} {m['leaves']} leaves, {m['param_bytes']} bytes")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description="optimizer-as-a-service parameter server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from optserve.server import demo

    demo.add_parser(sub)
    _add_admin(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "demo":
        return demo.run(args)
    return admin(args)


if __name__ == "__main__":
    sys.exit(main())
