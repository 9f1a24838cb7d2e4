"""Run optax in float64 for a list of canonical specs, in its own process.

``python -m tests.reference._optax_x64 JOBS.json OUT.npz``.  JOBS.json is a list of
``{"id", "spec", "n_steps", "params_seed", "grads_seed"}``; OUT.npz holds, per job and leaf,
``"<id>|<leaf>"`` with the params after every step (shape (n_steps, *leaf_shape)), or
``"<id>|!error"`` with the error text.  jax_enable_x64 is switched on here, in a separate
process, so that it never leaks into other test modules.
"""

from __future__ import annotations

import json
import sys
import warnings

import jax
import numpy as np

from .data import make_grads, make_params

jax.config.update("jax_enable_x64", True)

# optax (and jax.numpy) only once x64 is on: jax's flags are meant to be set before jax is used.
from .optax_equiv import run_optax  # noqa: E402 - after jax_enable_x64


def main(jobs_path: str, out_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    out = {}
    warnings.simplefilter("ignore")
    for job in jobs:
        params = make_params(job["params_seed"], dtype=np.float64)
        grads = make_grads(job["n_steps"], job["grads_seed"], dtype=np.float64)
        try:
            traj = run_optax(job["spec"], params, grads, dtype=jax.numpy.float64)
        except Exception as e:  # reported per job, so one bad spec does not hide the others
            out[f"{job['id']}|!error"] = np.array(f"{type(e).__name__}: {e}")
            continue
        for leaf in params:
            out[f"{job['id']}|{leaf}"] = np.stack([p[leaf] for p in traj])
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
