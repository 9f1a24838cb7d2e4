"""Embedding tables: row-sparse pushes and row pulls against dense ones, and against the table size.

One `optserve serve` process on 127.0.0.1 holds one `lazy_adam` model per table size (`--rows`,
default 1M and 10M rows of width `--width` 64, float32), each table drawn on the server (`Init`,
nothing crosses the wire). The script times, median of `--rounds` after
`--warmup` (which also compiles each padded size), every size's model alive on one server and
timed in turn call by call (`common.interleaved_medians`: a slow phase of the shared machine hits
every size alike):

- rows push: `model.push({"table": Rows(ids, values)})` of `--k` (4096) random ids;
- rows pull: `model.pull_rows({"table": ids})` of as many ids;
- dense push and dense pull of the whole table (`model.push(gradient)`, `model.pull(out=)`), only
  for the sizes in `--dense` (default 1M: the baseline the issue's 20x target is against), timed
  in turn with that size's rows push and pull (`--dense-rounds`), whose medians the ratio uses;
- sync rows push: the same rows pushed by the one worker of a sync model (`workers=1`: each push
  closes a round, summed at the union of its rows: core/round_sums.py), only for the sizes in
  `--sync` (default 1M), timed in turn with that size's async rows push.

Ratios are within the run: dense over rows at the same size (target >= 20x at 1M rows), and each
size's rows figure over the smallest size's (target <= 1.5x at 10M: the cost follows the rows
touched, not the table). A run that would need more than `--memory-fraction` of
MemAvailable (tables, moments, the drawn host copy, the dense gradient) skips the run with the
reason.

    python bench/embeddings.py [--rows 1000000,10000000] [--sync 1000000] [--k 4096] [--rounds 20]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

from optserve.client import Client, Init, Rows


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(sizes: list[int], args: argparse.Namespace, dense: set[int], sync: set[int]) -> list[dict]:
    """Every size's model on one server, alive at once, timed in turn call by call (the order
    rotating: `common.interleaved_medians`), so that a slow phase of a shared machine hits every
    size alike; the dense baselines likewise in turn with their size's rows calls."""
    width, k = args.width, args.k
    proc, target = common.optserve_server()
    try:
        with Client(target, timeout=600) as client:
            rng = np.random.default_rng(0)
            models, pushes, pulls = {}, [], []
            for rows in sizes:
                model = models[rows] = client.create_model(
                    f"table-{rows}",
                    {"table": Init((rows, width), "float32", "normal", stddev=0.01, seed=0)},
                    {"lazy_adam": {"learning_rate": 0.001}},
                )
                batches = [
                    (rng.integers(0, rows, k), rng.standard_normal((k, width)).astype(np.float32)) for _ in range(8)
                ]
                pushes.append(_cycle_push(model, batches))
                pulls.append(_cycle_pull(model, [ids for ids, _ in batches]))
            push_ms = common.interleaved_medians(tuple(pushes), args.rounds, args.warmup)
            pull_ms = common.interleaved_medians(tuple(pulls), args.rounds, args.warmup)
            out = [
                {"rows": rows, "rows push ms": 1e3 * a, "rows pull ms": 1e3 * b}
                for rows, a, b in zip(sizes, push_ms, pull_ms, strict=True)
            ]
            for i, rows in enumerate(sizes):
                if rows in dense:
                    out[i].update(_dense(models[rows], rows, width, pushes[i], pulls[i], args.dense_rounds))
                if rows in sync:
                    out[i].update(_sync(client, rows, width, k, pushes[i], args))
            return out
    finally:
        common.stop(proc)


def _dense(model, rows: int, width: int, push_rows, pull_rows, rounds: int) -> dict:  # type: ignore[no-untyped-def]
    """The dense push and pull of the whole table, in turn with the rows push and pull."""
    grad = {"table": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)}
    params = model.pull()
    d_push, r_push, d_pull, r_pull = common.interleaved_medians(
        (lambda: model.push(grad), push_rows, lambda: model.pull(out=params), pull_rows), rounds, 1
    )
    return {
        "dense push ms": 1e3 * d_push,
        "dense pull ms": 1e3 * d_pull,
        "paired rows push ms": 1e3 * r_push,
        "paired rows pull ms": 1e3 * r_pull,
    }


def _sync(client, rows: int, width: int, k: int, push_rows, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """A sync model's rows push (one worker: every push closes its round), in turn with the async one."""
    model = client.create_model(
        f"table-sync-{rows}",
        {"table": Init((rows, width), "float32", "normal", stddev=0.01, seed=0)},
        {"lazy_adam": {"learning_rate": 0.001}},
        mode="sync",
        workers=1,
    )
    rng = np.random.default_rng(2)
    batches = [(rng.integers(0, rows, k), rng.standard_normal((k, width)).astype(np.float32)) for _ in range(8)]
    sync_ms, async_ms = common.interleaved_medians(
        (_cycle_push(model.worker("w"), batches), push_rows), args.rounds, args.warmup
    )
    client.delete_model(f"table-sync-{rows}")
    return {"sync rows push ms": 1e3 * sync_ms, "paired async rows push ms": 1e3 * async_ms}


def _cycle_push(model, batches):  # type: ignore[no-untyped-def]
    it = itertools.cycle(batches)

    def push() -> None:
        ids, values = next(it)
        model.push({"table": Rows(ids, values)})

    return push


def _cycle_pull(model, ids_list):  # type: ignore[no-untyped-def]
    it = itertools.cycle(ids_list)
    return lambda: model.pull_rows({"table": next(it)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--dense", default="1000000", help="sizes that also time the dense push and pull")
    parser.add_argument("--sync", default="1000000", help="sizes that also time a sync model's rows push")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dense-rounds", type=int, default=5)
    parser.add_argument("--memory-fraction", type=float, default=0.8)
    args = parser.parse_args()
    sizes = [int(s) for s in args.rows.split(",")]
    dense = {int(s) for s in args.dense.split(",") if s}
    sync = {int(s) for s in args.sync.split(",") if s}
    print(common.machine())
    print(f"lazy_adam, float32 table of width {args.width}, {args.k} random rows per push and per pull")
    # every table + two moments on the server, the largest drawn host copy while creating, and the
    # dense gradient and pulled copy in this process for the dense sizes
    need = sum(rows * args.width * 4 * (3 + (2 if rows in dense else 0) + (3 if rows in sync else 0)) for rows in sizes)
    need += max(sizes) * args.width * 4
    if need > args.memory_fraction * mem_available():
        print(f"skipped: needs ~{need / 1e9:.1f} GB, MemAvailable {mem_available() / 1e9:.1f} GB (fewer --rows)")
        return
    results = measure(sizes, args, dense, sync)
    base = results[0]
    table = []
    for r in results:
        row = {"rows": f"{r['rows']:,}"}
        for what in ("push", "pull"):
            row[f"rows {what} ms"] = f"{r[f'rows {what} ms']:.2f}"
            row[f"{what} vs {base['rows']:,} rows"] = f"{r[f'rows {what} ms'] / base[f'rows {what} ms']:.2f}x"
            if f"dense {what} ms" in r:
                row[f"dense {what} ms"] = f"{r[f'dense {what} ms']:.1f}"
                paired = r[f"paired rows {what} ms"]
                row[f"dense/rows {what}"] = f"{r[f'dense {what} ms'] / paired:.1f}x (rows {paired:.2f} ms)"
        if "sync rows push ms" in r:
            paired = r["paired async rows push ms"]
            row["sync rows push ms"] = f"{r['sync rows push ms']:.2f}"
            row["sync/async push"] = f"{r['sync rows push ms'] / paired:.2f}x (async {paired:.2f} ms)"
        table.append(row)
    columns = list(dict.fromkeys(c for row in table for c in row))
    print(common.table(table, columns))


if __name__ == "__main__":
    main()
