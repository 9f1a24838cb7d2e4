"""Resharding: the states of a sharded model's shards gathered into the whole model's state, and a
whole state split over a shard map (docs/design.md, "Shards"; README.md, "Sharded models").

A *state* here is what a downloaded file holds (README.md, "Checkpoint format"): tensors keyed
`params/<leaf path>`, `opt/<state path>` and `ema/<state path>`, and the manifest's fields as plain
JSON data. A shard's state is an ordinary model's state over its part of the leaves (its schema is
the map's part for it) plus `manifest["shard"] = {"index": i, "map": <ShardMap.to_json()>}`; a whole
model's has no "shard". Client and server share this module (numpy and the standard library only):
`ShardedModel.download` gathers, `Client.upload(path, shards=K)` splits, and `optserve reshard`
does both on checkpoint directories. Nothing here reads or writes files: states in, states out.

**Which state tensors follow which leaf.** A state path follows leaf L when it ends with "/L" and
its shape is the shape of L's piece (on a shard: the rows it holds; in a whole state: the whole
leaf); of several such leaves the longest path is taken (`inner_state/0/mu/block/b` follows
`block/b`, not `b`). A tensor that follows a leaf goes where the leaf goes: to the shard holding it,
or, for a split leaf, cut by rows like it (split) and concatenated by rows in piece order (gather).
Every other tensor (counts, hyperparameters, the EMA's decay) is *replicated*: every shard holds a
copy, and a gather requires the copies to be equal bit for bit. A state path equal to a leaf path
follows nothing: the top level of a state holds counts and hyperparameters (`count`, `decay`), which
a scalar leaf of that name would otherwise capture, and no rule a sharded model accepts keeps a
parameter-shaped state there. Names and shapes cannot tell a scalar count from the state of a
scalar leaf whose path ends the count's (`inner_state/0/count` and a leaf `count`): when gathering,
presence settles it (a tensor found on every shard is replicated, whatever it would follow on one of
them); when splitting, a scalar follows a scalar leaf only if the same prefix also holds the state of
another leaf (`inner_state/0/mu/count` beside `inner_state/0/mu/w`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optserve.wire.dtypes import LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import ShardedLeaf, ShardMap

# A state: tensors by file key ("params/w", "opt/count", ...) and the manifest's fields.
State = tuple[dict[str, np.ndarray], dict[str, Any]]

GROUPS = ("params", "opt", "ema")
KEY_LISTS = {"opt": "opt_keys", "ema": "ema_keys"}  # the manifest field listing each state group's keys
# Fields every shard of one model at one step has alike (the worker records are compared by seq).
COMMON_FIELDS = ("format", "format_version", "model", "step", "spec", "settings", "hyperparams")


def shard_of(manifest: Mapping[str, Any], where: str = "state") -> tuple[int, ShardMap] | None:
    """(index, map) of a shard's state; None for a whole model's. WireError when malformed."""
    entry = manifest.get("shard")
    if entry is None:
        return None
    if not isinstance(entry, dict) or type(entry.get("index")) is not int:
        raise WireError(f"{where}: shard: expected an object with an integer index")
    shard_map = ShardMap.from_json(entry.get("map"), f"{where}: shard.map")
    if not 0 <= entry["index"] < shard_map.shards:
        raise WireError(f"{where}: shard.index {entry['index']} is not one of the map's {shard_map.shards} shards")
    return entry["index"], shard_map


# -- gather ---------------------------------------------------------------------------------------


def gather(states: Sequence[State], labels: Sequence[str] | None = None) -> State:
    """The whole model's state from the states of all its shards (in any order; `labels` name them
    in messages, default "file <i>"). A single whole state is returned as it is. WireError naming
    the field, tensor and shards when they are not the shards of one placement at one step."""
    if not states:
        raise WireError("no state to gather")
    labels = [f"file {i}" for i in range(len(states))] if labels is None else list(labels)
    shards = [shard_of(m, label) for (_, m), label in zip(states, labels, strict=True)]
    wholes = [label for s, label in zip(shards, labels, strict=True) if s is None]
    if wholes:
        if len(states) > 1:
            raise WireError(f"{wholes[0]} holds a whole model, not a shard: give the states of one sharded model only")
        tensors, manifest = states[0]
        _check_state(tensors, manifest, _schema(manifest, labels[0]), labels[0])
        return dict(tensors), dict(manifest)
    shard_map, by_index = _one_placement([s for s in shards if s is not None], labels)
    name = states[0][1].get("model")
    missing = [i for i in range(shard_map.shards) if i not in by_index]
    if missing:
        raise WireError(
            f"model {name!r}: shard {missing[0]} of {shard_map.shards} ({shard_map.targets[missing[0]]}) is "
            "missing: a gather needs the state of every shard"
        )
    ordered = [states[by_index[i]] for i in range(shard_map.shards)]
    names = [f"shard {i} ({labels[by_index[i]]})" for i in range(shard_map.shards)]
    for i, (tensors, manifest) in enumerate(ordered):
        _check_state(tensors, manifest, shard_map.shard_schema(i), f"model {name!r}: {names[i]}")
    where = f"model {name!r}"
    _check_common(ordered, names, where)
    tensors = _gather_params(ordered, shard_map)
    whole = {k: v for k, v in ordered[0][1].items() if k != "shard"}
    whole["schema"] = [_leaf_json(leaf.spec) for leaf in shard_map.leaves]
    for group, key_list in KEY_LISTS.items():
        if ordered[0][1].get(key_list) is None:
            whole[key_list] = None
            continue
        gathered = _gather_group(ordered, shard_map, group, names, where)
        tensors.update((f"{group}/{k}", a) for k, a in gathered.items())
        whole[key_list] = list(gathered)
    return tensors, whole


def _one_placement(shards: Sequence[tuple[int, ShardMap]], labels: Sequence[str]) -> tuple[ShardMap, dict[int, int]]:
    """The map the shards share, and the position of each shard index among them."""
    first_index, shard_map = shards[0]
    by_index: dict[int, int] = {}
    for pos, (index, other) in enumerate(shards):
        if (other.model_id, other.version) != (shard_map.model_id, shard_map.version):
            raise WireError(
                f"states of different placements: {labels[0]} is shard {first_index} of placement "
                f"{shard_map.model_id} (map version {shard_map.version}), {labels[pos]} is shard {index} of "
                f"placement {other.model_id} (map version {other.version})"
            )
        if other != shard_map:
            raise WireError(f"{labels[pos]}: its shard map differs from {labels[0]}'s for the same placement")
        if index in by_index:
            raise WireError(f"{labels[by_index[index]]} and {labels[pos]} both hold shard {index}")
        by_index[index] = pos
    return shard_map, by_index


def _check_common(ordered: Sequence[State], names: Sequence[str], where: str) -> None:
    """The fields every shard must have alike, and each worker's last seq."""
    first = ordered[0][1]
    for i, (_, manifest) in enumerate(ordered[1:], 1):
        for field in COMMON_FIELDS:
            if _canonical(manifest.get(field)) != _canonical(first.get(field)):
                why = " (the shards were not at one step)" if field == "step" else ""
                raise WireError(
                    f"{where}: {field} is {_short(first.get(field))} on {names[0]} but "
                    f"{_short(manifest.get(field))} on {names[i]}{why}"
                )
        if (first.get("ema_keys") is None) != (manifest.get("ema_keys") is None):
            raise WireError(f"{where}: {names[0]} and {names[i]} disagree on whether the model keeps an EMA")
        seqs, theirs = _last_seqs(first, names[0], where), _last_seqs(manifest, names[i], where)
        for worker in sorted(set(seqs) | set(theirs)):
            if seqs.get(worker) != theirs.get(worker):
                raise WireError(
                    f"{where}: worker {worker!r}: last seq {seqs.get(worker)} on {names[0]} but "
                    f"{theirs.get(worker)} on {names[i]} (a push reached some shards only: let the worker retry "
                    "it, then gather again)"
                )


def _last_seqs(manifest: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    workers = manifest.get("workers")
    if not isinstance(workers, dict) or not all(isinstance(r, dict) for r in workers.values()):
        raise WireError(f"{where}: {name}: workers: expected an object of worker records")
    return {w: r.get("last_seq") for w, r in workers.items()}


def _gather_params(ordered: Sequence[State], shard_map: ShardMap) -> dict[str, np.ndarray]:
    out = {}
    for leaf in shard_map.leaves:
        key = f"params/{leaf.spec.path}"
        out[key] = _concat([ordered[p.shard][0][key] for p in leaf.pieces])
    return out


def _gather_group(
    ordered: Sequence[State], shard_map: ShardMap, group: str, names: Sequence[str], where: str
) -> dict[str, np.ndarray]:
    """One state group (opt or ema) of the whole model, in an order consistent with every shard's."""
    n = len(ordered)
    keys = [list(m[KEY_LISTS[group]]) for _, m in ordered]
    # per shard: the leaf each of its tensors follows (None: none of its pieces)
    follows = []
    for i, (tensors, _) in enumerate(ordered):
        shapes = {leaf.spec.path: leaf.piece_shape(p) for leaf, p in shard_map.pieces_of(i)}
        follows.append({k: _follows(k, tensors[f"{group}/{k}"].shape, shapes) for k in keys[i]})
    leaves = {leaf.spec.path: leaf for leaf in shard_map.leaves}
    out: dict[str, np.ndarray] = {}
    for k in _merge_orders(keys, lambda k: _prefix(k, next(f[k] for f in follows if k in f))):
        holders = [i for i in range(n) if k in follows[i]]
        arrays = [ordered[i][0][f"{group}/{k}"] for i in holders]
        path = follows[holders[0]][k]
        leaf = leaves.get(path) if path is not None else None
        if (
            leaf is not None
            and all(follows[i][k] == path for i in holders)
            and sorted(holders) == sorted(p.shard for p in leaf.pieces)
        ):
            if len({a.dtype for a in arrays}) > 1:
                raise WireError(
                    f"{where}: {group} state {k!r} of leaf {path!r} has dtypes "
                    f"{', '.join(f'{a.dtype} on {names[i]}' for i, a in zip(holders, arrays, strict=True))}"
                )
            by_shard = dict(zip(holders, arrays, strict=True))
            out[k] = _concat([by_shard[p.shard] for p in leaf.pieces])
        elif len(holders) == n:
            for i, a in zip(holders[1:], arrays[1:], strict=True):
                if not _same(a, arrays[0]):
                    raise WireError(
                        f"{where}: {group} state {k!r} differs between {names[0]} ({_describe(arrays[0])}) and "
                        f"{names[i]} ({_describe(a)}): a tensor every shard holds must be equal on all (were the "
                        "shards at one step?)"
                    )
            out[k] = arrays[0]
        else:
            raise WireError(
                f"{where}: {group} state {k!r} is on {', '.join(names[i] for i in holders)} only: it is neither on "
                "every shard nor shaped like the pieces of a leaf those shards hold, so it cannot be gathered"
            )
    return out


# -- split ----------------------------------------------------------------------------------------


def split(state: State, shard_map: ShardMap) -> list[State]:
    """Each shard's state (in shard order) of a whole state placed by `shard_map` (which places the
    state's schema): its leaves and row ranges, the state tensors following them, every replicated
    tensor, the worker records, and `shard`. Arrays are views of the whole state's. WireError
    naming the field or tensor when the state is not whole or does not fit the map."""
    tensors, manifest = state
    name = manifest.get("model")
    where = f"model {name!r}"
    shard = shard_of(manifest, where)
    if shard is not None:
        index, placed = shard
        raise WireError(
            f"{where}: the state is shard {index} of {placed.shards} (placement {placed.model_id}), not a whole "
            "model: gather the states of all its shards first"
        )
    schema = _schema(manifest, where)
    if schema != shard_map.schema():
        raise WireError(f"{where}: the shard map places another schema than the state's")
    _check_state(tensors, manifest, schema, where)
    whole = {leaf.spec.path: leaf for leaf in shard_map.leaves}
    shapes = {path: leaf.spec.shape for path, leaf in whole.items()}
    follows = {
        group: _whole_follows(manifest[key_list], tensors, group, shapes)
        for group, key_list in KEY_LISTS.items()
        if manifest.get(key_list) is not None
    }
    out: list[State] = []
    for i in range(shard_map.shards):
        mine = {
            f"params/{leaf.spec.path}": _rows(tensors[f"params/{leaf.spec.path}"], leaf, p)
            for leaf, p in shard_map.pieces_of(i)
        }
        manifest_i = {k: v for k, v in manifest.items() if k not in ("shard", "schema")}
        manifest_i["schema"] = [_leaf_json(spec) for spec in shard_map.shard_schema(i)]
        for group, key_list in KEY_LISTS.items():
            if manifest.get(key_list) is None:
                manifest_i[key_list] = None
                continue
            kept = []
            for k, path in follows[group].items():
                a = tensors[f"{group}/{k}"]
                piece = None if path is None else next((p for p in whole[path].pieces if p.shard == i), None)
                if path is not None and piece is None:
                    continue  # the state of a leaf another shard holds
                mine[f"{group}/{k}"] = a if path is None else _rows(a, whole[path], piece)
                kept.append(k)
            manifest_i[key_list] = kept
        manifest_i["shard"] = {"index": i, "map": shard_map.to_json()}
        out.append((mine, manifest_i))
    return out


# -- helpers --------------------------------------------------------------------------------------


def _follows(key: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The leaf path `key` follows among `shapes` (leaf path -> the shape its state would have): the
    longest leaf path that `key` ends with after a "/" whose shape is `shape` (module docstring)."""
    at = key.find("/")
    while at != -1:
        path = key[at + 1 :]
        if path in shapes and tuple(shapes[path]) == tuple(shape):
            return path
        at = key.find("/", at + 1)
    return None


def _whole_follows(
    keys: Sequence[str], tensors: Mapping[str, np.ndarray], group: str, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str | None]:
    """The leaf each state tensor of a whole state follows (None: replicated), in the state's order.
    A scalar follows a scalar leaf only beside the state of another leaf under the same prefix
    (module docstring): `inner_state/0/count` is a count, not the state of a leaf named `count`."""
    found = {k: _follows(k, tensors[f"{group}/{k}"].shape, shapes) for k in keys}
    leaves_of: dict[str, set[str]] = {}
    for k, path in found.items():
        if path is not None:
            leaves_of.setdefault(_prefix(k, path), set()).add(path)
    return {
        k: None if path is not None and not shapes[path] and len(leaves_of[_prefix(k, path)]) < 2 else path
        for k, path in found.items()
    }


def _prefix(key: str, path: str | None) -> str:
    """What comes before the leaf path in a state path that follows a leaf (the key itself otherwise)."""
    return key if path is None else key[: -len(path) - 1]


def _merge_orders(orders: Sequence[Sequence[str]], prefix: Any) -> list[str]:
    """One order of the union of `orders` that keeps each one's order: the whole model's state order
    from its shards'. Where several keys may come next, a key of the group (same `prefix(key)`) just
    emitted comes first, then the smallest: a state's leaves of one group are in sorted order, as
    jax flattens the dict of a model's leaves."""
    where = [{k: j for j, k in enumerate(order)} for order in orders]
    at = [0] * len(orders)
    out: list[str] = []
    done: set[str] = set()
    last = None
    while True:
        for i, order in enumerate(orders):
            while at[i] < len(order) and order[at[i]] in done:
                at[i] += 1
        heads = [order[at[i]] for i, order in enumerate(orders) if at[i] < len(order)]
        if not heads:
            return out
        # a key may come next where no order has it further on
        free = [h for h in heads if all(where[i].get(h, at[i]) <= at[i] for i in range(len(orders)))]
        if not free:  # the orders disagree (not one model's states): the first one's next key
            free = heads[:1]
        k = min(free, key=lambda h: (prefix(h) != last, h))
        last = prefix(k)
        out.append(k)
        done.add(k)


def _rows(a: np.ndarray, leaf: ShardedLeaf, piece: Any) -> np.ndarray:
    return a if not leaf.split else a[piece.start : piece.stop]


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _describe(a: np.ndarray) -> str:
    if a.size <= 4:
        return f"{a.dtype}{list(a.shape)} {a.tolist()}"
    return f"{a.dtype}{list(a.shape)}"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _leaf_json(spec: LeafSpec) -> dict[str, Any]:
    return {"path": spec.path, "dtype": spec.dtype, "shape": list(spec.shape)}


def _schema(manifest: Mapping[str, Any], where: str) -> list[LeafSpec]:
    try:
        return [
            LeafSpec(str(d["path"]), str(d["dtype"]), tuple(int(n) for n in d["shape"])) for d in manifest["schema"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"{where}: schema: malformed ({type(e).__name__}: {e})") from None


def _check_state(
    tensors: Mapping[str, np.ndarray], manifest: Mapping[str, Any], schema: Sequence[LeafSpec], where: str
) -> None:
    """The tensors are what the manifest says: a params tensor of each leaf of `schema` (its dtype and
    shape) and nothing else; the opt and ema tensors those `opt_keys` and `ema_keys` list."""
    if _schema(manifest, where) != list(schema):
        raise WireError(f"{where}: its schema is not the one its shard map gives it")
    groups: dict[str, set[str]] = {g: set() for g in GROUPS}
    for key in tensors:
        group, _, rest = key.partition("/")
        if group not in groups or not rest:
            raise WireError(f"{where}: tensor {key!r}: expected a params/, opt/ or ema/ key")
        groups[group].add(rest)
    for leaf in schema:
        a = tensors.get(f"params/{leaf.path}")
        if a is None:
            raise WireError(f"{where}: no params tensor for leaf {leaf.path!r}")
        if a.dtype.name != leaf.dtype or tuple(a.shape) != tuple(leaf.shape):
            raise WireError(
                f"{where}: params tensor {leaf.path!r} is {a.dtype.name}{list(a.shape)}, the schema says "
                f"{leaf.dtype}{list(leaf.shape)}"
            )
    extra = sorted(groups["params"] - {leaf.path for leaf in schema})
    if extra:
        raise WireError(f"{where}: params tensor {extra[0]!r} is not in the schema")
    for group, key_list in KEY_LISTS.items():
        listed = manifest.get(key_list)
        if listed is None and group == "ema" and not groups[group]:
            continue
        if (
            not isinstance(listed, list)
            or not all(isinstance(k, str) for k in listed)
            or len(set(listed)) != len(listed)
        ):
            raise WireError(f"{where}: {key_list}: expected a list of distinct strings")
        if set(listed) != groups[group]:
            odd = sorted(set(listed) ^ groups[group])[0]
            raise WireError(f"{where}: {key_list} and the {group} tensors disagree (on {odd!r})")
