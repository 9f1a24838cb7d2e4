"""A shared-memory Adam round with region-backed arrays against the copying one, one server, one run.

    python bench/shm_round.py [--params 10000000] [--leaves 4] [--rounds 9] [--runs 3]

One `optserve serve --shared-memory` process; this process is the worker, with one connection (and
one async Adam model of `--params` float32 parameters in `--leaves` leaves) per path, every round a
`Worker.push_pull(grads, out=params)` of the whole model through shared memory:

- copy: the gradient and `out=` are the worker's own numpy arrays: the client writes the gradient
  into its region and copies the parameters out of it (the round before `Worker.shared_arrays`).
- out: `out=` is the region-backed `params` of `Worker.shared_arrays()`: the server writes the
  parameters straight into it; the gradient is still copied in (a framework's own gradient).
- inplace: the gradient lives in the region-backed `grads` too (written there once, as a worker
  computes its gradient into them): the client copies nothing (client/shared_arrays.py).

Rounds alternate between the paths (the order rotating), so that a busy phase of the shared machine
hits each alike; each run reports every path's median round and its ratio to copy's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, optserve_server, stop, table

from optserve.client import Client, optim

PATHS = ("copy", "out", "inplace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=10_000_000, help="float32 parameters (default: %(default)s)")
    p.add_argument("--leaves", type=int, default=4, help="leaves they are split into (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per path and run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs, each a median (default: %(default)s)")
    args = p.parse_args(argv)
    each = args.params // args.leaves
    shapes = [each + (args.params - each * args.leaves if i == 0 else 0) for i in range(args.leaves)]
    own = {f"leaf{i}": np.full(s, 1e-3, np.float32) for i, s in enumerate(shapes)}
    proc, address = optserve_server("--shared-memory")
    clients = [Client(address, timeout=600) for _ in PATHS]
    try:
        rounds = {}
        for name, client in zip(PATHS, clients, strict=True):
            client.create_model(f"round-{name}", {k: np.zeros_like(v) for k, v in own.items()}, optim.adam(1e-3))
            worker = client.model(f"round-{name}").worker("w0")
            grads: dict = own
            if name == "copy":
                params = worker.pull()
            else:
                region_grads, params = worker.shared_arrays()
                params = worker.pull(out=params)
                if name == "inplace":
                    for k, g in own.items():
                        region_grads[k][...] = g
                    grads = region_grads
            rounds[name] = (worker, grads, params)
        for worker, grads, params in rounds.values():  # compilation, buffers, regions
            for _ in range(3):
                worker.push_pull(grads, out=params)
        for client in clients:
            shm = client.shared_memory
            if shm is None or shm.unavailable:
                raise SystemExit(f"shared memory not used: {shm and shm.unavailable}")
        medians: dict[str, list[float]] = {k: [] for k in PATHS}
        for _ in range(args.runs):
            times: dict[str, list[float]] = {k: [] for k in PATHS}
            for r in range(args.rounds):
                for i in range(len(PATHS)):
                    name = PATHS[(r + i) % len(PATHS)]
                    worker, grads, params = rounds[name]
                    start = time.perf_counter()
                    got = worker.push_pull(grads, out=params)
                    times[name].append(time.perf_counter() - start)
                    assert got is params
            for k in PATHS:
                medians[k].append(statistics.median(times[k]))
    finally:
        for client in clients:
            client.close()
        stop(proc)
    rows = []
    for name, runs in medians.items():
        ratios = [t / c for t, c in zip(runs, medians["copy"], strict=True)]
        rows.append(
            {
                "path": name,
                "round ms (runs)": ", ".join(f"{t * 1e3:.1f}" for t in runs),
                "vs copy": f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
            }
        )
    print(f"# shared-memory push_pull(out=) of {args.params:,} float32 parameters ({args.leaves} leaves, Adam)")
    print(f"# {machine()}; median of {args.rounds} alternating rounds per run, {args.runs} runs")
    print(table(rows, ["path", "round ms (runs)", "vs copy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
