"""The manifest: the JSON description of a `HostState` (everything but its tensors), and reading
one back as strictly as CreateModel validates a client's request.

Checkpoint directories store the manifest as `manifest.json` (checkpoint/files.py); a downloaded
model keeps its fields as JSON strings in the safetensors `__metadata__` (state/state_file.py).
Worker records (model.WorkerRecord, with the replies a retried push gets back) are part of it.
"""
from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from optserve.server.core import datapath
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.model import MAX_STEP, REPLY_WINDOW, WorkerRecord
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import SpecError, check_spec_depth
from optserve.server.state.errors import StateError, is_int, show
from optserve.server.state.model_state import HostState
from optserve.v1 import optserve_pb2 as pb

FORMAT = "optserve-state"
FORMAT_VERSION = 1


def to_manifest(state: HostState) -> dict:
    """The JSON-able description of `state` (everything but the tensors)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": state.name,
        "step": state.step,
        "schema": [{"path": l.path, "dtype": l.dtype, "shape": list(l.shape)} for l in state.schema],
        "spec": state.spec,
        "settings": state.settings.to_json(),
        "hyperparams": state.hyperparams,
        "workers": {w: encode_worker(r) for w, r in state.workers.items()},
        "opt_keys": list(state.opt),
        "ema_keys": None if state.ema is None else list(state.ema),
    }


# ---------------------------------------------------------------------------------------------
# Worker records (model.WorkerRecord) <-> JSON
#
# {"last_seq": int, "last_base_step": int, "replies": [{"seq": int, "reply": REPLY}, ...]} with
# REPLY = {"proto": "PushResponse", "b64": base64 of the serialized message}; files written before
# the reply window hold {"last_seq", "last_base_step", "last_reply": REPLY or null} instead.

_UINT64_MAX = 2**64 - 1  # PushHeader.seq and WorkerState.last_seq are uint64


def _encode_reply(reply: Any) -> dict:
    return {"proto": type(reply).__name__, "b64": base64.b64encode(reply.SerializeToString()).decode()}


def encode_worker(record: Any) -> dict:
    """The JSON form of a WorkerRecord."""
    return {
        "last_seq": record.last_seq,
        "last_base_step": record.last_base_step,
        "replies": [{"seq": seq, "reply": _encode_reply(r)} for seq, r in record.replies.items()],
    }


def _decode_reply(value: Any, where: str) -> pb.PushResponse:
    if not (isinstance(value, dict) and set(value) == {"proto", "b64"} and value["proto"] == "PushResponse"
            and isinstance(value["b64"], str)):  # fmt: skip
        raise StateError(f'{where}: expected {{"proto": "PushResponse", "b64": string}}, got {show(value)}')
    try:
        reply = pb.PushResponse.FromString(base64.b64decode(value["b64"], validate=True))
    except Exception as e:  # noqa: BLE001 - binascii.Error, protobuf's DecodeError
        raise StateError(f"{where}: not a serialized PushResponse ({type(e).__name__}: {e})") from None
    if not 0 <= reply.step <= MAX_STEP:
        raise StateError(f"{where}: reply step {reply.step} is not in [0, {MAX_STEP}]")
    return reply


def decode_worker(data: Any, where: str, step: int) -> Any:
    """A WorkerRecord from its JSON form (either), strictly typed: last_seq an int in [0, 2**64),
    last_base_step an int in [-1, step], replies PushResponses for distinct seqs in
    [1, last_seq] in increasing order (only the newest REPLY_WINDOW are kept)."""
    if not isinstance(data, dict):
        raise StateError(f"{where}: expected an object, got {show(data)}")
    old_form = "last_reply" in data
    keys = {"last_seq", "last_base_step", "last_reply" if old_form else "replies"}
    if set(data) != keys:
        raise StateError(f"{where}: expected the keys {sorted(keys)}, got {sorted(map(str, data))}")
    last_seq, base = data["last_seq"], data["last_base_step"]
    if not (is_int(last_seq) and 0 <= last_seq <= _UINT64_MAX):
        raise StateError(f"{where}.last_seq: expected an integer in [0, 2**64), got {show(last_seq)}")
    if not (is_int(base) and -1 <= base <= step):
        raise StateError(f"{where}.last_base_step: expected an integer in [-1, {step}] (the step), got {show(base)}")
    record = WorkerRecord(last_seq, base)
    if old_form:
        if data["last_reply"] is not None:
            record.replies[last_seq] = _decode_reply(data["last_reply"], f"{where}.last_reply")
        return record
    replies = data["replies"]
    if not isinstance(replies, list):
        raise StateError(f"{where}.replies: expected a list, got {show(replies)}")
    previous = 0
    for i, entry in enumerate(replies):
        here = f"{where}.replies[{i}]"
        if not (isinstance(entry, dict) and set(entry) == {"seq", "reply"}):
            raise StateError(f'{here}: expected {{"seq": integer, "reply": ...}}, got {show(entry)}')
        seq = entry["seq"]
        if not (is_int(seq) and previous < seq <= last_seq):
            raise StateError(f"{here}.seq: expected an integer in [1, last_seq {last_seq}] above the previous one, "
                             f"got {show(seq)}")  # fmt: skip
        record.replies[seq] = _decode_reply(entry["reply"], f"{here}.reply")
        previous = seq
    for seq in list(record.replies)[:-REPLY_WINDOW]:  # a file from a server with a larger window
        del record.replies[seq]
    return record


def _decode_workers(data: Any, where: str, step: int) -> dict[str, Any]:
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


def from_manifest(manifest: Any, groups: Mapping[str, Mapping[str, np.ndarray]], where: str,
                  model: str | None = None) -> HostState:  # fmt: skip
    """A HostState from a manifest and its tensor groups, validated as strictly as CreateModel
    validates a client's request (the same schema, settings and spec-depth checks, typed worker
    records); StateError names `where`, the model (`model`, else the manifest's name) and the field.
    Tensors are checked against the model later (`model_state.prepare`); the spec is compiled by
    `model_state.create_model`. Unknown keys are ignored (a checkpoint's manifest adds "files" and
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
        schema = datapath.schema_from_json(label, manifest["schema"])
        settings = ModelSettings.from_json(manifest["settings"], label)
        check_spec_depth(manifest["spec"])
    except InvalidArgument as e:
        raise StateError(f"{where}: {e.message}") from None
    except SpecError as e:
        raise StateError(f"{where}: model {label!r}: optimizer {e}") from None
    hyperparams = manifest["hyperparams"]
    if not (isinstance(hyperparams, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in hyperparams.values())):  # fmt: skip
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
        if not (isinstance(ema_keys, list) and all(isinstance(k, str) for k in ema_keys)
                and len(set(ema_keys)) == len(ema_keys)):  # fmt: skip
            raise StateError(f"{where}: ema_keys: expected null or a list of distinct strings, got {show(ema_keys)}")
        found = groups.get("ema", {})
        if set(ema_keys) != set(found):
            raise StateError(f"{where}: ema_keys do not match the EMA tensors")
        ema = {k: found[k] for k in ema_keys}
    elif groups.get("ema"):
        raise StateError(f"{where}: EMA tensors but no ema_keys")
    return HostState(
        name=name, step=step, schema=schema, spec=manifest["spec"], settings=settings,
        params=dict(groups.get("params", {})), opt={k: opt[k] for k in order}, ema=ema,
        hyperparams={k: float(v) for k, v in hyperparams.items()}, workers=workers,
    )  # fmt: skip
