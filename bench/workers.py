"""Many workers: 1, 2, 4 and 8 worker processes against one `optserve serve` process, async and sync.

Each worker pulls, then runs `--pushes` PushPull round trips (a fixed gradient of `--floats` float32,
no compute, so the server's path is what is measured); all workers start together. Reported per
mode and worker count: steps/s, pushes/s, aggregate gradient bytes/s pushed, and sync's throughput
relative to async at the same worker count (pushes/s ratio: a sync step takes one push of every
worker). Median of `--repeat` runs. `--modes` may add "elastic": sync with membership leases
(`heartbeat=2.0`: every push and pull renews the worker's lease, docs/design.md, "Membership and
leases"), reported against fixed-membership sync at the same worker count ("elastic / sync").

    python bench/workers.py [--floats 1000000] [--pushes 40] [--counts 1,2,4,8] [--repeat 3] [--modes async,sync]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WARMUP = 3  # round trips per worker before timing (not counted)
COLUMNS = ["mode", "workers", "gradient", "steps/s", "pushes/s", "grad MB/s", "sync / async", "elastic / sync"]
MODES = {
    "async": lambda n: {},
    "sync": lambda n: {"mode": "sync", "workers": n, "heartbeat": 0},  # a fixed membership: the baseline
    "elastic": lambda n: {"mode": "sync", "workers": n, "heartbeat": 2.0},
}


def worker_main(target: str, model: str, index: int, pushes: int, floats: int) -> None:
    """One worker process: READY after the first pull, GO on stdin, then the timed loop."""
    from optserve.client import Client

    grads = {"w": np.full(floats, 1e-3 * (index + 1), np.float32)}
    with Client(target, timeout=300) as client:
        worker = client.model(model).worker(f"bench-{index}")
        worker.pull()
        print("READY", flush=True)
        sys.stdin.readline()
        for _ in range(WARMUP):  # the first steps compile the model's jitted update
            worker.push_pull(grads)
        start = time.perf_counter()
        for _ in range(pushes):
            worker.push_pull(grads)
        print(json.dumps({"seconds": time.perf_counter() - start, "pushes": pushes}), flush=True)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("worker did not answer in time")
    return proc.stdout.readline().strip()


def run_one(target: str, mode: str, n: int, floats: int, pushes: int) -> dict:
    from optserve.client import Client, optim

    name = f"bench-{mode}-{n}-{floats}"
    settings = MODES[mode](n)
    with Client(target, timeout=300) as client:
        model = client.create_model(name, {"w": np.zeros(floats, np.float32)}, optimizer=optim.adam(1e-3), **settings)
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", target, name, str(i), str(pushes), str(floats)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(n)
        ]
        try:
            for p in procs:
                assert _readline(p, 120) == "READY"
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
            results = [json.loads(_readline(p, 600)) for p in procs]
            info = model.info()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(30)
        client.delete_model(name)
    # every worker times its own loop (after the warm-up); they run over the same period, so the
    # aggregate rate is the sum of theirs. A sync step takes one push of each worker.
    pushes_per_s = sum(r["pushes"] / r["seconds"] for r in results)
    steps_per_push = info["step"] / (n * (pushes + WARMUP))
    return {
        "mode": mode,
        "workers": n,
        "gradient": f"{floats * 4 / 1e6:g} MB",
        "steps/s": f"{pushes_per_s * steps_per_push:.1f}",
        "pushes/s": f"{pushes_per_s:.1f}",
        "grad MB/s": f"{pushes_per_s * floats * 4 / 1e6:.0f}",
        "_pushes_per_s": pushes_per_s,
    }


def main() -> None:
    from common import machine, optserve_server, stop, table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--floats", type=int, default=1_000_000)
    ap.add_argument("--pushes", type=int, default=40, help="PushPull round trips per worker")
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported")
    ap.add_argument("--modes", default="async,sync", help=f"of {','.join(MODES)}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    proc, target = optserve_server()
    rows = []
    try:
        for n in counts:
            by_mode = {}
            for mode in modes:
                runs = sorted(
                    (run_one(target, mode, n, args.floats, args.pushes) for _ in range(args.repeat)),
                    key=lambda r: r["_pushes_per_s"],
                )
                by_mode[mode] = runs[len(runs) // 2]
            rate = {m: r["_pushes_per_s"] for m, r in by_mode.items()}
            if "sync" in rate and "async" in rate:
                by_mode["sync"]["sync / async"] = f"{rate['sync'] / rate['async']:.2f}x"
            if "elastic" in rate and "sync" in rate:
                by_mode["elastic"]["elastic / sync"] = f"{rate['elastic'] / rate['sync']:.2f}x"
            rows += [by_mode[m] for m in modes]
            print(f"  {n} workers done", file=sys.stderr, flush=True)
    finally:
        stop(proc)
    print(f"machine: {machine()}; load average at the end {os.getloadavg()[0]:.1f}")
    print(
        f"command: python bench/workers.py --floats {args.floats} --pushes {args.pushes} --counts {args.counts} "
        f"--repeat {args.repeat} --modes {args.modes}"
    )
    print(table(rows, COLUMNS))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
