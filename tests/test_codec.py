"""The wire format on its own: framing equals protobuf's, slices cover leaves exactly, bad streams
fail, the assembler's extension points are called as documented, and the package stays numpy only."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from optserve.v1 import optserve_pb2 as pb
from optserve.wire.assembler import ALIGN_MIN_BYTES, ALIGNMENT, Leaf, TensorAssembler, buffer_of
from optserve.wire.chunks import Cast, chunk_messages
from optserve.wire.dtypes import DTYPES, LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.framing import read_varint, split_payload, varint

LEAVES = [
    ("a", np.arange(10, dtype=np.float32)),
    ("b/c", np.ones((3, 2), ml_dtypes.bfloat16)),
    ("empty", np.zeros((0, 4), np.float16)),
    ("i", np.arange(5, dtype=np.int64)),
    ("big", np.arange(3 * ALIGN_MIN_BYTES // 4, dtype=np.float32)),
]


def _assemble(messages, assembler: TensorAssembler | None = None):
    asm = assembler or TensorAssembler(None, what="m")
    for raw in messages:
        head, payload = split_payload(raw)
        asm.add(pb.PushRequest.FromString(head).slices, payload)
    return asm.finish()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_chunking_round_trips_any_chunk_size(chunk):
    msgs = list(chunk_messages(pb.PushRequest(header=pb.PushHeader(model="m")), LEAVES, chunk))
    for raw in msgs:  # the hand-made payload field is what protobuf itself produces
        _, payload = split_payload(raw)
        full = pb.PushRequest.FromString(raw)
        assert full.payload == bytes(payload)
        assert sum(s.length for s in full.slices) == len(payload)
        assert len(raw) - len(payload) < 600  # the header stays small
    out = _assemble(msgs)
    assert list(out) == [p for p, _ in LEAVES]
    for path, a in LEAVES:
        assert out[path].dtype == a.dtype and out[path].shape == a.shape
        np.testing.assert_array_equal(out[path], a)
        if a.nbytes >= ALIGN_MIN_BYTES:  # what jax.device_put can alias without a copy
            assert out[path].ctypes.data % ALIGNMENT == 0


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_cast_leaves_are_converted_chunk_by_chunk_on_element_boundaries(chunk, wire):
    target = DTYPES[wire]
    leaves = [(p, Cast(a, target) if a.dtype.kind == "f" and a.dtype != target else a) for p, a in LEAVES]
    msgs = list(chunk_messages(pb.PushRequest(header=pb.PushHeader(model="m")), leaves, chunk))
    for raw in msgs:
        head, _ = split_payload(raw)
        for s in pb.PushRequest.FromString(head).slices:
            if isinstance(dict(leaves)[s.path], Cast):  # never half an element: chunks convert on their own
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
        head, payload = split_payload(raw)
        assert bytes(payload) == b"abc" and pb.PushRequest.FromString(head) == msg
    head, payload = split_payload(header)
    assert len(payload) == 0 and head == header


@pytest.mark.parametrize("raw", [b"\x0a\xff", b"\x80", b"\x0b", pb.PushRequest(payload=b"ab").SerializeToString() * 2])
def test_malformed_framing(raw):
    with pytest.raises(WireError):
        split_payload(raw)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varints_round_trip_as_protobuf_writes_them(value):
    encoded = varint(value)
    assert pb.PullRequest(if_newer_than=value % 2**63).SerializeToString()[1:] == varint(value % 2**63)
    assert read_varint(b"\xff" + encoded + b"\x01", 1) == (value, 1 + len(encoded))


def _slice(path="x", dtype="float32", shape=(4,), offset=0, length=16):
    return pb.TensorSlice(path=path, dtype=dtype, shape=shape, offset=offset, length=length)


EXPECTED = {"x": LeafSpec("x", "float32", (4,))}


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
    asm = TensorAssembler(EXPECTED, what="model 'm'")
    with pytest.raises(WireError, match=error.replace("[", r"\[")) as e:
        asm.add(slices, memoryview(bytes(payload)))
    assert "model 'm'" in str(e.value)


def test_gaps_and_missing_leaves_fail_at_finish():
    asm = TensorAssembler(EXPECTED, what="model 'm'")
    asm.add([_slice(length=8)], memoryview(bytes(8)))
    with pytest.raises(WireError, match="received 8 of 16"):
        asm.finish()
    with pytest.raises(WireError, match="missing leaf 'x'"):
        TensorAssembler(EXPECTED, what="m").finish()


def test_huge_declared_shapes_are_refused_before_allocating():
    class Refusing(TensorAssembler):
        def allocate(self, path, dtype, shape, nbytes):
            raise AssertionError("allocated a buffer for a leaf over the limit")

    asm = Refusing(None, what="m", max_bytes=1 << 20)
    with pytest.raises(WireError, match="over the limit"):
        asm.add([_slice(shape=(1 << 40,), length=0)], memoryview(b""))


# -- extension points ---------------------------------------------------------------------------


class Recording(TensorAssembler):
    """Records every hook call; receives leaf "given" into an array of its own."""

    def __init__(self, expected=None, **kwargs):
        super().__init__(expected, what="model 'm'", **kwargs)
        self.given = np.full(6, -1.0, np.float32)
        self.calls: list[tuple] = []

    def allocate(self, path, dtype, shape, nbytes):
        self.calls.append(("allocate", path, dtype, shape, nbytes))
        mine = buffer_of(self.given, dtype, shape) if path == "given" else None
        return mine if mine is not None else super().allocate(path, dtype, shape, nbytes)

    def copy(self, leaf: Leaf, start, source):
        self.calls.append(("copy", leaf.path, start, len(source)))
        super().copy(leaf, start, source)

    def completed(self, leaf: Leaf):
        assert leaf.received == leaf.nbytes and leaf.done
        self.calls.append(("completed", leaf.path, leaf.array().copy()))


def test_hooks_allocate_once_copy_every_slice_and_complete_at_the_last_byte():
    given, other = np.arange(6, dtype=np.float32), np.arange(3, dtype=np.int16)
    leaves = [("given", given), ("other", other), ("none", np.zeros((2, 0), np.float32))]
    msgs = list(chunk_messages(pb.PushRequest(), leaves, 8))  # 8-byte chunks: slices split leaves
    asm = Recording()
    completed_after = {}
    for i, raw in enumerate(msgs):
        head, payload = split_payload(raw)
        asm.add(pb.PushRequest.FromString(head).slices, payload)
        for call in asm.calls:
            if call[0] == "completed":
                completed_after.setdefault(call[1], i)
    out = asm.finish()
    allocs = [c[1:] for c in asm.calls if c[0] == "allocate"]
    assert allocs == [
        ("given", np.dtype(np.float32), (6,), 24),
        ("other", np.dtype(np.int16), (3,), 6),
        ("none", np.dtype(np.float32), (2, 0), 0),
    ]
    copies = [c[1:] for c in asm.calls if c[0] == "copy"]
    assert [c for c in copies if c[0] == "given"] == [("given", 0, 8), ("given", 8, 8), ("given", 16, 8)]
    assert sum(n for p, _, n in copies if p == "other") == 6 and all(p != "none" for p, _, _ in copies)
    done = [c for c in asm.calls if c[0] == "completed"]
    assert [c[1] for c in done] == ["given", "other", "none"]  # once each, a zero-size leaf at finish
    np.testing.assert_array_equal(done[0][2], given)
    assert completed_after["given"] < len(msgs) - 1  # while later chunks were still to come
    # "given" was received straight into the array allocate() returned
    assert out["given"].ctypes.data == asm.given.ctypes.data
    np.testing.assert_array_equal(asm.given, given)
    np.testing.assert_array_equal(out["other"], other)


def test_a_hook_rejects_the_stream_with_a_wire_error_naming_it():
    class NoNegatives(TensorAssembler):
        def copy(self, leaf, start, source):
            super().copy(leaf, start, source)
            if (leaf.buffer[start : start + len(source)].view(np.int8) < 0).any():
                raise self.error(f"leaf {leaf.path!r}: negative byte")

    msgs = list(chunk_messages(pb.PushRequest(), [("x", np.array([1, -1], np.int8))], 1 << 20))
    with pytest.raises(WireError, match=r"^model 'm': leaf 'x': negative byte$"):
        _assemble(msgs, NoNegatives(None, what="model 'm'"))


def test_buffer_of_takes_only_a_contiguous_array_of_the_leaf_dtype_and_shape():
    a = np.zeros((4, 3), np.float32)
    buf = buffer_of(a, np.dtype(np.float32), (4, 3))
    assert buf is not None and buf.dtype == np.uint8 and buf.size == 48 and buf.ctypes.data == a.ctypes.data
    assert buffer_of(None, np.dtype(np.float32), (4, 3)) is None
    assert buffer_of(a, np.dtype(np.int32), (4, 3)) is None
    assert buffer_of(a, np.dtype(np.float32), (3, 4)) is None
    assert buffer_of(a[:, ::2], np.dtype(np.float32), (4, 2)) is None


def test_the_wire_package_imports_numpy_only():
    """The one package client and server share: no grpc, no protobuf, no generated modules, and
    neither the client nor the server package."""
    code = (
        "import sys\n"
        "import optserve.wire.assembler, optserve.wire.channel, optserve.wire.chunks, optserve.wire.dtypes, "
        "optserve.wire.errors, optserve.wire.framing\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'jax') "
        "or m.startswith(('optserve.v1', 'optserve.client', 'optserve.server'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
