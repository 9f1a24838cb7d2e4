"""The admin commands against a running server (ls, info, save, restore, delete, rules, health):
one call each through the client, or grpc's health service alone for `health`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from optserve.server.cli.flags import DEFAULT_PORT, seconds
from optserve.server.cli.progress import activity
from optserve.wire.channel import tls_options


def target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of a command that talks to a server (here and in cli/transfer.py)."""
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    target(sub.add_parser("ls", help="list models"))
    p = target(sub.add_parser("health", help="exit 0 if the server reports SERVING (for container health checks)"))
    p.add_argument("--service", default="", help="service name to check ('' : the whole server)")
    p.add_argument(
        "--timeout",
        type=seconds,
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


def connect(args: argparse.Namespace, targets: list[str] | None = None) -> Any:
    """A client of the server `--target` names (or of `targets`, the servers of a sharded model),
    with the token and TLS flags."""
    from optserve.client import Client

    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = next((line.split()[0] for line in f if line.strip() and not line.startswith("#")), None)
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = {k: v for k, v in {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}.items() if v}
    return Client(targets or args.target, token=token, tls=tls, timeout=60.0)


def print_rules(rules: list[dict], as_json: bool) -> None:
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


def run(args: argparse.Namespace) -> int:
    if args.command == "health":
        return health(args)
    from optserve.client import OptserveError

    if args.command == "rules" and args.local:
        from optserve.server.spec import list_rules

        print_rules(list_rules(), args.json)
        return 0
    try:
        with connect(args) as client:
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
                model = client.model(args.model)
                with activity(f"restoring {args.model}"):
                    step = model.restore(args.step)
                print(f"restored {args.model} to step {step}")
            elif args.command == "delete":
                client.delete_model(args.model, delete_checkpoints=args.checkpoints)
                print(f"deleted {args.model}")
            elif args.command == "rules":
                print_rules(client.rules(), args.json)
    except OptserveError as e:
        print(f"optserve {args.command}: {e}", file=sys.stderr)
        return 1
    return 0
