"""Every conformance case in sync mode, quorum 2 of 3 workers, over three shard servers against the
same model whole on a fourth server (docs/design.md, "Shards", "Sync rounds"): the rounds are
decided by shard 0 and relayed by the workers (client/rounds.py), the whole model is fed exactly the
contributions shard 0's rounds took, in that order, and both must hold the same parameters,
optimizer state and EMA, as tests/test_shards_conformance.py checks for async pushes (its leaves,
split threshold and tolerances: tests/shard_compare.py).

Cheap by design (the suite's budget): the module's four servers are shared; the three workers of a
model are driven from one thread, so that each round is decided by the order of their pushes and
nothing waits on the clock (the first push is staged, the second is the quorum and closes the round
on shard 0, whose decision the workers' relays take to the other shards, the third is stale
everywhere); only the donating step is compiled (tests/core_helpers.py, `donating_step_only`); and
the models of the next few cases are created ahead, so that their steps compile in the background
while the current case trains. Even so every case costs about 1.5 s of a core (XLA compiling the
steps of three shards and of the whole model), so by default a chosen third of them runs (`QUICK`);
`OPTSERVE_SYNC_CONFORMANCE=all` runs every one (about 200 s of a core, 2026-12-03)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from optserve.client.errors import FailedPreconditionError, InvalidArgumentError
from optserve.client.state_file import read_state
from tests.conftest import in_process_servers
from tests.core_helpers import donating_step_only
from tests.reference.cases import CASES, EMA_CASES, NOISE_CASES, Case
from tests.reference.data import make_grads, make_params
from tests.shard_compare import NOISE, REDUCING, SHARD_SHAPES, SPLIT_BYTES
from tests.test_shards_conformance import NOISE_BESIDE_PACKS, REFUSED_RULES

WEIGHTS = {"w0": 1.0, "w1": 2.0, "w2": 0.5}  # each worker's weight in a round's weighted mean
# round r: the first worker's push is staged, the second's closes the round (quorum 2), the third's
# is stale; over the three rounds each worker is once first, once second and once left out
ORDERS = [("w0", "w1", "w2"), ("w2", "w0", "w1"), ("w1", "w2", "w0")]
ROUNDS = 3
AHEAD = 3  # cases whose models are created (and their steps compiled) ahead of the one training

CLIP_LAMB = Case(
    "clip_lamb", {"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"lamb": {"learning_rate": 0.01}}]}
)
ALL_CASES = [*CASES, *EMA_CASES, *NOISE_CASES, *NOISE_BESIDE_PACKS, CLIP_LAMB]
# What the suite runs by default, within its budget (every case costs about 1.5 s of a core, mostly
# XLA compiling four steps; all 139 about 200 s, the noise cases 10 s each): every rule that reduces
# (where shards could disagree beyond an element), both EMA settings, the head clip + lamb chain,
# the noise rule beside packs, and a few element-wise ones of each kind of state.
QUICK = {
    *(c.id for c in CASES if any(word in json.dumps(c.spec).lower() for word in REDUCING)),
    *(c.id for c in EMA_CASES),
    *("clip_lamb", "noise_beside_packs", "sgd", "sgd_momentum", "adam", "adamw", "rmsprop_centered"),
    *("adagrad", "yogi", "schedule_inverse_time_decay", "schedule_join"),
}
# OPTSERVE_SYNC_CONFORMANCE=all: every case (a choice of what to collect, never a skip)
SWEEP = ALL_CASES if os.environ.get("OPTSERVE_SYNC_CONFORMANCE") == "all" else [c for c in ALL_CASES if c.id in QUICK]


@pytest.fixture(scope="module")
def servers():
    """Three shard servers and one for the whole model, compiling only the donating step."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("optserve.server.core.model.warm_up_steps", donating_step_only)
        with in_process_servers([None] * 4) as srvs:
            yield srvs


def _tree(flat: dict[str, np.ndarray]) -> dict:
    """The conformance leaves as the client sends them: "rows/odd" nested, so that its path is that."""
    out: dict = {}
    for path, a in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = a
    return out


def _grads(worker_id: str, seq: int) -> dict:
    return _tree(make_grads(1, 1000 * int(worker_id[1:]) + seq, SHARD_SHAPES)[0])


def _settings(case) -> dict:
    # no leases (heartbeat 0): quorum 2 of 3 alone makes shard 0 decide the rounds, and no worker's
    # lease can expire on a loaded machine between its calls
    return {"mode": "sync", "workers": 3, "quorum": 2, "heartbeat": 0, **getattr(case, "settings", {})}


class _Ahead:
    """The (sharded, whole) models of the cases to come, created ahead of their turn: creating a
    model queues its step's compilation, which then runs while earlier cases train."""

    def __init__(self, sharded_client, whole_client):
        self.sc, self.wc = sharded_client, whole_client
        self.made: dict[str, tuple] = {}

    def _create(self, case) -> tuple:
        params = make_params(0, SHARD_SHAPES)
        try:
            sm = self.sc.create_model(
                f"sc-{case.id}", _tree(params), case.spec, split_bytes=SPLIT_BYTES, **_settings(case)
            )
        except InvalidArgumentError as e:
            return e, None
        return sm, self.wc.create_model(f"sc-{case.id}", _tree(params), case.spec, **_settings(case))

    def take(self, case, upcoming) -> tuple:
        for c in [case, *upcoming][: AHEAD + 1]:
            if c.id not in self.made:
                self.made[c.id] = self._create(c)
        return self.made.pop(case.id)


@pytest.fixture(scope="module")
def ahead(sharded_client, whole_client):
    return _Ahead(sharded_client, whole_client)


def _upcoming(request) -> list:
    """The cases of this test that the session runs after the current one, in order."""
    items = request.session.items
    at = items.index(request.node)
    return [
        it.callspec.params["case"]
        for it in items[at + 1 : at + 1 + AHEAD]
        if getattr(it, "originalname", None) == request.node.originalname
    ]


def _train(sm) -> list[list[tuple[str, int]]]:
    """ROUNDS rounds from one thread (module docstring); the contributors each round took."""
    workers = {wid: sm.worker(wid) for wid in WEIGHTS}
    try:
        for w in workers.values():
            w.pull()
        taken = []
        for r in range(ROUNDS):
            first, second, late = (workers[wid] for wid in ORDERS[r % len(ORDERS)])
            first.push(_grads(first.worker_id, first.seq + 1), weight=WEIGHTS[first.worker_id])
            # the quorum: shard 0 closes the round; the call returns once every shard has applied it,
            # which only the relays' decisions make the other shards do
            second.push_pull(_grads(second.worker_id, second.seq + 1), weight=WEIGHTS[second.worker_id])
            with pytest.raises(FailedPreconditionError, match="computed against step"):
                late.push(_grads(late.worker_id, late.seq + 1), weight=WEIGHTS[late.worker_id])
            first.pull()
            late.pull()
            taken.append([(first.worker_id, first.seq), (second.worker_id, second.seq)])
        return taken
    finally:
        for w in workers.values():
            w.close()


def _differences(got: dict, want: dict, *, bitwise: bool, reducing: bool) -> str:
    """What differs between the gathered shards' state and the whole model's ("": nothing): bit for
    bit (noise rules), else to float32 rounding. Element-wise rules too, unlike async pushes
    (tests/shard_compare.py: one unit in the last place): a round's sum and mean are XLA code of
    their own for a shard's piece of a leaf, whose last bit may round differently, and that compounds
    with the step's over the rounds (3 units in a momentum trace of rmsprop centered, 3 rounds), and a
    reduction over a leaf can make more of it (centralize: 3e-6 relative after its mean's subtraction;
    tests/test_shards_sync.py allows 1e-5 to reductions too)."""
    if set(got) != set(want):
        return f"keys differ: {sorted(set(got) ^ set(want))}"
    for key, b in want.items():
        a = got[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{key}: {a.dtype}{a.shape} against {b.dtype}{b.shape}"
        if bitwise or not np.issubdtype(b.dtype, np.floating):
            if a.tobytes() != b.tobytes():
                return f"{key}: not bit for bit the whole model's"
            continue
        try:
            np.testing.assert_allclose(a, b, rtol=1e-5 if reducing else 2e-6, atol=1e-7)
        except AssertionError as e:
            return f"{key}: " + "; ".join(
                line.strip() for line in str(e).splitlines() if "ismatch" in line or "Max" in line
            )
    return ""


@pytest.mark.parametrize("case", SWEEP, ids=lambda c: c.id)
def test_sync_quorum_2_of_3_sharded_equals_whole(request, ahead, sharded_client, whole_client, case, tmp_path):
    sm, wm = ahead.take(case, _upcoming(request))
    spec = json.dumps(case.spec)
    refused_rule = next((r for r in REFUSED_RULES if r in spec), None)
    if refused_rule is not None:
        assert isinstance(sm, InvalidArgumentError) and refused_rule in sm.message, sm
        return
    assert not isinstance(sm, Exception), sm
    name = sm.name
    try:
        assert sm.decides_rounds
        taken = _train(sm)
        rounds = [[tuple(c) for c in sm.shards[0].decide_round(s)["contributors"]] for s in range(1, ROUNDS + 1)]
        assert rounds == taken, rounds
        for contributors in rounds:  # the whole model fed what shard 0's rounds took, in that order
            for wid, seq in contributors:
                wm.push(_grads(wid, seq), weight=WEIGHTS[wid])
        assert [s["step"] for s in sm.info()["shards"]] == [ROUNDS] * 3
        assert wm.info()["step"] == ROUNDS
        sm.download(tmp_path / "sharded.safetensors")
        wm.download(tmp_path / "whole.safetensors")
    finally:
        sharded_client.delete_model(name)
        whole_client.delete_model(name)
    got, _ = read_state(tmp_path / "sharded.safetensors")
    want, _ = read_state(tmp_path / "whole.safetensors")
    lowered = spec.lower()
    reducing = any(word in lowered for word in REDUCING)
    assert (
        _differences(got, want, bitwise=not reducing and any(word in lowered for word in NOISE), reducing=reducing)
        == ""
    )
