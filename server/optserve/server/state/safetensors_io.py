"""safetensors files: a strict reader of untrusted ones, what the writer expects, and checksums.

The writer is safetensors' own (`safetensors.numpy.save` / `save_file`); the reader is ours because
safetensors' numpy reader has no bfloat16 (numpy lacks it; ml_dtypes provides it), and because an
uploaded or damaged file must be refused with a message naming the tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from optserve.server.core import schema as schemas
from optserve.server.state.errors import StateError, is_int, show
from optserve.wire.dtypes import DTYPES, leaf_nbytes

# safetensors dtype names <-> numpy names (DTYPES)
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def to_specs(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-contiguous arrays (what safetensors' writer expects; it byte-swaps big-endian ones itself).
    Not np.ascontiguousarray: it turns 0-d arrays (step counts) into 1-d ones."""
    return {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in tensors.items()}


def parse_safetensors(data: bytes | bytearray | memoryview, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file held in memory, validated strictly: every entry's
    dtype, shape and offsets, the tensors covering the body exactly (no overlap, gap or trailing
    bytes). The tensors are views into `data`."""
    view = memoryview(data)
    if len(view) < 8:
        raise StateError(f"{where}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8 or n > 100 << 20:
        raise StateError(f"{where}: truncated or malformed safetensors header (length {n})")
    header = loads_json(bytes(view[8 : 8 + n]), f"{where}: safetensors header")
    if not isinstance(header, dict):
        raise StateError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise StateError(f"{where}: safetensors __metadata__ must map names to strings")
    body = view[8 + n :]
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = DTYPES[_ST_DTYPES[info["dtype"]]]
            shape, offsets = tuple(info["shape"]), tuple(info["data_offsets"])
            begin, end = offsets
        except (KeyError, TypeError, ValueError):
            raise StateError(f"{where}: tensor {key!r}: malformed entry {show(info)}") from None
        if (
            not all(is_int(x) for x in shape + offsets)
            or len(shape) > schemas.MAX_RANK
            or not schemas.shape_extent_ok(dtype, shape)
        ):
            raise StateError(
                f"{where}: tensor {key!r}: shape {show(info['shape'])} or data_offsets "
                f"{show(info['data_offsets'])} out of range"
            )
        if not 0 <= begin <= end <= len(body) or end - begin != leaf_nbytes(dtype, shape):
            raise StateError(f"{where}: tensor {key!r}: data_offsets {begin}..{end} do not fit its shape or the file")
        spans.append((begin, end, key))
        tensors[key] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    spans.sort()
    covered = 0
    for begin, end, key in spans:
        if begin != covered:
            raise StateError(f"{where}: tensor {key!r}: overlapping or gapped data_offsets")
        covered = end
    if covered != len(body):
        raise StateError(f"{where}: {len(body) - covered} trailing bytes after the last tensor")
    return tensors, metadata


def loads_json(text: str | bytes, where: str) -> Any:
    """json.loads for untrusted text: malformed, non-UTF-8 or hostilely nested JSON (RecursionError
    in the parser) is a StateError naming `where`."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise StateError(f"{where}: JSON nested too deeply") from None


def sha256_file(path: str) -> tuple[str, int]:
    """(hex digest, size) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
