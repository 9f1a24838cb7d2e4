"""A shared-memory Adam round with region-backed arrays against the copying one, one server, one run.

    python bench/shm_round.py [--params 10000000] [--leaves 4] [--rounds 9] [--runs 3] [--phases]

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

--phases: the server runs in this process instead (`Server(shared_memory=True)`), and timers around
the functions a round goes through say where its time goes, per path (medians over the rounds): the
client's write of the gradient, the server's NaN/Inf check (in place in the region: nothing is
copied out), the move of the checked leaves to the device, the push's commit (the update, which it
waits for when the gradient was read in place from the region), the wait for the update at the
pull (the host view of the new parameters), the server's write of them into the region, and the
client's read into `out=`.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, optserve_server, ratio_range, stop, table

from optserve.client import Client, optim

PATHS = ("copy", "out", "inplace")


def open_paths(address: str, shapes: list[int]) -> tuple[list[Client], dict[str, tuple[Any, Any, Any]]]:
    """A client, model and worker per path, warmed up: {path: (worker, grads, params)}."""
    own = {f"leaf{i}": np.full(s, 1e-3, np.float32) for i, s in enumerate(shapes)}
    clients = [Client(address, timeout=600) for _ in PATHS]
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
    return clients, rounds


def alternate(rounds: dict, n: int, each: Callable[[str], None] = lambda name: None) -> dict[str, list[float]]:
    """`n` rounds per path, alternating; seconds by path. each(name): called after every round."""
    times: dict[str, list[float]] = {k: [] for k in PATHS}
    for r in range(n):
        for i in range(len(PATHS)):
            name = PATHS[(r + i) % len(PATHS)]
            worker, grads, params = rounds[name]
            start = time.perf_counter()
            got = worker.push_pull(grads, out=params)
            times[name].append(time.perf_counter() - start)
            assert got is params
            each(name)
    return times


class Phases:
    """Timers wrapped around module functions; `spent` sums each one's seconds since `clear`."""

    def __init__(self) -> None:
        self.spent: collections.defaultdict[str, float] = collections.defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - start

        setattr(owner, name, timed)


@contextmanager
def phase_timers() -> Iterator[Phases]:
    """The round's phases, timed (module docstring); the originals put back after."""
    from optserve.client import pulls as client_pulls
    from optserve.client import shared_memory as client_shm
    from optserve.server.api import requests, shared_spans
    from optserve.server.core import model, pulls, receiving

    phases = Phases()
    targets: list[tuple[Any, str, str]] = [
        (client_shm, "push_message", "client: gradient into the region"),
        (receiving.GradientAssembler, "copy", "server: NaN/Inf check (in place)"),
        (receiving.GradientAssembler, "completed", "server: leaves to the device"),
        (requests, "receive_tensors", "server: whole receive"),
        (model.Model, "commit_push", "server: commit (update, waited for)"),
        (pulls, "host_leaves", "server: wait for the update"),
        (shared_spans, "pull_reply", "server: parameters into the region"),
        (client_pulls.PullReader, "read", "client: parameters into out="),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, label in targets:
            phases.wrap(owner, name, label)
        yield phases
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def measure_phases(shapes: list[int], n: int) -> str:
    from optserve.server import Server

    with Server(port=0, shared_memory=True) as server:
        clients, rounds = open_paths(server.address, shapes)
        try:
            with phase_timers() as phases:
                per: dict[str, dict[str, list[float]]] = {k: collections.defaultdict(list) for k in PATHS}

                def record(name: str) -> None:
                    for label, seconds in phases.spent.items():
                        per[name][label].append(seconds)
                    phases.spent.clear()

                phases.spent.clear()
                times = alternate(rounds, n, record)
        finally:
            for client in clients:
                client.close()
    labels = list(dict.fromkeys(label for path in per.values() for label in path))
    rows = []
    for label in [*labels, "round"]:
        row = {"phase": label}
        for name in PATHS:
            got = times[name] if label == "round" else per[name].get(label, [0.0])
            row[f"{name} ms"] = f"{statistics.median(got) * 1e3:.1f}"
        rows.append(row)
    return table(rows, ["phase", *(f"{name} ms" for name in PATHS)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=10_000_000, help="float32 parameters (default: %(default)s)")
    p.add_argument("--leaves", type=int, default=4, help="leaves they are split into (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per path and run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs, each a median (default: %(default)s)")
    p.add_argument("--phases", action="store_true", help="in-process server, time of each phase (see above)")
    args = p.parse_args(argv)
    each = args.params // args.leaves
    shapes = [each + (args.params - each * args.leaves if i == 0 else 0) for i in range(args.leaves)]
    what = f"{args.params:,} float32 parameters ({args.leaves} leaves, Adam)"
    if args.phases:
        print(f"# phases of a shared-memory push_pull(out=) of {what}, server in process")
        print(f"# {machine()}; medians of {args.rounds * args.runs} alternating rounds per path")
        print(measure_phases(shapes, args.rounds * args.runs))
        return 0
    proc, address = optserve_server("--shared-memory")
    clients: list[Client] = []
    try:
        clients, rounds = open_paths(address, shapes)
        medians: dict[str, list[float]] = {k: [] for k in PATHS}
        for _ in range(args.runs):
            times = alternate(rounds, args.rounds)
            for k in PATHS:
                medians[k].append(statistics.median(times[k]))
    finally:
        for client in clients:
            client.close()
        stop(proc)
    rows = []
    for name, runs in medians.items():
        rows.append(
            {
                "path": name,
                "round ms (runs)": ", ".join(f"{t * 1e3:.1f}" for t in runs),
                "vs copy": ratio_range(runs, medians["copy"]),
            }
        )
    print(f"# shared-memory push_pull(out=) of {what}")
    print(f"# {machine()}; median of {args.rounds} alternating rounds per run, {args.runs} runs")
    print(table(rows, ["path", "round ms (runs)", "vs copy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
