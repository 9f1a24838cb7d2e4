"""Sync rounds that shard 0 decides (docs/design.md, "Shards", "Sync rounds"; core/shard_rounds.py,
client/rounds.py): real servers on 127.0.0.1, three holding the shards of a model and one holding
its unsharded twin. Three workers push to rounds of quorum 2 over the shards; which contributions
each round took is learned from shard 0 (DecideRound), and the twin is fed exactly those, in that
order: both must hold the same parameters, optimizer state and EMA."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from optserve.client.errors import FailedPreconditionError, InvalidArgumentError
from optserve.client.state_file import read_state
from tests.conftest import in_process_servers
from tests.reference.cases import CASES
from tests.shard_sync_data import WEIGHTS, grads, params

SPLIT = 1024  # bytes: "embed" and "out" split over the shards (unless a rule needs them whole)
STEPS = 4  # rounds each scenario trains for

_BY_ID = {c.id: c.spec for c in CASES}
# every conformance case is compared so, from one thread, in tests/test_shards_sync_conformance.py;
# these two run three worker threads at once, whose pushes race to each round
CASES_SYNC = [
    ("adam_ema", _BY_ID["adam"], {"ema": 0.9}),
    ("clip_adam", {"chain": [{"clip_by_global_norm": {"max_norm": 2.0}}, {"adam": {"learning_rate": 0.01}}]}, {}),
]


@pytest.fixture(scope="module")
def servers():
    """Three shard servers and one for the whole model."""
    with in_process_servers([None] * 4) as srvs:
        yield srvs


def _train(model, worker_id: str, until: int, attempts: int = 40) -> None:
    """Pushes rounds of gradients until the model is at step `until`; a push that its round left out
    (stale) pulls and pushes again."""
    w = model.worker(worker_id)
    w.pull()
    for _ in range(attempts):
        if w.workers[0].base_step >= until:
            return
        try:
            w.push_pull(grads(worker_id, w.seq + 1), weight=WEIGHTS[worker_id])
        except FailedPreconditionError as e:
            if "computed against step" not in e.message:  # only a push its round left out goes on
                raise
            w.pull()
    raise AssertionError(f"{worker_id} did not get to step {until}")


def _run_workers(model, worker_ids, until: int) -> None:
    errors: list[BaseException] = []

    def run(wid: str) -> None:
        try:
            _train(model, wid, until)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(wid,)) for wid in worker_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors


def _rounds(sm, last: int) -> list[list[tuple[str, int]]]:
    """The contributors shard 0 took in each round up to step `last`."""
    return [[tuple(c) for c in sm.shards[0].decide_round(step)["contributors"]] for step in range(1, last + 1)]


def _feed_twin(wm, rounds) -> None:
    for contributors in rounds:
        for wid, seq in contributors:
            wm.push(grads(wid, seq), weight=WEIGHTS[wid])


def _assert_same_state(sm, wm, tmp_path, rtol: float) -> None:
    step = sm.info()["step"]
    assert [s["step"] for s in sm.info()["shards"]] == [step] * 3
    assert wm.info()["step"] == step
    sm.download(tmp_path / "sharded.safetensors")
    wm.download(tmp_path / "whole.safetensors")
    got, _ = read_state(tmp_path / "sharded.safetensors")
    want, _ = read_state(tmp_path / "whole.safetensors")
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, b in want.items():
        np.testing.assert_allclose(got[key], b, rtol=rtol, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case", CASES_SYNC, ids=lambda c: c[0])
def test_quorum_2_of_3_over_three_shards_equals_the_whole_model_fed_the_same_rounds(
    sharded_client, whole_client, case, tmp_path
):
    name, spec, extra = case
    settings = {"mode": "sync", "workers": 3, "quorum": 2, **extra}
    sm = sharded_client.create_model(f"q-{name}", params(), spec, split_bytes=SPLIT, **settings)
    wm = whole_client.create_model(f"q-{name}", params(), spec, **settings)
    assert sm.decides_rounds
    _run_workers(sm, ["w0", "w1", "w2"], STEPS)
    last = sm.info()["step"]
    rounds = _rounds(sm, last)
    assert all(len(r) == 2 for r in rounds), rounds
    _feed_twin(wm, rounds)
    # element-wise rules to a unit or two in the last place over the steps; clipping's factor and
    # LAMB's norms to float32 rounding
    _assert_same_state(sm, wm, tmp_path, rtol=1e-5 if "clip" in name or "lamb" in name else 2e-6)


def test_a_sync_timeout_round_closes_without_the_missing_worker(sharded_client, whole_client, tmp_path):
    spec = {"adam": {"learning_rate": 0.01}}
    settings = {"mode": "sync", "workers": 3, "sync_timeout": 0.2}
    sm = sharded_client.create_model("timeout", params(), spec, split_bytes=SPLIT, **settings)
    # the twin applies every round of two contributions as the sharded model's timed-out rounds do
    wm = whole_client.create_model("timeout", params(), spec, mode="sync", workers=3, quorum=2)
    _run_workers(sm, ["w0", "w1"], 2)  # w2 never pushes: each round closes when shard 0's timeout fires
    rounds = _rounds(sm, sm.info()["step"])
    assert all(sorted(w for w, _ in r) == ["w0", "w1"] for r in rounds), rounds
    assert all(sh.info()["counters"]["sync_timeouts"] >= 1 for sh in sm.shards[:1])
    _feed_twin(wm, rounds)
    _assert_same_state(sm, wm, tmp_path, rtol=2e-6)


_DYING_WORKER = """
import sys
from optserve.client import Client
from tests.shard_sync_data import WEIGHTS, grads
with Client(sys.argv[1].split(","), timeout=60) as c:
    w = c.model(sys.argv[2]).worker("w2")
    w.pull()
    w.push(grads("w2", 1), weight=WEIGHTS["w2"])  # every shard has it; its round is still open
    print("PUSHED", flush=True)
    sys.stdin.readline()  # killed here, before its relay could tell the other shards anything
"""


def test_a_worker_killed_after_pushing_and_before_relaying_does_not_stop_the_others(
    sharded_client, whole_client, targets, tmp_path
):
    spec = {"adam": {"learning_rate": 0.01}}
    settings = {"mode": "sync", "workers": 3, "quorum": 2}
    sm = sharded_client.create_model("killed", params(), spec, split_bytes=SPLIT, **settings)
    wm = whole_client.create_model("killed", params(), spec, **settings)
    root = str(pathlib.Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_WORKER, ",".join(targets), "killed"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PUSHED"
        assert all(sh.info()["pending_contributions"] == 1 for sh in sm.shards)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    _run_workers(sm, ["w0", "w1"], STEPS)
    rounds = _rounds(sm, sm.info()["step"])
    assert rounds[0][0] == ("w2", 1), rounds  # the dead worker's push was first on shard 0: it counts
    _feed_twin(wm, rounds)
    _assert_same_state(sm, wm, tmp_path, rtol=2e-6)


def test_bad_decisions_are_refused_naming_the_model_and_shard_and_change_nothing(sharded_client, whole_client):
    sm = sharded_client.create_model(
        "bad-decisions", params(), {"sgd": {"learning_rate": 0.1}}, split_bytes=SPLIT, mode="sync", workers=3, quorum=2
    )
    _run_workers(sm, ["w0", "w1"], 1)
    taken = sm.shards[0].decide_round(1)["contributors"]
    before = [sh.info() for sh in sm.shards]
    pulled = sm.pull()
    label = re.escape("model 'bad-decisions' (shard 1 of 3)")
    with pytest.raises(FailedPreconditionError, match=rf"{label}.*decided with contributors"):
        sm.shards[1].decide_round(1, [("w0", 1), ("w2", 1)])
    with pytest.raises(FailedPreconditionError, match=rf"{label}: no sync round for step 7"):
        sm.shards[1].decide_round(7, taken)
    with pytest.raises(FailedPreconditionError, match=r"\(shard 0 of 3\): round for step 2 is still open on shard 0"):
        sm.shards[0].decide_round(2, taken)
    with pytest.raises(InvalidArgumentError, match=rf"{label}: a decision for step 2 must name its contributors"):
        sm.shards[1].decide_round(2)
    with pytest.raises(InvalidArgumentError, match=rf"{label}: round for step 2: contributors must be distinct"):
        sm.shards[1].decide_round(2, [("w0", 2), ("w0", 3)])
    # an identical decision again is answered from the round's record
    assert sm.shards[2].decide_round(1, taken)["applied"]
    after = [sh.info() for sh in sm.shards]
    assert [a["step"] for a in after] == [b["step"] for b in before] == [1, 1, 1]
    assert [a["workers"] for a in after] == [b["workers"] for b in before]
    np.testing.assert_array_equal(sm.pull()["embed"], pulled["embed"])
    # a model whose shards close their own rounds takes no decisions
    plain = whole_client.create_model(
        "bad-decisions", params(), {"sgd": {"learning_rate": 0.1}}, mode="sync", workers=2
    )
    with pytest.raises(FailedPreconditionError, match=r"model 'bad-decisions'.*takes no round decisions"):
        plain.decide_round(1, taken)


def _anonymous_rounds(sm, last: int) -> list[int]:
    """How many anonymous contributions each round up to step `last` took, the same on every shard."""
    per_shard = [
        {r["step"]: r["anonymous"] for r in sh.info()["recent_rounds"] if r["step"] <= last} for sh in sm.shards
    ]
    assert all(p == per_shard[0] for p in per_shard), per_shard
    return [per_shard[0][step] for step in range(1, last + 1)]


def test_anonymous_pushes_make_rounds_that_shard_0_decides_as_the_whole_model_does(
    sharded_client, whole_client, tmp_path
):
    """`ShardedModel.push` and `push_pull` without a worker, on a sync model with leases (the
    default: shard 0 decides its rounds): each push is named on every shard by its contribution
    number, counts towards the quorum, and its round is relayed by the pushing handle itself."""
    spec = {"adam": {"learning_rate": 0.01}}
    sm = sharded_client.create_model("anonymous", params(), spec, split_bytes=SPLIT, mode="sync", workers=2)
    wm = whole_client.create_model("anonymous", params(), spec, mode="sync", workers=2)
    assert sm.decides_rounds
    # round 1: two anonymous pushes (the second closes it on shard 0; the handle relays the decision)
    for m in (sm, wm):
        assert m.push(grads("w0", 1), weight=WEIGHTS["w0"]) == 1
        assert m.push(grads("w1", 1), weight=WEIGHTS["w1"]) == 1
    sm.pull(min_step=1, timeout=60)
    # round 2: a worker's push beside an anonymous push_pull, which returns the round's parameters
    w = sm.worker("w2")
    w.pull()
    w.push(grads("w2", 1), weight=WEIGHTS["w2"])  # staged; its round waits for one more
    got = sm.push_pull(grads("w0", 2), weight=WEIGHTS["w0"])
    assert sm.last_step == 2
    wm.push(grads("w2", 1), weight=WEIGHTS["w2"])
    want = wm.push_pull(grads("w0", 2), weight=WEIGHTS["w0"])
    for key in ("embed", "out"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=1e-6, err_msg=key)
    rounds = _rounds(sm, 2)
    assert [sorted(bool(wid) for wid, _ in r) for r in rounds] == [[False, False], [False, True]], rounds
    assert _anonymous_rounds(sm, 2) == [2, 1]
    _assert_same_state(sm, wm, tmp_path, rtol=2e-6)
    w.close()


def test_an_anonymous_push_without_its_contribution_number_is_refused_by_a_shard(sharded_client):
    sm = sharded_client.create_model(
        "anonymous-bad", params(), {"sgd": {"learning_rate": 0.1}}, split_bytes=SPLIT, mode="sync", workers=2
    )
    part = sm._split(sm._leaves(grads("w0", 1), "gradient"))[1]
    before = sm.shards[1].info()
    with pytest.raises(
        InvalidArgumentError, match=r"\(shard 1 of 3\): an anonymous sync push .* needs PushHeader.contribution"
    ):
        sm.shards[1].push(part)  # as a client without contribution numbers sends it
    header = sm.shards[1]._push_header(None, None, worker_id="w0", seq=1, contribution=7)
    with pytest.raises(InvalidArgumentError, match=r"worker 'w0': contribution is for anonymous pushes only"):
        sm.shards[1]._send_grads(part, None, header, lambda leaves: sm.shards[1].push_raw(header, leaves))
    after = sm.shards[1].info()
    assert (after["step"], after["pending_contributions"], after["counters"]) == (
        before["step"],
        before["pending_contributions"],
        before["counters"],
    )
