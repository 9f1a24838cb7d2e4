"""A model sharded over several devices (docs/design.md, "Devices and meshes"): Adam's apply-step
time over 1, 2, 4 devices, and on a GPU host the bandwidth each device achieves.

    python bench/devices.py [--params 10e6,100e6] [--devices 1,2,4] [--repeats 5]

CPU part (always): each device count runs in a child process with fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N), since the count is fixed when jax starts.
Fake devices share the host's cores: these figures check that the mesh works and what its
overhead is, not speed (on a 2-core machine 4 devices cannot be faster than 1).

GPU part (only where jax sees GPUs): for 1..N GPUs, Adam's step time and the bandwidth each device
achieves (28 bytes per float32 parameter and step: p, g, mu, nu read, p, mu, nu written) against
the device copy bandwidth measured in the same process (a jitted `x + 1` over as many bytes:
read once, written once). The target is >= 80% of the copy bandwidth, and step time falling as
1/N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ADAM_BYTES_PER_PARAM = 28  # float32: p, g, mu, nu read; p, mu, nu written


def child(platform: str, devices: int, sizes: list[int], repeats: int) -> list[dict]:
    """Runs in a process whose jax has the devices: one row per size."""
    import jax
    import numpy as np
    from apply import leaves_for
    from common import median_seconds

    from optserve.client import optim
    from optserve.server.core import admission
    from optserve.server.core.placement import Placement
    from optserve.server.core.settings import ModelSettings
    from optserve.server.core.store import ModelStore
    from optserve.wire.dtypes import LeafSpec

    mesh = jax.devices(platform)[:devices]
    rows = []
    for n in sizes:
        params = leaves_for(n)
        grads = {k: np.full(v.shape, 1e-3, np.float32) for k, v in params.items()}
        schema = [LeafSpec(k, "float32", v.shape) for k, v in params.items()]
        store = ModelStore(Placement(mesh))
        model = admission.create_model(store, "bench", schema, optim.adam(1e-3), ModelSettings(), params)
        del params
        g = model.to_device(grads)
        del grads

        seconds = median_seconds(lambda model=model, g=g: _step(model, g), repeats)
        row = {
            "platform": platform,
            "devices": devices,
            "params": f"{n / 1e6:g}M",
            "step ms": f"{seconds * 1e3:.1f}",
            "GB/s per device": f"{ADAM_BYTES_PER_PARAM * n / seconds / devices / 1e9:.1f}",
            "bytes per device": max(model.placement_info()[1]),
        }
        if platform == "gpu":
            copy = copy_bandwidth(mesh, ADAM_BYTES_PER_PARAM * n // 8 // devices * devices, repeats)
            row["copy GB/s per device"] = f"{copy / 1e9:.1f}"
            row["of copy"] = f"{ADAM_BYTES_PER_PARAM * n / seconds / devices / copy:.0%}"
        rows.append(row)
        del model, store, g
    return rows


def _step(model, g) -> None:
    """One update on a gradient already on the devices, waited for (as bench/apply.py times it)."""
    import jax

    with model.locked() as m:
        m.apply(g, 1.0)
    with model.snapshot() as snap:
        jax.block_until_ready(snap.arrays)


def copy_bandwidth(devices: list, elements: int, repeats: int) -> float:
    """Bytes per second one device moves in a jitted `x + 1` over float32 sharded on `devices`
    (reads and writes counted), the same total bytes as an Adam step's traffic."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import median_seconds
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    x = jax.device_put(jnp.zeros(elements, jnp.float32), sharding)
    f = jax.jit(lambda a: a + 1, donate_argnums=0, out_shardings=sharding)
    box = [x]

    def run() -> None:
        box[0] = f(box[0])
        jax.block_until_ready(box[0])

    seconds = median_seconds(run, repeats)
    return 2 * 4 * elements / seconds / len(devices)


def run_child(platform: str, devices: int, sizes: list[int], repeats: int) -> list[dict]:
    env = dict(os.environ)
    if platform == "cpu":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    args = ["--child", platform, "--devices", str(devices), "--params", ",".join(map(str, sizes))]
    out = subprocess.run(
        [sys.executable, __file__, *args, "--repeats", str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{platform} x{devices}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_count() -> int:
    probe = "import jax\ntry:\n print(len(jax.devices('gpu')))\nexcept RuntimeError:\n print(0)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


COLUMNS = ["platform", "devices", "params", "step ms", "GB/s per device", "bytes per device"]
GPU_COLUMNS = [*COLUMNS, "copy GB/s per device", "of copy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="10e6,100e6")
    ap.add_argument("--devices", default="1,2,4", help="CPU device counts (fake devices)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(float(x)) for x in args.params.split(",")]
    if args.child:
        print(json.dumps(child(args.child, int(args.devices), sizes, args.repeats)))
        return
    from common import machine, table

    print(f"# devices: {machine()}")
    print("# CPU: fake devices sharing the host's cores (correctness and overhead, not speed)")
    rows = [r for d in args.devices.split(",") for r in run_child("cpu", int(d), sizes, args.repeats)]
    print(table(rows, COLUMNS))
    gpus = gpu_count()
    if not gpus:
        print("# GPU: none here (the GPU part runs where jax sees GPUs)")
        return
    counts = sorted({n for n in (1, 2, 4, 8, gpus) if n <= gpus})
    print(f"# GPU: {gpus} device(s); target >= 80% of copy bandwidth, step time ~ 1/N")
    print(table([r for n in counts for r in run_child("gpu", n, sizes, args.repeats)], GPU_COLUMNS))


if __name__ == "__main__":
    main()
