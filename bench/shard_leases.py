"""What leases cost a sync model over two shard servers: fixed membership against the default.

With leases (the default heartbeat) shard 0 decides every sync round of a sharded model, and each
push relays its round's decision (a DecideRound to shard 0, then one to shard 1, on the worker's
relay threads; docs/design.md, "Shards", "Sync rounds"); with `heartbeat=0` (a fixed membership,
quorum == workers) each shard closes its rounds alone. One worker (`workers=1`: every push closes
its round), two models alive at once on the same two `optserve serve` processes, one
`push_pull(grads, out=)` of each timed in turn (`common.interleaved_medians`), median of `--rounds`
after `--warmup`. Reported: ms per push_pull and leases / fixed of the same run.

    python bench/shard_leases.py [--floats 1000,1000000] [--rounds 50] [--warmup 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COLUMNS = ["floats", "fixed ms", "leases ms", "leases / fixed"]


def measure(floats: int, targets: list[str], args: argparse.Namespace) -> dict:
    import common

    from optserve.client import Client

    half = max(1, floats // 2)
    params = {"a": np.zeros(half, np.float32), "b": np.zeros(half, np.float32)}  # one leaf per shard
    grads = {k: np.full_like(v, 1e-3) for k, v in params.items()}
    with Client(targets, timeout=120) as client:
        models = {
            "fixed": client.create_model(
                f"fixed-{floats}", params, {"sgd": {"learning_rate": 0.1}}, mode="sync", workers=1, heartbeat=0
            ),
            "leases": client.create_model(
                f"leases-{floats}", params, {"sgd": {"learning_rate": 0.1}}, mode="sync", workers=1
            ),
        }
        assert not models["fixed"].decides_rounds and models["leases"].decides_rounds
        workers = {k: m.worker("bench") for k, m in models.items()}
        outs = {k: w.pull() for k, w in workers.items()}
        fns = tuple((lambda w=workers[k], o=outs[k]: w.push_pull(grads, out=o)) for k in ("fixed", "leases"))
        fixed, leased = common.interleaved_medians(fns, args.rounds, args.warmup)
        for k, w in workers.items():
            w.close()
            client.delete_model(models[k].name)
    return {
        "floats": floats,
        "fixed ms": f"{fixed * 1e3:.2f}",
        "leases ms": f"{leased * 1e3:.2f}",
        "leases / fixed": f"{leased / fixed:.2f}x",
    }


def main() -> None:
    import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floats", default="1000,1000000")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    servers = [common.optserve_server() for _ in range(2)]
    try:
        rows = [measure(int(n), [a for _, a in servers], args) for n in args.floats.split(",")]
    finally:
        for proc, _ in servers:
            common.stop(proc)
    print(common.machine())
    print(common.table(rows, COLUMNS))


if __name__ == "__main__":
    main()
