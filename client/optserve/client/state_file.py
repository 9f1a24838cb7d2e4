"""A model's state file (what `Model.download` writes) as the client reads and writes it: tensors by
file key (`params/...`, `opt/...`, `ema/...`) and the manifest's fields, each stored as a JSON string
in the safetensors `__metadata__` (README.md, "Checkpoint format"). `optserve.wire.resharding`
gathers and splits such states; this module only moves them between files and memory.

Reading uses safetensors' `safe_open` (its numpy reader knows bfloat16 once ml_dtypes is imported,
which optserve.wire.dtypes does), writing `safetensors.numpy`; neither imports torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from optserve.client.errors import InvalidArgumentError
from optserve.wire.resharding import State


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest fields of a state file, read from its header only; None when the file is not a
    safetensors file with JSON fields (the server then says what is wrong with it)."""
    try:
        with safetensors.safe_open(os.fspath(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        return {k: json.loads(v) for k, v in metadata.items()}
    except (OSError, ValueError, safetensors.SafetensorError):
        return None


def read_state(path: str | os.PathLike) -> State:
    """(tensors, manifest) of a state file; InvalidArgumentError naming the file if it is not one."""
    where = os.fspath(path)
    try:
        with safetensors.safe_open(where, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  # a safe_open handle, not a dict
    except (ValueError, TypeError, safetensors.SafetensorError) as e:
        raise InvalidArgumentError(f"{where}: not a readable safetensors file ({e})") from None
    manifest = {}
    for key, text in metadata.items():
        try:
            manifest[key] = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{where}: __metadata__[{key!r}] is not JSON ({e})") from None
    return tensors, manifest


def encode_state(state: State) -> bytes:
    """The state file's bytes."""
    tensors, manifest = state
    return safetensors.numpy.save(_contiguous(tensors), metadata={k: json.dumps(v) for k, v in manifest.items()})


def write_state(path: str | os.PathLike, state: State) -> int:
    """Writes a state file (through `<path>.part`, fsynced, renamed: a reader never sees half of
    one); returns its size in bytes."""
    tmp = f"{os.fspath(path)}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(encode_state(state))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return size


def _contiguous(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # safetensors writes C-contiguous arrays only (row ranges of one are; anything else is copied).
    # Not np.ascontiguousarray: it turns 0-d arrays (counts) into 1-d ones.
    return {k: a if a.flags.c_contiguous else a.copy(order="C") for k, a in tensors.items()}
