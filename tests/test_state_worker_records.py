"""state/worker_records.py: worker records in today's JSON form, and replies in the protobuf form
that earlier versions wrote, read without the generated modules."""

from __future__ import annotations

import base64

import pytest
from google.protobuf.message import DecodeError

from optserve.server.core.workers import REPLY_WINDOW, PushReply, WorkerRecord
from optserve.server.state.errors import StateError
from optserve.server.state.worker_records import decode_worker, encode_worker
from optserve.v1 import optserve_pb2 as pb


def _b64(message) -> dict:
    return {"proto": "PushResponse", "b64": base64.b64encode(message.SerializeToString()).decode()}


def test_records_round_trip_through_their_json_form():
    record = WorkerRecord(5, 3, {4: PushReply(4, applied=True), 5: PushReply(6, applied=False)})
    data = encode_worker(record)
    assert data == {
        "last_seq": 5,
        "last_base_step": 3,
        "replies": [
            {"seq": 4, "reply": {"step": 4, "applied": True}},
            {"seq": 5, "reply": {"step": 6, "applied": False}},
        ],
    }
    assert decode_worker(data, "w", step=6) == record


@pytest.mark.parametrize(
    "message",
    [
        pb.PushResponse(model="m", step=7, applied=True, incarnation="abc"),
        pb.PushResponse(step=7),  # applied false: a sync contribution's reply
        pb.PushResponse(model="ünïcode", step=2**53 - 1, applied=True, duplicate=True),
        pb.PushResponse(),  # every field at its default: an empty message
    ],
)
def test_serialized_push_responses_from_earlier_versions_are_read_as_protobuf_reads_them(message):
    for data in (
        {"last_seq": 3, "last_base_step": 0, "replies": [{"seq": 3, "reply": _b64(message)}]},
        {"last_seq": 3, "last_base_step": 0, "last_reply": _b64(message)},
    ):
        record = decode_worker(data, "w", step=10)
        assert record.replies == {3: PushReply(message.step, message.applied)}


def test_unknown_fields_are_skipped_and_the_last_value_of_a_field_wins():
    raw = pb.PushResponse(step=1).SerializeToString() + bytes([0x30, 0x05])  # field 6 (varint), unknown
    raw += bytes([0x3D, 1, 2, 3, 4, 0x39, 1, 2, 3, 4, 5, 6, 7, 8])  # fields 7 (fixed32) and 7 (fixed64)
    raw += pb.PushResponse(step=4, applied=True).SerializeToString()
    assert pb.PushResponse.FromString(raw).step == 4  # what protobuf itself makes of it
    data = {
        "last_seq": 1,
        "last_base_step": 0,
        "last_reply": {"proto": "PushResponse", "b64": base64.b64encode(raw).decode()},
    }
    assert decode_worker(data, "w", step=4).replies == {1: PushReply(4, applied=True)}


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xff\xff",  # a truncated varint
        b"\x0a\x05ab",  # a string shorter than its length
        b"\x0a\x02\xff\xfe",  # a model name that is not UTF-8
        b"\x10" + b"\xff" * 11,  # a varint longer than 10 bytes
        b"\x03",  # wire type 3 (groups) of field 0
        b"\x15\x01",  # a truncated fixed32
    ],
)
def test_malformed_serialized_replies_are_refused_naming_push_response(raw):
    with pytest.raises(DecodeError):  # protobuf's own parser refuses each too
        pb.PushResponse.FromString(raw)
    data = {
        "last_seq": 1,
        "last_base_step": 0,
        "last_reply": {"proto": "PushResponse", "b64": base64.b64encode(raw).decode()},
    }
    with pytest.raises(StateError, match="not a serialized PushResponse"):
        decode_worker(data, "w", step=4)


def test_a_negative_step_is_refused_in_either_form():
    for reply in (_b64(pb.PushResponse(step=-3)), {"step": -3, "applied": True}):
        with pytest.raises(StateError, match="reply step -3"):
            decode_worker({"last_seq": 1, "last_base_step": 0, "replies": [{"seq": 1, "reply": reply}]}, "w", step=4)


def test_only_the_newest_window_of_replies_is_kept():
    n = REPLY_WINDOW + 3
    data = {
        "last_seq": n,
        "last_base_step": 0,
        "replies": [{"seq": s, "reply": {"step": s, "applied": True}} for s in range(1, n + 1)],
    }
    assert list(decode_worker(data, "w", step=n).replies) == list(range(4, n + 1))
