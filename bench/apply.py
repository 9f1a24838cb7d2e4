"""The server's compiled step against in-process jitted optax with donation, same rule and size.

    python bench/apply.py [--params 10e6] [--rules adam,sgd,chain]

Times, alternately (see common.paired_medians), the server's update once the gradient is on the
device (`LockedModel.apply`: the jitted step with donated buffers, EMA and scale included; NaN/Inf
were already rejected chunk by chunk on receipt) against `jax.jit(optax update + apply_updates,
donate)`. Both block until the new parameters are ready.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine, paired_medians, table

from optserve.client import optim
from optserve.server.core import admission
from optserve.server.core.settings import ModelSettings
from optserve.server.core.store import ModelStore
from optserve.wire.dtypes import LeafSpec

RULES = {
    "sgd": (optim.sgd(1e-3), optax.sgd(1e-3)),
    "adam": (optim.adam(1e-3), optax.adam(1e-3)),
    "chain": (
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=1e-4)),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4)),
    ),
}


def leaves_for(n: int) -> dict[str, np.ndarray]:
    """A few leaves like a real model: one big matrix, a few smaller ones."""
    big = n * 7 // 8
    rest = n - big
    return {
        "a/kernel": np.zeros(big, np.float32),
        "b/kernel": np.zeros(rest - 1024, np.float32),
        "b/bias": np.zeros(1024, np.float32),
    }


def server_step(spec, params: dict, grads: dict):
    """One server update (LockedModel.apply) on a gradient already on the device, waited for."""
    schema = [LeafSpec(k, "float32", v.shape) for k, v in params.items()]
    model = admission.create_model(ModelStore(jax.devices()[0]), "bench", schema, spec, ModelSettings(), params)
    g = model.to_device(grads)

    def step():
        with model.locked() as m:
            m.apply(g, 1.0)
        with model.snapshot() as snap:  # the new parameters (a pin only: released before the next step)
            jax.block_until_ready(snap.arrays)

    return step


def optax_step(tx, params: dict, grads: dict):
    """The same update in process: jitted optax with donated parameters and state, waited for."""
    p = {k: jnp.asarray(v) for k, v in params.items()}
    g = {k: jnp.asarray(v) for k, v in grads.items()}

    def _step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(_step, donate_argnums=(0, 1))
    box = [p, tx.init(p)]

    def run():
        box[0], box[1] = step(box[0], box[1], g)
        jax.block_until_ready(box[0])

    return run


def measure(n: int, rules: list[str], repeats: int = 30) -> list[dict]:
    rows = []
    params = leaves_for(n)
    grads = {k: np.full(v.shape, 1e-3, np.float32) for k, v in params.items()}
    for name in rules:
        spec, tx = RULES[name]
        ours, ref = paired_medians(
            server_step(spec, {k: v.copy() for k, v in params.items()}, grads), optax_step(tx, params, grads), repeats
        )
        rows.append(
            {
                "rule": name,
                "params": f"{n / 1e6:g}M",
                "server step ms": f"{ours * 1e3:.2f}",
                "optax step ms": f"{ref * 1e3:.2f}",
                "ratio": f"{ours / ref:.2f}x",
            }
        )
    return rows


COLUMNS = ["rule", "params", "server step ms", "optax step ms", "ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=10e6)
    ap.add_argument("--rules", default="sgd,adam,chain")
    args = ap.parse_args()
    print(f"# apply: {machine()}, device {jax.devices()[0]}")
    print(table(measure(int(args.params), args.rules.split(",")), COLUMNS))


if __name__ == "__main__":
    main()
