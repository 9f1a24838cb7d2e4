"""The compiled step of an optimizer spec against the same chain written by hand in optax.

    python bench/spec_step.py [--params 10e6]

Both are jitted with donated parameters and state, timed alternately until the new parameters are
ready;
the spec compiler must add nothing per leaf or per element (issue: 'at most 1.1x in-process optax').
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from apply import leaves_for, optax_step
from common import machine, paired_medians, table

from optserve.client import optim
from optserve.server.spec import compile_spec

CASES = {
    "adam": (optim.adam(1e-3), lambda: optax.adam(1e-3)),
    "chain(clip, adamw(schedule))": (
        optim.chain(
            optim.clip_by_global_norm(1.0), optim.adamw(optim.exponential_decay(1e-3, 1000, 0.1), weight_decay=1e-4)
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(optax.exponential_decay(1e-3, 1000, 0.1), weight_decay=1e-4)
        ),
    ),
    "sgd(momentum, nesterov)": (
        optim.sgd(1e-2, momentum=0.9, nesterov=True),
        lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    ),
    "rmsprop(centered)": (optim.rmsprop(1e-3, centered=True), lambda: optax.rmsprop(1e-3, centered=True)),
    "lamb": (optim.lamb(1e-3), lambda: optax.lamb(1e-3)),
}


def measure(n: int, repeats: int = 30) -> list[dict]:
    params = leaves_for(n)
    grads = {k: jnp.full(v.shape, 1e-3, jnp.float32) for k, v in params.items()}
    rows = []
    for name, (spec, make) in CASES.items():
        compiled = compile_spec(spec, list(params))
        ours, ref = paired_medians(optax_step(compiled, params, grads), optax_step(make(), params, grads), repeats)
        rows.append(
            {
                "spec": name,
                "params": f"{n / 1e6:g}M",
                "compiled ms": f"{ours * 1e3:.2f}",
                "optax ms": f"{ref * 1e3:.2f}",
                "ratio": f"{ours / ref:.2f}x",
            }
        )
    return rows


COLUMNS = ["spec", "params", "compiled ms", "optax ms", "ratio"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=10e6)
    print(f"# spec step: {machine()}, device {jax.devices()[0]}")
    print(table(measure(int(ap.parse_args().params)), COLUMNS))
