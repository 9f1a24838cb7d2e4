"""The wire codec on its own: framing equals protobuf's, slices cover leaves exactly, bad streams fail."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from optserve.wire import codec
from optserve.client.messages import chunk_messages
from optserve.v1 import optserve_pb2 as pb

LEAVES = [
    ("a", np.arange(10, dtype=np.float32)),
    ("b/c", np.ones((3, 2), ml_dtypes.bfloat16)),
    ("empty", np.zeros((0, 4), np.float16)),
    ("i", np.arange(5, dtype=np.int64)),
    ("big", np.arange(3 * codec.ALIGN_MIN_BYTES // 4, dtype=np.float32)),
]


def _assemble(messages, **kwargs):
    asm = codec.TensorAssembler(None, what="m", **kwargs)
    for raw in messages:
        head, payload = codec.split_payload(raw)
        asm.add(pb.PushRequest.FromString(head).slices, payload)
    return asm.finish()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_chunking_round_trips_any_chunk_size(chunk):
    msgs = list(chunk_messages(pb.PushRequest(header=pb.PushHeader(model="m")), LEAVES, chunk))
    for raw in msgs:  # the hand-made payload field is what protobuf itself produces
        head, payload = codec.split_payload(raw)
        full = pb.PushRequest.FromString(raw)
        assert full.payload == bytes(payload)
        assert sum(s.length for s in full.slices) == len(payload)
        assert len(raw) - len(payload) < 600  # the header stays small
    out = _assemble(msgs, finite=True)
    assert list(out) == [p for p, _ in LEAVES]
    for path, a in LEAVES:
        assert out[path].dtype == a.dtype and out[path].shape == a.shape
        np.testing.assert_array_equal(out[path], a)
        if a.nbytes >= codec.ALIGN_MIN_BYTES:  # what jax.device_put can alias without a copy
            assert out[path].ctypes.data % codec.ALIGNMENT == 0


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_cast_leaves_are_converted_chunk_by_chunk_on_element_boundaries(chunk, wire):
    target = codec.DTYPES[wire]
    leaves = [(p, codec.Cast(a, target) if a.dtype.kind == "f" and a.dtype != target else a) for p, a in LEAVES]
    msgs = list(chunk_messages(pb.PushRequest(header=pb.PushHeader(model="m")), leaves, chunk))
    for raw in msgs:
        head, _ = codec.split_payload(raw)
        for s in pb.PushRequest.FromString(head).slices:
            if isinstance(dict(leaves)[s.path], codec.Cast):  # never half an element: chunks convert on their own
                assert s.offset % target.itemsize == 0 and s.length % target.itemsize == 0
    out = _assemble(msgs)
    for path, a in LEAVES:
        want = a.astype(target) if a.dtype.kind == "f" else a
        assert out[path].dtype == want.dtype and out[path].shape == a.shape
        np.testing.assert_array_equal(out[path], want)


def test_payload_anywhere_and_absent():
    msg = pb.PushRequest(slices=[pb.TensorSlice(path="x", dtype="uint8", shape=[3], offset=0, length=3)])
    header = msg.SerializeToString()
    payload_field = pb.PushRequest(payload=b"abc").SerializeToString()
    for raw in (header + payload_field, payload_field + header):
        head, payload = codec.split_payload(raw)
        assert bytes(payload) == b"abc" and pb.PushRequest.FromString(head) == msg
    head, payload = codec.split_payload(header)
    assert len(payload) == 0 and head == header


@pytest.mark.parametrize("raw", [b"\x0a\xff", b"\x80", b"\x0b", pb.PushRequest(payload=b"ab").SerializeToString() * 2])
def test_malformed_framing(raw):
    with pytest.raises(codec.WireError):
        codec.split_payload(raw)


def _slice(path="x", dtype="float32", shape=(4,), offset=0, length=16):
    return pb.TensorSlice(path=path, dtype=dtype, shape=shape, offset=offset, length=length)


EXPECTED = {"x": codec.LeafSpec("x", "float32", (4,))}


@pytest.mark.parametrize(
    "slices, payload, error",
    [
        ([_slice(length=8), _slice(offset=4, length=8)], 16, "overlaps"),
        ([_slice(offset=12, length=8)], 8, "outside"),
        ([_slice(length=16)], 8, "past the end"),
        ([_slice(length=8)], 12, "not described"),
        ([_slice(dtype="object")], 16, "unsupported dtype"),
        ([_slice(shape=(2, 2))], 16, "shape [2, 2]"),
        ([_slice(shape=(-4,))], 16, "negative"),
        ([_slice(path="y")], 16, "unexpected leaf 'y'"),
        ([_slice(dtype="int32")], 16, "dtype int32"),
    ],
)
def test_assembler_rejects(slices, payload, error):
    asm = codec.TensorAssembler(EXPECTED, what="model 'm'")
    with pytest.raises(codec.WireError, match=error.replace("[", r"\[")) as e:
        asm.add(slices, memoryview(bytes(payload)))
    assert "model 'm'" in str(e.value)


def test_gaps_and_missing_leaves_fail_at_finish():
    asm = codec.TensorAssembler(EXPECTED, what="model 'm'")
    asm.add([_slice(length=8)], memoryview(bytes(8)))
    with pytest.raises(codec.WireError, match="received 8 of 16"):
        asm.finish()
    with pytest.raises(codec.WireError, match="missing leaf 'x'"):
        codec.TensorAssembler(EXPECTED, what="m").finish()


def test_huge_declared_shapes_are_refused_before_allocating():
    asm = codec.TensorAssembler(None, what="m", max_bytes=1 << 20)
    with pytest.raises(codec.WireError, match="over the limit"):
        asm.add([_slice(shape=(1 << 40,), length=0)], memoryview(b""))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk", [3, 1 << 20])  # 3: slices split elements, checked at finish
def test_nonfinite_gradients_are_found_in_every_float_dtype(dtype, bad, chunk):
    g = np.ones(9, codec.DTYPES[dtype])
    g[7] = bad
    msgs = list(chunk_messages(pb.PushRequest(), [("g", g), ("ok", np.ones(2, np.float32))], chunk))
    with pytest.raises(codec.WireError, match="leaf 'g': gradient has NaN or Inf"):
        _assemble(msgs, finite=True)
    assert _assemble(msgs)["g"][7] != 0  # without the check the bytes pass through


@pytest.mark.parametrize("where", [0, codec.CHECK_BLOCK_BYTES // 4 - 1, codec.CHECK_BLOCK_BYTES // 4, -1])
def test_nonfinite_values_are_found_in_every_block_of_a_large_chunk(where):
    g = np.ones(3 * codec.CHECK_BLOCK_BYTES // 4 + 5, np.float32)  # several check blocks in one chunk
    msgs = list(chunk_messages(pb.PushRequest(), [("g", g)], 4 << 20))
    np.testing.assert_array_equal(_assemble(msgs, finite=True)["g"], g)
    g[where] = np.nan
    msgs = list(chunk_messages(pb.PushRequest(), [("g", g)], 4 << 20))
    assert len(msgs) == 1
    with pytest.raises(codec.WireError, match="leaf 'g': gradient has NaN or Inf"):
        _assemble(msgs, finite=True)
