"""The client's side of packed layouts, without a server: the plan of a layout against a pytree,
gathering a gradient into packs, pull replies read as views of one buffer per pack, `out=` received
in place, and the fast flatten of a known structure (docs/design.md, "Packed layouts")."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from optserve.client import pytree
from optserve.client.layout import Layout, pack_views
from optserve.client.messages import info_to_dict
from optserve.client.model import Model
from optserve.client.transport import Connection
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.assembler import ALIGNMENT, TensorAssembler
from optserve.wire.chunks import Cast, chunk_messages
from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.framing import parse_message

BF16 = np.dtype(ml_dtypes.bfloat16)

# A model of small leaves: "a/*" and "c" packed, "n" (int) and "s" (a scalar left out) loose.
PARAMS = {
    "a": {f"{i:02d}": np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(5)},
    "b": np.linspace(0, 1, 7, dtype=np.float32),
    "c": np.zeros((), np.float32),
    "n": np.arange(3, dtype=np.int32),
    "s": np.float32(2.5) * np.ones(4, np.float32),
}
A_PATHS = [f"a/{i:02d}" for i in range(5)]


def schema_msgs(params=PARAMS):
    leaves, _ = pytree.flatten(params)
    return [pb.LeafSpec(path=p, dtype=a.dtype.name, shape=a.shape) for p, a in leaves]


def packing_msgs(groups):
    """groups: {name: [paths]} of float32 leaves of PARAMS."""
    leaves = dict(pytree.flatten(PARAMS)[0])
    return [
        pb.PackedTensor(name=n, dtype="float32", leaves=ps, elements=sum(leaves[p].size for p in ps))
        for n, ps in groups.items()
    ]


PACKING = {"pk0": [*A_PATHS, "b"], "pk1": ["c"]}


def info(groups=PACKING, name="m"):
    return pb.ModelInfo(name=name, schema=schema_msgs(), packing=packing_msgs(groups))


def make_model(groups=PACKING, structure=True, packed=True):
    conn = SimpleNamespace(chunk_bytes=1 << 20, packed=packed, max_receive_bytes=64 << 20, timeout=None)
    return Model(conn, "m", pytree.flatten(PARAMS)[1] if structure else None, info(groups))  # type: ignore[arg-type]


def reply(params, groups, *, step=3, wire=None, chunk=1 << 20):
    """The serialized messages of a packed pull reply of `params` (the server's side, by hand)."""
    leaves = dict(pytree.flatten(params)[0])
    header = pb.PullHeader(model="m", step=step, schema=schema_msgs(params), packing=packing_msgs(groups))
    packed = {p for ps in groups.values() for p in ps}
    wire_leaves = [(n, np.concatenate([leaves[p].reshape(-1) for p in ps])) for n, ps in groups.items()]
    wire_leaves += [(p, a) for p, a in leaves.items() if p not in packed]
    if wire is not None:
        wire_leaves = [(p, Cast(a, wire) if a.dtype.kind == "f" else a) for p, a in wire_leaves]
    return list(chunk_messages(pb.PullResponse(header=header), wire_leaves, chunk))


def received(messages, layout):
    """What a server would assemble from a push (wire path -> array)."""
    asm = TensorAssembler(layout.wire_schema, what="test", cast_floats=True)
    for raw in messages:
        msg, payload = parse_message(raw, pb.PushRequest)
        asm.add(msg.slices, payload)
    return asm.finish()


def updated(params, delta):
    return {k: (updated(v, delta) if isinstance(v, dict) else v + v.dtype.type(delta)) for k, v in params.items()}


# -- layouts and plans ----------------------------------------------------------------------------


def test_a_layout_lists_packs_loose_leaves_and_what_a_packed_stream_carries():
    layout = Layout.from_messages(schema_msgs(), packing_msgs(PACKING))
    assert [p.name for p in layout.packs] == ["pk0", "pk1"]
    assert layout.loose == ("n", "s")
    assert layout.wire_schema == {
        "n": LeafSpec("n", "int32", (3,)),
        "s": LeafSpec("s", "float32", (4,)),
        "pk0": LeafSpec("pk0", "float32", (37,)),
        "pk1": LeafSpec("pk1", "float32", (1,)),
    }
    # Consecutive leaves of one shape are viewed in one call; a scalar alone.
    assert [(r.count, r.shape) for r in layout.runs["pk0"]] == [(5, (2, 3)), (1, (7,))]
    assert [(r.count, r.shape) for r in layout.runs["pk1"]] == [(1, ())]


@pytest.mark.parametrize(
    "groups",
    [
        {"a": ["nope"]},  # not a leaf
        {"a": ["b"], "b2": ["b"]},  # in two packs
        {"a": ["n"]},  # another dtype
        {"b": ["c"]},  # a pack named like a leaf
    ],
)
def test_a_packing_that_does_not_fit_the_schema_is_refused_and_the_model_sends_leaves(groups):
    msgs = [pb.PackedTensor(name=n, dtype="float32", leaves=ps, elements=1) for n, ps in groups.items()]
    with pytest.raises(WireError):
        Layout.from_messages(schema_msgs(), msgs)
    conn = SimpleNamespace(chunk_bytes=1 << 20, packed=True)
    model = Model(conn, "m", None, pb.ModelInfo(name="m", schema=schema_msgs(), packing=msgs))  # type: ignore[arg-type]
    assert [p for p, _ in model._grad_leaves(PARAMS, None)] == [p for p, _ in pytree.flatten(PARAMS)[0]]


def test_a_plan_places_packs_by_slice_or_positions_and_refuses_another_set_of_leaves():
    layout = Layout.from_messages(schema_msgs(), packing_msgs({"p": ["b", *A_PATHS]}))  # not flatten order
    structure = pytree.flatten(PARAMS)[1]
    plan = layout.plan(structure)
    assert plan is not None and layout.plan(structure) is plan  # cached per structure
    (placed,) = plan.placed
    assert placed.positions == (5, 0, 1, 2, 3, 4)
    in_order = Layout.from_messages(schema_msgs(), packing_msgs(PACKING)).plan(structure)
    assert in_order is not None and in_order.placed[0].positions == slice(0, 6)
    assert layout.plan(pytree.flatten({**PARAMS, "x": np.zeros(1)})[1]) is None
    assert layout.plan(pytree.flatten({k: v for k, v in PARAMS.items() if k != "n"})[1]) is None


# -- pushes ---------------------------------------------------------------------------------------


def grads_like(params, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: grads_like(v, seed + 1) if isinstance(v, dict) else rng.standard_normal(v.shape).astype(v.dtype)
        for k, v in params.items()
    }


@pytest.mark.parametrize("wire", [None, "bfloat16", "float16"])
def test_a_push_sends_each_pack_as_one_tensor_and_loose_leaves_alone(wire):
    model = make_model()
    g = grads_like(PARAMS)
    leaves = model._grad_leaves(g, wire)
    assert [p for p, _ in leaves] == ["pk0", "pk1", "n", "s"]
    got = received(chunk_messages(pb.PushRequest(header=pb.PushHeader(model="m")), leaves, 64), model._layout)
    flat = dict(pytree.flatten(g)[0])
    want = np.concatenate([flat[p].reshape(-1) for p in PACKING["pk0"]])
    assert got["pk0"].dtype == (np.dtype(wire) if wire and wire != "bfloat16" else BF16 if wire else np.float32)
    np.testing.assert_array_equal(got["pk0"], want.astype(got["pk0"].dtype))
    np.testing.assert_array_equal(got["n"], g["n"])
    assert got["s"].dtype == got["pk0"].dtype  # loose float leaves are narrowed as before


def test_gathering_casts_float64_to_the_pack_dtype_and_keeps_a_uniform_narrower_dtype():
    model = make_model()
    g64 = {
        k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in PARAMS.items()
    }
    g64["a"] = {k: v.astype(np.float64) for k, v in PARAMS["a"].items()}
    assert dict(model._grad_leaves(g64, None))["pk0"].dtype == np.float32
    g16 = {**g64, "a": {k: v.astype(BF16) for k, v in PARAMS["a"].items()}, "b": PARAMS["b"].astype(BF16)}
    assert dict(model._grad_leaves(g16, None))["pk0"].dtype == BF16
    mixed = {**g16, "b": PARAMS["b"]}
    assert dict(model._grad_leaves(mixed, None))["pk0"].dtype == np.float32


def test_a_large_pack_is_gathered_into_an_aligned_buffer():
    big = {f"w{i}": np.full(20_000, i, np.float32) for i in range(4)}
    schema = [pb.LeafSpec(path=p, dtype="float32", shape=[20_000]) for p in big]
    msgs = [pb.PackedTensor(name="p", dtype="float32", leaves=list(big), elements=80_000)]
    model = Model(
        SimpleNamespace(chunk_bytes=1 << 20, packed=True),
        "m",
        None,
        pb.ModelInfo(name="m", schema=schema, packing=msgs),
    )  # type: ignore[arg-type]
    ((name, buf),) = model._grad_leaves(big, None)
    assert name == "p" and buf.__array_interface__["data"][0] % ALIGNMENT == 0
    np.testing.assert_array_equal(buf, np.repeat(np.arange(4, dtype=np.float32), 20_000))


@pytest.mark.parametrize(
    "bad",
    [
        {**PARAMS, "b": np.zeros(8, np.float32)},  # a wrong shape
        {**PARAMS, "b": np.zeros(7, np.int32)},  # not a float
    ],
)
def test_a_gradient_that_does_not_fit_its_packs_goes_leaf_by_leaf_for_the_server_to_name_the_leaf(bad):
    leaves = make_model()._grad_leaves(bad, None)
    assert [p for p, _ in leaves] == [p for p, _ in pytree.flatten(PARAMS)[0]]


def test_packed_false_and_models_without_packs_send_leaf_by_leaf():
    paths = [p for p, _ in pytree.flatten(PARAMS)[0]]
    assert [p for p, _ in make_model(packed=False)._grad_leaves(PARAMS, None)] == paths
    assert [p for p, _ in make_model(groups={})._grad_leaves(PARAMS, None)] == paths
    conn = Connection("127.0.0.1:1", packed=False)  # the option a user sets on the Client
    try:
        assert Model(conn, "m", None, info()).packed is False
    finally:
        conn.close()


# -- pulls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", [True, False])
def test_a_packed_reply_becomes_the_pytree_with_each_packs_leaves_views_of_one_buffer(structure):
    model = make_model(structure=structure)
    got = model.read_pull_stream(reply(PARAMS, PACKING, chunk=40), None)[1]
    assert model.last_step == 3
    for path, a in pytree.flatten(PARAMS)[0]:
        b = dict(pytree.flatten(got)[0])[path]
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    a_leaves = [got["a"][k] for k in sorted(got["a"])]
    assert all(np.shares_memory(a_leaves[0].base, x) for x in [*a_leaves, got["b"]])
    assert not np.shares_memory(got["b"], got["s"])


def test_a_narrowed_reply_is_widened_once_per_pack():
    got = make_model().read_pull_stream(reply(PARAMS, PACKING, wire=BF16), None)[1]
    assert got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], PARAMS["b"].astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(got["n"], PARAMS["n"])


def test_the_reply_header_decides_the_layout_and_becomes_the_models():
    model = make_model(groups={"old": A_PATHS})
    other = {"x": ["b", "c", "s"]}  # a model re-created with another layout
    got = model.read_pull_stream(reply(PARAMS, other), None)[1]
    for path, a in pytree.flatten(PARAMS)[0]:
        np.testing.assert_array_equal(dict(pytree.flatten(got)[0])[path], a)
    assert model._layout is not None and [p.name for p in model._layout.packs] == ["old"]  # not asked packed
    model._read(reply(PARAMS, other), None, packed=True)
    assert [p.name for p in model._layout.packs] == ["x"]
    assert model._grad_leaves(PARAMS, None)[0][0] == "x"


@pytest.mark.parametrize("structure", [True, False])  # False: a handle that returns nested dicts
def test_out_the_views_of_an_earlier_pull_is_received_in_place(structure):
    model = make_model(structure=structure)
    first = model.read_pull_stream(reply(PARAMS, PACKING), None)[1]
    ids = {p: id(a) for p, a in pytree.flatten(first)[0]}
    base = first["b"].base
    newer = updated(PARAMS, 1.0)
    got = model.read_pull_stream(reply(newer, PACKING, step=4), None, out=first)[1]
    assert got is first and {p: id(a) for p, a in pytree.flatten(got)[0]} == ids
    assert first["b"].base is base
    for path, a in pytree.flatten(newer)[0]:
        np.testing.assert_array_equal(dict(pytree.flatten(first)[0])[path], a)
    # In place means into the same buffer: the pack arrived there, not beside it and copied.
    calls = []
    original = np.copyto
    try:
        np.copyto = lambda *a, **k: (calls.append(a[0].shape), original(*a, **k))  # type: ignore[assignment]
        model.read_pull_stream(reply(updated(PARAMS, 2.0), PACKING, step=5), None, out=first)
    finally:
        np.copyto = original  # type: ignore[assignment]
    assert calls == []
    np.testing.assert_array_equal(first["a"]["03"], PARAMS["a"]["03"] + 2)
    # Narrowed on the wire: received apart, then one conversion into the pack's buffer.
    model.read_pull_stream(reply(updated(PARAMS, 3.0), PACKING, wire=BF16), None, out=first)
    np.testing.assert_array_equal(first["b"], (PARAMS["b"] + 3).astype(BF16).astype(np.float32))
    assert first["b"].base is base


def test_out_other_arrays_are_written_leaf_by_leaf():
    model = make_model()
    mine = {
        "a": {k: np.zeros((2, 3), np.float32) for k in PARAMS["a"]},
        "b": np.zeros(7, np.float32),
        "c": np.zeros((), np.float32),
        "n": np.zeros(3, np.int32),
        "s": np.zeros(4, np.float32),
    }
    before = {p: id(a) for p, a in pytree.flatten(mine)[0]}
    got = model.read_pull_stream(reply(PARAMS, PACKING), None, out=mine)[1]
    assert got is mine and {p: id(a) for p, a in pytree.flatten(mine)[0]} == before
    for path, a in pytree.flatten(PARAMS)[0]:
        np.testing.assert_array_equal(dict(pytree.flatten(mine)[0])[path], a)
    # Views of an earlier pull, but one swapped: not the pack's layout any more.
    first = model.read_pull_stream(reply(PARAMS, PACKING), None)[1]
    first["a"]["00"], first["a"]["01"] = first["a"]["01"], first["a"]["00"]
    model.read_pull_stream(reply(updated(PARAMS, 1.0), PACKING), None, out=first)
    np.testing.assert_array_equal(first["a"]["00"], PARAMS["a"]["00"] + 1)
    np.testing.assert_array_equal(first["a"]["01"], PARAMS["a"]["01"] + 1)


# -- pytree ---------------------------------------------------------------------------------------


Point = collections.namedtuple("Point", "x y")


class Frozen(dict):
    pass


def odd_tree():
    return {
        "p": Point(np.ones(2), [np.zeros(1), (np.ones(3),), None]),
        "q": 1.5,
        "f": Frozen(z=np.float32(2), y=np.arange(2)),
        3: (),
    }


@pytest.mark.parametrize("uses", [1, 3])  # walked, then compiled (`treecode`) from the second use on
def test_flatten_as_takes_a_tree_of_the_known_structure_and_nothing_else(uses):
    tree = odd_tree()
    leaves, structure = pytree.flatten(tree)
    for _ in range(uses):
        got = pytree.flatten_as(tree, structure)
        assert got is not None and len(got) == len(leaves)
        assert all(type(a) is np.ndarray and np.array_equal(a, b) for a, (_, b) in zip(got, leaves, strict=True))
        assert pytree.flatten_as(tree, structure, convert=False)[-1] == 1.5  # type: ignore[index]
    t = odd_tree
    other = [
        {**t(), "r": np.ones(1)},
        {"p": t()["p"], "q": 1.5, "f": t()["f"]},
        {**t(), "p": Point(np.ones(2), [np.zeros(1), (np.ones(3),)])},
        {**t(), "p": Point(np.ones(2), [np.zeros(1), [np.ones(3)], None])},  # a list for a tuple
        {**t(), "p": Point(np.ones(2), [np.zeros(1), (np.ones(3),), np.ones(1)])},  # a leaf for None
        {**t(), "p": {"x": 1, "y": 2}},
        {**t(), "q": {"z": 1.0}},  # a container for a leaf
        {**t(), "f": {"z": 1.0, "x": 1.0}},  # another key
    ]
    for _ in range(uses):
        for o in other:
            assert pytree.flatten_as(o, structure) is None
        grows = collections.defaultdict(lambda: np.zeros(1), {"p": 1, "q": 1, "f": 1, "r": 1.0})
        assert pytree.flatten_as(grows, structure) is None and set(grows) == {"p", "q", "f", "r"}


@pytest.mark.parametrize("uses", [1, 3])
def test_unflatten_keeps_the_callers_containers_key_order_and_leaf_objects(uses):
    tree = {"b": np.ones(1), "a": np.zeros(2), **odd_tree()}
    leaves, structure = pytree.flatten(tree)
    for _ in range(uses):
        back = pytree.unflatten(structure, [a for _, a in leaves])
        assert list(back) == list(tree) and back["a"] is dict(leaves)["a"]
        assert type(back["f"]) is Frozen and list(back["f"]) == ["z", "y"] and type(back["f"]["z"]) is np.float32
        assert type(back["p"]) is Point and back["p"].y[1][0].tolist() == [1, 1, 1] and back["p"].y[2] is None
        assert back["q"] == 1.5 and type(back["q"]) is float and back[3] == ()
    assert ("unflatten" in structure.compiled) == (uses > 1)


def test_info_lists_the_packing():
    d = info_to_dict(info())
    assert d["packing"] == [
        {"name": "pk0", "dtype": "float32", "leaves": [*A_PATHS, "b"], "elements": 37},
        {"name": "pk1", "dtype": "float32", "leaves": ["c"], "elements": 1},
    ]


def test_pack_views_do_not_copy():
    layout = Layout.from_messages(schema_msgs(), packing_msgs(PACKING))
    flat = np.arange(37, dtype=np.float32)
    views = pack_views(layout.runs["pk0"], flat)
    assert [v.shape for v in views] == [(2, 3)] * 5 + [(7,)]
    assert all(v.base is flat for v in views)
    flat[30] = -1
    assert views[5][0] == -1


def test_structures_too_deep_to_compile_are_walked():
    deep: dict = {}
    node = deep
    for _ in range(300):  # deeper than Python's parser nests expressions
        node["x"] = {}
        node = node["x"]
    node["leaf"] = np.arange(2)
    leaves, structure = pytree.flatten(deep)
    for _ in range(3):
        got = pytree.flatten_as(deep, structure)
        assert got is not None and got[0] is leaves[0][1]
        back = pytree.unflatten(structure, [np.ones(2)])
        inner = back
        for _ in range(300):
            inner = inner["x"]
        assert inner["leaf"].tolist() == [1, 1]
    assert structure.compiled["unflatten"] is None
