"""Deterministic test data and the error metric shared by the self-tests and the conformance test.

Leaves cover rank 0 to rank 4 (issue 3 acceptance); gradients are random signs times magnitudes
log-uniform in [1e-4, 1] per element.
"""

from __future__ import annotations

import numpy as np

# leaf path -> shape.  Small on purpose (a step must cost a few ms); flat names without "/" so
# that the client keeps the dict flat.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "bias": (3,),
    "kernel": (2, 3),
    "conv": (2, 1, 2, 3),
}


def make_params(seed: int = 0, shapes=SHAPES, dtype=np.float32) -> dict[str, np.ndarray]:
    """Initial params ~ N(0, 0.5²), the scalar pushed away from 0 (|p| ≥ 0.3) so that
    trust ratios and relative errors are well defined."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        x = rng.normal(0.0, 0.5, size=shape)
        if shape == ():
            x = np.sign(x or 1.0) * max(abs(float(x)), 0.3)
        out[k] = np.asarray(x, dtype=dtype)
    return out


def make_grads(
    n_steps: int, seed: int = 1, shapes=SHAPES, dtype=np.float32, low: float = 1e-4, high: float = 1.0
) -> list[dict[str, np.ndarray]]:
    """``n_steps`` gradients: sign · 10^U(log10 low, log10 high) element-wise."""
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(n_steps):
        g = {}
        for k, shape in shapes.items():
            mag = 10.0 ** rng.uniform(np.log10(low), np.log10(high), size=shape)
            sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
            g[k] = np.asarray(sign * mag, dtype=dtype)
        grads.append(g)
    return grads


def rel_error(actual: np.ndarray, reference: np.ndarray, initial: np.ndarray | None = None) -> float:
    """max |actual − reference| / max |reference|  (docs/optimizer-catalogue.md §5).

    The denominator is floored by max |initial| (the leaf before training) so that a leaf whose
    reference happens to end near 0 does not turn float32 rounding into a huge ratio.
    """
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    denom = float(np.max(np.abs(reference))) if reference.size else 0.0
    if initial is not None and np.size(initial):
        denom = max(denom, float(np.max(np.abs(np.asarray(initial, dtype=np.float64)))))
    diff = float(np.max(np.abs(actual - reference))) if reference.size else 0.0
    if denom == 0.0:
        return diff
    return diff / denom


def max_rel_error(actual: dict, reference: dict, initial: dict | None = None) -> tuple[float, str]:
    """The worst leaf: (relative error, leaf path)."""
    worst = (0.0, "")
    for k in reference:
        e = rel_error(actual[k], reference[k], None if initial is None else initial[k])
        if e > worst[0] or not worst[1]:
            worst = (e, k)
    return worst
