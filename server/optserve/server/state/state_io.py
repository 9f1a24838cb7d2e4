"""A model's complete state on the host, and its safetensors form (checkpoints, download, upload).

`capture(model)` takes a consistent snapshot as fresh device copies (`Model.capture_state`, which
holds the model lock only while the copies are dispatched; later updates, which donate their
buffers, cannot touch it); `DeviceSnapshot.to_host()` turns it into a `HostState` of numpy arrays.
`prepare(model, state)` validates a `HostState` against a model and puts it on the device, touching
nothing of the model; `Model.replace_state` installs the result, so a bad state changes nothing.

Tensor keys (README, "Checkpoint format"):
- `params/<leaf path>`: parameters, e.g. `params/encoder/layers/0/kernel`;
- `opt/<state path>`: optimizer-state leaves, the state path being the `/`-joined keys of the leaf
  in the optimizer-state pytree, e.g. `opt/count`, `opt/inner_state/0/mu/encoder/layers/0/kernel`,
  `opt/hyperparams/learning_rate`;
- `ema/<state path>`: leaves of the parameter-EMA state, when the model keeps one, keyed like the
  optimizer state, e.g. `ema/count`, `ema/ema/<leaf path>`.

Checkpoint directories store each group in its own file without the group prefix
(`params.safetensors`, `opt_state.safetensors`, `ema.safetensors`); a downloaded model is one file
with the prefixes, and its `__metadata__` holds the manifest fields as JSON strings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from optserve.wire import codec
from optserve.wire.codec import LeafSpec
from optserve.server.core import admission, schema as schemas
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.model import Model, ModelState
from optserve.server.core.settings import ModelSettings
from optserve.server.core.step import MAX_STEP
from optserve.server.core.store import ModelStore
from optserve.server.core.workers import WorkerRecord
from optserve.server.spec import SpecError, check_spec_depth
from optserve.server.state.errors import StateError
from optserve.server.state.worker_records import decode_worker, encode_worker

FORMAT = "optserve-state"
FORMAT_VERSION = 1
# MAX_STEP (core/step.py): uploads, checkpoints and restores accept steps in [0, MAX_STEP].
GROUPS = ("params", "opt", "ema")

# safetensors dtype names <-> numpy names (codec.DTYPES)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


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
    workers: dict[str, WorkerRecord]  # worker_id -> its record (validated; JSON form: encode_worker)

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
            "workers": {w: encode_worker(r) for w, r in self.workers.items()},
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


def _decode_workers(data: Any, where: str, step: int) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise StateError(f"{where}: workers: expected an object, got {_show(data)}")
    workers = {}
    for worker_id, record in data.items():
        # any id a push can carry (a protobuf string: valid UTF-8, so no lone surrogates; GetModel
        # sends it back the same way)
        if not worker_id or not _utf8(worker_id):
            raise StateError(f"{where}: workers: invalid worker id {_show(worker_id)}")
        workers[worker_id] = decode_worker(record, f"{where}: workers[{worker_id!r}]", step)
    return workers


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass
class DeviceSnapshot:
    """Device copies of a model's state plus its host-side bookkeeping, taken under the lock."""

    model: Model
    step: int
    params: dict[str, jax.Array]
    opt_state: Any
    ema: Any
    workers: dict[str, WorkerRecord]  # worker_id -> a copy of its record

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


def capture(model: Model) -> DeviceSnapshot:
    """A consistent snapshot of `model` (Model.capture_state: device copies, dispatched under its lock)."""
    return capture_versioned(model)[0]


def capture_versioned(model: Model) -> tuple[DeviceSnapshot, int]:
    """`capture(model)` and the model's `state_version` it holds, taken together under the lock."""
    state, version = model.capture_state()
    return DeviceSnapshot(model, state.step, state.params, state.opt_state, state.ema_state, state.workers), version


def check_compatible(model: Model, state: HostState) -> None:
    """A state can replace a model's only if schema, spec and settings are the model's."""
    what = f"model {model.name!r}"
    if list(state.schema) != list(model.schema):
        raise StateError(f"{what}: the checkpoint's schema differs from the model's (was the model re-created?)")
    if json.dumps(state.spec, sort_keys=True) != json.dumps(model.compiled.spec, sort_keys=True):
        raise StateError(f"{what}: the checkpoint's optimizer spec differs from the model's")
    if state.settings != model.settings:
        raise StateError(f"{what}: the checkpoint's settings differ from the model's")


def prepare(model: Model, state: HostState) -> ModelState:
    """Validates `state` against `model` and puts it on the device, for `Model.replace_state`;
    touches nothing of the model."""
    check_compatible(model, state)
    what = f"model {model.name!r}"
    opt_state = _tree_from(what, "optimizer state", opt_state_templates(model), state.opt, model.device)
    _check_leaves(what, "params", model.schema, state.params)
    ema_template = model.ema_template()
    if (state.ema is None) != (ema_template is None):
        has = "holds a parameter EMA but the model keeps none" if ema_template is None else "holds no parameter EMA but the model keeps one"
        raise StateError(f"{what}: the state {has}")
    ema = None if ema_template is None else _tree_from(what, "EMA state", (ema_template,), state.ema, model.device)
    _check_hyperparams_state(what, state.opt)
    workers = {w: r.copy() for w, r in state.workers.items()}
    dev = model.device
    params = {k: jax.device_put(own(state.params[k]), dev) for k in model.schema_map}
    return ModelState(step=state.step, params=params, opt_state=opt_state, ema_state=ema, workers=workers)


def _check_hyperparams_state(what: str, opt: Mapping[str, np.ndarray]) -> None:
    """Hyperparameters held in the optimizer state (tunable and injected ones) must be finite: no
    client could have set anything else (CreateModel and SetHyperparams validate them)."""
    for path, a in opt.items():
        if path.startswith("hyperparams/") and a.dtype.name in codec.FLOAT_DTYPES \
                and not np.isfinite(a.astype(np.float64)).all():  # fmt: skip
            raise StateError(f"{what}: optimizer state leaf {path!r}: hyperparameter is not finite ({a})")


def admit_state(store: ModelStore, name: str, state: HostState) -> Model:
    """Creates model `name` from a validated HostState (`from_manifest`) through core/admission.py,
    as CreateModel creates one: limits, spec and tensors checked before anything is allocated for
    it; INVALID_ARGUMENT for a state that does not fit together. The model appears in the store only
    once its whole state is installed; whatever fails, nothing remains."""

    def check_params() -> None:
        try:
            _check_leaves(f"model {name!r}", "params", state.schema, state.params)
        except StateError as e:
            raise InvalidArgument(str(e)) from None

    def restore(model: Model) -> ModelState:
        try:
            return prepare(model, state)
        except StateError as e:
            raise InvalidArgument(str(e)) from None

    with admission.admit(store, name, state.schema, state.spec, state.settings, validate=check_params) as admitted:
        return admitted.create({k: own(v) for k, v in state.params.items()}, restore=restore)


def own(a: np.ndarray) -> np.ndarray:
    # A private, aligned, writable buffer: on CPU the device array aliases it and donation writes it.
    out = codec.aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def opt_state_templates(model: Model) -> tuple[Any, Any]:
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


_REQUIRED_KEYS = ("model", "step", "schema", "spec", "settings", "hyperparams", "workers", "opt_keys", "ema_keys")


def from_manifest(manifest: Any, groups: Mapping[str, Mapping[str, np.ndarray]], where: str,
                  model: str | None = None) -> HostState:  # fmt: skip
    """A HostState from a manifest and its tensor groups, validated as strictly as CreateModel
    validates a client's request (the same schema, settings and spec-depth checks, typed worker
    records); StateError names `where`, the model (`model`, else the manifest's name) and the field.
    Tensors are checked against the model later (`prepare`); the spec is compiled by
    `admit_state`. Unknown keys are ignored (a checkpoint's manifest adds "files" and
    "created_unix")."""
    if not isinstance(manifest, dict):
        raise StateError(f"{where}: the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise StateError(f"{where}: not an optserve state (format {_show(manifest.get('format'))})")
    if manifest.get("format_version") != FORMAT_VERSION or not _is_int(manifest.get("format_version")):
        raise StateError(f"{where}: unsupported format_version {_show(manifest.get('format_version'))}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise StateError(f"{where}: the manifest lacks {missing[0]!r}")
    name = manifest["model"]
    if not isinstance(name, str):
        raise StateError(f"{where}: model: expected a string, got {_show(name)}")
    step = manifest["step"]
    if not (_is_int(step) and 0 <= step <= MAX_STEP):
        raise StateError(f"{where}: step {_show(step)} is not an integer in [0, 2**53 - 1]")
    label = name if model is None else model
    try:
        schema = schemas.schema_from_json(label, manifest["schema"])
        settings = ModelSettings.from_json(manifest["settings"], label)
        check_spec_depth(manifest["spec"])
    except InvalidArgument as e:
        raise StateError(f"{where}: {e.message}") from None
    except SpecError as e:
        raise StateError(f"{where}: model {label!r}: optimizer {e}") from None
    hyperparams = manifest["hyperparams"]
    if not (isinstance(hyperparams, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in hyperparams.values())):  # fmt: skip
        raise StateError(f"{where}: hyperparams: expected an object of finite numbers, got {_show(hyperparams)}")
    workers = _decode_workers(manifest["workers"], where, step)
    opt = groups.get("opt", {})
    order = manifest["opt_keys"]
    if not (isinstance(order, list) and all(isinstance(k, str) for k in order) and len(set(order)) == len(order)):
        raise StateError(f"{where}: opt_keys: expected a list of distinct strings, got {_show(order)}")
    if set(order) != set(opt):
        raise StateError(f"{where}: opt_keys do not match the optimizer-state tensors")
    ema_keys = manifest["ema_keys"]
    ema = None
    if ema_keys is not None:
        if not (isinstance(ema_keys, list) and all(isinstance(k, str) for k in ema_keys)
                and len(set(ema_keys)) == len(ema_keys)):  # fmt: skip
            raise StateError(f"{where}: ema_keys: expected null or a list of distinct strings, got {_show(ema_keys)}")
        found = groups.get("ema", {})
        if set(ema_keys) != set(found):
            raise StateError(f"{where}: ema_keys do not match the EMA tensors")
        ema = {k: found[k] for k in ema_keys}
    elif groups.get("ema"):
        raise StateError(f"{where}: EMA tensors but no ema_keys")
    return HostState(
        name=name, step=step, schema=schema, spec=manifest["spec"], settings=settings,
        params=dict(groups.get("params", {})), opt={k: opt[k] for k in order}, ema=ema,
        hyperparams={k: float(v) for k, v in hyperparams.items()}, workers=workers,
    )  # fmt: skip


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
    header = loads_json(bytes(view[8 : 8 + n]), f"{where}: safetensors header")
    if not isinstance(header, dict):
        raise StateError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise StateError(f"{where}: safetensors __metadata__ must map names to strings")
    body = view[8 + n :]
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = codec.DTYPES[_ST_DTYPES[info["dtype"]]]
            shape, offsets = tuple(info["shape"]), tuple(info["data_offsets"])
            begin, end = offsets
        except (KeyError, TypeError, ValueError):
            raise StateError(f"{where}: tensor {key!r}: malformed entry {_show(info)}") from None
        if not all(_is_int(x) for x in shape + offsets) or len(shape) > schemas.MAX_RANK \
                or not schemas.shape_extent_ok(dtype, shape):  # fmt: skip
            raise StateError(f"{where}: tensor {key!r}: shape {_show(info['shape'])} or data_offsets "
                             f"{_show(info['data_offsets'])} out of range")  # fmt: skip
        if not 0 <= begin <= end <= len(body) or end - begin != codec.leaf_nbytes(dtype, shape):
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


def loads_json(text: str | bytes, where: str) -> Any:
    """json.loads for untrusted text: malformed, non-UTF-8 or hostilely nested JSON (RecursionError
    in the parser) is a StateError naming `where`."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise StateError(f"{where}: JSON nested too deeply") from None


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


def decode_file(data: bytes | bytearray | memoryview, where: str = "uploaded file", model: str | None = None) -> HostState:
    """A HostState from a file written by `encode_file`, validated (`from_manifest`; `model`: the
    name the model will have, for messages); StateError names the problem."""
    tensors, metadata = parse_safetensors(data, where)
    manifest = {k: loads_json(v, f"{where}: __metadata__[{k!r}]") for k, v in metadata.items()}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, a in tensors.items():
        group, _, rest = key.partition("/")
        if group not in GROUPS or not rest:
            raise StateError(f"{where}: tensor {key!r}: expected a params/, opt/ or ema/ key")
        groups.setdefault(group, {})[rest] = a
    return from_manifest(manifest, groups, where, model)
