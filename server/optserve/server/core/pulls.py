"""What a pull sends: a snapshot's leaves as host arrays in the requested wire dtype, and the size
bound of a one-message reply."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.wire.chunks import Cast, slice_wire_bytes
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.framing import PAYLOAD_FIELD_BYTES

WIRE_DTYPES = ("float16", "bfloat16", "float32")  # what a pull may narrow floating-point leaves to


def check_wire_dtype(wire_dtype: str, model: str) -> None:
    """A pull's wire_dtype: empty (the parameters' dtypes) or a floating dtype the wire supports."""
    if wire_dtype and wire_dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"model {model!r}: wire_dtype must be float16, bfloat16 or float32, got {wire_dtype!r}")


def single_reply_bytes(schema: Iterable[LeafSpec], wire_dtype: str, header_bytes: int) -> int:
    """An upper bound of a one-message pull reply (PullOne, PushPullOne): `header_bytes` of header
    fields, every leaf's slice description and bytes (in the wire dtype), and the payload field."""
    total = header_bytes + PAYLOAD_FIELD_BYTES
    for leaf in schema:
        dtype = leaf.dtype if not wire_dtype or leaf.dtype not in FLOAT_DTYPES else wire_dtype
        total += slice_wire_bytes(leaf.path, dtype, leaf.shape) + leaf_nbytes(DTYPES[dtype], leaf.shape)
    return total


def _on_cpu(x: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def host_leaves(
    schema: list[LeafSpec], arrays: Mapping[str, jax.Array], wire_dtype: str, model: str
) -> list[tuple[str, np.ndarray | Cast]]:
    """Device arrays as host arrays (zero copy on CPU), floats marked for the requested wire dtype.

    On the CPU the narrowing happens chunk by chunk while the reply is framed (`Cast`); on an
    accelerator it happens on the device, so only the narrow bytes cross to the host.
    """
    check_wire_dtype(wire_dtype, model)
    target = DTYPES.get(wire_dtype) if wire_dtype else None
    out: list[tuple[str, np.ndarray | Cast]] = []
    for leaf in schema:
        x = arrays[leaf.path]
        if target is None or leaf.dtype not in FLOAT_DTYPES or x.dtype == target:
            out.append((leaf.path, np.asarray(x)))
        elif _on_cpu(x):
            out.append((leaf.path, Cast(np.asarray(x), target)))
        else:
            out.append((leaf.path, np.asarray(x.astype(target))))
    return out
