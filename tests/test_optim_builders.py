"""The client's spec builders name only rules the server knows, and build specs it accepts."""

from __future__ import annotations

from optserve.client import optim
from optserve.server.spec import compile_spec, list_rules


def test_every_builder_names_a_known_rule():
    known = {r["name"] for r in list_rules()}
    builders = set(optim.__all__) - {"rule", "preset", "chain"}
    assert builders <= known, sorted(builders - known)


def test_builders_produce_specs_the_compiler_accepts():
    spec = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100), weight_decay=0.01),
    )
    assert spec == {
        "chain": [
            {"clip_by_global_norm": {"max_norm": 1.0}},
            {
                "adamw": {
                    "learning_rate": {
                        "warmup_cosine_decay_schedule": {
                            "init_value": 0.0,
                            "peak_value": 1e-3,
                            "warmup_steps": 10,
                            "decay_steps": 100,
                        }
                    },
                    "weight_decay": 0.01,
                }
            },
        ]
    }
    compile_spec(spec, ["w"])
    compile_spec(optim.preset("flux:ADAM", learning_rate=0.01), ["w"])
    compile_spec(optim.sgd(0.1, momentum=0.9, nesterov=True), ["w"])
