"""Parameter EMA, custom transforms from entry points, the generated reference page."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optserve.server.spec import SpecError, compile_spec, custom, docs, list_rules
from optserve.server.spec.ema import ema_init, ema_update, ema_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- EMA (objax ExponentialMovingAverage)


def objax_ema(ws, momentum, debias, eps=1e-6):
    """float64 transcription of objax/optimizer/ema.py."""
    m, step = np.zeros_like(ws[0]), 0
    for w in ws:
        step += 1
        m = m + (1 - momentum) * (w - m)
    return m * (1 / (1 - (1 - eps) * momentum**step)) if debias else m


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("momentum", [0.9, 0.999])
def test_ema_matches_objax(debias, momentum):
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 2)) for _ in range(25)]
    state = ema_init({"w": jnp.zeros((3, 2), jnp.float32)})
    step = jax.jit(ema_update, static_argnums=(3,))
    for w in ws:
        state = step(state, {"w": jnp.asarray(w, jnp.float32)}, momentum, debias)
    np.testing.assert_allclose(
        np.asarray(ema_value(state, debias)["w"]), objax_ema(ws, momentum, debias), rtol=1e-5, atol=1e-7
    )


def test_ema_debias_has_objax_eps_and_starts_at_zero():
    state = ema_init({"w": jnp.ones(2)})
    assert float(ema_value(state, True)["w"][0]) == 0.0
    state = ema_update(state, {"w": jnp.ones(2)}, 0.9)
    # One step: m = 0.1; debiased m / (1 − (1 − 1e-6)·0.9) ≠ 1 exactly (optax.ema would give 1).
    np.testing.assert_allclose(float(ema_value(state, True)["w"][0]), 0.1 / (1 - (1 - 1e-6) * 0.9), rtol=1e-6)
    assert float(ema_value(state, False)["w"][0]) == pytest.approx(0.1)


# ---------------------------------------------------------------- custom transforms (entry points)

PLUGIN = '''
import optax
from optserve.server.spec.hyperparams import HP, Number
from optserve.server.spec.registry import Rule


def double_then_scale(step_size=2.0, flip=False):
    """Scales updates by step_size (a test plugin).

    More text.
    """
    return optax.scale(-step_size if flip else step_size)


sign_rule = Rule(name="ignored", kind="custom", library="testplug", build=lambda: optax.scale_by_sign(),
                 doc="Sign of the update.", formula="u = sign(g)")

clash = lambda: optax.identity()
not_a_rule = 42
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "testplug_mod.py").write_text(PLUGIN)
    info = tmp_path / "testplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: testplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
      [optserve.transforms]
      my_scale = testplug_mod:double_then_scale
      my_sign = testplug_mod:sign_rule
      adam = testplug_mod:clash
      broken = testplug_mod:not_a_rule
      missing = testplug_mod:does_not_exist
      """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield custom.load_entry_points()
    monkeypatch.undo()
    custom.load_entry_points()


def test_custom_transforms_load_compile_and_list(plugin, caplog):
    assert sorted(plugin) == ["my_scale", "my_sign"]
    c = compile_spec({"chain": [{"my_scale": {"step_size": 3.0, "tunable": ["step_size"]}}, "my_sign"]}, ["w"])
    p = {"w": jnp.asarray([0.5, -2.0])}
    state = c.init(p)
    u, _ = c.update(p, state, p)
    np.testing.assert_allclose(np.asarray(u["w"]), [1.0, -1.0])
    assert c.hyperparams(state) == {"step_size": 3.0}
    rules = {r["name"]: r for r in list_rules()}
    assert rules["my_scale"]["kind"] == "custom" and rules["my_scale"]["library"] == "testplug"
    assert rules["my_scale"]["doc"] == "Scales updates by step_size (a test plugin)."
    assert [h["name"] for h in rules["my_scale"]["hyperparams"]] == ["step_size", "flip"]
    assert rules["my_sign"]["formula"] == "u = sign(g)"
    assert rules["adam"]["library"] == "optax"  # a plugin cannot shadow a built-in
    with pytest.raises(SpecError, match=r"my_scale\.flip: expected true or false, got 1"):
        compile_spec({"my_scale": {"flip": 1}}, ["w"])


def test_no_plugin_no_custom_rule():
    with pytest.raises(SpecError, match='unknown rule "my_scale"'):
        compile_spec("my_scale", ["w"])


# ---------------------------------------------------------------- the reference page and jit


def test_docs_page_is_current():
    with open(os.path.join(ROOT, "docs", "optimizers.md"), encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == docs.render(), (
        "docs/optimizers.md is stale: run `python -m optserve.server.spec.docs > docs/optimizers.md`"
    )


def test_every_rule_is_documented():
    page = docs.render()
    for rule in list_rules():
        if rule["kind"] != "custom":
            assert f"### `{rule['name']}`" in page
            assert rule["doc"], rule["name"]


def test_update_jits_with_donation():
    c = compile_spec(
        {
            "chain": [
                {"clip_by_global_norm": {"max_norm": 1.0}},
                {"adamw": {"learning_rate": 1e-3, "tunable": ["learning_rate"]}},
            ]
        },
        ["a", "b"],
    )
    params = {"a": jnp.ones((4,)), "b": jnp.ones((2, 2))}

    def step(params, state, grads):
        updates, state = c.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jstep = jax.jit(step, donate_argnums=(0, 1))
    state = c.init(params)
    for _ in range(3):
        params, state = jstep(params, state, {"a": jnp.ones((4,)), "b": jnp.ones((2, 2))})
    state = c.set_hyperparams(state, {"learning_rate": 0.0})
    before = np.asarray(params["a"]).copy()
    params, state = jstep(params, state, {"a": jnp.ones((4,)), "b": jnp.ones((2, 2))})
    np.testing.assert_array_equal(np.asarray(params["a"]), before)
    assert jstep._cache_size() == 1  # set_hyperparams did not recompile
