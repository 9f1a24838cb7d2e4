"""bf16 and fp16 on the wire: effective gradient throughput (float32 bytes represented per second)
against float32 on the wire, same model, same run. The last row pushes gradients that are bfloat16
already (as a bfloat16 model computes them): the float32 -> bfloat16 conversion on the client is
the difference between it and the bfloat16 row.

    python bench/wire.py [--params 10e6]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np
from common import interleaved_medians, machine, optserve_server, paired_medians, stop, table

from optserve.client import Client, optim


def measure(n: int = 10_000_000) -> list[dict]:
    proc, addr = optserve_server()
    rows = []
    try:
        client = Client(addr, timeout=600)
        model = client.create_model("wire", {"w": np.zeros(n, np.float32)}, optim.sgd(1e-3))
        grads = {"w": np.full(n, 1e-3, np.float32)}
        native = {"w": grads["w"].astype(ml_dtypes.bfloat16)}  # a bfloat16 model's own gradients: no conversion
        f32, bf16, bf16_native = interleaved_medians(
            (lambda: model.push(grads), lambda: model.push(grads, wire_dtype="bfloat16"), lambda: model.push(native)), 9
        )
        _, f16 = paired_medians(lambda: model.push(grads), lambda: model.push(grads, wire_dtype="float16"), 5)
        times = {
            "float32": f32,
            "bfloat16": bf16,
            "float16": f16,
            "bfloat16 gradients (no client conversion)": bf16_native,
        }
        for w, t in times.items():
            rows.append(
                {
                    "wire dtype": w,
                    "push ms": f"{t * 1e3:.1f}",
                    "effective GB/s (as float32)": f"{4 * n / t / 1e9:.2f}",
                    "vs float32": f"{f32 / t:.2f}x",
                    "target": "" if w == "float32" else ">= 1.8x",
                }
            )
        client.close()
    finally:
        stop(proc)
    return rows


COLUMNS = ["wire dtype", "push ms", "effective GB/s (as float32)", "vs float32", "target"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=10e6)
    print(f"# wire: {machine()}")
    print(table(measure(int(ap.parse_args().params)), COLUMNS))
