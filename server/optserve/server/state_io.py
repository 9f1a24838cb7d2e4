"""A model's complete state on the host, and its safetensors form (checkpoints, download, upload).

`capture(model)` (called under the model lock) takes a consistent snapshot as fresh device copies,
so the lock is held only while the copies are dispatched and later updates, which donate their
buffers, cannot touch it; `DeviceSnapshot.to_host()` (outside the lock) turns it into a
`HostState` of numpy arrays. `install(model, state)` (under the lock) replaces a model's state by a
`HostState` after validating all of it, so a bad state changes nothing.

Tensor keys (README, "Checkpoint format"):
- `params/<leaf path>`: parameters, e.g. `params/encoder/layers/0/kernel`;
- `opt/<state path>`: optimizer-state leaves, the state path being the `/`-joined keys of the leaf
  in the optimizer-state pytree, e.g. `opt/count`, `opt/inner_state/0/mu/encoder/layers/0/kernel`,
  `opt/hyperparams/learning_rate`;
- `ema/<state path>`: leaves of the parameter-EMA state (the model attribute `EMA_ATTR`), when the
  model keeps one, keyed like the optimizer state, e.g. `ema/count`, `ema/ema/<leaf path>`.

Checkpoint directories store each group in its own file without the group prefix
(`params.safetensors`, `opt_state.safetensors`, `ema.safetensors`); a downloaded model is one file
with the prefixes, and its `__metadata__` holds the manifest fields as JSON strings.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from optserve.client import codec
from optserve.client.codec import LeafSpec
from optserve.server.errors import InvalidArgument
from optserve.server.settings import ModelSettings
from optserve.v1 import optserve_pb2 as pb

FORMAT = "optserve-state"
FORMAT_VERSION = 1
MAX_STEP = 2**53  # steps must stay exact in JSON (and in JavaScript readers of the manifest)
GROUPS = ("params", "opt", "ema")
EMA_ATTR = "ema_state"  # the Model attribute holding the parameter-EMA pytree (None: no EMA)

# safetensors dtype names <-> numpy names (codec.DTYPES)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


class StateError(ValueError):
    """A state file or checkpoint that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class HostState:
    """Everything that makes a model continue exactly where it left off, as host data."""

    name: str
    step: int
    schema: list[LeafSpec]
    spec: Any
    settings: ModelSettings
    params: dict[str, np.ndarray]
    opt: dict[str, np.ndarray]  # state path -> leaf, in the optimizer state's leaf order
    ema: dict[str, np.ndarray] | None  # state path -> leaf of the EMA state, in leaf order
    hyperparams: dict[str, float]
    workers: dict[str, dict]  # worker_id -> WorkerRecord fields (JSON-able, replies encoded)

    def manifest(self) -> dict:
        """The JSON-able description (everything but the tensors)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "step": self.step,
            "schema": [{"path": l.path, "dtype": l.dtype, "shape": list(l.shape)} for l in self.schema],
            "spec": self.spec,
            "settings": self.settings.to_json(),
            "hyperparams": self.hyperparams,
            "workers": self.workers,
            "opt_keys": list(self.opt),
            "ema_keys": None if self.ema is None else list(self.ema),
        }

    def tensor_groups(self) -> dict[str, dict[str, np.ndarray]]:
        groups = {"params": self.params, "opt": self.opt}
        if self.ema is not None:
            groups["ema"] = self.ema
        return groups

    def nbytes(self) -> int:
        return sum(a.nbytes for g in self.tensor_groups().values() for a in g.values())


# ---------------------------------------------------------------------------------------------
# Model <-> host state


def _key_part(k: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def state_paths(tree: Any, what: str) -> list[str]:
    """The `/`-joined key path of every leaf of a pytree, in leaf order (unique)."""
    paths = ["/".join(_key_part(k) for k in path) for path, _ in jax.tree.flatten_with_path(tree)[0]]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise StateError(f"{what}: two optimizer-state leaves share the key {dup!r}")
    return paths


def _encode_record_value(value: Any) -> Any:
    if hasattr(value, "SerializeToString"):  # the remembered reply of a worker's last push
        return {"proto": type(value).__name__, "b64": base64.b64encode(value.SerializeToString()).decode()}
    return value


def _decode_record_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"proto", "b64"}:
        cls = getattr(pb, value["proto"], None)
        if cls is None:
            raise StateError(f"worker record: unknown message type {value['proto']!r}")
        return cls.FromString(base64.b64decode(value["b64"]))
    return value


@dataclasses.dataclass
class DeviceSnapshot:
    """Device copies of a model's state plus its host-side bookkeeping, taken under the lock."""

    model: Any
    step: int
    params: dict[str, jax.Array]
    opt_state: Any
    ema: Any
    workers: dict[str, dict]

    def to_host(self) -> HostState:
        """Waits for the copies and views them as numpy (zero copy on CPU; a transfer on GPUs)."""
        m = self.model
        opt_leaves = jax.tree.leaves(self.opt_state)
        opt = dict(zip(state_paths(self.opt_state, f"model {m.name!r}"), (np.asarray(x) for x in opt_leaves)))
        ema = None
        if self.ema is not None:
            ema = dict(zip(state_paths(self.ema, f"model {m.name!r}"), (np.asarray(x) for x in jax.tree.leaves(self.ema))))
        return HostState(
            name=m.name, step=self.step, schema=list(m.schema), spec=m.compiled.spec, settings=m.settings,
            params={k: np.asarray(v) for k, v in self.params.items()}, opt=opt, ema=ema,
            hyperparams=m.compiled.hyperparams(self.opt_state), workers=self.workers,
        )  # fmt: skip


def capture(model: Any) -> DeviceSnapshot:
    """Snapshot of `model`; the caller holds the model lock.

    `device_put(may_alias=False)` dispatches fresh device copies and returns at once: the lock is
    held for the dispatch only, and the next update (which donates the live buffers) is ordered
    after the copies by the runtime. Host views of the live buffers would be unsafe: on CPU
    `np.asarray` aliases them and a donated update overwrites them.
    """
    ema = getattr(model, EMA_ATTR, None)
    params, opt_state, ema = jax.device_put((model.params, model.opt_state, ema), may_alias=False)
    workers = {
        w: {f.name: _encode_record_value(getattr(r, f.name)) for f in dataclasses.fields(r)}
        for w, r in model.workers.items()
    }
    return DeviceSnapshot(model, model.step, params, opt_state, ema, workers)


def check_compatible(model: Any, state: HostState) -> None:
    """A state can replace a model's only if schema, spec and settings are the model's."""
    what = f"model {model.name!r}"
    if list(state.schema) != list(model.schema):
        raise StateError(f"{what}: the checkpoint's schema differs from the model's (was the model re-created?)")
    if json.dumps(state.spec, sort_keys=True) != json.dumps(model.compiled.spec, sort_keys=True):
        raise StateError(f"{what}: the checkpoint's optimizer spec differs from the model's")
    if state.settings != model.settings:
        raise StateError(f"{what}: the checkpoint's settings differ from the model's")


def prepare(model: Any, state: HostState) -> dict:
    """Validates `state` against `model` and puts it on the device; touches nothing of the model."""
    check_compatible(model, state)
    what = f"model {model.name!r}"
    opt_state = _tree_from(what, "optimizer state", opt_state_templates(model), state.opt, model.device)
    _check_leaves(what, "params", model.schema, state.params)
    ema_template = getattr(model, EMA_ATTR, None)
    if (state.ema is None) != (ema_template is None):
        has = "holds a parameter EMA but the model keeps none" if ema_template is None else "holds no parameter EMA but the model keeps one"
        raise StateError(f"{what}: the state {has}")
    ema = None if ema_template is None else _tree_from(what, "EMA state", (ema_template,), state.ema, model.device)
    from optserve.server.model import WorkerRecord

    try:
        workers = {w: WorkerRecord(**{k: _decode_record_value(v) for k, v in r.items()}) for w, r in state.workers.items()}
    except (TypeError, ValueError) as e:
        raise StateError(f"{what}: worker records: {e}") from None
    dev = model.device
    return {
        "step": state.step,
        "params": {k: jax.device_put(own(state.params[k]), dev) for k in model.schema_map},
        "opt_state": opt_state,
        "ema": ema,
        "workers": workers,
    }


def install(model: Any, prepared: dict) -> None:
    """Replaces the model's state by a `prepare`d one; the caller holds the model lock."""
    from optserve.server.model import Counters

    model.params = prepared["params"]
    model.opt_state = prepared["opt_state"]
    if prepared["ema"] is not None:
        setattr(model, EMA_ATTR, prepared["ema"])
    model.step = prepared["step"]
    model.workers = prepared["workers"]
    model.counters = Counters()  # counters count since creation or restore
    model._changed.notify_all()


def create_model(store: Any, name: str, state: HostState) -> Any:
    """Creates model `name` from a HostState (limits checked first, as for CreateModel); it appears
    in the store only once its whole state is installed."""
    from optserve.server.datapath import schema_bytes
    from optserve.server.model import Model
    from optserve.server.store import compile_for, state_bytes_for

    declared = schema_bytes(state.schema)
    store.check_can_create(name, declared)
    compiled = compile_for(name, state.spec, state.schema)
    store.reserve(name, declared + state_bytes_for(compiled, state.schema))
    try:
        model = Model(name, state.schema, {k: own(v) for k, v in state.params.items()}, compiled, state.settings,
                      store.device)  # fmt: skip
        try:
            prepared = prepare(model, state)
        except StateError as e:
            raise InvalidArgument(str(e)) from None
        model.install_checkpoint(prepared)
        store.add(model)
    finally:
        store.release(name)
    return model


def own(a: np.ndarray) -> np.ndarray:
    # A private, aligned, writable buffer: on CPU the device array aliases it and donation writes it.
    out = codec.aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def opt_state_templates(model: Any) -> tuple[Any, Any]:
    """Shapes of the model's optimizer state after init and after one update (no allocation).

    Both are valid in a checkpoint: some rules change a leaf's dtype at the first update (adam's
    moments of a bfloat16 parameter become float32)."""
    shapes = {l.path: jax.ShapeDtypeStruct(l.shape, codec.DTYPES[l.dtype]) for l in model.schema if l.path in model.trainable}
    init = jax.eval_shape(model.compiled.init, shapes)
    after = jax.eval_shape(lambda s, g: model.compiled.update(g, s, g)[1], init, shapes)
    return init, after


def _tree_from(what: str, group: str, templates: tuple, arrays: Mapping[str, np.ndarray], device: Any) -> Any:
    """A device pytree shaped like `templates[0]` from arrays keyed by state path; every leaf must be
    present with the shape of the templates and the dtype of one of them, and nothing else."""
    paths = state_paths(templates[0], what)
    missing = [p for p in paths if p not in arrays]
    extra = [p for p in arrays if p not in set(paths)]
    if missing or extra:
        raise StateError(f"{what}: {group}: " + (f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}"))
    alternatives = [jax.tree.leaves(t) for t in templates if jax.tree.structure(t) == jax.tree.structure(templates[0])]
    for i, p in enumerate(paths):
        a, t = arrays[p], alternatives[0][i]
        if tuple(a.shape) != tuple(t.shape) or all(a.dtype != alt[i].dtype for alt in alternatives):
            raise StateError(f"{what}: {group} leaf {p!r}: expected {t.dtype}{list(t.shape)}, got {a.dtype}{list(a.shape)}")
    return jax.tree.unflatten(jax.tree.structure(templates[0]), [jax.device_put(own(arrays[p]), device) for p in paths])


def _check_leaves(what: str, group: str, schema: list[LeafSpec], arrays: Mapping[str, np.ndarray]) -> None:
    if set(arrays) != {l.path for l in schema}:
        missing = [l.path for l in schema if l.path not in arrays]
        extra = [p for p in arrays if p not in {l.path for l in schema}]
        raise StateError(f"{what}: {group}: " + (f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}"))
    for l in schema:
        a = arrays[l.path]
        if a.dtype.name != l.dtype or tuple(a.shape) != tuple(l.shape):
            raise StateError(f"{what}: {group} leaf {l.path!r}: expected {l.dtype}{list(l.shape)}, got {a.dtype.name}{list(a.shape)}")


# ---------------------------------------------------------------------------------------------
# Manifest <-> host state


def from_manifest(manifest: Mapping, groups: Mapping[str, Mapping[str, np.ndarray]], where: str) -> HostState:
    """A HostState from a manifest and its tensor groups; StateError names `where` and the field."""
    try:
        if manifest.get("format") != FORMAT:
            raise StateError(f"{where}: not an optserve state (format {manifest.get('format')!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StateError(f"{where}: unsupported format_version {manifest.get('format_version')!r}")
        step = manifest["step"]
        if not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise StateError(f"{where}: step {step!r} is not an integer in [0, 2**53]")
        schema = [LeafSpec(l["path"], l["dtype"], tuple(int(d) for d in l["shape"])) for l in manifest["schema"]]
        settings = ModelSettings.from_json(manifest["settings"])
        opt = groups.get("opt", {})
        order = manifest.get("opt_keys", list(opt))
        if set(order) != set(opt):
            raise StateError(f"{where}: opt_keys do not match the optimizer-state tensors")
        ema_keys = manifest.get("ema_keys")
        ema = None
        if ema_keys is not None:
            found = groups.get("ema", {})
            if set(ema_keys) != set(found):
                raise StateError(f"{where}: ema_keys do not match the EMA tensors")
            ema = {k: found[k] for k in ema_keys}
        return HostState(
            name=manifest["model"], step=step, schema=schema, spec=manifest["spec"], settings=settings,
            params=dict(groups.get("params", {})), opt={k: opt[k] for k in order}, ema=ema,
            hyperparams={k: float(v) for k, v in manifest.get("hyperparams", {}).items()},
            workers=dict(manifest.get("workers", {})),
        )  # fmt: skip
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# safetensors


def to_specs(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-contiguous arrays (what safetensors' writer expects; it byte-swaps big-endian ones itself).
    Not np.ascontiguousarray: it turns 0-d arrays (step counts) into 1-d ones."""
    return {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in tensors.items()}


def parse_safetensors(data: bytes | bytearray | memoryview, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file held in memory, validated strictly.

    The tensors are views into `data`. A reader of our own because safetensors' numpy reader has no
    bfloat16 (numpy lacks it; ml_dtypes provides it).
    """
    view = memoryview(data)
    if len(view) < 8:
        raise StateError(f"{where}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8 or n > 100 << 20:
        raise StateError(f"{where}: truncated or malformed safetensors header (length {n})")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{where}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise StateError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = view[8 + n :]
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = codec.DTYPES[_ST_DTYPES[info["dtype"]]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StateError(f"{where}: tensor {key!r}: malformed entry {info!r}") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body) or end - begin != codec.leaf_nbytes(dtype, shape):
            raise StateError(f"{where}: tensor {key!r}: data_offsets {begin}..{end} do not fit its shape or the file")
        spans.append((begin, end, key))
        tensors[key] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    spans.sort()
    covered = 0
    for begin, end, key in spans:
        if begin != covered:
            raise StateError(f"{where}: tensor {key!r}: overlapping or gapped data_offsets")
        covered = end
    if covered != len(body):
        raise StateError(f"{where}: {len(body) - covered} trailing bytes after the last tensor")
    return tensors, metadata


def sha256_file(path: str) -> tuple[str, int]:
    """(hex digest, size) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# ---------------------------------------------------------------------------------------------
# One-file form (Download / Upload)


def encode_file(state: HostState) -> bytes:
    """The model's complete state as one safetensors file (bytes)."""
    import safetensors.numpy

    tensors = {f"{g}/{k}": v for g, group in state.tensor_groups().items() for k, v in group.items()}
    metadata = {k: json.dumps(v) for k, v in state.manifest().items()}
    return safetensors.numpy.save(to_specs(tensors), metadata=metadata)


def decode_file(data: bytes | bytearray | memoryview, where: str = "uploaded file") -> HostState:
    """A HostState from a file written by `encode_file` (validated; StateError names the problem)."""
    tensors, metadata = parse_safetensors(data, where)
    try:
        manifest = {k: json.loads(v) for k, v in metadata.items()}
    except (TypeError, json.JSONDecodeError) as e:
        raise StateError(f"{where}: __metadata__ values must be JSON strings ({e})") from None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, a in tensors.items():
        group, _, rest = key.partition("/")
        if group not in GROUPS or not rest:
            raise StateError(f"{where}: tensor {key!r}: expected a params/, opt/ or ema/ key")
        groups.setdefault(group, {})[rest] = a
    return from_manifest(manifest, groups, where)
