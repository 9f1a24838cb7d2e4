"""Peak server memory while receiving a G-byte gradient, against parameters + optimizer state + 1.2 G.

    python bench/memory.py [--params 100e6]

The server runs in its own process. Its runtime (Python, JAX, grpc, with one tiny model created,
pushed to and deleted) is measured first and subtracted: the budget is about what a model costs.
Then a float32 Adam model of `--params` parameters is created and pushed to once (compilation),
pulled, left alone for 0.5 s (less than the 2 s for which a model keeps its gradient buffers for the
next push), the peak (VmHWM) is reset, and one more gradient is pushed; the peak during that push is
what is reported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine, optserve_server, stop, table

from optserve.client import Client, optim


def rss(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def measure(n: int = 100_000_000) -> list[dict]:
    proc, addr = optserve_server()
    rows = []
    try:
        client = Client(addr, timeout=600)
        warm = client.create_model("warm", {"w": np.zeros(16, np.float32)}, optim.adam(1e-3))
        warm.push({"w": np.ones(16, np.float32)})
        warm.pull()
        client.delete_model("warm")
        runtime = rss(proc.pid, "VmRSS")
        model = client.create_model("mem", {"w": np.zeros(n, np.float32)}, optim.adam(1e-3))
        info = model.info()
        grads = {"w": np.full(n, 1e-3, np.float32)}
        model.push(grads)  # compile and settle
        model.pull()
        # The server drops the last update's inputs within ~50 ms of the update finishing
        # (host_memory.host_buffer_reaper) but keeps the gradient buffer itself for the next push for
        # 2 s (gradient_buffers.py), as during training: "before" includes it and the push reuses it.
        # A push that arrives while the previous update still runs holds two gradients, by design
        # (receiving overlaps the update); this measures one push.
        time.sleep(0.5)
        before = rss(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        model.push(grads)
        peak = rss(proc.pid, "VmHWM")
        g = 4 * n
        state = info["param_bytes"] + info["state_bytes"]
        used = peak - runtime
        rows.append(
            {
                "gradient G": f"{g / 1e9:.2f} GB",
                "params + state": f"{state / 1e9:.2f} GB",
                "server runtime": f"{runtime / 1e9:.2f} GB",
                "model RSS before push": f"{(before - runtime) / 1e9:.2f} GB",
                "model peak during push": f"{used / 1e9:.2f} GB",
                "= state +": f"{(used - state) / g:.2f} G",
                "budget (state + 1.2 G)": f"{(state + 1.2 * g) / 1e9:.2f} GB",
                "within": "yes" if used <= state + 1.2 * g else "no",
            }
        )
        client.close()
    finally:
        stop(proc)
    return rows


COLUMNS = [
    "gradient G",
    "params + state",
    "server runtime",
    "model RSS before push",
    "model peak during push",
    "= state +",
    "budget (state + 1.2 G)",
    "within",
]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    print(f"# memory: {machine()}")
    print(table(measure(int(ap.parse_args().params)), COLUMNS))
