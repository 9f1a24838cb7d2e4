"""Packed layouts (issue 19; docs/design.md, "Packed layouts"): which leaves are packed, and that a
packed model computes what the unpacked one does, for every conformance case, with checkpoints
keyed by leaf either way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optserve.server.core import admission
from optserve.server.core.errors import NonFiniteUpdate
from optserve.server.core.layout import plan_layout
from optserve.server.core.settings import ModelSettings
from optserve.server.core.store import ModelStore
from optserve.server.spec import compile_spec
from optserve.server.state.model_state import capture, prepare
from optserve.wire.dtypes import LeafSpec, dtype_name
from tests.core_helpers import CPU, push
from tests.reference.cases import CASES, EMA_CASES
from tests.reference.data import SHAPES, make_grads, make_params

# The conformance leaves (which the cases' masks and partitions name) and as many more of the same
# shapes, so that the element-wise groups have enough leaves to be packed (scalars stay loose).
SHAPES_PACKED = {**SHAPES, **{f"extra/{k}": s for k, s in SHAPES.items()}}
STEPS = 3
GLOBAL_RULES = ("clip_by_global_norm",)  # a sum over all leaves: the same sum in another order


def _model(spec, packed: bool, settings: ModelSettings | None = None, shapes=SHAPES_PACKED, name="m"):
    params = make_params(0, shapes)
    schema = [LeafSpec(k, dtype_name(v.dtype), v.shape) for k, v in params.items()]
    store = ModelStore(CPU, packed=packed)
    return admission.create_model(store, name, schema, spec, settings or ModelSettings(), params)


def _run(spec, packed: bool, settings: ModelSettings | None = None, grads=None):
    model = _model(spec, packed, settings)
    for g in grads if grads is not None else make_grads(STEPS, 1, SHAPES_PACKED):
        push(model, g)
    return model, capture(model).to_host()


def _assert_same(a, b, exact: bool) -> None:
    for group in ("params", "opt", "ema"):
        x, y = getattr(a, group), getattr(b, group)
        assert (x is None) == (y is None)
        if x is None:
            continue
        assert list(x) == list(y), group
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (group, k)
            if exact:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{group} {k}")
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=2e-6, atol=1e-7, err_msg=f"{group} {k}")
    assert a.hyperparams == b.hyperparams


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packed_and_unpacked_models_agree_on_every_conformance_case(case):
    _, got = _run(case.spec, True)
    unpacked, want = _run(case.spec, False)
    assert not unpacked.layout.packs
    global_rule = any(name in json.dumps(case.spec) for name in GLOBAL_RULES)
    _assert_same(got, want, exact=not global_rule)


def test_element_wise_rules_are_packed_and_rules_that_need_leaves_are_not():
    adam = _model({"adam": {"learning_rate": 0.01}}, True)
    packed_leaves = {leaf for p in adam.layout.packs for leaf in p.leaves}
    assert packed_leaves == {k for k, s in SHAPES_PACKED.items() if s} and len(adam.layout.packs) >= 2
    assert set(adam.layout.loose) == {"scalar", "extra/scalar"}
    assert _model({"lamb": {"learning_rate": 0.01}}, True).layout.packs == ()
    assert _model({"chain": [{"centralize": {}}, {"sgd": {"learning_rate": 0.1}}]}, True).layout.packs == ()


# Four leaves of each conformance shape: every group of a mask or partition is large enough to pack.
SHAPES_MANY = {**SHAPES, **{f"copy{i}/{k}": s for i in range(3) for k, s in SHAPES.items()}}
MASKED_SPECS = {
    "partition_sgd_adamw_mask": {
        "partition": [
            {"params": ["**/bias", "bias"], "optimizer": {"sgd": {"learning_rate": 0.1, "momentum": 0.9}}},
            {"params": "**", "optimizer": {"adamw": {"learning_rate": 0.01, "mask": ["**/kernel", "kernel"]}}},
        ]
    },
    "masked_clip_tunable_adam": {
        "chain": [
            {"clip": {"max_delta": 0.05, "mask": ["**/conv", "conv"]}},
            {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}},
        ]
    },
    "global_norm_partition_flux": {
        "chain": [
            {"clip_by_global_norm": {"max_norm": 0.5}},
            {"partition": [{"params": ["**/conv", "conv"], "optimizer": "flux:ADAM"},
                           {"params": "**", "optimizer": {"rmsprop": {"learning_rate": 0.01}}}]},
        ]
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MASKED_SPECS))
def test_masks_and_partitions_are_packed_and_agree(name):
    spec = MASKED_SPECS[name]
    runs = []
    for packed in (True, False):
        model = _model(spec, packed, ModelSettings(ema_decay=0.9), SHAPES_MANY)
        for g in make_grads(STEPS, 1, SHAPES_MANY):
            push(model, g)
        runs.append((model, capture(model).to_host()))
    (packed_model, got), (_, want) = runs
    assert len(packed_model.layout.packs) >= 4
    _assert_same(got, want, exact="global" not in name)


def test_masks_and_partitions_pack_only_leaves_treated_alike():
    layout = _model(MASKED_SPECS["partition_sgd_adamw_mask"], True, shapes=SHAPES_MANY).layout
    assert len(layout.packs) == 6  # (biases: sgd; kernels: adamw decayed; convs: adamw) x 2 buffers
    for pack in layout.packs:
        kinds = {leaf.rsplit("/", 1)[-1] for leaf in pack.leaves}
        # a bias (sgd), a kernel (adamw, decayed) and the others (adamw, not decayed) never share a pack
        assert kinds <= {"bias"} or kinds <= {"kernel"} or not kinds & {"bias", "kernel"}, pack.leaves


def test_large_leaves_non_float_leaves_and_small_groups_stay_loose():
    schema = [LeafSpec(f"s{i}", "float32", (8,)) for i in range(6)]
    schema += [LeafSpec("big", "float32", (1 << 18,)), LeafSpec("n", "int32", (3,))]
    schema += [LeafSpec(f"h{i}", "bfloat16", (4,)) for i in range(3)]  # alike, but only three
    layout = plan_layout(
        schema, compile_spec({"adam": {"learning_rate": 0.1}}, [x.path for x in schema if x.dtype != "int32"])
    )
    assert sorted(leaf for p in layout.packs for leaf in p.leaves) == [f"s{i}" for i in range(6)]
    assert len(layout.packs) == 2 and set(layout.loose) == {"big", "n", "h0", "h1", "h2"}
    assert "n" not in layout.trainable and "big" in layout.trainable


def test_pack_names_never_collide_with_leaf_paths():
    schema = [LeafSpec(p, "float32", (2,)) for p in ("@pack0", "@pack1", "a", "b", "c", "d")]
    layout = plan_layout(schema, compile_spec("flux:ADAM", [x.path for x in schema]))
    assert layout.packs and not {p.name for p in layout.packs} & {x.path for x in schema}


@pytest.mark.parametrize("case", EMA_CASES, ids=[c.id for c in EMA_CASES])
def test_parameter_ema_is_packed_and_agrees(case):
    settings = ModelSettings(ema_decay=case.settings["ema"], ema_debias=case.settings.get("ema_debias", False))
    packed, got = _run(case.spec, True, settings)
    assert packed.layout.packs
    _, want = _run(case.spec, False, settings)
    _assert_same(got, want, exact=True)


def test_tunable_and_scheduled_hyperparameters_agree_packed_and_unpacked():
    spec = {
        "chain": [
            {"clip": {"max_delta": 0.5}},
            {"adam": {"learning_rate": {"exponential_decay": {"init_value": 0.1, "transition_steps": 2,
                                                               "decay_rate": 0.5}},
                      "b1": 0.8, "tunable": ["b1"]}},
        ]
    }  # fmt: skip
    results = []
    for packed in (True, False):
        model = _model(spec, packed)
        for i, g in enumerate(make_grads(STEPS, 1, SHAPES_PACKED)):
            if i == 2:
                model.set_hyperparams({"b1": 0.5})
            push(model, g)
        results.append(capture(model).to_host())
    _assert_same(*results, exact=True)


def test_an_unpacked_checkpoint_restores_into_a_packed_model_bit_for_bit():
    spec = {"adamw": {"learning_rate": 0.01, "mask": ["**/kernel", "kernel"]}}
    settings = ModelSettings(ema_decay=0.9)
    _, saved = _run(spec, False, settings)
    packed = _model(spec, True, settings)
    assert packed.layout.packs
    packed.replace_state(prepare(packed, saved))
    _assert_same(capture(packed).to_host(), saved, exact=True)
    # and both continue alike from there
    unpacked = _model(spec, False, settings)
    unpacked.replace_state(prepare(unpacked, saved))
    for g in make_grads(2, 5, SHAPES_PACKED):
        push(packed, g)
        push(unpacked, g)
    _assert_same(capture(packed).to_host(), capture(unpacked).to_host(), exact=True)


def test_a_refused_update_names_the_packed_leaf_at_fault():
    model = _model({"sgd": {"learning_rate": 1e38}}, True, ModelSettings(reject_nonfinite_updates=True))
    assert model.layout.packs
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES_PACKED.items()}
    g["extra/kernel"] = np.full(SHAPES_PACKED["extra/kernel"], 1e38, np.float32)
    with pytest.raises(NonFiniteUpdate, match="parameter 'extra/kernel'"):
        push(model, g)
    assert model.step == 0


def test_half_precision_leaves_under_a_global_norm_stay_loose():
    """optax sums a bfloat16 leaf's squares in bfloat16: packed, the same sum in another order would
    differ by a bfloat16 ulp, so such leaves keep their shape (float32 ones are packed)."""
    schema = [LeafSpec(f"h{i}", "bfloat16", (7,)) for i in range(6)] + [
        LeafSpec(f"f{i}", "float32", (7,)) for i in range(6)
    ]
    paths = [x.path for x in schema]
    clipped = plan_layout(
        schema, compile_spec({"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, "flux:ADAM"]}, paths)
    )
    assert sorted(leaf for p in clipped.packs for leaf in p.leaves) == [f"f{i}" for i in range(6)]
    plain = plan_layout(schema, compile_spec("flux:ADAM", paths))
    assert sorted(leaf for p in plain.packs for leaf in p.leaves) == sorted(paths)
