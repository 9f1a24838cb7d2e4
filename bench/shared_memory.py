"""A large push through shared memory against the same push over TCP, one server, one run.

    python bench/shared_memory.py [--mbytes 256] [--rounds 7] [--runs 3] [--small-calls 2000]

One `optserve serve --shared-memory` process holds a model of `--mbytes` MB of float32 parameters
(4 leaves, SGD: the update is a few milliseconds, so the push's time is its data plane). Two clients
in this process push the same gradient: one over TCP with shared memory off (the byte stream), one
with shared memory on (the gradient written into its memfd region, the server copying it out with
its NaN/Inf check; docs/design.md, "Shared memory"). Pushes alternate between the two; each run
reports the median push time of each and the ratio TCP / shared memory (the speed-up), so that a
busy phase of the shared machine hits both alike.

Then what shared memory costs the byte stream where it is not offered: against a second server,
without `--shared-memory`, a client that never uses it (`shared_memory=False`) and one left at the
default (whose calls below its 256 KiB threshold only check the size) make `--small-calls`
1K-parameter push_pulls in turn; their p50s and ratio are printed. (Larger calls of a default
client ask the server once, are told no, and from then on check a flag.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gbps, machine, optserve_server, stop, table

from optserve.client import Client, optim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbytes", type=int, default=256, help="gradient size in MB (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="timed pushes per path and run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs, each a median (default: %(default)s)")
    p.add_argument("--small-calls", type=int, default=2000, help="1K push_pulls per client (default: %(default)s)")
    args = p.parse_args(argv)
    n = args.mbytes * (1 << 20) // 4
    shapes = [n // 4 + (n % 4 if i == 0 else 0) for i in range(4)]
    params = {f"leaf{i}": np.zeros(s, np.float32) for i, s in enumerate(shapes)}
    grads = {f"leaf{i}": np.full(s, 1e-3, np.float32) for i, s in enumerate(shapes)}
    proc, address = optserve_server("--shared-memory")
    rows = []
    try:
        with (
            Client(address, timeout=600, shared_memory=False) as tcp,
            Client(address, timeout=600, shared_memory=True) as shm,
        ):
            tcp.create_model("bench-shm", params, optim.sgd(1e-3))
            paths = {"tcp": tcp.model("bench-shm"), "shared memory": shm.model("bench-shm")}
            for m in paths.values():  # compilation, buffers, the region
                m.push(grads)
                m.push(grads)
            if shm.shared_memory is None or shm.shared_memory.unavailable:
                raise SystemExit(f"shared memory not used: {shm.shared_memory and shm.shared_memory.unavailable}")
            medians: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.runs):
                times: dict[str, list[float]] = {k: [] for k in paths}
                for r in range(args.rounds):
                    for name in list(paths)[r % 2 :] + list(paths)[: r % 2]:
                        start = time.perf_counter()
                        paths[name].push(grads)
                        times[name].append(time.perf_counter() - start)
                for k in paths:
                    medians[k].append(statistics.median(times[k]))
    finally:
        stop(proc)
    nbytes = sum(g.nbytes for g in grads.values())
    ratios = [t / s for t, s in zip(medians["tcp"], medians["shared memory"], strict=True)]
    for name, runs in medians.items():
        rows.append(
            {
                "path": name,
                "push ms (runs)": ", ".join(f"{t * 1e3:.0f}" for t in runs),
                "GB/s (last run)": gbps(nbytes, runs[-1]),
            }
        )
    print(f"# push of {nbytes / 1e6:.0f} MB float32 (4 leaves, SGD), one server; {machine()}")
    print(f"# median of {args.rounds} alternating pushes per run, {args.runs} runs")
    print(table(rows, ["path", "push ms (runs)", "GB/s (last run)"]))
    print(
        f"\nshared memory vs tcp: {statistics.median(ratios):.2f}x faster "
        f"(runs {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    off, default = small_calls(args.small_calls)
    print(
        f"1K push_pull p50 against a server without shared memory: shared_memory=False {off * 1e6:.0f} us, "
        f"default {default * 1e6:.0f} us ({default / off:.3f}x)"
    )
    return 0


def small_calls(n: int) -> tuple[float, float]:
    """p50 seconds of a 1K push_pull: (a client with shared memory off, one at the default)."""
    params, grads = {"w": np.zeros(1000, np.float32)}, {"w": np.ones(1000, np.float32)}
    proc, address = optserve_server()
    try:
        with Client(address, timeout=600, shared_memory=False) as off, Client(address, timeout=600) as on:
            off.create_model("bench-small", params, optim.sgd(1e-3))
            models = {"off": off.model("bench-small"), "on": on.model("bench-small")}
            for m in models.values():
                m.push_pull(grads)
            times: dict[str, list[float]] = {k: [] for k in models}
            for i in range(n):
                for k in ("off", "on") if i % 2 else ("on", "off"):
                    start = time.perf_counter()
                    models[k].push_pull(grads)
                    times[k].append(time.perf_counter() - start)
    finally:
        stop(proc)
    return statistics.median(times["off"]), statistics.median(times["on"])


if __name__ == "__main__":
    sys.exit(main())
