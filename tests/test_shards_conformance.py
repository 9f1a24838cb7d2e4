"""Every conformance case over three shards against the same model whole (tests/shard_compare.py):
the same parameters, optimizer state and EMA after the same pushes; the specs a sharded model
cannot compute as the whole model does are refused when it is placed, naming the rule."""

from __future__ import annotations

import json

import pytest

from tests.core_helpers import donating_step_only
from tests.reference.cases import CASES, EMA_CASES
from tests.shard_compare import compare

# the rules core/sharding.py refuses over several shards: a reduction over every leaf other than a
# clip_by_global_norm at the head of the chain (none in the conformance cases)
REFUSED_RULES: tuple[str, ...] = ()


@pytest.fixture(scope="module", autouse=True)
def _donating_step_only():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("optserve.server.core.model.warm_up_steps", donating_step_only)
        yield


@pytest.mark.parametrize("case", [*CASES, *EMA_CASES], ids=lambda c: c.id)
def test_sharded_equals_whole(case):
    result = compare(case, shards=3)
    spec = json.dumps(case.spec)
    refused_rule = next((r for r in REFUSED_RULES if r in spec), None)
    if refused_rule is not None:
        assert refused_rule in result["refused"] and "3 shards" in result["refused"], result
        return
    assert not result["refused"], result
    assert result["diff"] == "", result
