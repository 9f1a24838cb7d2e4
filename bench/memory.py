"""Peak server RSS while receiving a G-byte gradient, against parameters + optimizer state + 1.2 G.

    python bench/memory.py [--params 100e6]

The server runs in its own process; VmHWM (peak resident set) is read from /proc before and after
one push of a float32 gradient of the model's size.
"""
from __future__ import annotations

import argparse

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
        model = client.create_model("mem", {"w": np.zeros(n, np.float32)}, optim.adam(1e-3))
        info = model.info()
        grads = {"w": np.full(n, 1e-3, np.float32)}
        model.push(grads)  # compile and settle
        before = rss(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        model.push(grads)
        peak = rss(proc.pid, "VmHWM")
        g = 4 * n
        state = info["param_bytes"] + info["state_bytes"]
        rows.append({"gradient": f"{g / 1e9:.2f} GB", "params + state": f"{state / 1e9:.2f} GB",
                     "RSS before push": f"{before / 1e9:.2f} GB", "peak RSS during push": f"{peak / 1e9:.2f} GB",
                     "peak - before": f"{(peak - before) / g:.2f} G",
                     "budget (state + 1.2 G)": f"{(state + 1.2 * g) / 1e9:.2f} GB",
                     "within": "yes" if peak <= state + 1.2 * g + (before - state) else "no"})  # fmt: skip
        client.close()
    finally:
        stop(proc)
    return rows


COLUMNS = ["gradient", "params + state", "RSS before push", "peak RSS during push", "peak - before",
           "budget (state + 1.2 G)", "within"]  # fmt: skip

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    print(f"# memory: {machine()}")
    print(table(measure(int(ap.parse_args().params)), COLUMNS))
