"""A model over several shards against the same model whole, in this process, for every conformance
case (tests/test_shards_conformance.py): the shards are admitted as servers admit them
(core/admission.py with a `Shard`), each fed its part of the same pushes; their states, put side by
side, must equal the whole model's (bit for bit, or to float32 rounding where a rule reduces; noise
rules bit for bit, split leaves included). Rules a sharded model refuses (core/sharding.py) must be
refused at placement."""

from __future__ import annotations

import json

import jax
import numpy as np

from optserve.server.core import admission, sharding
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.settings import ModelSettings
from optserve.server.core.sharding import Shard
from optserve.server.core.store import ModelStore
from optserve.server.state.model_state import HostState, capture
from optserve.wire.dtypes import LeafSpec, dtype_name
from optserve.wire.shards import ShardMap
from tests.core_helpers import push
from tests.reference.data import SHAPES, make_grads, make_params

# the conformance leaves, a table split over three shards and a leaf of rows that do not divide
SHARD_SHAPES = {**SHAPES, "table": (12, 4), "rows/odd": (7, 3)}
SPLIT_BYTES = 40  # "conv" (48 bytes), "table" and "rows/odd" split; the others whole
STEPS = 3
PACKED = True  # the stores pack leaves as servers do
REDUCING = ("clip_by_global_norm", "lamb", "lars", "norm", "centralize", "trust_ratio", "fromage")
# noise rules: every shard splits the key over the whole model's leaves and draws a split leaf's noise
# whole (core/shard_noise.py), inside a fusion of its own (spec/rng.py): bit for bit, split leaves too
NOISE = ("add_noise", "noisy_sgd")
CPU = jax.devices("cpu")[0]


def settings_of(case) -> ModelSettings:
    if not hasattr(case, "settings"):
        return ModelSettings()
    return ModelSettings(ema_decay=case.settings["ema"], ema_debias=case.settings.get("ema_debias", False))


def _schema(params: dict[str, np.ndarray]) -> list[LeafSpec]:
    return [LeafSpec(k, dtype_name(v.dtype), v.shape) for k, v in params.items()]


def part_of(shard_map: ShardMap, shard: int, tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shard's leaves and rows of a tree given whole."""
    return {
        leaf.spec.path: tree[leaf.spec.path][p.start : p.stop] if leaf.split else tree[leaf.spec.path]
        for leaf, p in shard_map.pieces_of(shard)
    }


def run_whole(case) -> HostState:
    params = make_params(0, SHARD_SHAPES)
    model = admission.create_model(
        ModelStore(CPU, packed=PACKED), "m", _schema(params), case.spec, settings_of(case), params
    )
    for g in make_grads(STEPS, 1, SHARD_SHAPES):
        push(model, g)
    return _done(model, capture(model).to_host())


def run_sharded(case, shards: int = 3) -> tuple[ShardMap, list[HostState]]:
    """The case over `shards` shards; InvalidArgument when the placement is refused."""
    params = make_params(0, SHARD_SHAPES)
    schema, settings = _schema(params), settings_of(case)
    compiled = admission.compile_for("m", case.spec, schema)
    targets = [f"shard-{i}:8470" for i in range(shards)]
    shard_map = sharding.plan("m", compiled, settings, schema, targets, SPLIT_BYTES)
    store = ModelStore(CPU, packed=PACKED)
    models = []
    for i in range(shards):
        with admission.admit(
            store, f"m{i}", shard_map.shard_schema(i), case.spec, settings, shard=Shard(shard_map, i)
        ) as admitted:
            models.append(admitted.create(part_of(shard_map, i, params)))
    for g in make_grads(STEPS, 1, SHARD_SHAPES):
        # what a client sends with each push when the spec starts with clip_by_global_norm
        norm_sq = (
            sum(float(np.square(a, dtype=np.float64).sum()) for a in g.values()) if shard_map.global_norm else None
        )
        for i, m in enumerate(models):
            push(m, part_of(shard_map, i, g), global_norm_sq=norm_sq)
    return shard_map, [_done(m, capture(m).to_host()) for m in models]


def _done(model, state: HostState) -> HostState:
    """`state`, once `model` is marked deleted: its queued background compilation of the
    non-donating step, which these pushes never use, is skipped (half of each case's compile time)."""
    model.mark_deleted()
    return state


def _rows_of(shard_map: ShardMap, shard: int, key: str, shape: tuple) -> slice | None:
    """The rows of the whole model's tensor that a shard's tensor `key` holds (None: all of it):
    a state leaf follows the parameter leaf whose path ends its key."""
    for leaf, p in shard_map.pieces_of(shard):
        if (
            leaf.split
            and (key == leaf.spec.path or key.endswith("/" + leaf.spec.path))
            and shape[:1] == (p.stop - p.start,)
        ):
            return slice(p.start, p.stop)
    return None


def differences(
    shard_map: ShardMap, shards: list[HostState], whole: HostState, exact: bool, bitwise: bool = False
) -> str:
    """What differs between the shards' states, side by side, and the whole model's ("": nothing);
    `bitwise`: every bit, `exact`: but for the last bit, else to float32 rounding."""
    for group in ("params", "opt", "ema"):
        want = getattr(whole, group)
        seen: set[str] = set()
        for i, state in enumerate(shards):
            got = getattr(state, group)
            if (got is None) != (want is None):
                return f"shard {i} {group}: present on one side only"
            for key, a in (got or {}).items():
                if key not in want:
                    return f"shard {i} {group} {key}: not in the whole model's state"
                rows = _rows_of(shard_map, i, key, a.shape)
                b = want[key] if rows is None else want[key][rows]
                seen.add(key)
                if a.dtype != b.dtype or a.shape != b.shape:
                    return f"shard {i} {group} {key}: {a.dtype}{a.shape} against {b.dtype}{b.shape}"
                if bitwise:
                    if a.tobytes() != b.tobytes():
                        return f"shard {i} {group} {key}: not bit for bit the whole model's"
                    continue
                try:
                    if exact:
                        # bit for bit but for the last bit: XLA's CPU code for a leaf of another size
                        # (a shard's rows of it) may round an element differently (rmsprop centered)
                        np.testing.assert_array_max_ulp(a, b, maxulp=1)
                    else:
                        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
                except AssertionError as e:
                    return f"shard {i} {group} {key}: {str(e).strip().splitlines()[-1]}"
        missing = set(want or {}) - seen
        if missing:
            return f"{group}: no shard holds {sorted(missing)[0]!r}"
    for i, state in enumerate(shards):
        if state.hyperparams != whole.hyperparams or state.step != whole.step:
            return f"shard {i}: hyperparams or step differ"
    return ""


def compare(case, shards: int = 3) -> dict:
    """{"id", "refused": the refusal's message or "", "diff": what differs or ""}."""
    spec = json.dumps(case.spec).lower()
    try:
        shard_map, states = run_sharded(case, shards)
    except InvalidArgument as e:
        return {"id": case.id, "refused": e.message, "diff": ""}
    exact = not any(word in spec for word in REDUCING)
    bitwise = exact and any(word in spec for word in NOISE)
    return {"id": case.id, "refused": "", "diff": differences(shard_map, states, run_whole(case), exact, bitwise)}
