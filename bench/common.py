"""Shared helpers for the benchmarks: server subprocesses, timing, tables, machine description."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --pin (or OPTSERVE_BENCH_PIN=1): server processes on CPU 0, this (client) process on CPU 1, so
# the two sides do not steal each other's core; on a 2-core machine the unpinned scheduler otherwise
# mixes their busy threads and figures swing by 2x between runs.
PIN = os.environ.get("OPTSERVE_BENCH_PIN") == "1"


def pin_client() -> None:
    """Pins this process (and the threads it starts later) to CPU 1 when pinning is on."""
    if PIN and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})


pin_client()  # scripts run on their own honour OPTSERVE_BENCH_PIN=1


def start_process(
    args: list[str], pattern: str = r"listening on (\S+):(\d+)", timeout: float = 120.0, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """Starts a server process and waits (bounded) for its 'listening on HOST:PORT' line."""
    if PIN and len(os.sched_getaffinity(0) | {0}) >= 2:
        args = ["taskset", "-c", "0", *args]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}")
        m = re.search(pattern, line or "")
        if m:
            return proc, f"{m.group(1)}:{m.group(2)}"
    proc.kill()
    raise TimeoutError(f"{args} did not start in {timeout}s")


def optserve_server(*extra: str) -> tuple[subprocess.Popen, str]:
    return start_process(
        [
            sys.executable,
            "-m",
            "optserve.server.cli",
            "serve",
            "--port",
            "0",
            "--checkpoint-dir",
            "",
            "--log-level",
            "WARNING",
            *extra,
        ]
    )


def raw_server(unix_socket: str | None = None) -> tuple[subprocess.Popen, str]:
    """bench/raw_grpc.py on 127.0.0.1 (its address returned) and on `unix_socket` if given."""
    return start_process(
        [sys.executable, os.path.join(ROOT, "bench", "raw_grpc.py"), *([unix_socket] if unix_socket else [])]
    )


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_medians(
    fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int, warmup: int = 1
) -> tuple[float, float]:
    """Median seconds of two alternatives timed alternately (a b, b a, a b, ...), so that a slow phase
    of a shared machine hits both sides alike instead of whichever happened to run then."""
    a, b = interleaved_medians((fn_a, fn_b), repeats, warmup)
    return a, b


def interleaved_medians(fns: tuple[Callable[[], object], ...], repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each alternative, timed in turn, the order rotating every round (a b c,
    b c a, c a b, ...): what one call leaves behind (measured: a 400 MB raw pull made the next 400 MB
    receive, whichever it was, 3x slower through the client's allocator) then hits each alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for i in range(len(fns)):
            k = (r + i) % len(fns)
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def repeats_for(nbytes: int) -> int:
    return 5 if nbytes >= 200e6 else 7 if nbytes >= 20e6 else 30  # 400 MB: rare allocation stalls (transport.py)


def machine() -> str:
    """One line describing the machine (and whether processes are pinned)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import grpc

    pinned = ", server pinned to CPU 0 and client to CPU 1" if PIN else ", unpinned"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, grpcio {grpc.__version__}{pinned}"


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}"


def ratio_range(runs: Sequence[float], baselines: Sequence[float]) -> str:
    """Each run's time against its baseline measured in the same run: "median x (min-max)"."""
    ratios = [t / b for t, b in zip(runs, baselines, strict=True)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
