"""The dtypes a tensor may have on the wire: names, numpy dtypes, sizes, and what a leaf must be."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from optserve.wire.errors import WireError

# The dtypes a tensor may have on the wire, by numpy name.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "float32": np.float32,
        "float64": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
    }.items()
}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

_NAME_OF = {dtype: name for name, dtype in DTYPES.items()}  # numpy's dtype.name is slow Python code


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; raises WireError for dtypes that cannot travel."""
    name = _NAME_OF.get(dtype)
    if name is not None:
        return name
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise WireError(f"dtype {name!r} cannot be sent; supported: {', '.join(DTYPES)}")
    return name


def wire_dtype(name: str, *, path: str = "") -> np.dtype:
    """The numpy dtype for a wire name; raises WireError naming the leaf for unknown names."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        where = f"leaf {path!r}: " if path else ""
        raise WireError(f"{where}unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def leaf_nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype.itemsize


# bfloat16 has no fast numpy isfinite: its exponent bits are all ones exactly for Inf and NaN, i.e.
# when the bits without the sign are >= 0x7F80 (one mask and a max: ~0.07 ms per 2 MiB).
_BF16_ABS = np.uint16(0x7FFF)
_BF16_INF = 0x7F80


def all_finite(raw: np.ndarray, dtype_name: str) -> bool:
    """Whether the floats of wire dtype `dtype_name` in the uint8 buffer `raw` (whole elements)
    are all finite."""
    if dtype_name == "bfloat16":
        bits = raw.view(np.uint16)
        return bits.size == 0 or int(np.bitwise_and(bits, _BF16_ABS).max()) < _BF16_INF
    return bool(np.isfinite(raw.view(DTYPES[dtype_name])).all())


@dataclass(frozen=True)
class LeafSpec:
    """What a leaf must look like: parameter dtype name and shape."""

    path: str
    dtype: str
    shape: tuple[int, ...]
