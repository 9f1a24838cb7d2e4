"""Resharding (README.md, "Sharded models"): a sharded model downloaded into one file, uploaded over
any number of servers, and moved between checkpoint directories offline by `optserve reshard`.
Real servers on 127.0.0.1: five that hold shards and one that holds the same model whole (the
twin), fed the same pushes; the files of both are compared tensor by tensor, bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors

from optserve.client import Client
from optserve.client.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from optserve.client.model import Model
from optserve.client.sharded import ShardedModel
from optserve.server import Server, cli
from optserve.wire import resharding
from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import place
from tests.conftest import assert_same_tree, in_process_servers

ADAM = {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}
SPLIT = 1024  # bytes: "embed" and "out" are split over the shards, so every shard holds several leaves


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(size=(100, 8)).astype(np.float32),
        "block": {"w": rng.normal(size=(8, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
        "out": rng.normal(size=(37, 9)).astype(np.float32),
        "norm": rng.normal(size=(8,)).astype(ml_dtypes.bfloat16),
        # a scalar leaf whose name ends Adam's count (inner_state/0/count): the state of neither moves
        # with the other
        "count": np.array(1.5, np.float32),
    }


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def like(a):
        return rng.normal(size=np.shape(a)).astype(np.asarray(a).dtype)

    return {k: {kk: like(vv) for kk, vv in v.items()} if isinstance(v, dict) else like(v) for k, v in _params().items()}


def _load(path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(v) for k, v in f.metadata().items()}  # noqa: SIM118


def _assert_same_file(a, b, *, ignore=("model",)) -> None:
    """Two state files hold the same tensors bit for bit and the same manifest (but `ignore`)."""
    (ta, ma), (tb, mb) = _load(a), _load(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), f"tensor {k} differs"
    assert {k: v for k, v in ma.items() if k not in ignore} == {k: v for k, v in mb.items() if k not in ignore}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(client: Client) -> set[str]:
    return {m["name"] for m in client.list_models()}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("reshard")
    return [str(root / f"s{i}") for i in range(6)]


@pytest.fixture(scope="module")
def servers(roots):
    """Five shard servers and one for the whole model, each with its checkpoint directory."""
    with in_process_servers(roots) as srvs:
        yield srvs


@pytest.fixture(scope="module")
def targets(servers):
    return [s.address for s in servers[:5]]


@pytest.fixture(scope="module")
def whole_client(servers):
    with servers[5].client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def trained(servers, targets, whole_client, tmp_path_factory):
    """Model "src" over the first three servers and its twin, trained alike by worker "w0" (EMA, a
    hyperparameter changed, a checkpoint of the sharded model); both downloaded."""
    files = tmp_path_factory.mktemp("files")
    with Client(targets[:3], timeout=60) as c:
        sm = c.create_model("src", _params(), ADAM, split_bytes=SPLIT, ema=0.9)
        wm = whole_client.create_model("src", _params(), ADAM, ema=0.9)
        for model in (sm, wm):
            worker = model.worker("w0", session=1)  # files hold the worker's session: the twin's is the same
            worker.push(_grads(1))
            model.set_hyperparams(learning_rate=0.05)
            worker.push(_grads(2))
            worker.push_pull(_grads(3))
        assert sm.save() == 3
        sm.download(files / "sharded.safetensors")
        wm.download(files / "whole.safetensors")
        yield {"sharded": files / "sharded.safetensors", "whole": files / "whole.safetensors", "model": sm}


# -- download and upload --------------------------------------------------------------------------


def test_download_gathers_every_shard_into_the_whole_models_file(trained):
    assert isinstance(trained["model"], ShardedModel)
    _assert_same_file(trained["sharded"], trained["whole"], ignore=())  # manifest too: same name
    tensors, manifest = _load(trained["sharded"])
    assert "shard" not in manifest and manifest["step"] == 3
    assert manifest["workers"]["w0"]["last_seq"] == 3
    assert tensors["params/embed"].shape == (100, 8) and tensors["opt/inner_state/0/mu/embed"].shape == (100, 8)
    assert tensors["ema/ema/out"].shape == (37, 9) and tensors["params/norm"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("shards", [2, 5, 1])
def test_upload_places_the_file_over_any_number_of_servers(shards, trained, targets, whole_client, tmp_path):
    name = f"up{shards}"
    with Client(targets, timeout=60) as c:
        model = c.upload(trained["sharded"], name=name, shards=shards, split_bytes=SPLIT)
        if shards == 1:
            assert isinstance(model, Model) and model.info()["shard"] is None
        else:
            assert isinstance(model, ShardedModel) and model.shard_map.shards == shards
            assert any(leaf.split for leaf in model.shard_map.leaves)
            with Client(targets[shards - 1], timeout=60) as one:  # every shard keeps the map: discovery works
                found = one.model(name)
                assert isinstance(found, ShardedModel) and found.shard_map == model.shard_map
        model.download(tmp_path / "back.safetensors")
        _assert_same_file(tmp_path / "back.safetensors", trained["whole"])
        # and it trains on as the whole model does (a fresh copy of the twin, fed the same)
        twin = whole_client.upload(trained["whole"], name=f"twin{shards}")
        for seed in (4, 5):
            assert_same_tree(model.push_pull(_grads(seed)), twin.push_pull(_grads(seed)))
        assert_same_tree(model.pull(ema=True), twin.pull(ema=True))
        assert model.info()["workers"]["w0"]["last_seq"] == 3


def test_a_file_of_one_shard_is_not_uploaded_as_a_whole_model(trained, targets, tmp_path):
    shard_file = tmp_path / "shard1.safetensors"
    trained["model"].shards[1].download(shard_file)
    for shards in (1, 2):
        with Client(targets[3:5], timeout=60) as c, pytest.raises(InvalidArgumentError, match=r"shard 1 of 3"):
            c.upload(shard_file, name="one-shard", shards=shards)
        for t in targets[3:5]:
            with Client(t) as c:
                assert "one-shard" not in _names(c)


def test_a_failed_shard_deletes_the_shards_this_upload_created(trained, targets):
    with Client(targets[1]) as c:
        c.create_model("clash", {"x": np.zeros(3, np.float32)}, ADAM)  # shard 1's server has the name
    with Client(targets[:3], timeout=60) as c, pytest.raises(AlreadyExistsError, match=r"^.*shard 1 \("):
        c.upload(trained["sharded"], name="clash", shards=3, split_bytes=SPLIT)
    for i, t in enumerate(targets[:3]):
        with Client(t) as c:
            assert ("clash" in _names(c)) == (i == 1)
            if i == 1:
                assert c.model("clash").info()["shard"] is None  # the unrelated model is untouched


def test_a_file_that_does_not_fit_its_manifest_creates_nothing(trained, targets, tmp_path):
    tensors, manifest = _load(trained["whole"])
    del tensors["opt/inner_state/0/nu/out"]
    bad = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(tensors, str(bad), metadata={k: json.dumps(v) for k, v in manifest.items()})
    with Client(targets[:3], timeout=60) as c:
        with pytest.raises(InvalidArgumentError, match=r"opt_keys and the opt tensors disagree.*nu/out"):
            c.upload(bad, name="bad", shards=3)
        assert "bad" not in _names(c)


def test_a_download_of_shards_at_different_steps_is_refused(targets, tmp_path):
    with Client(targets[:3], timeout=60) as c:
        sm = c.create_model("skew", _params(), ADAM, split_bytes=SPLIT)
        parts = sm._split(sm._leaves(_grads(1), "gradient"))
        sm.shards[0].push(parts[0])  # shard 0 only: the others stay at step 0
        with pytest.raises(FailedPreconditionError, match=r"step is 1 on shard 0 .* but 0 on shard 1 .*one step"):
            sm.download(tmp_path / "skew.safetensors")
    assert os.listdir(tmp_path) == []  # neither the file nor what the shards' downloads left


# -- optserve reshard (offline) -------------------------------------------------------------------


def _reshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "reshard", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _start(roots) -> tuple[list[Server], list[str]]:
    """Servers on `roots` at ports chosen beforehand (the new shard map names them)."""
    ports = [_free_port() for _ in roots]
    srvs = [Server(port=p, checkpoint_dir=str(r)) for p, r in zip(ports, roots, strict=True)]
    return srvs, [s.address for s in srvs]


def test_offline_reshard_3_to_2_to_5_restores_bit_identical_shards(whole_client, tmp_path):
    a = [tmp_path / f"a{i}" for i in range(3)]
    srvs = [Server(port=0, checkpoint_dir=str(r)) for r in a]
    with Client([s.address for s in srvs], timeout=60) as c:
        sm = c.create_model("cli", _params(), ADAM, split_bytes=SPLIT, ema=0.9)
        twin = whole_client.create_model("cli", _params(), ADAM, ema=0.9)
        for model in (sm, twin):
            model.worker("w0", session=1).push(_grads(1))  # the files hold the session: the same for both
            model.push(_grads(2))
        sm.save()
    for s in srvs:
        s.stop(grace=1.0)
    twin.download(tmp_path / "twin2.safetensors")

    # 3 -> 2, in place on a0 (its old shard goes to .archive) and onto a new root
    b = [a[0], tmp_path / "b1"]
    ports = [_free_port() for _ in b]
    done = _reshard(
        "--model", "cli", "--from", *map(str, a), "--to", *map(str, b),
        "--targets", ",".join(f"127.0.0.1:{p}" for p in ports), "--split-bytes", str(SPLIT),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "shard 1 (127.0.0.1:" in done.stdout and "resharded" in done.stdout
    assert [n for n in os.listdir(a[0] / ".archive") if n.startswith("cli-")]
    srvs = [Server(port=p, checkpoint_dir=str(r)) for p, r in zip(ports, b, strict=True)]
    try:
        with Client(srvs[1].address, timeout=60) as c:
            sm = c.model("cli")
            assert isinstance(sm, ShardedModel) and sm.shard_map.shards == 2 and sm.shard_map.version == 2
            sm.download(tmp_path / "after2.safetensors")
            _assert_same_file(tmp_path / "after2.safetensors", tmp_path / "twin2.safetensors")
            assert_same_tree(sm.push_pull(_grads(3)), twin.push_pull(_grads(3)))
            assert sm.save() == 3
    finally:
        for s in srvs:
            s.stop(grace=1.0)
    twin.download(tmp_path / "twin3.safetensors")

    # 2 -> 5: both old roots in place, three new ones
    c5 = [*b, *(tmp_path / f"c{i}" for i in range(2, 5))]
    ports = [_free_port() for _ in c5]
    done = _reshard(
        "--model", "cli", "--from", *map(str, b), "--to", *map(str, c5),
        "--targets", ",".join(f"127.0.0.1:{p}" for p in ports), "--split-bytes", str(SPLIT),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    srvs = [Server(port=p, checkpoint_dir=str(r)) for p, r in zip(ports, c5, strict=True)]
    try:
        with Client(srvs[0].address, timeout=60) as c:
            sm = c.model("cli")
            assert isinstance(sm, ShardedModel) and sm.shard_map.shards == 5 and sm.shard_map.version == 3
            sm.download(tmp_path / "after5.safetensors")
            _assert_same_file(tmp_path / "after5.safetensors", tmp_path / "twin3.safetensors")
            assert_same_tree(sm.push_pull(_grads(4)), twin.push_pull(_grads(4)))
    finally:
        for s in srvs:
            s.stop(grace=1.0)


def test_offline_reshard_to_one_root_and_back(trained, roots, tmp_path, capsys):
    """The 3 shards of "src" (read while their servers run: committed checkpoints never change) into
    one unsharded root, then that into 2 shards and back into one: the state stays the same."""
    sources = roots[:3]
    assert cli.main(["reshard", "--model", "src", "--from", *sources, "--to", str(tmp_path / "w")]) == 0
    assert "whole model" in capsys.readouterr().out
    two = [str(tmp_path / "x0"), str(tmp_path / "x1")]
    assert cli.main(["reshard", "--model", "src", "--from", str(tmp_path / "w"), "--to", *two,
                     "--targets", "h0:1,h1:1", "--split-bytes", str(SPLIT)]) == 0  # fmt: skip
    assert cli.main(["reshard", "--model", "src", "--from", *two, "--to", str(tmp_path / "y")]) == 0
    srv = Server(port=0, checkpoint_dir=str(tmp_path / "y"))
    try:
        with srv.client(timeout=60) as c:
            model = c.model("src")
            assert isinstance(model, Model) and model.info()["shard"] is None
            model.download(tmp_path / "y.safetensors")
    finally:
        srv.stop(grace=1.0)
    _assert_same_file(tmp_path / "y.safetensors", trained["whole"])


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_offline_reshard_refuses_bad_sources_and_writes_nothing(trained, servers, roots, tmp_path, capsys):
    sources = roots[:3]
    out = tmp_path / "out"
    os.mkdir(out)

    def refused(*args: str, status: int = 1) -> str:
        try:
            got = cli.main(["reshard", "--model", "src", *args])
        except SystemExit as e:  # the parser's refusals
            got = e.code
        assert got == status
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert _tree(out) == [], _tree(out)
        return err

    assert "shard 2 of 3" in refused("--from", *sources[:2], "--to", str(out))
    # a shard of another placement of a model of the same name
    with Client([s.address for s in servers[3:5]], timeout=60) as c:
        c.upload(trained["whole"], name="src", shards=2).save()
    err = refused("--from", sources[0], sources[1], roots[3], "--to", str(out))
    assert "different placements" in err
    # a corrupt checkpoint
    corrupt = tmp_path / "corrupt"
    os.makedirs(corrupt / "src")
    step_dir = max(os.listdir(os.path.join(sources[2], "src")))
    subprocess.run(["cp", "-r", os.path.join(sources[2], "src", step_dir), str(corrupt / "src")], check=True)
    with open(corrupt / "src" / step_dir / "opt_state.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert "sha256 mismatch" in refused("--from", *sources[:2], str(corrupt), "--to", str(out))
    assert "step 99 is not committed" in refused("--from", *sources, "--to", str(out), "--step", "99")
    # flags that cannot work: one line naming the flag, status 2
    assert "--targets" in refused("--from", *sources, "--to", str(out), str(tmp_path / "o2"), status=2)
    assert "--targets: 1 addresses for 2" in refused(
        "--from", *sources, "--to", str(out), str(tmp_path / "o2"), "--targets", "h:1", status=2
    )
    assert "--model" in refused("--from", *sources, "--to", str(out), "--model", "../x", status=2)
    assert "--from" in refused("--from", sources[0], sources[0], "--to", str(out), status=2)


def test_a_subprocess_reports_a_missing_model_in_one_line(tmp_path):
    done = _reshard("--model", "nothing", "--from", str(tmp_path), "--to", str(tmp_path / "o"))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no committed checkpoint of model 'nothing'" in done.stderr and not os.path.exists(tmp_path / "o")


# -- the rules of gather and split, on states built here --------------------------------------------


def _state(schema: list[LeafSpec], opt: dict, shard_map=None) -> resharding.State:
    """A whole state (arrays 0, 1, 2, ... by leaf) and its split over `shard_map`."""
    tensors = {f"params/{s.path}": np.full(s.shape, i, np.float32) for i, s in enumerate(schema)}
    tensors.update((f"opt/{k}", a) for k, a in opt.items())
    manifest = {
        "format": "optserve-state", "format_version": 1, "model": "m", "step": 7,
        "schema": [{"path": s.path, "dtype": s.dtype, "shape": list(s.shape)} for s in schema],
        "spec": {}, "settings": {}, "hyperparams": {}, "workers": {"w": {"last_seq": 2}},
        "opt_keys": list(opt), "ema_keys": None,
    }  # fmt: skip
    return tensors, manifest


def test_state_follows_the_longest_leaf_of_its_shape_and_counts_are_replicated():
    schema = [LeafSpec("x", "float32", (4, 2)), LeafSpec("mu/x", "float32", (3,)), LeafSpec("count", "float32", ())]
    opt = {  # in the order a state over these leaves has (each group's leaves sorted)
        "count": np.array(5, np.int32),
        "0/count": np.array(5, np.int32),  # ends with "/count", a scalar: not the state of leaf "count"
        "0/mu/count": np.array(9.0, np.float32),
        "0/mu/mu/x": np.arange(3, dtype=np.float32),
        "0/mu/x": np.arange(8, dtype=np.float32).reshape(4, 2),  # "x"'s: "mu/x" has another shape
    }
    whole = _state(schema, opt)
    shard_map = place(schema, ["a:1", "b:1"], model_id="p", split_bytes=8)
    assert shard_map.leaves[0].split
    parts = resharding.split(whole, shard_map)
    holder = shard_map.holder("count")[0]
    for i, (tensors, manifest) in enumerate(parts):
        assert "opt/count" in tensors and "opt/0/count" in tensors  # replicated
        assert ("opt/0/mu/count" in tensors) == (i == holder)
        assert tensors["opt/0/mu/x"].shape == (2, 2)  # rows of "x"
        assert manifest["shard"]["index"] == i
    back, manifest = resharding.gather(parts[::-1])  # any order
    assert manifest == whole[1]
    assert sorted(back) == sorted(whole[0])
    for k, a in whole[0].items():
        assert back[k].tobytes() == a.tobytes() and back[k].dtype == a.dtype, k


def test_gather_names_what_does_not_fit():
    schema = [LeafSpec("x", "float32", (4, 2)), LeafSpec("y", "float32", (3,))]
    whole = _state(schema, {"count": np.array(5, np.int32), "mu/x": np.zeros((4, 2), np.float32)})
    shard_map = place(schema, ["a:1", "b:1"], model_id="p", split_bytes=8)
    parts = resharding.split(whole, shard_map)
    with pytest.raises(WireError, match=r"shard 1 of 2 \(b:1\) is missing"):
        resharding.gather(parts[:1])
    with pytest.raises(WireError, match="both hold shard 0"):
        resharding.gather([parts[0], parts[0]])
    other = resharding.split(whole, place(schema, ["a:1", "b:1"], model_id="q", split_bytes=8))
    with pytest.raises(WireError, match="different placements"):
        resharding.gather([parts[0], other[1]])
    behind = (dict(parts[1][0]), {**parts[1][1], "step": 6})
    with pytest.raises(WireError, match=r"step is 7 on shard 0 \(file 0\) but 6 on shard 1"):
        resharding.gather([parts[0], behind])
    skewed = ({**parts[1][0], "opt/count": np.array(4, np.int32)}, parts[1][1])
    with pytest.raises(WireError, match=r"opt state 'count' differs between shard 0"):
        resharding.gather([parts[0], skewed])
    lagging = (parts[1][0], {**parts[1][1], "workers": {"w": {"last_seq": 1}}})
    with pytest.raises(WireError, match=r"worker 'w': last seq 2 on shard 0 .* but 1 on shard 1"):
        resharding.gather([parts[0], lagging])
    cut = ({**parts[1][0], "params/x": parts[1][0]["params/x"][:1]}, parts[1][1])
    with pytest.raises(WireError, match=r"shard 1 .*params tensor 'x' is float32\[1, 2\]"):
        resharding.gather([parts[0], cut])
    with pytest.raises(WireError, match="not a whole model"):
        resharding.split(parts[0], shard_map)
