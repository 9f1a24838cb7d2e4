"""Every conformance case over three shards against the same model whole (tests/shard_compare.py):
the same parameters, optimizer state and EMA after the same pushes; the specs a sharded model
cannot compute as the whole model does are refused when it is placed, naming the rule. The noise
cases (random rules) too, bit for bit, with leaves split by rows and a whole model that packs."""

from __future__ import annotations

import json

import pytest

from tests.core_helpers import donating_step_only
from tests.reference.cases import CASES, EMA_CASES, NOISE_CASES, Case
from tests.shard_compare import compare

# the rules core/sharding.py refuses over several shards: a reduction over every leaf other than a
# clip_by_global_norm at the head of the chain (none in the conformance cases)
REFUSED_RULES: tuple[str, ...] = ()


# noise over some leaves only: the whole model packs the others (bias, kernel, conv, rows/odd: alike
# under adam) and gives the noise rule "scalar" and "table" (split over the shards) in its dict order
NOISE_BESIDE_PACKS = [
    Case(
        "noise_beside_packs",
        {
            "partition": [
                {"params": ["scalar", "table"], "optimizer": {"noisy_sgd": {"learning_rate": 0.1, "key": 3}}},
                {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01}}},
            ]
        },
    ),
    Case(
        "masked_noise",
        {
            "chain": [
                {"add_noise": {"eta": 0.01, "gamma": 0.3, "key": 4, "mask": ["table", "conv", "rows/*"]}},
                {"add_noise": {"eta": 0.02, "gamma": 0.5, "key": 5}},
                {"sgd": {"learning_rate": 0.1}},
            ]
        },
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _donating_step_only():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("optserve.server.core.model.warm_up_steps", donating_step_only)
        yield


@pytest.mark.parametrize("case", [*CASES, *EMA_CASES, *NOISE_CASES, *NOISE_BESIDE_PACKS], ids=lambda c: c.id)
def test_sharded_equals_whole(case):
    result = compare(case, shards=3)
    spec = json.dumps(case.spec)
    refused_rule = next((r for r in REFUSED_RULES if r in spec), None)
    if refused_rule is not None:
        assert refused_rule in result["refused"] and "3 shards" in result["refused"], result
        return
    assert not result["refused"], result
    assert result["diff"] == "", result
