"""The server's policy on received gradients (`core.receiving`), without a server: NaN and Inf
refused in every float dtype and every check block, leaves handed on only once checked, earlier
pushes' buffers reused, and complete leaves put on the device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from optserve.server.core.layout import plan_layout
from optserve.server.core.receiving import CHECK_BLOCK_BYTES, EARLY_DEVICE_PUT_BYTES, GradientAssembler, device_putter
from optserve.server.spec import compile_spec
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.assembler import TensorAssembler
from optserve.wire.chunks import chunk_messages
from optserve.wire.dtypes import DTYPES, LeafSpec, dtype_name
from optserve.wire.errors import WireError
from optserve.wire.framing import split_payload


def _schema(leaves) -> dict[str, LeafSpec]:
    return {p: LeafSpec(p, dtype_name(a.dtype), a.shape) for p, a in leaves}


def _feed(asm: TensorAssembler, leaves, chunk: int) -> dict[str, np.ndarray]:
    for raw in chunk_messages(pb.PushRequest(), leaves, chunk):
        head, payload = split_payload(raw)
        asm.add(pb.PushRequest.FromString(head).slices, payload)
    return asm.finish()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk", [3, 1 << 20])  # 3: slices split elements, checked once the leaf is complete
def test_nonfinite_gradients_are_found_in_every_float_dtype(dtype, bad, chunk):
    g = np.ones(9, DTYPES[dtype])
    g[7] = bad
    leaves = [("g", g), ("ok", np.ones(2, np.float32))]
    handed_on: list[str] = []
    asm = GradientAssembler(_schema(leaves), what="model 'm'", on_complete=lambda path, a: handed_on.append(path))
    with pytest.raises(WireError, match=r"^model 'm': leaf 'g': gradient has NaN or Inf$"):
        _feed(asm, leaves, chunk)
    assert "g" not in handed_on  # never used before it is checked
    # the wire assembler itself has no such policy: the bytes pass through
    assert _feed(TensorAssembler(_schema(leaves), what="m"), leaves, chunk)["g"][7] != 0


@pytest.mark.parametrize("where", [0, CHECK_BLOCK_BYTES // 4 - 1, CHECK_BLOCK_BYTES // 4, -1])
def test_nonfinite_values_are_found_in_every_block_of_a_large_chunk(where):
    g = np.ones(3 * CHECK_BLOCK_BYTES // 4 + 5, np.float32)  # several check blocks in one chunk
    leaves = [("g", g)]
    np.testing.assert_array_equal(_feed(GradientAssembler(_schema(leaves), what="m"), leaves, 4 << 20)["g"], g)
    g[where] = np.nan
    assert len(list(chunk_messages(pb.PushRequest(), leaves, 4 << 20))) == 1
    with pytest.raises(WireError, match="leaf 'g': gradient has NaN or Inf"):
        _feed(GradientAssembler(_schema(leaves), what="m"), leaves, 4 << 20)


def test_integer_leaves_are_not_checked_and_narrower_float_dtypes_are_accepted():
    leaves = [("i", np.array([-1, 2**31 - 1], np.int32)), ("w", np.ones(4, DTYPES["bfloat16"]))]
    schema = {"i": LeafSpec("i", "int32", (2,)), "w": LeafSpec("w", "float32", (4,))}  # float32 leaf, bf16 wire
    out = _feed(GradientAssembler(schema, what="m"), leaves, 1 << 20)
    assert out["w"].dtype == DTYPES["bfloat16"] and out["i"].tolist() == [-1, 2**31 - 1]


def test_earlier_buffers_are_reused_only_where_wire_dtype_and_shape_fit():
    leaves = [("w", np.arange(6, dtype=np.float32)), ("b", np.ones(3, DTYPES["bfloat16"]))]
    schema = {"w": LeafSpec("w", "float32", (6,)), "b": LeafSpec("b", "float32", (3,))}
    kept = {"w": np.zeros(6, np.float32), "b": np.zeros(3, np.float32)}  # "b" arrives as bfloat16: no fit
    out = _feed(GradientAssembler(schema, what="m", buffers=kept), leaves, 8)
    assert out["w"].ctypes.data == kept["w"].ctypes.data
    np.testing.assert_array_equal(kept["w"], leaves[0][1])
    assert out["b"].ctypes.data != kept["b"].ctypes.data and not kept["b"].any()


def test_device_putter_moves_large_chosen_leaves_and_leaves_small_ones_on_the_host():
    n = EARLY_DEVICE_PUT_BYTES // 4
    leaves = [("big", np.ones(n, np.float32)), ("small", np.ones(3, np.float32)), ("frozen", np.ones(n, np.float32))]
    on_device: dict = {}
    put = device_putter(on_device, jax.devices("cpu")[0], only=frozenset({"big", "small"}))
    _feed(GradientAssembler(_schema(leaves), what="m", on_complete=put), leaves, 1 << 20)
    assert set(on_device) == {"big", "small"}
    assert isinstance(on_device["big"], jax.Array) and isinstance(on_device["small"], np.ndarray)
    np.testing.assert_array_equal(np.asarray(on_device["big"]), leaves[0][1])


# -- packed layouts (core/layout.py): a pack arrives whole or leaf by leaf ------------------------


def _packed_layout():
    schema = [LeafSpec(f"p{i}", "float32", (i + 1,)) for i in range(6)] + [LeafSpec("n", "int32", (2,))]
    layout = plan_layout(schema, compile_spec({"sgd": {"learning_rate": 0.1}}, [f"p{i}" for i in range(6)]))
    expected = {**{x.path: x for x in schema}, **{p.name: p.spec for p in layout.packs}}
    grads = {f"p{i}": np.arange(i + 1, dtype=np.float32) + i for i in range(6)} | {"n": np.zeros(2, np.int32)}
    return layout, expected, grads


def _packed_result(layout, grads):
    return {p.name: p.gather(grads) for p in layout.packs} | {"n": grads["n"]}


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_a_pack_arrives_leaf_by_leaf_whole_or_mixed_in_wire_dtypes(chunk):
    layout, expected, grads = _packed_layout()
    first, second = layout.packs
    whole = [(first.name, first.gather(grads))]
    bf16 = [(k, grads[k].astype(DTYPES["bfloat16"])) for k in second.leaves[:1]]
    by_leaf = [(k, grads[k]) for k in second.leaves[1:]]
    for leaves in ([(k, v) for k, v in grads.items()], whole + bf16 + by_leaf + [("n", grads["n"])]):
        handed_on: dict[str, np.ndarray] = {}
        asm = GradientAssembler(expected, layout, what="m", on_complete=handed_on.__setitem__)
        out = _feed(asm, leaves, chunk)
        want = _packed_result(layout, grads)
        assert list(out) == list(want) and set(handed_on) == set(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(out[k], np.float32), np.asarray(want[k], np.float32))


def test_a_pack_and_its_leaves_are_not_both_accepted_and_a_missing_leaf_is_named():
    layout, expected, grads = _packed_layout()
    pack = layout.packs[0]
    both = [(pack.name, pack.gather(grads)), (pack.leaves[0], grads[pack.leaves[0]])]
    with pytest.raises(WireError, match="both sent"):
        _feed(GradientAssembler(expected, layout, what="m"), both, 1 << 20)
    partial = [(k, v) for k, v in grads.items() if k != pack.leaves[-1]]
    with pytest.raises(WireError, match=f"missing leaf '{pack.leaves[-1]}'"):
        _feed(GradientAssembler(expected, layout, what="m"), partial, 1 << 20)


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_nan_in_a_pack_sent_whole_names_the_leaf_that_holds_it(chunk):
    layout, expected, grads = _packed_layout()
    pack = layout.packs[-1]
    grads[pack.leaves[-1]] = grads[pack.leaves[-1]].copy()
    grads[pack.leaves[-1]][-1] = np.nan
    leaves = [(pack.name, pack.gather(grads))]
    with pytest.raises(WireError, match=f"leaf '{pack.leaves[-1]}': gradient has NaN or Inf"):
        _feed(GradientAssembler(expected, layout, what="m"), leaves, chunk)


@pytest.mark.parametrize("first", ["float16", "bfloat16"])
def test_a_pack_whose_leaves_come_in_mixed_wire_dtypes_keeps_each_value_as_its_own_dtype_has_it(first):
    """A narrow first leaf must not narrow the float32 leaves after it (no 1e5 overflowing float16,
    no 1.001 rounded to bfloat16): the pack switches to the parameters' dtype."""
    layout, expected, grads = _packed_layout()
    pack = layout.packs[0]
    sent = dict(grads)
    sent[pack.leaves[0]] = grads[pack.leaves[0]].astype(DTYPES[first])
    sent[pack.leaves[1]] = np.full_like(grads[pack.leaves[1]], 1e5 + 0.125)
    for chunk in (3, 1 << 20):
        out = _feed(GradientAssembler(expected, layout, what="m"), list(sent.items()), chunk)
        assert out[pack.name].dtype == np.float32
        want = np.concatenate([np.asarray(sent[k], np.float32).reshape(-1) for k in pack.leaves])
        np.testing.assert_array_equal(out[pack.name], want)
