"""How long a checkpoint holds up training, and how fast it is written.

    .venv/bin/python bench/checkpoint.py [--params 100_000_000] [--leaves 10] [--dir DIR]

An Adam model of `--params` float32 parameters (state = 3x that) lives in an embedded server with a
checkpoint directory. In-process (no gRPC, so transfer time does not hide anything), it measures:
- the update time of one push with no checkpoint running (`LockedModel.apply`, waited for on the device);
- the model-lock hold of a snapshot (`Model.capture_state`: dispatching device copies) and
  the time until the copies are complete;
- every push's time while `save_now` runs in another thread, i.e. how long pushes are held up;
- the commit time of the checkpoint and its write throughput (bytes / seconds), split into the
  host view, the safetensors write + fsync + sha256 read-back, and the commit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import jax
import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--leaves", type=int, default=10)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from optserve.server import Server
    from optserve.server.checkpoint import files as checkpoint_files
    from optserve.server.core import admission
    from optserve.server.state import model_state

    per = args.params // args.leaves
    rng = np.random.default_rng(0)
    params = {f"layer{i}": rng.standard_normal(per, dtype=np.float32) for i in range(args.leaves)}
    grads = {k: (rng.standard_normal(per, dtype=np.float32) * 1e-3) for k in params}
    root = args.dir or tempfile.mkdtemp(prefix="optserve-bench-ckpt-")
    print(
        f"{args.params / 1e6:.0f}M float32 parameters in {args.leaves} leaves, Adam; state "
        f"{3 * args.params * 4 / 1e9:.2f} GB; checkpoint dir {root}; device {jax.devices()[0]}"
    )

    with Server(port=0, checkpoint_dir=root) as srv, srv.client(timeout=600) as client:
        client.create_model("big", {k: v[:1] for k, v in params.items()}, optimizer={"adam": {"learning_rate": 1e-3}})
        client.delete_model("big")  # (warms the service path; the real model is built in-process below)
        model = admission.create_model(
            srv.store, "big", _schema(params), {"adam": {"learning_rate": 1e-3}}, _settings(), params
        )
        manager = srv.checkpoints

        def push() -> float:
            t = time.perf_counter()
            with model.locked() as m:  # the update alone, as an async push applies it once received
                m.apply(grads, 1.0)
            with model.snapshot() as snap:  # the new parameters (a pin only: released before the next push)
                jax.block_until_ready(snap.arrays)
            return time.perf_counter() - t

        for _ in range(3):  # compile and warm
            push()
        base = [push() for _ in range(5)]
        print(f"push without checkpoint: median {statistics.median(base) * 1e3:.0f} ms, max {max(base) * 1e3:.0f} ms")

        t = time.perf_counter()
        snap = model_state.capture(model)
        held = time.perf_counter() - t
        jax.block_until_ready((snap.params, snap.opt_state))
        copied = time.perf_counter() - t
        print(
            f"snapshot: model lock held {held * 1e3:.1f} ms (dispatch); "
            f"device copies complete after {copied * 1e3:.0f} ms"
        )
        t = time.perf_counter()
        state = snap.to_host()
        to_host = time.perf_counter() - t
        del snap
        model_dir = os.path.join(root, "direct")
        os.makedirs(model_dir, exist_ok=True)
        t = time.perf_counter()
        info = checkpoint_files.write_checkpoint(model_dir, state)
        write = time.perf_counter() - t
        del state
        print(
            f"write alone: host view {to_host * 1e3:.0f} ms, write+fsync+sha256+commit {write:.2f} s for "
            f"{info.bytes / 1e9:.2f} GB = {info.bytes / write / 1e9:.2f} GB/s"
        )

        result: dict = {}

        def save() -> None:
            t0 = time.perf_counter()
            result["info"] = manager.save_now(model)
            result["seconds"] = time.perf_counter() - t0

        during: list[float] = []
        saver = threading.Thread(target=save)
        saver.start()
        while saver.is_alive():
            during.append(push())
        saver.join()
        info = result["info"]
        print(
            f"save_now (in a thread, {len(during)} pushes meanwhile): committed step {info.step}, "
            f"{info.bytes / 1e9:.2f} GB in {result['seconds']:.2f} s = {info.bytes / result['seconds'] / 1e9:.2f} GB/s"
        )
        if during:
            print(
                f"pushes during the save: first {during[0] * 1e3:.0f} ms, "
                f"median {statistics.median(during) * 1e3:.0f} ms, "
                f"max {max(during) * 1e3:.0f} ms (baseline median {statistics.median(base) * 1e3:.0f} ms)"
            )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _schema(params: dict) -> list:
    from optserve.wire.dtypes import LeafSpec

    return [LeafSpec(k, "float32", v.shape) for k, v in params.items()]


def _settings():
    from optserve.server.core.settings import ModelSettings

    return ModelSettings()


if __name__ == "__main__":
    sys.exit(main())
