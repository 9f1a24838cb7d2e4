"""The state and checkpoint-file layers without a server: a Model built from core, its state
captured, written in both stored forms (the one-file form and a checkpoint directory), read back,
validated and installed into another model, bitwise.

The end-to-end versions (through the service, restarts, crashes) are test_checkpoints_*.py.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from optserve.server.checkpoint.files import (
    CheckpointInfo,
    committed,
    info_of,
    next_name,
    read_checkpoint,
    write_checkpoint,
)
from optserve.server.core.model import Model
from optserve.server.core.settings import ModelSettings
from optserve.server.state import model_state
from optserve.server.state.errors import StateError
from optserve.server.state.manifest import from_manifest, to_manifest
from optserve.server.state.model_state import HostState
from optserve.server.state.safetensors_io import parse_safetensors, to_specs
from optserve.server.state.state_file import decode_file, encode_file
from optserve.wire.dtypes import LeafSpec
from tests.core_helpers import make_model, push

SPEC = {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}
SCHEMA = [
    LeafSpec("w", "float32", (3, 2)),
    LeafSpec("emb", "bfloat16", (4,)),  # adam's moments of a bfloat16 leaf become float32 at the first update
    LeafSpec("table", "int32", (2,)),  # not trainable: carried unchanged
]
SETTINGS = ModelSettings(ema_decay=0.9)  # with a parameter EMA, so all three tensor groups are exercised


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "emb": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
        "table": np.arange(2, dtype=np.int32) + seed,
    }


def _model(seed: int) -> Model:
    model = make_model(SETTINGS, SPEC, _params(seed), name="m")
    assert list(model.schema) == SCHEMA
    return model


def _push(model: Model, seed: int, *, worker_id: str, seq: int) -> None:
    rng = np.random.default_rng(seed)
    grads = {leaf.path: rng.standard_normal(leaf.shape).astype(leaf.dtype) for leaf in SCHEMA}
    push(model, grads, base_step=model.step, worker_id=worker_id, seq=seq)


@pytest.fixture(scope="module")
def trained() -> tuple[Model, HostState]:
    """A model two updates and one hyperparameter change in (two workers' records), and its state."""
    model = _model(0)
    _push(model, 1, worker_id="a", seq=1)
    model.set_hyperparams({"learning_rate": 0.005})
    _push(model, 2, worker_id="b", seq=7)
    return model, model_state.capture(model).to_host()


def _assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def _assert_same_state(a: HostState, b: HostState) -> None:
    assert (a.name, a.step, a.schema, a.spec, a.settings, a.hyperparams) == (
        b.name,
        b.step,
        b.schema,
        b.spec,
        b.settings,
        b.hyperparams,
    )
    _assert_same_tensors(a.params, b.params, ordered=False)  # keyed by leaf path
    _assert_same_tensors(a.opt, b.opt)  # in the optimizer state's leaf order
    assert (a.ema is None) == (b.ema is None)
    if a.ema is not None:
        _assert_same_tensors(a.ema, b.ema)
    assert a.workers == b.workers  # last_seq, last_base_step and the kept replies


def _via_manifest(state: HostState) -> HostState:
    """The checkpoint-directory path without the directory: each group through safetensors, the
    manifest through JSON-able values."""
    groups = {}
    for group, tensors in state.tensor_groups().items():
        groups[group] = parse_safetensors(safetensors.numpy.save(to_specs(tensors)), group)[0]
    return from_manifest(to_manifest(state), groups, "test")


@pytest.mark.parametrize("form", ["manifest+safetensors", "one file"])
def test_captured_state_installs_bitwise_into_a_fresh_model(trained, form):
    model, state = trained
    assert state.step == 2 and set(state.workers) == {"a", "b"} and state.ema is not None
    assert state.opt["inner_state/0/mu/emb"].dtype == np.float32  # the after-update template of a bfloat16 leaf
    back = _via_manifest(state) if form == "manifest+safetensors" else decode_file(encode_file(state))
    _assert_same_state(state, back)

    fresh = _model(5)  # other parameters, and a history of its own that the install must replace
    _push(fresh, 4, worker_id="z", seq=3)
    version = fresh.replace_state(model_state.prepare(fresh, back))
    assert version == fresh.state_version
    _assert_same_state(model_state.capture(fresh).to_host(), state)
    assert fresh.counters().pushes_applied == 0  # counters count since creation or restore

    # ... and it continues exactly where the captured model did
    _push(model, 3, worker_id="a", seq=2)
    _push(fresh, 3, worker_id="a", seq=2)
    _assert_same_state(model_state.capture(fresh).to_host(), model_state.capture(model).to_host())


def test_prepare_refuses_a_state_that_does_not_fit_and_changes_nothing(trained):
    _, state = trained
    target = _model(5)
    before = model_state.capture(target).to_host()
    wrong_shape = HostState(**{**vars(state), "opt": {**state.opt, "inner_state/0/mu/w": np.zeros((2, 3), np.float32)}})
    with pytest.raises(
        StateError, match=r"model 'm': optimizer state leaf 'inner_state/0/mu/w': expected float32\[3, 2\]"
    ):
        model_state.prepare(target, wrong_shape)
    other_settings = HostState(**{**vars(state), "settings": ModelSettings()})
    with pytest.raises(StateError, match="settings differ"):
        model_state.prepare(target, other_settings)
    _assert_same_state(model_state.capture(target).to_host(), before)


def test_checkpoint_directory_round_trip(trained, tmp_path):
    _, state = trained
    info = write_checkpoint(str(tmp_path), state)
    assert isinstance(info, CheckpointInfo) and (info.model, info.step, info.name) == ("m", 2, "step_2")
    step_dir = tmp_path / "step_2"
    assert info.bytes == sum(os.path.getsize(step_dir / f) for f in os.listdir(step_dir))
    assert sorted(os.listdir(tmp_path)) == ["step_2"]  # committed: no temporary directory left
    _assert_same_state(read_checkpoint(str(step_dir), "m"), state)

    # a second state of the same step sorts after the first; listing reads what was written
    second = write_checkpoint(str(tmp_path), state, next_name(str(tmp_path), state.step))
    assert second.name == "step_2.1"
    assert [c.name for c in committed(str(tmp_path))] == ["step_2.1", "step_2"]
    assert info_of("m", committed(str(tmp_path))[1]) == info


def test_read_checkpoint_refuses_a_damaged_file_naming_it(trained, tmp_path):
    _, state = trained
    write_checkpoint(str(tmp_path), state)
    victim = tmp_path / "step_2" / "opt_state.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(StateError, match=r"opt_state\.safetensors: sha256 mismatch"):
        read_checkpoint(str(tmp_path / "step_2"), "m")
    data[-1] ^= 1  # repaired: now the directory is fine, but not another model's
    victim.write_bytes(bytes(data))
    with pytest.raises(StateError, match="describes model 'm' step 2, not this directory"):
        read_checkpoint(str(tmp_path / "step_2"), "other")
