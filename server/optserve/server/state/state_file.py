"""The one-file form of a model's state (Download / Upload): one safetensors file.

Its tensors are the groups of a `HostState` under their group prefix (`params/<leaf path>`,
`opt/<state path>`, `ema/<state path>`; state/model_state.py), and its `__metadata__` holds each
manifest field (state/manifest.py) as a JSON string, so any safetensors reader can open it.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.numpy

from optserve.server.state.errors import StateError
from optserve.server.state.manifest import from_manifest, to_manifest
from optserve.server.state.model_state import GROUPS, HostState
from optserve.server.state.safetensors_io import loads_json, parse_safetensors, to_specs


def encode_file(state: HostState) -> bytes:
    """The model's complete state as one safetensors file (bytes)."""
    tensors = {f"{g}/{k}": v for g, group in state.tensor_groups().items() for k, v in group.items()}
    metadata = {k: json.dumps(v) for k, v in to_manifest(state).items()}
    return safetensors.numpy.save(to_specs(tensors), metadata=metadata)


def decode_file(
    data: bytes | bytearray | memoryview, where: str = "uploaded file", model: str | None = None
) -> HostState:
    """A HostState from a file written by `encode_file`, validated (`manifest.from_manifest`;
    `model`: the name the model will have, for messages); StateError names the problem."""
    tensors, metadata = parse_safetensors(data, where)
    manifest = {k: loads_json(v, f"{where}: __metadata__[{k!r}]") for k, v in metadata.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, a in tensors.items():
        group, _, rest = key.partition("/")
        if group not in GROUPS or not rest:
            raise StateError(f"{where}: tensor {key!r}: expected a params/, opt/ or ema/ key")
        groups.setdefault(group, {})[rest] = a
    return from_manifest(manifest, groups, where, model)
