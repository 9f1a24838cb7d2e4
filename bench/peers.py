"""optserve beside the parameter servers people write with Ray and torch.distributed.rpc, on one host.

    make bench-peers PEERS_ARGS="..."     # creates .venv-bench (ray, torch, optserve) and runs this
    python bench/peers.py [--params 10000000] [--leaves 4] [--workers 1,4] [--rounds 7] [--runs 3]
                          [--targets ray,torch,tcp,tcp-bf16,unix,shm,shm-out,shm-inplace] [--warmup 2]

Every target holds `--params` float32 parameters in `--leaves` leaves with Adam (lr 1e-3); each of
`--workers` worker processes pushes a full gradient and gets the full parameters back per round:

- ray: a Ray actor parameter server in the form of Ray's "Parameter Server" example
  (doc/source/ray-core/examples/plot_parameter_server.ipynb in ray-project/ray): the actor holds
  torch tensors and torch's Adam; workers are actors calling `ps.apply_gradients.remote(grads)` then
  `ray.get(ps.get_weights.remote())`. Gradients and weights are numpy arrays, which Ray moves
  through its shared-memory object store (one copy in, read in place), and the worker uses the
  returned read-only arrays as they are: Ray's fastest form.
- torch: the parameter server of torch's "Implementing Batch RPC Processing Using Asynchronous
  Executions" tutorial (distributed/rpc/batch/parameter_server.py in pytorch/examples): an object
  behind an RRef on rank 0, `update_and_fetch_model` with `@rpc.functions.async_execution`, trainers
  calling `rpc.rpc_sync(ps_rref.owner(), ...)` over TensorPipe; one update per push (the
  tutorial's batch size 1, so every push is a step as in the other targets), Adam instead of SGD,
  and the parameters returned as a snapshot (the tutorial returns the live model, which another
  trainer's step may change while it is sent).
- tcp, tcp-bf16, unix, unix-bf16: one `optserve serve` process (`--unix-socket`), an async model per
  target, workers calling `Worker.push_pull(grads, out=params)` over TCP (float32 or bfloat16 on
  the wire both ways) or the Unix socket, with shared memory off in the client.
- shm, shm-bf16: the same server (it runs with `--shared-memory`), workers connected over TCP with
  shared memory on: each worker's gradient is written into its memfd region and the parameters come
  back through it (docs/design.md, "Shared memory"); bf16: converted on the way in and out. The
  client copies both ways: the gradient into its region, the parameters out of it into `out=`.
- shm-out: as shm, with `out=` the region-backed parameters of `Worker.shared_arrays()`: the server
  writes the parameters straight into them, and the client copies nothing back (the gradient is
  still copied into the region every round, as a worker whose framework computes its gradient in
  memory of its own must).
- shm-inplace: as shm-out, the gradient living in the region-backed gradient arrays of
  `Worker.shared_arrays()` too (the form of a worker that computes its gradient into them; here it
  is written there once, as the other targets' workers compute theirs once): the client copies
  nothing either way, and the server checks the gradient where it lies and hands it to the update
  without a copy (docs/design.md, "Shared memory").

A round is every worker's push + pull started at once; its time is the slowest worker's, measured
in the worker. Rounds alternate between the targets (the order rotating every round), so that a
busy phase of the shared machine hits each alike; each run reports the median of `--rounds` rounds
per target, and the ratios are against the ray target's median of the same run.

Only the standard library is imported here at module level (ray, torch and optserve inside the
functions that use them), so `--help` works in any environment.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, optserve_server, ratio_range, stop, table

TARGETS = ("ray", "torch", "tcp", "tcp-bf16", "unix", "unix-bf16", "shm", "shm-bf16", "shm-out", "shm-inplace")
DEFAULT_TARGETS = "ray,torch,tcp,tcp-bf16,unix,shm,shm-out,shm-inplace"
LEARNING_RATE = 1e-3
# FUSED: Ray's and torch's servers use torch's fused CPU Adam, its fastest (10M parameters on the 2-core
# VM: 9 ms a step, against 24-50 ms for the default for-loop and 57 ms for foreach; optserve's jitted
# optax Adam with donated buffers takes 9-12 ms), so that the rounds compare data planes, not Adams.
PREFIX = "@peers "  # protocol lines between the driver and its worker processes; anything else is noise


def shapes_of(params: int, leaves: int) -> list[tuple[int, ...]]:
    """`leaves` 1-D leaves holding `params` floats in all (the first takes the remainder)."""
    each = params // leaves
    return [(each + (params - each * leaves if i == 0 else 0),) for i in range(leaves)]


def gradients(shapes: list[tuple[int, ...]], index: int) -> list:
    import numpy as np

    return [np.full(s, 1e-3 * (index + 1), np.float32) for s in shapes]


# -- worker processes: one line in ("go" or "stop"), one line out (the round's seconds) ------------


def say(message: str) -> None:
    print(PREFIX + message, flush=True)


def serve_rounds(round_fn: Callable[[], None]) -> None:
    """READY, then one timed round per "go" line until "stop" or the end of stdin."""
    say("ready")
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        round_fn()
        say(f"{time.perf_counter() - start:.6f}")


def optserve_worker(config: dict) -> None:
    from optserve.client import Client

    wire = config["wire_dtype"]
    with Client(config["target"], timeout=600, shared_memory=config["shared_memory"]) as client:
        worker = client.model(config["model"]).worker(f"peer-{config['index']}")
        grads = {f"leaf{i}": g for i, g in enumerate(gradients(config["shapes"], config["index"]))}
        shared = config.get("shared_arrays")
        if shared:  # Worker.shared_arrays(): see shm-out and shm-inplace in the module docstring
            region_grads, params = worker.shared_arrays()
            params = worker.pull(wire_dtype=wire, out=params)
            if shared == "inplace":
                for k, g in grads.items():
                    region_grads[k][...] = g
                grads = region_grads
        else:
            params = worker.pull(wire_dtype=wire)
        holder = [params]

        def one_round() -> None:
            holder[0] = worker.push_pull(grads, wire_dtype=wire, out=holder[0])

        serve_rounds(one_round)


class BatchUpdateParameterServer:
    """torch's tutorial parameter server (see the module docstring), one update per push."""

    def __init__(self, shapes: list[tuple[int, ...]], batch_update_size: int = 1):
        import threading

        import torch

        self.params = [torch.zeros(s, requires_grad=True) for s in shapes]
        self.lock = threading.Lock()
        self.future_model = torch.futures.Future()
        self.batch_update_size = batch_update_size
        self.curr_update_size = 0
        self.optimizer = torch.optim.Adam(self.params, lr=LEARNING_RATE, fused=True)  # see FUSED
        for p in self.params:
            p.grad = torch.zeros_like(p)

    @staticmethod
    def update_and_fetch_model(ps_rref, grads):  # marked async_execution by torch_rpc_init
        self = ps_rref.local_value()
        with self.lock:  # the tutorial adds outside the lock; several trainers may add at once
            for p, g in zip(self.params, grads, strict=True):
                if self.batch_update_size == 1:
                    p.grad = g  # one push per step: used as it came (the tutorial's += is a copy here)
                else:
                    p.grad += g
            self.curr_update_size += 1
            fut = self.future_model
            if self.curr_update_size >= self.batch_update_size:
                self.optimizer.step()
                self.curr_update_size = 0
                fut.set_result([p.detach().clone() for p in self.params])  # a snapshot, sent after the lock
                self.future_model = type(fut)()
        return fut


_PS_RREF: list = []  # the trainer's handle on the parameter server, set by the server itself


def _set_ps(ps_rref) -> None:
    _PS_RREF.append(ps_rref)


def torch_rpc_init(config: dict, name: str, rank: int) -> Any:
    """Joins the RPC world (TensorPipe, as in the tutorial) and returns torch.distributed.rpc."""
    import torch.distributed.rpc as rpc

    # The tutorial's @rpc.functions.async_execution, applied here so that torch is imported only where used
    # (both ends: the caller's pickle names the function, the callee's copy must carry the mark).
    fn = BatchUpdateParameterServer.update_and_fetch_model
    BatchUpdateParameterServer.update_and_fetch_model = staticmethod(rpc.functions.async_execution(fn))
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=16, rpc_timeout=600, init_method=f"tcp://127.0.0.1:{config['port']}"
    )
    rpc.init_rpc(name, rank=rank, world_size=config["workers"] + 1, rpc_backend_options=options)
    return rpc


def torch_ps(config: dict) -> None:
    rpc = torch_rpc_init(config, "ps", 0)
    ps_rref = rpc.RRef(BatchUpdateParameterServer([tuple(s) for s in config["shapes"]]))
    for i in range(config["workers"]):
        rpc.rpc_sync(f"trainer{i}", _set_ps, args=(ps_rref,))
    say("ready")
    sys.stdin.readline()  # "stop"
    rpc.shutdown()


def torch_trainer(config: dict) -> None:
    import torch

    rpc = torch_rpc_init(config, f"trainer{config['index']}", config["index"] + 1)
    grads = [torch.from_numpy(g) for g in gradients(config["shapes"], config["index"])]
    deadline = time.monotonic() + 600
    while not _PS_RREF:  # handed over by the server right after every rank joined
        if time.monotonic() > deadline:
            raise TimeoutError("the parameter server never sent its RRef")
        time.sleep(0.01)
    ps_rref = _PS_RREF[0]
    holder: list = []

    def one_round() -> None:
        holder[:] = rpc.rpc_sync(
            ps_rref.owner(), BatchUpdateParameterServer.update_and_fetch_model, args=(ps_rref, grads)
        )

    serve_rounds(one_round)
    rpc.shutdown()


WORKERS = {"optserve": optserve_worker, "torch-ps": torch_ps, "torch": torch_trainer}


# -- the driver -------------------------------------------------------------------------------------


class Child:
    """A worker process speaking the line protocol; every read bounded."""

    def __init__(self, kind: str, config: dict, log, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        self._buffer = b""

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float = 600.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(PREFIX):
                    return text[len(PREFIX) :]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"worker {self.proc.args[3]} did not answer in {timeout:.0f}s")
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError(f"worker {self.proc.args[3]} exited with {self.proc.wait(30)} (see the log)")
            self._buffer += data

    def ask_to_stop(self) -> None:
        try:
            self.send("stop")
            self.proc.stdin.close()
        except OSError:  # already gone
            pass

    def wait(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


class ProcessTarget:
    """Worker processes answering "go" with their round's seconds (optserve, torch)."""

    def __init__(self, workers: list[Child], others: list[Child] = ()):
        self.workers, self.others = workers, list(others)
        for child in self.others + self.workers:
            assert child.read() == "ready"

    def round(self) -> float:
        for w in self.workers:
            w.send("go")
        return max(float(w.read()) for w in self.workers)

    def close(self) -> None:
        children = self.workers + self.others
        for child in children:  # all at once: torch's rpc.shutdown waits for every rank
            child.ask_to_stop()
        for child in children:
            child.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayTarget:
    def __init__(self, shapes: list[tuple[int, ...]], workers: int):
        import numpy as np
        import ray

        @ray.remote
        class ParameterServer:
            def __init__(self, shapes):
                import torch

                torch.set_num_threads(os.cpu_count() or 1)  # Ray gives an actor one thread by default
                self.params = [torch.zeros(s, requires_grad=True) for s in shapes]
                self.optimizer = torch.optim.Adam(self.params, lr=LEARNING_RATE, fused=True)  # see FUSED

            def apply_gradients(self, *gradients):
                import torch

                if len(gradients) == 1:  # the example sums several workers' gradients; one is used as is
                    summed = gradients[0]
                else:
                    summed = [np.stack(z).sum(axis=0) for z in zip(*gradients, strict=True)]
                self.optimizer.zero_grad()
                for p, g in zip(self.params, summed, strict=True):
                    with warnings.catch_warnings():  # the object store's arrays are read-only; Adam only reads
                        warnings.simplefilter("ignore")
                        p.grad = torch.from_numpy(g)
                self.optimizer.step()

            def get_weights(self):
                return [p.detach().numpy() for p in self.params]

        @ray.remote
        class DataWorker:
            def __init__(self, ps, shapes, index):
                self.ps, self.grads = ps, gradients(shapes, index)
                self.weights = None

            def ready(self) -> bool:
                return True

            def round(self) -> float:
                start = time.perf_counter()
                self.ps.apply_gradients.remote(self.grads)
                self.weights = None  # drop the last round's arrays before the new ones arrive
                self.weights = ray.get(self.ps.get_weights.remote())
                return time.perf_counter() - start

        self.ray = ray
        self.ps = ParameterServer.remote(shapes)
        self.workers = [DataWorker.remote(self.ps, shapes, i) for i in range(workers)]
        ray.get([w.ready.remote() for w in self.workers], timeout=600)

    def round(self) -> float:
        return max(self.ray.get([w.round.remote() for w in self.workers], timeout=600))

    def close(self) -> None:
        for actor in [*self.workers, self.ps]:
            self.ray.kill(actor)


def open_target(name: str, shapes, workers: int, server: dict, log) -> object:
    if name == "ray":
        return RayTarget(shapes, workers)
    if name == "torch":
        config = {"shapes": shapes, "workers": workers, "port": free_port()}
        env = {"TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
        ps = Child("torch-ps", config, log, env)
        trainers = [Child("torch", {**config, "index": i}, log, env) for i in range(workers)]
        return ProcessTarget(trainers, [ps])
    from optserve.client import Client, optim

    transport, _, variant = name.partition("-")
    wire = variant == "bf16"
    target = server["unix"] if transport == "unix" else server["tcp"]
    model = f"peers-{name}-{workers}"
    with Client(server["tcp"], timeout=600) as client:
        params = {f"leaf{i}": g * 0 for i, g in enumerate(gradients(shapes, 0))}
        client.create_model(model, params, optim.adam(LEARNING_RATE))
    config = {
        "target": target,
        "model": model,
        "shapes": shapes,
        "wire_dtype": "bfloat16" if wire else None,
        "shared_memory": transport == "shm",
        "shared_arrays": variant if variant in ("out", "inplace") else None,
    }
    return ProcessTarget([Child("optserve", {**config, "index": i}, log) for i in range(workers)])


def measure(args: argparse.Namespace, targets: list[str], workers: int, server: dict, log) -> dict[str, list]:
    """{target: [median seconds of each run]} for one worker count."""
    shapes = shapes_of(args.params, args.leaves)
    opened: dict[str, object] = {}
    try:
        for name in targets:
            opened[name] = open_target(name, shapes, workers, server, log)
            for _ in range(args.warmup):  # compilation, the object store's first pages, connections
                opened[name].round()
        medians: dict[str, list] = {name: [] for name in targets}
        for _ in range(args.runs):
            times: dict[str, list] = {name: [] for name in targets}
            for r in range(args.rounds):
                for i in range(len(targets)):
                    name = targets[(r + i) % len(targets)]
                    times[name].append(opened[name].round())
            for name in targets:
                medians[name].append(statistics.median(times[name]))
        return medians
    finally:
        for target in opened.values():
            target.close()
        if server:
            from optserve.client import Client

            with Client(server["tcp"], timeout=600) as client:
                for model in client.list_models():
                    client.delete_model(model["name"])


def report(results: dict[int, dict[str, list]], baseline: str | None) -> str:
    rows = []
    for workers, medians in results.items():
        for name, runs in medians.items():
            row = {"workers": workers, "target": name, "round ms (last run)": f"{runs[-1] * 1e3:.1f}"}
            row["updates/s"] = f"{workers / runs[-1]:.1f}"
            row["runs, ms"] = ", ".join(f"{t * 1e3:.1f}" for t in runs)
            if baseline and name != baseline:
                row[f"vs {baseline}"] = ratio_range(runs, medians[baseline])
            rows.append(row)
    columns = ["workers", "target", "round ms (last run)", "updates/s", "runs, ms"] + (
        [f"vs {baseline}"] if baseline else []
    )
    return table(rows, columns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Runs in .venv-bench: make bench-peers.")
    p.add_argument("--params", type=int, default=10_000_000, help="float32 parameters (default: %(default)s)")
    p.add_argument("--leaves", type=int, default=4, help="leaves they are split into (default: %(default)s)")
    p.add_argument("--workers", default="1,4", help="worker counts, comma separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per target and run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs, each a median (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per target first (default: %(default)s)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"some of {', '.join(TARGETS)} (default: %(default)s)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {', '.join(TARGETS)}")
    args.targets = targets
    try:
        args.workers = [int(n) for n in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers}: comma separated whole numbers, e.g. 1,4")
    if min(args.workers) < 1 or min(args.params, args.leaves, args.rounds, args.runs) < 1 or args.warmup < 0:
        p.error("--workers, --params, --leaves, --rounds and --runs must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, config = args.worker
        WORKERS[kind](json.loads(config))
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp, open(os.path.join(tmp, "workers.log"), "wb") as log:
        server: dict = {}
        proc = None
        uses_ray = "ray" in args.targets
        try:
            if uses_ray:
                import ray

                ray.init(
                    num_cpus=max(args.workers) + 2,
                    object_store_memory=2 << 30,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                )
            if any(t not in ("ray", "torch") for t in args.targets):
                path = os.path.join(tmp, "optserve.sock")
                proc, address = optserve_server("--unix-socket", path, "--shared-memory")
                server = {"tcp": address, "unix": f"unix://{path}"}
            results = {n: measure(args, args.targets, n, server, log) for n in args.workers}
        except BaseException:
            log.flush()
            with open(os.path.join(tmp, "workers.log"), "rb") as f:
                sys.stderr.write(f.read().decode(errors="replace")[-4000:])
            raise
        finally:
            if proc is not None:
                stop(proc)
            if uses_ray:
                import ray

                ray.shutdown()
    print(f"# same-host peers: {args.params:,} float32 parameters in {args.leaves} leaves, Adam, push + pull per round")
    print(f"# {machine()}; median of {args.rounds} alternating rounds per run, {args.runs} runs")
    print(report(results, "ray" if "ray" in args.targets else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
