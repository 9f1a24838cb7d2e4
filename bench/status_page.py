"""The status page (issue 18): how fast /status and /status.json answer with 100 models and 1,000
workers, and whether a browser polling them every second slows pushes.

One `optserve serve --status-port 0` process; this process creates `--models` small models and has
`--workers` distinct worker ids push once each (spread over the models), so that every model has
worker rows. Then:

1. latency: `--requests` GETs of /status and of /status.json, alternating (median, p95, max, size);
2. pushes: one worker pushes a small gradient to one model in a loop, in `--rounds` pairs of
   phases of `--seconds` each, without a poller (the baseline) and with a poller that GETs /status
   and /status.json every second (what a browser tab and a dashboard do), the order alternating
   from round to round so that a slow spell of a shared machine hits both alike; median pushes/s
   of each, and their ratio;
3. what each push pays for the page: the per-worker tally (core/worker_activity.py), timed in this
   process against an empty call, with 1,000 workers known.

    python bench/status_page.py [--models 100] [--workers 1000] [--requests 40] [--seconds 5] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, stop


def start_server() -> tuple[subprocess.Popen, str, str]:
    """(process, gRPC address, status URL): its lines read until both are known (bounded)."""
    args = [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--status-port", "0"]
    args += ["--checkpoint-dir", "", "--log-level", "WARNING"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    address = status = ""
    deadline = time.monotonic() + 120
    while not (address and status) and time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if m := re.search(r"optserve status on (http://\S+)/status", line):
            status = m.group(1)
        if m := re.search(r"optserve listening on (\S+:\d+)", line):
            address = m.group(1)
    if not (address and status):
        proc.kill()
        raise TimeoutError("the server did not start in 120 s")
    return proc, address, status


def get(url: str) -> tuple[int, float]:
    """(bytes, the server's own milliseconds from its Server-Timing header: report + render)."""
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
        spent = sum(float(x) for x in re.findall(r"dur=([0-9.]+)", r.headers.get("Server-Timing", "")))
        return len(body), spent


def latency(url: str, requests: int) -> dict:
    sizes, times, server = [], [], []
    get(url)  # warm-up
    for _ in range(requests):
        t = time.perf_counter()
        size, spent = get(url)
        times.append(time.perf_counter() - t)
        sizes.append(size)
        server.append(spent)
    times.sort()
    return {
        "median ms": 1e3 * statistics.median(times),
        "p95 ms": 1e3 * times[int(0.95 * (len(times) - 1))],
        "max ms": 1e3 * times[-1],
        "server median ms": statistics.median(server),
        "size KiB": statistics.median(sizes) / 1024,
    }


def push_rate(worker, grad: dict, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        worker.push(grad)
        n += 1
    return n / (time.perf_counter() - t0)


class Poller:
    """GETs the page and its JSON once a second, as a browser tab and a dashboard would."""

    def __init__(self, status: str):
        self.status, self.stop, self.polls = status, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            get(f"{self.status}/status")
            get(f"{self.status}/status.json")
            self.polls += 1

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def tally_cost(pushes: int = 200_000) -> float:
    """Microseconds a push spends in WorkerActivity.pushed, beyond an empty call."""
    from optserve.server.core.worker_activity import WorkerActivity

    activity = WorkerActivity()
    ids = [f"worker-{i:04d}" for i in range(1000)]

    def nothing(worker_id: str, *, duplicate: bool, staleness: int | None) -> None:
        pass

    def loop(fn) -> float:
        t = time.perf_counter()
        for i in range(pushes):
            fn(ids[i % 1000], duplicate=False, staleness=1)
        return time.perf_counter() - t

    spent = statistics.median(loop(activity.pushed) for _ in range(5))
    empty = statistics.median(loop(nothing) for _ in range(5))
    return 1e6 * (spent - empty) / pushes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    from optserve.client import Client, optim

    proc, address, status = start_server()
    try:
        with Client(address, timeout=300) as client:
            params = {"w": np.zeros(16, np.float32)}
            grad = {"w": np.full(16, 1e-3, np.float32)}
            models = [client.create_model(f"model-{i:03d}", params, optim.adam(1e-3)) for i in range(args.models)]
            t = time.perf_counter()
            for i in range(args.workers):
                models[i % len(models)].worker(f"worker-{i:04d}").push(grad)
            print(f"{machine()}; load average {os.getloadavg()[0]:.1f}")
            print(f"{args.models} models, {args.workers} workers (one push each, {time.perf_counter() - t:.1f} s)")
            time.sleep(2.5)  # a few of the history's samples, so the page draws its charts (not timed)
            for path in ("/status", "/status.json"):
                row = latency(status + path, args.requests)
                print(f"GET {path:<13} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
            hot = models[0].worker("hot")
            push_rate(hot, grad, 1.0)  # warm-up
            plain, polled, polls = [], [], 0
            for r in range(args.rounds):
                for with_poller in (r % 2 == 1, r % 2 == 0):
                    if with_poller:
                        with Poller(status) as poller:
                            polled.append(push_rate(hot, grad, args.seconds))
                        polls += poller.polls
                    else:
                        plain.append(push_rate(hot, grad, args.seconds))
            a, b = statistics.median(plain), statistics.median(polled)
            print(
                f"pushes/s (median of {args.rounds} phases of {args.seconds:g} s): no poller {a:.0f} "
                f"[{', '.join(f'{x:.0f}' for x in plain)}], poller every 1 s {b:.0f} "
                f"[{', '.join(f'{x:.0f}' for x in polled)}] ({polls} polls); with / without {b / a:.3f}"
            )
    finally:
        stop(proc)
    print(f"worker tally per push: {tally_cost():.2f} us")


if __name__ == "__main__":
    main()
