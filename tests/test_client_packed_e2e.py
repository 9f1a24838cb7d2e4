"""Packed tensors on the wire against a real server: a model of many small leaves pushed and pulled as
packs gives exactly what the same calls leaf by leaf give (`Client(packed=False)`), in every wire
dtype, through push, pull, push_pull, workers, EMA pulls and `out=`; and it costs fewer bytes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from optserve.client import optim, pytree
from optserve.client.errors import InvalidArgumentError
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages
from optserve.wire.framing import parse_message

LEAVES = 300


def params_of(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layers": {f"{i:03d}": {"w": rng.standard_normal(3).astype(np.float32)} for i in range(LEAVES)},
        "scale": np.ones((), np.float32),
        "count": np.arange(2, dtype=np.int32),  # never updated: in no pack
    }


def grads_of(seed: int) -> dict:
    g = params_of(seed + 100)
    g["count"] = np.zeros(2, np.int32)
    return g


def assert_same(a, b) -> None:
    la, lb = pytree.flatten(a)[0], pytree.flatten(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.fixture(scope="module")
def leafwise(server):
    with server.client(timeout=60.0, packed=False) as c:
        yield c


@pytest.fixture
def pair(client, leafwise, model_name):
    """The same model twice: one used through packs, one leaf by leaf."""
    spec = optim.adam(1e-2)
    packed = client.create_model(f"{model_name}-p", params_of(), optimizer=spec, ema=0.5)
    plain = leafwise.create_model(f"{model_name}-l", params_of(), optimizer=spec, ema=0.5)
    return packed, plain


def test_the_server_announces_packs_and_the_client_lists_them(pair):
    packed, plain = pair
    packing = packed.info()["packing"]
    assert packing and plain.info()["packing"] == packing
    in_packs = [p for pack in packing for p in pack["leaves"]]
    assert len(in_packs) == len(set(in_packs)) and "count" not in in_packs
    assert sum(p["elements"] for p in packing) == sum(
        np.size(a) for p, a in pytree.flatten(params_of())[0] if p in in_packs
    )
    assert packed._layout is not None and packed._layout.packs and plain.packed is False


@pytest.mark.parametrize("wire", [None, "bfloat16"])
def test_pushes_and_pulls_through_packs_give_exactly_the_leafwise_results(pair, wire):
    packed, plain = pair
    for seed in range(3):
        assert packed.push(grads_of(seed)) == plain.push(grads_of(seed))
    got, want = packed.pull(wire_dtype=wire), plain.pull(wire_dtype=wire)
    assert_same(got, want)
    assert not np.array_equal(got["layers"]["000"]["w"], params_of()["layers"]["000"]["w"])  # it trained
    # Each pack came as one buffer: its leaves are views of it.
    bases = {id(a.base) for p, a in pytree.flatten(got)[0] if p.startswith("layers/")}
    assert len(bases) <= len(packed.info()["packing"])
    assert_same(packed.pull(ema=True, wire_dtype=wire), plain.pull(ema=True, wire_dtype=wire))
    assert_same(packed.pull(min_step=3, timeout=30, wire_dtype=wire), want)
    if wire == "bfloat16":  # narrowed on the wire, widened once per pack
        w = got["layers"]["007"]["w"]
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, w.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bfloat16_pushes_through_packs_give_exactly_the_leafwise_results(pair):
    """A pack sent whole in bfloat16 and its leaves sent one by one in bfloat16 reach the update in
    the same dtype (XLA rounds a bfloat16-input program and a float32-input one differently)."""
    packed, plain = pair
    for seed in range(4):
        assert packed.push(grads_of(seed), wire_dtype="bfloat16") == plain.push(grads_of(seed), wire_dtype="bfloat16")
    assert_same(packed.pull(), plain.pull())
    assert_same(packed.pull(ema=True), plain.pull(ema=True))


def test_push_pull_workers_and_out_through_packs(pair):
    packed, plain = pair
    assert_same(packed.push_pull(grads_of(0)), plain.push_pull(grads_of(0)))
    wp, wl = packed.worker("w"), plain.worker("w")
    wp.pull(), wl.pull()
    assert_same(wp.push_pull(grads_of(1)), wl.push_pull(grads_of(1)))
    assert wp.push(grads_of(2)) == wl.push(grads_of(2))

    buffers = packed.pull()
    ids = {p: id(a) for p, a in pytree.flatten(buffers)[0]}
    base = buffers["layers"]["000"]["w"].base
    packed.push(grads_of(3)), plain.push(grads_of(3))
    got = packed.pull(out=buffers)
    assert got is buffers and {p: id(a) for p, a in pytree.flatten(got)[0]} == ids
    assert buffers["layers"]["000"]["w"].base is base  # received into the same pack buffer
    assert_same(got, plain.pull())
    after = packed.push_pull(grads_of(4), out=buffers)
    assert after is buffers
    assert_same(after, plain.push_pull(grads_of(4)))
    mine = pytree.unflatten(pytree.flatten(buffers)[1], [a.copy() for _, a in pytree.flatten(buffers)[0]])
    assert_same(packed.pull(out=mine), plain.pull())  # arrays of the caller's own: leaf by leaf


def test_a_handle_that_never_saw_the_tree_pulls_packs_into_nested_dicts(client, pair):
    packed, plain = pair
    handle = client.model(packed.name)
    got = handle.pull()
    assert_same(got, plain.pull())
    assert handle.pull(out=got) is got


def test_packs_cost_fewer_bytes_on_the_wire(client, pair):
    """The payload is the same either way (the server's counters count it); the slice list is not:
    one slice per pack instead of one per leaf."""
    packed, plain = pair
    grads = grads_of(0)

    def pushed(leaves) -> int:
        header = pb.PushHeader(model=packed.name)
        return sum(len(m) for m in chunk_messages(pb.PushRequest(header=header), leaves, client.chunk_bytes))

    def pulled(as_packs: bool) -> int:
        return sum(len(m) for m in client._pull(pb.PullRequest(model=packed.name, packed=as_packs), timeout=60))

    assert pushed(packed._grad_leaves(grads, None)) * 2 < pushed(plain._grad_leaves(grads, None))
    assert pulled(True) < pulled(False)


def test_a_model_created_again_with_another_layout_is_pushed_and_pulled_by_its_new_layout(client, model_name):
    first = {f"k{i:02d}": np.full(3, i, np.float32) for i in range(10)}
    old = client.create_model(model_name, first, optimizer=optim.sgd(1.0))
    old.pull()
    client.delete_model(model_name)
    # The same structure, half of it bfloat16 now: the packing differs (a pack holds one dtype).
    second = {k: (v.astype(ml_dtypes.bfloat16) if i % 2 else v) for i, (k, v) in enumerate(first.items())}
    client.create_model(model_name, second, optimizer=optim.sgd(1.0))
    assert old.push({k: np.ones(3, np.float32) for k in first}) == 1  # refused once by its packs, then resent
    got = old.pull()
    for i, (k, v) in enumerate(second.items()):
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k].astype(np.float32), np.full(3, i - 1, np.float32))


def test_a_refused_packed_push_is_not_sent_again_when_the_packing_did_not_change(pair):
    packed, _ = pair
    packed.pull()
    packed._reader.layouts._by_key.clear()  # built again when read again: another object, the same packs
    bad = grads_of(0)
    bad["layers"]["010"]["w"][1] = np.nan
    sent = []
    push_raw = packed.push_raw
    packed.push_raw = lambda header, leaves, timeout=None: sent.append(1) or push_raw(header, leaves, timeout)  # type: ignore[method-assign]
    with pytest.raises(InvalidArgumentError, match="layers/010/w"):
        packed.push(bad)
    assert len(sent) == 1 and packed.info()["step"] == 0


def test_a_packed_pull_that_names_the_layout_it_knows_gets_no_schema_back(client, pair):
    packed, plain = pair
    layout_id = packed._get_info().layout_id
    assert layout_id and layout_id == plain._get_info().layout_id  # one model layout, one id

    def first_header(request: pb.PullRequest) -> tuple[pb.PullHeader, int]:
        messages = list(client._pull(request, timeout=60))
        return parse_message(messages[0], pb.PullResponse)[0].header, sum(len(m) for m in messages)

    short, short_bytes = first_header(pb.PullRequest(model=packed.name, packed=True, layout_id=layout_id))
    full, full_bytes = first_header(pb.PullRequest(model=packed.name, packed=True, layout_id="not-" + layout_id))
    plain_header, _ = first_header(pb.PullRequest(model=packed.name, packed=False, layout_id=layout_id))
    assert short.layout_id == full.layout_id == plain_header.layout_id == layout_id
    assert not short.schema and not short.packing and full.schema and full.packing and short_bytes < full_bytes
    assert plain_header.schema and not plain_header.packing  # a plain pull always describes its leaves
    # the handle names what it knows, and reads the short reply with it
    request = packed._pull_request(min_step=None, timeout=None, ema=False, wire_dtype=None, if_newer_than=None)
    assert request.layout_id == layout_id
    assert_same(packed.pull(), plain.pull())


def test_packs_of_a_stale_layout_are_refused_and_the_handle_resends_by_the_new_one(client, model_name):
    """A model created again with another spec may have packs of the same names, dtypes and sizes
    holding other leaves: a push names the layout its packs come from (PushHeader.layout_id), so a
    stale handle's packs are refused before anything is applied, and the handle resends by the new
    layout."""
    params = {f"l{i}": np.zeros(4, np.float32) for i in range(8)}

    def spec(decayed):
        return {"adamw": {"learning_rate": 1.0, "weight_decay": 0.0, "mask": decayed}}

    old = client.create_model(model_name, params, spec(["l0", "l1", "l2", "l3"]))
    client.delete_model(model_name)
    new = client.create_model(model_name, params, spec(["l0", "l2", "l4", "l6"]))
    old_packs = [list(p.leaves) for p in old._layout.packs]  # what the stale handle still holds
    assert old_packs != [p["leaves"] for p in new.info()["packing"]]
    g = {k: np.zeros(4, np.float32) for k in params}
    g["l1"][:] = 1.0

    for layout_id in ("", "another layout"):  # a raw push of a pack: without the id, or with another
        leaves = [(name, np.zeros(8, np.float32)) for name in ("@pack0", "@pack1", "@pack2", "@pack3")]
        header = pb.PushHeader(model=model_name, layout_id=layout_id)
        with pytest.raises(InvalidArgumentError, match="layout"):
            old.push_raw(header, leaves)
    assert new.step == 0
    assert old.push(g) == 1  # refused by the server as of another layout, resent by the new one
    got = new.pull()
    assert got["l1"][0] < 0 and all(not got[k].any() for k in params if k != "l1")
