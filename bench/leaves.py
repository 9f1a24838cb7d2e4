"""What a model's number of leaves costs: create, first push (compilation), push and pull, against a
one-leaf model of the same bytes and against in-process optax on the same pytree; and a restart
of a server holding many models, with and without the persistent compilation cache.

    python bench/leaves.py [--leaves 100,1000,5000,20000] [--values 64] [--pushes 20]
                           [--baseline-max 1000] [--restart-models 20] [--restart-leaves 1000]
    python bench/leaves.py --quick      # 100 and 1,000 leaves; restart of 8 models of 200 leaves

Every model is float32 leaves of `--values` values with
`chain(clip_by_global_norm(1.0), adam(1e-3))`, served by its own `optserve serve` process (no
checkpoints, no compilation cache: the first push pays the whole compilation; the server compiles
a new model's step in the background from its creation on, so "first push" is the time until that
compilation is done). Push and pull are medians over `--pushes` calls once both step variants are
compiled. The baseline jits the same optax chain on the same pytree in this process, with
donation: its compile time (lower + compile) and step time (median, waited for). In-process optax
compilation grows fast with the leaves (282 s at 5,000 on a 2-core machine), so it runs only up to
`--baseline-max` leaves.

Restart: a server with `--checkpoint-dir` holds `--restart-models` models of `--restart-leaves`
leaves, each pushed once and saved; it stops. Then "read" is the time to read and verify every
model's checkpoint in this process (checkpoint/files.py `read_checkpoint`, what a restore does
first: sha256 of every file, parse; files in the page cache, as on a restart right after a stop).
Then the server is started again on the same directory, with its compilation cache and, once
more, without one (`--compile-cache ''`); "ready" is from starting the process to every model
having applied one push (one client thread per model, all pushing as soon as the server listens),
"listening" the part until the server listens (every model restored), and "start-up" the time the
same server takes to listen with an empty checkpoint directory (Python, jax, grpc): the
restart's own cost is "ready" less that, compared with "read".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from common import PIN, machine, stop, table

from optserve.client import Client, optim

SPEC = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-3))
COLUMNS = [
    "model",
    "create s",
    "first push s",
    "push p50 ms",
    "pull p50 ms",
    "push vs 1 leaf",
    "pull vs 1 leaf",
    "optax compile s",
    "optax step ms",
]
RESTART_COLUMNS = [
    "server",
    "read s",
    "start-up s",
    "listening s",
    "ready s",
    "(ready - start-up) / read",
    "step compilations",
    "cache hits",
]


def _serve(*extra: str, timeout: float = 600.0) -> tuple[subprocess.Popen, str, int, float]:
    """`optserve serve --port 0 --metrics-port 0 ...`: (process, target, metrics port, seconds until
    it listened), from the lines it prints (bounded)."""
    args = [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--metrics-port", "0"]
    args += ["--log-level", "WARNING", *extra]
    if PIN and len(os.sched_getaffinity(0) | {0}) >= 2:
        args = ["taskset", "-c", "0", *args]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline, metrics = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"optserve serve exited with {proc.returncode}")
        if m := re.search(r"metrics on \S+:(\d+)", line):
            metrics = int(m.group(1))
        if m := re.search(r"listening on (\S+):(\d+)", line):
            return proc, f"{m.group(1)}:{m.group(2)}", metrics, time.perf_counter() - started
    proc.kill()
    raise TimeoutError(f"the server did not start in {timeout}s")


def _counts(metrics: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=60) as r:
        text = r.read().decode()
    out = {}
    for name, label, value in re.findall(r'^optserve_(\w+)_total(?:\{\w+="(\w+)"\})? (\S+)$', text, re.M):
        out[f"{name}:{label}" if label else name] = float(value)
    return out


def _wait_warm_ups(metrics: int, n: int, timeout: float = 7200.0) -> None:
    """Until n warm-ups ended (compiled, skipped or failed): both step variants of every model."""
    deadline = time.monotonic() + timeout
    while True:
        c = _counts(metrics)
        if sum(c.get(f"warm_ups:{k}", 0) for k in ("compiled", "skipped", "failed")) >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-ups not finished in {timeout}s")
        time.sleep(0.1)


def _tree(leaves: int, values: int, fill: float) -> dict[str, np.ndarray]:
    return {f"layer{i:05d}": np.full(values, fill, np.float32) for i in range(leaves)}


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure_server(leaves: int, values: int, pushes: int) -> dict:
    """create, first push, push p50, pull p50 of one model on a fresh server (no cache)."""
    proc, target, metrics, _ = _serve("--checkpoint-dir", "", "--compile-cache", "")
    try:
        with Client(target, timeout=7200.0) as c:
            params, grads = _tree(leaves, values, 0.5), _tree(leaves, values, 1e-3)
            t = time.perf_counter()
            m = c.create_model("m", params, optimizer=SPEC)
            create = time.perf_counter() - t
            t = time.perf_counter()
            m.push(grads)
            first = time.perf_counter() - t
            _wait_warm_ups(metrics, 2)  # the non-donating variant too: no compilation in the timings
            m.pull()
            push = _median_ms(lambda: m.push(grads), pushes)
            pull = _median_ms(m.pull, pushes)
    finally:
        stop(proc)
    return {"create": create, "first": first, "push": push, "pull": pull}


def measure_optax(leaves: int, values: int, pushes: int) -> tuple[float, float]:
    """In-process optax: (compile seconds, step ms) of the jitted, donating update."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    p = {k: jnp.asarray(v) for k, v in _tree(leaves, values, 0.5).items()}
    g = {k: jnp.asarray(v) for k, v in _tree(leaves, values, 1e-3).items()}

    def _step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    box = [p, tx.init(p)]
    t = time.perf_counter()
    step = jax.jit(_step, donate_argnums=(0, 1)).lower(box[0], box[1], g).compile()
    compile_s = time.perf_counter() - t

    def run() -> None:
        box[0], box[1] = step(box[0], box[1], g)
        jax.block_until_ready(box[0])

    run()
    return compile_s, _median_ms(run, pushes)


def leaves_rows(sizes: list[int], values: int, pushes: int, baseline_max: int) -> list[dict]:
    rows = []
    for n in sizes:
        many = measure_server(n, values, pushes)
        one = measure_server(1, n * values, pushes)
        optax_compile, optax_step = measure_optax(n, values, pushes) if n <= baseline_max else (None, None)
        for label, r in ((f"{n:,} leaves x {values}", many), (f"1 leaf x {n * values:,}", one)):
            rows.append(
                {
                    "model": label,
                    "create s": f"{r['create']:.2f}",
                    "first push s": f"{r['first']:.2f}",
                    "push p50 ms": f"{r['push']:.2f}",
                    "pull p50 ms": f"{r['pull']:.2f}",
                    "push vs 1 leaf": f"{r['push'] / one['push']:.1f}x" if r is many else "",
                    "pull vs 1 leaf": f"{r['pull'] / one['pull']:.1f}x" if r is many else "",
                    "optax compile s": f"{optax_compile:.2f}" if r is many and optax_compile is not None else "",
                    "optax step ms": f"{optax_step:.2f}" if r is many and optax_step is not None else "",
                }
            )
        print(table(rows[-2:], COLUMNS).split("\n", 2)[2], file=sys.stderr, flush=True)  # progress
    return rows


def _read_checkpoints(root: str, names: list[str]) -> float:
    """Seconds to read and verify every model's newest checkpoint, as a restore does first."""
    from optserve.server.checkpoint.files import committed, read_checkpoint

    t = time.perf_counter()
    for name in names:
        newest = committed(os.path.join(root, name))[0]
        read_checkpoint(newest.path, name)
    return time.perf_counter() - t


def _ready(extra: list[str], names: list[str], leaves: int, values: int) -> dict:
    """Starts the server on the checkpoints; every model pushed once, from a thread each."""
    t0 = time.perf_counter()
    proc, target, metrics, listening = _serve(*extra)
    try:
        grads = _tree(leaves, values, 1e-3)

        def push(name: str) -> None:
            with Client(target, timeout=7200.0) as c:
                c.model(name).push(grads)

        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(push, names))
        ready = time.perf_counter() - t0
        counts = _counts(metrics)
    finally:
        stop(proc)
    return {
        "listening": listening,
        "ready": ready,
        "compilations": counts.get("compilations:update_step", 0),
        "hits": counts.get("compile_cache_hits:update_step", 0),
    }


def restart_rows(models: int, leaves: int, values: int) -> list[dict]:
    root = tempfile.mkdtemp(prefix="optserve-bench-leaves-")
    try:
        names = [f"m{i:02d}" for i in range(models)]
        proc, target, metrics, _ = _serve("--checkpoint-dir", root)
        try:
            with Client(target, timeout=7200.0) as c:
                params, grads = _tree(leaves, values, 0.5), _tree(leaves, values, 1e-3)
                for name in names:
                    m = c.create_model(name, params, optimizer=SPEC)
                    m.push(grads)
                    m.save()
            _wait_warm_ups(metrics, 2 * models)  # every variant compiled, so in the cache
        finally:
            stop(proc)
        read = _read_checkpoints(root, names)
        empty = tempfile.mkdtemp(prefix="optserve-bench-empty-")  # the same server with nothing to restore
        try:
            proc, _, _, startup = _serve("--checkpoint-dir", empty)
            stop(proc)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        rows = []
        for label, extra in (
            ("restart, compilation cache", ["--checkpoint-dir", root]),
            ("restart, no cache", ["--checkpoint-dir", root, "--compile-cache", ""]),
        ):
            r = _ready(extra, names, leaves, values)
            rows.append(
                {
                    "server": f"{label}: {models} models x {leaves:,} leaves",
                    "read s": f"{read:.2f}",
                    "start-up s": f"{startup:.2f}",
                    "listening s": f"{r['listening']:.2f}",
                    "ready s": f"{r['ready']:.2f}",
                    "(ready - start-up) / read": f"{(r['ready'] - startup) / read:.1f}x",
                    "step compilations": f"{r['compilations']:.0f}",
                    "cache hits": f"{r['hits']:.0f}",
                }
            )
            print(table(rows[-1:], RESTART_COLUMNS).split("\n", 2)[2], file=sys.stderr, flush=True)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", default="100,1000,5000,20000", help="leaf counts, comma-separated")
    ap.add_argument("--values", type=int, default=64, help="float32 values per leaf")
    ap.add_argument("--pushes", type=int, default=20, help="pushes (and pulls) per median")
    ap.add_argument("--baseline-max", type=int, default=1000, help="in-process optax only up to this many leaves")
    ap.add_argument("--restart-models", type=int, default=20, help="models of the restart scenario (0: skip it)")
    ap.add_argument("--restart-leaves", type=int, default=1000, help="leaves of each model of the restart scenario")
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 leaves; restart of 8 models of 200 leaves")
    args = ap.parse_args()
    if args.quick:
        args.leaves, args.restart_models, args.restart_leaves = "100,1000", 8, 200
    sizes = [int(x) for x in args.leaves.split(",") if x]
    import jax

    print(f"# leaves: {machine()}, device {jax.devices()[0]}")
    print(f"chain(clip_by_global_norm(1.0), adam(1e-3)), float32 leaves of {args.values} values; medians of")
    print(f"{args.pushes} calls; in-process optax baseline only up to {args.baseline_max:,} leaves (--baseline-max)\n")
    print(table(leaves_rows(sizes, args.values, args.pushes, args.baseline_max), COLUMNS))
    if args.restart_models:
        print()
        print(table(restart_rows(args.restart_models, args.restart_leaves, args.values), RESTART_COLUMNS))


if __name__ == "__main__":
    main()
