"""Worker records (core/workers.py) <-> their JSON form in manifests and state files.

    {"last_seq": int, "last_base_step": int, "replies": [{"seq": int, "reply": REPLY}, ...], "session": int}
    REPLY = {"step": int, "applied": bool}

"session" (core/membership.py) is written only when not 0, and absent in files written before
sessions existed.

Read as well, from files written by earlier versions:
- REPLY = {"proto": "PushResponse", "b64": base64 of a serialized optserve.v1.PushResponse};
- {"last_seq", "last_base_step", "last_reply": REPLY or null} (before the window of replies).
The old replies are decoded here without the generated protobuf modules (this layer does not
speak gRPC): PushResponse is a handful of scalar fields, read by `_read_push_response` with the
wire's varint reader (optserve.wire.framing).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from optserve.server.core.step import MAX_STEP
from optserve.server.core.workers import REPLY_WINDOW, PushReply, WorkerRecord
from optserve.server.state.errors import StateError, is_int, show
from optserve.wire.framing import read_varint

_UINT64_MAX = 2**64 - 1  # PushHeader.seq and WorkerState.last_seq are uint64


def _encode_reply(reply: PushReply) -> dict:
    return {"step": reply.step, "applied": reply.applied}


def encode_worker(record: WorkerRecord) -> dict:
    """The JSON form of a WorkerRecord."""
    return {
        "last_seq": record.last_seq,
        "last_base_step": record.last_base_step,
        "replies": [{"seq": seq, "reply": _encode_reply(r)} for seq, r in record.replies.items()],
        **({"session": record.session} if record.session else {}),
    }


# -- the old form of a reply: a serialized PushResponse ---------------------------------------------
#
# optserve.v1.PushResponse: 1 model (string), 2 step (int64), 3 applied (bool), 4 duplicate (bool),
# 5 incarnation (string). Only step and applied are kept: the model's name and the server's
# incarnation are added by the API when it answers a retry, which also sets duplicate.

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_STRING_FIELDS = (1, 5)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, pos = read_varint(data, pos)  # WireError (a ValueError) when truncated or too long
    return value & _UINT64_MAX, pos  # a 10-byte varint's last byte may carry bits above 64: protobuf drops them


def _read_push_response(data: bytes) -> PushReply:
    """step and applied of a serialized PushResponse, read as protobuf reads them: the last value of
    a field wins, unknown fields are skipped; malformed bytes raise ValueError."""
    step, applied, pos = 0, False, 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire_type == _VARINT:
            value, pos = _varint(data, pos)
            if field == 2:
                step = value - (1 << 64) if value >> 63 else value  # int64: two's complement
            elif field == 3:
                applied = value != 0
        elif wire_type == _LEN:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            if field in _STRING_FIELDS:
                data[pos : pos + length].decode("utf-8")  # protobuf refuses a string that is not UTF-8
            pos += length
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
            if pos > len(data):
                raise ValueError("truncated fixed-width field")
        else:
            raise ValueError(f"wire type {wire_type} of field {field}")
    return PushReply(step, applied)


def _decode_reply(value: Any, where: str) -> PushReply:
    if isinstance(value, dict) and set(value) == {"step", "applied"}:
        step, applied = value["step"], value["applied"]
        if not is_int(step) or not isinstance(applied, bool):
            raise StateError(f'{where}: expected {{"step": integer, "applied": boolean}}, got {show(value)}')
        reply = PushReply(step, applied)
    elif (
        isinstance(value, dict)
        and set(value) == {"proto", "b64"}
        and value["proto"] == "PushResponse"
        and isinstance(value["b64"], str)
    ):
        try:
            reply = _read_push_response(base64.b64decode(value["b64"], validate=True))
        except (binascii.Error, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise StateError(f"{where}: not a serialized PushResponse ({type(e).__name__}: {e})") from None
    else:
        raise StateError(
            f'{where}: expected {{"step": integer, "applied": boolean}} (or, from older files, '
            f'{{"proto": "PushResponse", "b64": string}}), got {show(value)}'
        )
    if not 0 <= reply.step <= MAX_STEP:
        raise StateError(f"{where}: reply step {reply.step} is not in [0, {MAX_STEP}]")
    return reply


def decode_worker(data: Any, where: str, step: int) -> WorkerRecord:
    """A WorkerRecord from its JSON form (any, module docstring), strictly typed: last_seq an int in
    [0, 2**64), last_base_step an int in [-1, step], replies for distinct seqs in [1, last_seq] in
    increasing order (only the newest REPLY_WINDOW are kept)."""
    if not isinstance(data, dict):
        raise StateError(f"{where}: expected an object, got {show(data)}")
    old_form = "last_reply" in data
    keys = {"last_seq", "last_base_step", "last_reply" if old_form else "replies"}
    session = data.get("session", 0)
    if not (is_int(session) and 0 <= session <= _UINT64_MAX):
        raise StateError(f"{where}.session: expected an integer in [0, 2**64), got {show(session)}")
    if set(data) - {"session"} != keys:
        raise StateError(f"{where}: expected the keys {sorted(keys)}, got {sorted(map(str, data))}")
    last_seq, base = data["last_seq"], data["last_base_step"]
    if not (is_int(last_seq) and 0 <= last_seq <= _UINT64_MAX):
        raise StateError(f"{where}.last_seq: expected an integer in [0, 2**64), got {show(last_seq)}")
    if not (is_int(base) and -1 <= base <= step):
        raise StateError(f"{where}.last_base_step: expected an integer in [-1, {step}] (the step), got {show(base)}")
    record = WorkerRecord(last_seq, base, session=session)
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
            raise StateError(
                f"{here}.seq: expected an integer in [1, last_seq {last_seq}] above the previous one, got {show(seq)}"
            )
        record.replies[seq] = _decode_reply(entry["reply"], f"{here}.reply")
        previous = seq
    for seq in list(record.replies)[:-REPLY_WINDOW]:  # a file from a server with a larger window
        del record.replies[seq]
    return record
