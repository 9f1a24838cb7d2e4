"""`optserve download` and `optserve upload`: a model's whole state to a safetensors file and back,
through the client (`Model.download`, `ShardedModel.download`, `Client.upload`), with a progress
bar on a terminal (cli/progress.py) and one result line on stdout."""

from __future__ import annotations

import argparse
import os
import sys

from optserve.server.cli import admin
from optserve.server.cli.flags import add_placement_flags
from optserve.server.cli.progress import progress_bar


def add_parsers(sub: argparse._SubParsersAction) -> dict[str, argparse.ArgumentParser]:
    download = admin.target(
        sub.add_parser(
            "download",
            help="write a model's whole state (parameters, optimizer state, EMA, workers) into a safetensors file",
            description="Download a model into one safetensors file, as Model.download does; a sharded model "
            "(found from the server --target names) is gathered from all its shards into the file an unsharded "
            "model writes. `optserve upload` creates a model from it.",
        )
    )
    download.add_argument("model")
    download.add_argument("file", help="the file to write (replaced atomically when complete)")
    upload = admin.target(
        sub.add_parser(
            "upload",
            help="create a model from a file written by download",
            description="Create a model from a file written by `optserve download` (or Model.download): on the "
            "server --target names, or placed over the servers --targets names, whatever the shard count of the "
            "model downloaded; it continues exactly where the downloaded model was.",
        )
    )
    upload.add_argument("file")
    upload.add_argument("--model", metavar="NAME", default="", help="the new model's name (default: the file's)")
    add_placement_flags(
        upload,
        targets_help="place the model over these servers, comma-separated, shard 0 first (default: --target alone)",
        split_help="with --targets: split leaves larger than this by rows over the shards (default: 4194304)",
    )
    return {"download": download, "upload": upload}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Exit status 0; 2 for a file or flag that cannot work (one line naming it); 1 when the server
    refuses (one line with its message; nothing was created or written)."""
    from optserve.client import OptserveError

    if args.command == "upload" and not os.path.isfile(args.file):
        parser.error(f"{args.file}: no such file")
    if args.command == "download" and not os.path.isdir(os.path.dirname(os.path.abspath(args.file))):
        parser.error(f"{args.file}: its directory does not exist")
    if args.command == "upload" and args.split_bytes is not None and args.targets is None:
        parser.error("--split-bytes: only with --targets (an unsharded model splits nothing)")
    try:
        with admin.connect(args, args.targets if args.command == "upload" else None) as client:
            if args.command == "download":
                model = client.model(args.model)
                with progress_bar(f"downloading {args.model}") as report:
                    size = model.download(args.file, progress=report)
                print(f"downloaded {args.model} ({size} bytes) to {args.file}")
            else:
                with progress_bar(f"uploading {os.path.basename(args.file)}") as report:
                    model = client.upload(args.file, args.model or None, split_bytes=args.split_bytes, progress=report)
                info = model.info()
                where = f" over {len(info['shards'])} shards" if info.get("shards") else ""
                print(f"uploaded {model.name} at step {info['step']}{where}")
    except OptserveError as e:
        what = f"{args.file}: " if args.command == "upload" else ""
        print(f"optserve {args.command}: {what}{e}", file=sys.stderr)
        return 1
    return 0
