"""The torch drop-in against in-process torch.optim.Adam and against a hand-written raw push_pull.

One training loop (forward, backward, optimizer step on the digits batch of examples/torch_digits.py)
three ways, a step of each in turn (the order rotating every round, `common.interleaved_medians`):

- `torch.optim.Adam`: in-process, the baseline of steps/s;
- `RemoteOptimizer`: `opt.step()` pushes the gradients and writes the parameters back in place;
- raw: the loop one writes by hand without the drop-in: the `.grad` arrays gathered into a dict,
  `Worker.push_pull(grads, out=views of the parameters)`.

Each remote side has its own model (adam, async) on one `optserve serve` process. Printed: the
median seconds per whole step and steps/s of each, and the overhead that matters for the drop-in,
its optimizer step against the raw push_pull of the same gradients (target <= 1.1x), as the median
ratio of --runs runs with their range.

    python bench/dropins.py                     # the example's CNN (38k parameters)
    python bench/dropins.py --model mlp --steps 40   # a 5.8M-parameter MLP (23 MB per push and pull)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import common  # bench/common.py, beside this script
import numpy as np
import torch

from optserve.client import Client, optim
from optserve.torch import RemoteOptimizer

sys.path.insert(0, os.path.join(common.ROOT, "examples"))
import torch_digits


def build(kind: str) -> torch.nn.Module:
    if kind == "cnn":
        return torch_digits.cnn()
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 600),
        torch.nn.ReLU(),
        torch.nn.Linear(600, 10),
    )


class Loop:
    """One training loop; `step()` runs one whole step and records the optimizer part's seconds."""

    def __init__(self, net: torch.nn.Module, update: Callable[[], object], x: np.ndarray, y: np.ndarray, batch: int):
        self.net, self.update, self.x, self.y, self.batch = net, update, x, y, batch
        self.rng = np.random.default_rng(0)
        self.update_seconds: list[float] = []

    def step(self) -> None:
        idx = self.rng.choice(len(self.y), self.batch, replace=False)
        for p in self.net.parameters():
            p.grad = None
        loss = torch.nn.functional.cross_entropy(self.net(torch.from_numpy(self.x[idx])), torch.from_numpy(self.y[idx]))
        loss.backward()
        t = time.perf_counter()
        self.update()
        self.update_seconds.append(time.perf_counter() - t)


def raw_update(net: torch.nn.Module, worker: Any) -> Callable[[], None]:
    named = list(net.named_parameters())
    out = {n: p.detach().numpy() for n, p in named}

    def update() -> None:
        worker.push_pull({n: p.grad.numpy() for n, p in named}, out=out)

    return update


def one_run(client: Client, args: argparse.Namespace, run: int) -> dict:
    x, y, _, _ = torch_digits.load_digits()
    local, remote, raw = build(args.model), build(args.model), build(args.model)
    adam = torch.optim.Adam(local.parameters(), lr=1e-3)
    opt = RemoteOptimizer(remote.named_parameters(), client, f"dropin-{run}", optim.adam(1e-3))
    raw_model = client.create_model(
        f"raw-{run}", {n: p.detach().numpy() for n, p in raw.named_parameters()}, optim.adam(1e-3)
    )
    loops = [
        Loop(local, adam.step, x, y, args.batch),
        Loop(remote, opt.step, x, y, args.batch),
        Loop(raw, raw_update(raw, raw_model.worker("raw")), x, y, args.batch),
    ]
    whole = common.interleaved_medians(tuple(loop.step for loop in loops), args.steps, warmup=3)
    updates = [statistics.median(loop.update_seconds[3:]) for loop in loops]  # after the warm-up
    for name in (f"dropin-{run}", f"raw-{run}"):
        client.delete_model(name)
    return {"whole": whole, "update": updates}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    p.add_argument("--steps", type=int, default=200, help="steps of each loop per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    n_params = sum(t.numel() for t in build(args.model).parameters())
    print(f"bench/dropins.py: {args.model}, {n_params:,} float32 parameters, batch {args.batch}, {args.steps} steps")
    print(common.machine())
    proc, target = common.optserve_server()
    try:
        with Client(target, timeout=120.0) as client:
            runs = [one_run(client, args, r) for r in range(args.runs)]
    finally:
        common.stop(proc)
    last = runs[-1]
    rows = []
    for i, name in enumerate(("torch.optim.Adam (in process)", "RemoteOptimizer", "raw push_pull")):
        rows.append(
            {
                "loop": name,
                "step ms": f"{last['whole'][i] * 1e3:.2f}",
                "steps/s": f"{1 / last['whole'][i]:.1f}",
                "optimizer part ms": f"{last['update'][i] * 1e3:.3f}",
            }
        )
    print(common.table(rows, ["loop", "step ms", "steps/s", "optimizer part ms"]))
    vs_adam = [r["whole"][1] / r["whole"][0] for r in runs]
    vs_raw = [r["update"][1] / r["update"][2] for r in runs]
    vs_raw_whole = [r["whole"][1] / r["whole"][2] for r in runs]
    print(
        f"RemoteOptimizer step / torch.optim.Adam step: {statistics.median(vs_adam):.2f}x "
        f"({min(vs_adam):.2f}-{max(vs_adam):.2f}) over {args.runs} runs"
    )
    print(
        f"RemoteOptimizer.step() / raw push_pull of the same gradients: {statistics.median(vs_raw):.3f}x "
        f"({min(vs_raw):.3f}-{max(vs_raw):.3f}); whole steps {statistics.median(vs_raw_whole):.3f}x "
        f"({min(vs_raw_whole):.3f}-{max(vs_raw_whole):.3f}) (target <= 1.1x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
