"""Host to device: the cost of turning received bytes into device arrays, by path.

    python bench/h2d.py [--mb 40]

Compares jax.device_put of a 64-byte-aligned numpy buffer (what TensorAssembler produces; on CPU
the jax array aliases it, zero copy), of an unaligned one, jnp.asarray, and dlpack.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, median_seconds, table

from optserve.wire.assembler import aligned_empty


def measure(mb: float = 40) -> list[dict]:
    n = int(mb * 1e6) // 4
    dev = jax.devices()[0]
    aligned = aligned_empty(4 * n).view(np.float32)
    aligned[:] = 1.0
    raw = np.empty(4 * n + 1, np.uint8)
    unaligned = raw[1:].view(np.float32) if raw[1:].ctypes.data % 4 == 0 else raw[1 : 4 * n + 1].view(np.float32)
    unaligned[:] = 1.0
    paths = {
        "device_put, 64-byte aligned (used)": lambda: jax.block_until_ready(jax.device_put(aligned, dev)),
        "device_put, unaligned": lambda: jax.block_until_ready(jax.device_put(unaligned, dev)),
        "jnp.asarray, aligned": lambda: jax.block_until_ready(jnp.asarray(aligned)),
        "jax.dlpack.from_dlpack, aligned": lambda: jax.block_until_ready(jax.dlpack.from_dlpack(aligned)),
    }
    rows = []
    for name, fn in paths.items():
        try:
            t = median_seconds(fn, 10)
        except Exception as e:  # a path this platform lacks
            rows.append({"path": name, "ms": f"n/a ({type(e).__name__})", "GB/s": ""})
            continue
        rows.append({"path": name, "ms": f"{t * 1e3:.3f}", "GB/s": f"{4 * n / t / 1e9:.1f}"})
    return rows


COLUMNS = ["path", "ms", "GB/s"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=40)
    mb = ap.parse_args().mb
    print(f"# host to device, {mb:g} MB: {machine()}, device {jax.devices()[0]}")
    print(table(measure(mb), COLUMNS))
