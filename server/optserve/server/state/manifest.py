"""The manifest: the JSON description of a `HostState` (everything but its tensors), and reading
one back as strictly as CreateModel validates a client's request.

Checkpoint directories store the manifest as `manifest.json` (checkpoint/files.py); a downloaded
model keeps its fields as JSON strings in the safetensors `__metadata__` (state/state_file.py).
Worker records (core/workers.py, with the replies a retried push gets back) are part of it, in
their JSON form (state/worker_records.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from optserve.server.core.errors import InvalidArgument
from optserve.server.core.membership import MembershipState
from optserve.server.core.schema import schema_from_json
from optserve.server.core.settings import ModelSettings
from optserve.server.core.sharding import Shard
from optserve.server.core.step import MAX_STEP
from optserve.server.core.workers import WorkerRecord
from optserve.server.spec import SpecError, check_spec_depth
from optserve.server.state.errors import StateError, is_int, show
from optserve.server.state.model_state import HostState
from optserve.server.state.worker_records import decode_worker, encode_worker
from optserve.wire.errors import WireError
from optserve.wire.shards import ShardMap

FORMAT = "optserve-state"
FORMAT_VERSION = 1


def to_manifest(state: HostState) -> dict:
    """The JSON-able description of `state` (everything but the tensors)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": state.name,
        "step": state.step,
        "schema": [{"path": leaf.path, "dtype": leaf.dtype, "shape": list(leaf.shape)} for leaf in state.schema],
        "spec": state.spec,
        "settings": state.settings.to_json(),
        "hyperparams": state.hyperparams,
        "workers": {w: encode_worker(r) for w, r in state.workers.items()},
        "opt_keys": list(state.opt),
        "ema_keys": None if state.ema is None else list(state.ema),
        # absent for a whole model (files written before models could be sharded have none)
        **({} if state.shard is None else {"shard": {"index": state.shard.index, "map": state.shard.map.to_json()}}),
        # absent in files written before memberships (core/membership.py)
        **({} if state.membership is None else {"membership": _encode_membership(state.membership)}),
    }


def _encode_membership(m: MembershipState) -> dict:
    return {
        "epoch": m.epoch,
        "seen": list(m.seen),
        "members": [{"worker_id": w, "session": s, "joined_epoch": j} for w, s, j in m.members],
    }


def _decode_membership(data: Any, where: str) -> MembershipState | None:
    """The membership of a manifest (absent: None), strictly typed: epoch and joined_epoch integers in
    [0, 2**63), sessions in [0, 2**64), worker ids non-empty strings."""
    if data is None:
        return None
    here = f"{where}: membership"
    if not (isinstance(data, dict) and set(data) == {"epoch", "seen", "members"}):
        raise StateError(f'{here}: expected {{"epoch", "seen", "members"}}, got {show(data)}')
    epoch, seen, members = data["epoch"], data["seen"], data["members"]
    if not (is_int(epoch) and 0 <= epoch < 2**63):
        raise StateError(f"{here}.epoch: expected an integer in [0, 2**63), got {show(epoch)}")
    if not (isinstance(seen, list) and all(isinstance(w, str) and w and _utf8(w) for w in seen)):
        raise StateError(f"{here}.seen: expected a list of worker ids, got {show(seen)}")
    if not isinstance(members, list):
        raise StateError(f"{here}.members: expected a list, got {show(members)}")
    out = []
    for i, m in enumerate(members):
        ok = (
            isinstance(m, dict)
            and set(m) == {"worker_id", "session", "joined_epoch"}
            and isinstance(m["worker_id"], str)
            and bool(m["worker_id"])
            and _utf8(m["worker_id"])
            and is_int(m["session"])
            and 0 <= m["session"] < 2**64
            and is_int(m["joined_epoch"])
            and 0 <= m["joined_epoch"] <= epoch
        )
        if not ok:
            raise StateError(
                f'{here}.members[{i}]: expected {{"worker_id": id, "session": integer, "joined_epoch": integer <= '
                f"epoch}}, got {show(m)}"
            )
        out.append((m["worker_id"], m["session"], m["joined_epoch"]))
    return MembershipState(epoch, tuple(seen), tuple(out))


def _decode_workers(data: Any, where: str, step: int) -> dict[str, WorkerRecord]:
    if not isinstance(data, dict):
        raise StateError(f"{where}: workers: expected an object, got {show(data)}")
    workers = {}
    for worker_id, record in data.items():
        # any id a push can carry (a protobuf string: valid UTF-8, so no lone surrogates; GetModel
        # sends it back the same way)
        if not worker_id or not _utf8(worker_id):
            raise StateError(f"{where}: workers: invalid worker id {show(worker_id)}")
        workers[worker_id] = decode_worker(record, f"{where}: workers[{worker_id!r}]", step)
    return workers


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Manifest -> host state


_REQUIRED_KEYS = ("model", "step", "schema", "spec", "settings", "hyperparams", "workers", "opt_keys", "ema_keys")


def from_manifest(
    manifest: Any, groups: Mapping[str, Mapping[str, np.ndarray]], where: str, model: str | None = None
) -> HostState:
    """A HostState from a manifest and its tensor groups, validated as strictly as CreateModel
    validates a client's request (the same schema, settings and spec-depth checks, typed worker
    records); StateError names `where`, the model (`model`, else the manifest's name) and the field.
    Tensors are checked against the model later (`model_state.prepare`); the spec is compiled by
    `model_state.admit_state`. Unknown keys are ignored (a checkpoint's manifest adds "files" and
    "created_unix")."""
    if not isinstance(manifest, dict):
        raise StateError(f"{where}: the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise StateError(f"{where}: not an optserve state (format {show(manifest.get('format'))})")
    if manifest.get("format_version") != FORMAT_VERSION or not is_int(manifest.get("format_version")):
        raise StateError(f"{where}: unsupported format_version {show(manifest.get('format_version'))}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise StateError(f"{where}: the manifest lacks {missing[0]!r}")
    name = manifest["model"]
    if not isinstance(name, str):
        raise StateError(f"{where}: model: expected a string, got {show(name)}")
    step = manifest["step"]
    if not (is_int(step) and 0 <= step <= MAX_STEP):
        raise StateError(f"{where}: step {show(step)} is not an integer in [0, 2**53 - 1]")
    label = name if model is None else model
    try:
        schema = schema_from_json(label, manifest["schema"])
        settings = ModelSettings.from_json(manifest["settings"], label)
        check_spec_depth(manifest["spec"])
    except InvalidArgument as e:
        raise StateError(f"{where}: {e.message}") from None
    except SpecError as e:
        raise StateError(f"{where}: model {label!r}: optimizer {e}") from None
    hyperparams = manifest["hyperparams"]
    if not (
        isinstance(hyperparams, dict)
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in hyperparams.values()
        )
    ):
        raise StateError(f"{where}: hyperparams: expected an object of finite numbers, got {show(hyperparams)}")
    workers = _decode_workers(manifest["workers"], where, step)
    opt = groups.get("opt", {})
    order = manifest["opt_keys"]
    if not (isinstance(order, list) and all(isinstance(k, str) for k in order) and len(set(order)) == len(order)):
        raise StateError(f"{where}: opt_keys: expected a list of distinct strings, got {show(order)}")
    if set(order) != set(opt):
        raise StateError(f"{where}: opt_keys do not match the optimizer-state tensors")
    ema_keys = manifest["ema_keys"]
    ema = None
    if ema_keys is not None:
        if not (
            isinstance(ema_keys, list)
            and all(isinstance(k, str) for k in ema_keys)
            and len(set(ema_keys)) == len(ema_keys)
        ):
            raise StateError(f"{where}: ema_keys: expected null or a list of distinct strings, got {show(ema_keys)}")
        found = groups.get("ema", {})
        if set(ema_keys) != set(found):
            raise StateError(f"{where}: ema_keys do not match the EMA tensors")
        ema = {k: found[k] for k in ema_keys}
    elif groups.get("ema"):
        raise StateError(f"{where}: EMA tensors but no ema_keys")
    return HostState(
        name=name,
        step=step,
        schema=schema,
        spec=manifest["spec"],
        settings=settings,
        params=dict(groups.get("params", {})),
        opt={k: opt[k] for k in order},
        ema=ema,
        hyperparams={k: float(v) for k, v in hyperparams.items()},
        workers=workers,
        shard=_decode_shard(manifest.get("shard"), where),
        membership=_decode_membership(manifest.get("membership"), where),
    )


def _decode_shard(data: Any, where: str) -> Shard | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not is_int(data.get("index")):
        raise StateError(f"{where}: shard: expected an object with an integer index, got {show(data)}")
    try:
        shard_map = ShardMap.from_json(data.get("map"), f"{where}: shard.map")
    except WireError as e:
        raise StateError(str(e)) from None
    if not 0 <= data["index"] < shard_map.shards:
        raise StateError(f"{where}: shard.index {data['index']} is not one of the map's {shard_map.shards} shards")
    return Shard(shard_map, data["index"])
