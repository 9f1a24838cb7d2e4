"""`optserve reshard`: a model's checkpoints moved from N shard servers' directories to M, offline
(the work is checkpoint/resharding.py's)."""

from __future__ import annotations

import argparse
import os
import sys

from optserve.server.cli.flags import add_placement_flags, int_at_least
from optserve.server.cli.progress import progress_bar


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
        "--step",
        metavar="N",
        type=int_at_least(0),
        default=None,
        help="the step to reshard (default: the newest committed in every --from directory)",
    )
    add_placement_flags(
        p,
        targets_help="the new shards' addresses as clients reach them, comma-separated in --to's order "
        "(needed for more than one --to directory)",
        split_help="split leaves larger than this by rows over the shards (default: 4194304, as create_model)",
    )
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
        with progress_bar(f"resharding {args.model}", unit="checkpoints") as report:
            done = resharding.reshard(
                args.model,
                args.sources,
                args.dests,
                args.targets or (),
                step=args.step,
                split_bytes=args.split_bytes or 0,
                progress=report,
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
