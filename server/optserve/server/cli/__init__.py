"""The `optserve` command: serve, demo, top, reshard, and admin commands against a running server.

optserve serve [--host 127.0.0.1] [--port 8470] [--unix-socket PATH [--no-tcp]] [--checkpoint-dir DIR] ...
optserve demo [--workers 4] [--steps 300] [--mode sync|async]
optserve ls | info MODEL | save MODEL | restore MODEL [--step N] | delete MODEL | rules | health
    [--target HOST:PORT | unix:///PATH] [--token-file F] [--tls-ca F]
optserve download MODEL FILE | upload FILE [--model NAME] [--targets HOST:PORT,...]  (same server flags)
optserve top [--url http://HOST:STATUS_PORT] [--token-file F] [--once]
optserve reshard --model NAME --from DIR [DIR ...] --to DIR [DIR ...] [--targets HOST:PORT,...] [--step N]

One module per command (serve.py, admin.py, transfer.py, reshard.py; flags.py for what they share,
progress.py for the bars of the long ones on a terminal); each loads
what only it needs (jax, the client, rich) inside the function that runs it, so that
`optserve --help` and the admin commands start fast.
"""

from __future__ import annotations

import argparse

from optserve.server.cli import admin, reshard, serve, transfer
from optserve.server.cli.flags import OneLineErrors, seconds


def add_top_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "top", help="watch a server's models and workers in the terminal, refreshed in place (needs --status-port)"
    )
    p.add_argument(
        "--url",
        default="http://127.0.0.1:9480",
        help="the server's status page: http://HOST:PORT of its --status-port (default: %(default)s)",
    )
    p.add_argument("--token-file", default=None, help="file whose first token is sent (Authorization: Bearer)")
    p.add_argument("--interval", type=seconds, default=2.0, help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--model", default=None, help="whose workers to list (default: the first model)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (scripts, pipes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description="optimizer-as-a-service parameter server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    serve.add_parser(sub)
    from optserve.server import demo

    demo.add_parser(sub)
    admin.add_parsers(sub)
    transfer_parsers = transfer.add_parsers(sub)
    add_top_parser(sub)
    reshard_parser = reshard.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "reshard":
        return reshard.run(args, reshard_parser)
    if args.command in transfer_parsers:
        return transfer.run(args, transfer_parsers[args.command])
    if args.command == "demo":
        return demo.run(args)
    if args.command == "top":
        from optserve.server import top  # rich: loaded only for `optserve top`

        return top.run(args)
    return admin.run(args)
