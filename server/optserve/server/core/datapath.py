"""Received gradients onto the device while the rest of the push still arrives."""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

# Leaves from this size on start their device transfer as soon as they are complete (pipelining).
EARLY_DEVICE_PUT_BYTES = 1 << 20


def device_putter(into: dict, device: jax.Device, only: frozenset[str] | None = None) -> Callable[[str, np.ndarray], None]:
    """An on_complete callback for TensorAssembler that starts each finished leaf's host-to-device
    copy (asynchronous on accelerators; zero copy of the aligned buffer on CPU) while later chunks
    are still arriving. It closes over the target dict only, not over its receiver: a bound method
    would make receiver -> assembler -> callback -> receiver a reference cycle, keeping whole
    gradients alive until the cyclic garbage collector runs. `only`: the leaves to move (others,
    e.g. non-float leaves that take no part in the update, are left on the host)."""

    def put(path: str, array: np.ndarray) -> None:
        if only is None or path in only:
            # Small leaves go to the jitted step as numpy arrays: its C++ dispatch transfers them in
            # microseconds, where jax.device_put's Python path costs more than a small model's update.
            into[path] = jax.device_put(array, device) if array.nbytes >= EARLY_DEVICE_PUT_BYTES else array

    return put
