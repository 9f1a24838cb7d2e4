"""One model over 1, 2 and 4 shard servers: push_pull time, aggregate pushes/s, fan-out cost.

The push_pull time of one worker, the aggregate pushes/s of several worker processes, and the
fan-out cost of 2 shards against 1 at equal bytes (docs/design.md, "Shards").

For each size (`--params`) the script starts fresh `optserve serve` processes on 127.0.0.1 (as many
as the largest shard count) and creates a float32 Adam model of a few large leaves (above
`--split-bytes`, so placement splits them by rows over the shards) and some small ones. The 1-shard
case is the ordinary unsharded path (`Client(one target)`, a `Model`), so every ratio against it
includes the whole cost of fanning out; K shards are `Client(first K targets)` with `shards=K`.

(a) One worker: the models of every shard count alive at once, one `worker.push_pull(grads, out=)`
    of each timed in turn (`common.interleaved_medians`: a slow phase of a shared machine hits each
    alike), median of `--rounds` after `--warmup`.
(b) Aggregate: per shard count in turn (a model of its own, created after the last is deleted),
    `--workers` processes, each its own worker (a `ShardedWorker` when sharded) doing push_pull in
    a loop, async; all do `--warmup` round trips on one signal and time `--rounds` each on the
    next; pushes/s = every timed push / (last end - first start). "re-pulls per push": the pulls a
    ShardedWorker adds so that a push_pull returns one step of every shard (`count_repulls`);
    "pulls given up": push_pulls whose push every shard applied but whose pull found no common
    step within its attempts (UnavailableError, "kept moving"), counted and not retried.
(c) Fan-out cost: (a)'s 2-shard time over its 1-shard time (the same bytes, one server against two).

Every ratio is against the 1-shard figure of the same run. Nothing depends on the core count:
every process runs unpinned (OPTSERVE_BENCH_PIN would put every server on one core). A size whose
estimated peak memory exceeds `--memory-fraction` of MemAvailable is skipped, with the reason.

    python bench/shards.py [--params 10M,100M] [--shards 1,2,4] [--workers 4] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COLUMNS = [
    "params",
    "shards",
    "largest shard / mean",
    "push_pull ms (1 worker)",
    "time vs 1 shard",
    "pushes/s (W workers)",
    "pushes/s vs 1 shard",
    "grad MB/s pushed",
    "re-pulls per push",
    "pulls given up",
]
FANOUT_COLUMNS = ["params", "1 server ms", "2 shards ms", "2 shards / 1", "sharded client's gradient check ms"]
RUNTIME_BYTES = 300e6  # an idle `optserve serve` process (jax, grpc), and a bit of slack
WORKER_BYTES = 100e6  # a worker process before its arrays (numpy, grpc)


def parse_count(text: str) -> int:
    """'10M' -> 10_000_000 ('k', 'M', 'G'; plain digits too)."""
    m = re.fullmatch(r"([0-9.]+)([kKmMgG]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1k, 10M, 100M)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()])


def label(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:g}{suffix}"
    return str(n)


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3g} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.3g} kB"


def model_params(n: int, fill: float = 0.0) -> dict[str, Any]:
    """About `n` float32 parameters: an embedding of half of them and three blocks' weights (the
    large leaves: split by rows above the split threshold), and eight biases and scales (small:
    placed whole). Every process builds the same structure from `n`."""
    width = 1024 if n >= 1 << 20 else 16
    rest = n - 8 * width
    embed_rows, block_rows = rest // (2 * width), rest // (6 * width)
    if block_rows < 1:
        raise ValueError(f"--params {n} is too small for the model's shape (at least {14 * width})")

    def leaf(*shape: int) -> np.ndarray:
        return np.full(shape, fill, np.float32)

    tree: dict[str, Any] = {"embed": leaf(embed_rows, width)}
    for b in range(3):
        tree[f"block{b}"] = {"w": leaf(block_rows, width), "b": leaf(width), "scale": leaf(width)}
    tree["head"] = {"b": leaf(width), "scale": leaf(width)}
    return tree


def count(tree: Any) -> int:
    return sum(count(v) for v in tree.values()) if isinstance(tree, dict) else int(tree.size)


def estimated_peak_bytes(n: int, shard_counts: list[int], workers: int) -> float:
    """A generous estimate of the run's peak memory over every process (P = 4n bytes), from the
    peaks of a 100M run (BENCHMARKS.md, "Shards"): a model holds 3P in its servers (parameters,
    Adam's two moments), each push_pull in flight about 2P more there (its gradient, the pull's
    copy), a worker process 3.5P (gradient, `out=`, the transport's buffers). (a) keeps a model of
    every shard count, one push in flight, this process's parameters (until created), gradient
    and one `out=` per model; (b) one model with every worker's push in flight."""
    p = 4.0 * n
    runtime = RUNTIME_BYTES * max(shard_counts)
    one_worker = runtime + 3 * p * len(shard_counts) + 2 * p + p * (2 + len(shard_counts)) + WORKER_BYTES
    aggregate = runtime + 3 * p + workers * (2 * p + 3.5 * p + WORKER_BYTES) + p + WORKER_BYTES
    return max(one_worker, aggregate)


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return float("inf")


def peak_rss(pid: int | str = "self") -> float:
    """The high-water mark of a process's resident memory (VmHWM), bytes. (Not getrusage: a child's
    ru_maxrss starts at its parent's, which it inherits at fork.)"""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0
    return 0.0


def open_model(target: str, name: str) -> Any:
    """The model through any one shard (a ShardedModel finds the others in its shard map)."""
    from optserve.client import Client

    return Client(target, timeout=600).model(name)


def count_repulls(worker: Any) -> list[int]:
    """A counter of the pulls a ShardedWorker adds to make a push_pull return one step of every
    shard: with other workers' pushes in between, the shards answer at different steps and those
    behind are pulled again (client/optserve/client/sharded.py, `ShardedModel._consistent`).
    An unsharded Worker has none."""
    counter = [0]
    if hasattr(worker, "_pull_part"):
        pull_part = worker._pull_part

        def counted(*args: Any) -> Any:
            counter[0] += 1
            return pull_part(*args)

        worker._pull_part = counted
    return counter


def worker_main(spec: dict) -> None:
    """One worker process: READY after its first pull, then on each GO from stdin: the warm-up
    (WARM when done), the timed loop (its span on the machine's monotonic clock)."""
    from optserve.client.errors import UnavailableError

    model = open_model(spec["target"], spec["name"])
    grads = model_params(spec["n"], fill=1e-3 * (spec["index"] + 1))
    worker = model.worker(f"bench-{spec['index']}")
    out = worker.pull()
    print("READY", flush=True)
    sys.stdin.readline()
    for _ in range(spec["warmup"]):
        worker.push_pull(grads, out=out)
    repulls = count_repulls(worker)
    print("WARM", flush=True)
    sys.stdin.readline()
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    given_up = 0
    for _ in range(spec["rounds"]):
        try:
            worker.push_pull(grads, out=out)
        except UnavailableError as e:
            # every shard applied the push; only the pull after it found no step common to all
            # shards within its attempts (`ShardedModel._consistent`): counted, not hidden
            if "kept moving" not in e.message:
                raise
            given_up += 1
    end = time.monotonic()
    result = {
        "start": start,
        "end": end,
        "pushes": spec["rounds"],
        "repulls": repulls[0],
        "given_up": given_up,
        "rss": peak_rss(),
    }
    print(json.dumps(result), flush=True)
    model.client.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"worker {proc.pid} did not answer in {timeout:.0f}s")
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited ({proc.wait(30)}) without answering (its stderr is above)")
    return line


def aggregate(target: str, name: str, n: int, workers: int, rounds: int, warmup: int) -> dict:
    """{"rate": pushes/s of `workers` processes started together, "repulls": the sharded client's
    extra pulls per push, "rss": the largest worker's peak RSS in bytes}."""
    procs = []
    try:
        for i in range(workers):
            spec = {"target": target, "name": name, "n": n, "index": i, "rounds": rounds, "warmup": warmup}
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for signal, timeout in (("READY", 300), ("WARM", 1800)):  # two barriers: none times another's warm-up
            for p in procs:
                if (line := _readline(p, timeout)) != signal:
                    raise RuntimeError(f"worker {p.pid}: {line!r}, expected {signal}")
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
        results = [json.loads(_readline(p, 1800)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    pushes = sum(r["pushes"] for r in results)
    return {
        "rate": pushes / span,
        "repulls": sum(r["repulls"] for r in results) / pushes,
        "given_up": sum(r["given_up"] for r in results),
        "rss": max(r["rss"] for r in results),
    }


def create(targets: list[str], k: int, n: int, split_bytes: int | None) -> Any:
    """The model of `k` shards: over the first k targets, or (k = 1) an ordinary unsharded model."""
    from optserve.client import Client, optim

    client = Client(targets[0] if k == 1 else targets[:k], timeout=600)
    opts = {} if k == 1 else {"shards": k, "split_bytes": split_bytes}
    return client.create_model(f"shards-{k}", model_params(n), optim.adam(1e-3), **opts)


def drop(model: Any) -> None:
    model.client.delete_model(model.name)
    model.client.close()


def balance(model: Any) -> float:
    """The largest shard's parameter bytes over the mean (1.0 unsharded)."""
    if not hasattr(model, "shard_map"):
        return 1.0
    per_shard = model.shard_map.shard_bytes()
    return max(per_shard) / statistics.mean(per_shard)


def one_worker(targets: list[str], n: int, shard_counts: list[int], args: argparse.Namespace) -> dict:
    """(a): {k: median push_pull seconds}, and "check": the seconds of the sharded client's whole-
    gradient check (leaves, shapes, finite values) at 2 shards, part of its fan-out cost."""
    from common import interleaved_medians

    grads = model_params(n, fill=1e-3)
    models = {k: create(targets, k, n, args.split_bytes) for k in shard_counts}
    try:
        out: dict[Any, Any] = {"balance": {k: balance(m) for k, m in models.items()}}
        solo = {k: m.worker("bench-solo") for k, m in models.items()}
        outs = {k: w.pull() for k, w in solo.items()}
        fns = tuple((lambda w=w, o=outs[k]: w.push_pull(grads, out=o)) for k, w in solo.items())
        out.update(zip(solo, interleaved_medians(fns, args.rounds, warmup=args.warmup), strict=True))
        if 2 in models:
            m = models[2]
            out["check"] = min(_seconds(lambda: m._check_grads(m._leaves(grads, "gradient"))) for _ in range(5))
        return out
    finally:
        for m in models.values():
            drop(m)


def measure_size(n: int, shard_counts: list[int], args: argparse.Namespace) -> tuple[list[dict], dict, str]:
    """(rows of the main table, the fan-out row, a memory note) for one model size, on servers of
    its own."""
    from common import optserve_server, stop

    grad_bytes = 4 * count(model_params(n))
    with ThreadPoolExecutor(max(shard_counts)) as pool:  # their jax imports overlap
        servers = list(pool.map(lambda _: optserve_server(), range(max(shard_counts))))
    targets = [t for _, t in servers]
    try:
        one = one_worker(targets, n, shard_counts, args)
        # (b): one model at a time (the next is created after the last is deleted)
        runs = {}
        for k in shard_counts:
            model = create(targets, k, n, args.split_bytes)
            try:
                runs[k] = aggregate(targets[0], model.name, n, args.workers, args.rounds, args.warmup)
            finally:
                drop(model)
            print(f"  {label(n)}: {k} shard(s) done", file=sys.stderr, flush=True)
        server_rss = [peak_rss(p.pid) for p, _ in servers]
    finally:
        for p, _ in servers:
            stop(p)
    rates = {k: r["rate"] for k, r in runs.items()}
    worker_rss = max(r["rss"] for r in runs.values())
    base_t, base_r = one[1], rates[1]
    rows = [
        {
            "params": f"{label(n)} ({megabytes(grad_bytes)})",
            "shards": k,
            "largest shard / mean": f"{one['balance'][k]:.2f}",
            "push_pull ms (1 worker)": f"{one[k] * 1e3:.1f}",
            "time vs 1 shard": f"{one[k] / base_t:.2f}x",
            f"pushes/s ({args.workers} workers)": f"{rates[k]:.2f}",
            "pushes/s vs 1 shard": f"{rates[k] / base_r:.2f}x",
            "grad MB/s pushed": f"{rates[k] * grad_bytes / 1e6:.3g}",
            "re-pulls per push": f"{runs[k]['repulls']:.2f}",
            "pulls given up": f"{runs[k]['given_up']} of {args.workers * args.rounds}",
        }
        for k in shard_counts
    ]
    fanout = {}
    if 2 in shard_counts:
        fanout = {
            "params": label(n),
            "1 server ms": f"{one[1] * 1e3:.1f}",
            "2 shards ms": f"{one[2] * 1e3:.1f}",
            "2 shards / 1": f"{one[2] / one[1]:.2f}x",
            "sharded client's gradient check ms": f"{one['check'] * 1e3:.1f}",
        }
    memory = (
        f"{label(n)}: servers' peak RSS {' + '.join(f'{r / 1e9:.2f}' for r in server_rss)} = "
        f"{sum(server_rss) / 1e9:.2f} GB; largest worker process {worker_rss / 1e9:.2f} GB; "
        f"this process {peak_rss() / 1e9:.2f} GB (so far)"
    )
    return rows, fanout, memory


def _seconds(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    import common
    from common import machine, table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="10M,100M", help="model sizes, comma-separated (1k, 10M, 100M, ...)")
    ap.add_argument("--shards", default="1,2,4", help="shard counts; the first is the baseline (1: unsharded)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes for the aggregate pushes/s")
    ap.add_argument("--rounds", type=int, default=10, help="timed push_pulls per configuration and per worker")
    ap.add_argument("--warmup", type=int, default=2, help="untimed push_pulls before (the first compile the step)")
    ap.add_argument("--split-bytes", type=int, default=None, help="split leaves above this (default: the server's)")
    ap.add_argument(
        "--memory-fraction", type=float, default=0.6, help="skip a size estimated above this fraction of MemAvailable"
    )
    args = ap.parse_args()
    try:
        sizes = [parse_count(s) for s in args.params.split(",")]
        shard_counts = [int(s) for s in args.shards.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as e:
        ap.error(str(e))
    if shard_counts[0] != 1 or len(set(shard_counts)) != len(shard_counts) or min(shard_counts) < 1:
        ap.error("--shards: distinct counts starting with 1 (the unsharded baseline), e.g. 1,2,4")
    if min(args.workers, args.rounds) < 1 or args.warmup < 0:
        ap.error("--workers and --rounds must be at least 1, --warmup at least 0")
    if common.PIN:
        ap.error("OPTSERVE_BENCH_PIN would put every shard server on CPU 0; unset it for this benchmark")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, fanouts, notes = [], [], []
    for n in sizes:
        need, have = estimated_peak_bytes(n, shard_counts, args.workers), mem_available()
        if need > args.memory_fraction * have:
            notes.append(
                f"{label(n)}: skipped: estimated peak {need / 1e9:.1f} GB is above {args.memory_fraction:g} of the "
                f"{have / 1e9:.1f} GB available (fewer --shards or --workers, or a larger --memory-fraction)"
            )
            print(notes[-1], file=sys.stderr, flush=True)
            continue
        size_rows, fanout, memory = measure_size(n, shard_counts, args)
        rows += size_rows
        if fanout:
            fanouts.append(fanout)
        notes.append(f"{memory} (estimated peak {need / 1e9:.1f} GB)")
    load_after = os.getloadavg()
    print(f"# shards, {started}: {machine()}")
    print(
        f"command: python bench/shards.py --params {args.params} --shards {args.shards} --workers {args.workers} "
        f"--rounds {args.rounds} --warmup {args.warmup}"
        + (f" --split-bytes {args.split_bytes}" if args.split_bytes else "")
    )
    print(
        f"load average (1, 5, 15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)} (the after figure counts this run's own processes)\n"
    )
    print(table(rows, [c.replace("W workers", f"{args.workers} workers") for c in COLUMNS]))
    if fanouts:
        print("\nFan-out cost at equal bytes (the same model on 1 server and over 2):\n")
        print(table(fanouts, FANOUT_COLUMNS))
    print("\nMemory:\n" + "\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
