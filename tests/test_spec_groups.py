"""Masks (leaf-path globs) and partitions (optax.multi_transform)."""

import numpy as np
import optax
import pytest

from optserve.server.spec import SpecError, compile_spec
from optserve.server.spec.masks import glob_regex
from tests.test_spec_compiler import PATHS, assert_close, make_params, run_compiled, run_optax

# PATHS: enc/kernel, enc/bias, scale, conv/kernel
KERNELS = {"enc/kernel": True, "enc/bias": False, "scale": False, "conv/kernel": True}


@pytest.mark.parametrize(
    "pattern,path,hit",
    [
        ("**/kernel", "enc/kernel", True),
        ("**/kernel", "kernel", True),
        ("**/kernel", "a/b/c/kernel", True),
        ("*/kernel", "a/b/kernel", False),
        ("enc/*", "enc/kernel", True),
        ("enc/*", "enc/a/b", False),
        ("enc/**", "enc/a/b", True),
        ("**", "x/y", True),
        ("layers/[0-2]/w", "layers/1/w", True),
        ("layers/[!0-2]/w", "layers/1/w", False),
        ("?cale", "scale", True),
        ("bias", "enc/bias", False),
    ],
)
def test_glob_semantics(pattern, path, hit):
    assert bool(glob_regex(pattern).match(path)) is hit


@pytest.mark.parametrize("mask", [["**/kernel"], ["**", "!**/bias", "!scale"], ["!**/bias", "!scale"]])
def test_adamw_mask_selects_decayed_leaves(mask):
    spec = {"adamw": {"learning_rate": 0.01, "weight_decay": 0.5, "mask": mask}}
    assert_close(run_compiled(spec), run_optax(optax.adamw(0.01, weight_decay=0.5, mask=KERNELS)))
    unmasked = run_compiled({"adamw": {"learning_rate": 0.01, "weight_decay": 0.5}})
    assert not np.allclose(np.asarray(run_compiled(spec)["enc/bias"]), np.asarray(unmasked["enc/bias"]))


def test_wrapped_mask_passes_other_leaves_through():
    spec = {
        "chain": [{"clip_by_global_norm": {"max_norm": 0.01, "mask": "**/kernel"}}, {"sgd": {"learning_rate": 0.1}}]
    }
    tx = optax.chain(optax.masked(optax.clip_by_global_norm(0.01), KERNELS), optax.sgd(0.1))
    assert_close(run_compiled(spec), run_optax(tx))


def test_lars_and_lamb_masks():
    assert_close(
        run_compiled({"lars": {"learning_rate": 0.1, "weight_decay": 0.1, "mask": "**/kernel"}}),
        run_optax(optax.lars(0.1, weight_decay=0.1, weight_decay_mask=KERNELS, trust_ratio_mask=KERNELS)),
    )
    assert_close(
        run_compiled({"lamb": {"learning_rate": 0.01, "weight_decay": 0.1, "mask": "**/kernel"}}),
        run_optax(optax.lamb(0.01, weight_decay=0.1, mask=KERNELS)),
    )


def test_partition_matches_multi_transform():
    spec = {
        "partition": [
            {"params": ["**/bias", "scale"], "optimizer": {"sgd": {"learning_rate": 0.1}}},
            {
                "params": "**",
                "optimizer": {
                    "chain": [{"clip": {"max_delta": 0.1}}, {"adamw": {"learning_rate": 0.01, "mask": "enc/*"}}]
                },
            },
        ]
    }
    labels = {k: "b" if not v else "k" for k, v in KERNELS.items()}
    tx = optax.multi_transform(
        {
            "b": optax.sgd(0.1),
            "k": optax.chain(optax.clip(0.1), optax.adamw(0.01, mask={k: k == "enc/kernel" for k in KERNELS})),
        },
        labels,
    )
    assert_close(run_compiled(spec), run_optax(tx))
    assert compile_spec(spec, PATHS).spec["partition"][1]["params"] == ["**"]


def test_partition_freeze_and_tunables_inside():
    spec = {
        "partition": [
            {"params": "**/bias", "optimizer": "set_to_zero"},
            {"params": "**", "optimizer": {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}},
        ]
    }
    c = compile_spec(spec, PATHS)
    params = make_params()
    state = c.init(params)
    assert c.hyperparams(state) == pytest.approx({"learning_rate": 0.01})
    updates, _ = c.update(params, state, params)
    assert float(abs(updates["enc/bias"]).max()) == 0.0 and float(abs(updates["enc/kernel"]).max()) > 0


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"adamw": {"learning_rate": 0.1, "mask": "**/bais"}},
            'adamw.mask: glob "**/bais" matches no leaf (leaves: enc/kernel',
        ),
        (
            {"adamw": {"learning_rate": 0.1, "mask": ["**/kernel", "**/bais"]}},
            'adamw.mask[1]: glob "**/bais" matches no leaf',
        ),
        ({"adamw": {"learning_rate": 0.1, "mask": ["**/kernel", "!**/kernel"]}}, "adamw.mask: mask matches no leaf"),
        ({"adamw": {"learning_rate": 0.1, "mask": []}}, "adamw.mask: expected a glob or a non-empty list of globs"),
        ({"adamw": {"learning_rate": 0.1, "mask": [3]}}, "adamw.mask[0]: expected a glob string, got 3"),
        ({"adam": {"learning_rate": 0.1, "mask": "**"}}, "adam.mask: adam takes no mask"),
        (
            {"partition": [{"params": "**/kernel", "optimizer": "identity"}]},
            "partition: 2 leaves are in no group (enc/bias, scale)",
        ),
        (
            {"partition": [{"params": "**", "optimizer": "identity"}, {"params": "**/bias", "optimizer": "identity"}]},
            'partition[1].params: glob "**/bias" matches no leaf',
        ),
        (
            {"partition": [{"params": "**", "optimizer": {"adam": {"learning_rate": "x"}}}]},
            'partition[0].optimizer.adam.learning_rate: expected a number, got "x"',
        ),
        ({"partition": [{"params": "**", "optimizer": {"adamw": {"learning_rate": 1, "mask": "**/bias"}}}]}, None),
        (
            {
                "partition": [
                    {"params": "**/kernel", "optimizer": "identity"},
                    {"params": "**", "optimizer": {"adamw": {"learning_rate": 1, "mask": "**/kernel"}}},
                ]
            },
            'partition[1].optimizer.adamw.mask: glob "**/kernel" matches no leaf (leaves: enc/bias, scale)',
        ),
        ({"partition": [{"params": "**"}]}, 'partition[0]: expected {"params": globs, "optimizer": spec}'),
        ({"partition": []}, "partition: expected a non-empty list"),
    ],
)
def test_mask_and_partition_errors(spec, message):
    if message is None:
        compile_spec(spec, PATHS)
        return
    with pytest.raises(SpecError) as info:
        compile_spec(spec, PATHS)
    assert str(info.value).startswith(message), str(info.value)
