"""`ShardedModel`: one model over several servers, driven from the client (docs/design.md, "Shards").

Each shard server holds an ordinary model of the same name with some of the leaves: whole leaves,
and row ranges of large ones under the leaf's path (`optserve.wire.shards`). A ShardedModel holds a
`Model` per shard and sends every call to all of them at once (grpc releases the GIL while a call
waits): a push gives each shard its part of the gradient; a pull gathers every part into one pytree,
each shard writing its rows of a split leaf straight into that leaf's array.

What makes the shards one model:
- every push reaches every shard, under one (worker_id, seq) with a `ShardedWorker`, so a retry
  after a partial failure is applied only by the shards that missed it (the others answer it as a
  duplicate);
- a gradient is checked whole before any shard sees it (leaves, shapes, finite values), so input
  one shard would refuse is refused before another could apply its part;
- a pull returns one step on every shard: a shard behind the others is asked again for the step
  the others are at (`PullRequest.min_step`), a bounded number of times.
"""

from __future__ import annotations

import functools
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from optserve.client import pytree, state_file
from optserve.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from optserve.client.fanout import CONCURRENT_CALLERS, CONSISTENT_PULL_ATTEMPTS, Fanout, pull_exactly, swap
from optserve.client.model import Model
from optserve.client.progress import PartsProgress, Progress
from optserve.client.rounds import Relays, decides_rounds, relay
from optserve.client.sharded_worker import ShardedWorker
from optserve.client.tables import Rows, merge_rows
from optserve.wire import resharding
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec
from optserve.wire.errors import WireError
from optserve.wire.shards import ShardMap, row_slices

T = TypeVar("T")
# Model.info() keys that describe how one server holds its part (ShardedModel.info)
_PER_SHARD = ("packing", "placement", "device_bytes")


class ShardedModel:
    """A handle on a model held by several servers, with `Model`'s calls and their meaning.

    Made by `Client.create_model` on a client of several targets, or by `Client.model(name)` on any
    one shard (the others are found in the shard map every shard keeps)."""

    def __init__(self, name: str, shard_map: ShardMap, shards: Sequence[Model], structure: pytree.Structure | None):
        self.name = name
        self.shard_map = shard_map
        self.shards = list(shards)
        self.fanout = Fanout(name, [m.client.target for m in self.shards], callers=CONCURRENT_CALLERS)
        self._structure = structure
        self._schema = {leaf.spec.path: leaf for leaf in shard_map.leaves}
        # per shard, in its schema order: (leaf path, rows of the whole leaf or None: all of it)
        self._parts = [row_slices(shard_map, i) for i in range(shard_map.shards)]
        self.last_step = -1
        self.last_incarnation = ""
        self._decides_rounds: bool | None = None
        self._lock = threading.Lock()
        self._anonymous_relays: Relays | None = None

    def __repr__(self) -> str:
        return f"ShardedModel({self.name!r} on {len(self.shards)} shards: {', '.join(self.fanout.targets)})"

    @property
    def client(self) -> Any:
        return self.shards[0].client

    @property
    def decides_rounds(self) -> bool:
        """Whether shard 0 decides the sync rounds, which the workers relay (client/rounds.py)."""
        if self._decides_rounds is None:
            settings = self.shards[0].info()["settings"]
            self._decides_rounds = decides_rounds(settings, len(self.shards), self.shard_map.global_norm)
        return self._decides_rounds

    def relay(self, step: int, fanout: Fanout | None = None, sequential: bool = False) -> list[tuple[str, int]]:
        """Relays shard 0's decision of the sync round that makes `step` to the other shards (waiting
        for shard 0 to close it), through `fanout` or one shard after another; returns its
        contributors (worker_id, seq) in order."""
        fan = fanout or self.fanout

        def run(call: Callable[[int], T], shards: Sequence[int]) -> list[T]:
            return [call(i) for i in shards] if sequential else fan.run(call, shards)

        return relay(self.shards, run, step, self.shard_map.global_norm)

    # -- splitting and gathering ------------------------------------------------------------------

    def _leaves(self, tree: Any, what: str) -> dict[str, np.ndarray]:
        """The leaves of `tree` by path (the structure seen first is reused as Model does)."""
        structure = self._structure
        arrays = pytree.flatten_as(tree, structure) if structure is not None else None
        if structure is None or arrays is None:
            leaves, structure = pytree.flatten(tree)
            if self._structure is None:
                self._structure = structure
            return dict(leaves)
        return dict(zip(structure.paths, arrays, strict=True))

    def _check_grads(self, leaves: dict[str, np.ndarray]) -> None:
        """Refuses, before any shard sees it, a gradient that a shard would refuse after another
        applied its part: leaves missing or unknown, shapes, non-finite values."""
        where = f"model {self.name!r}"
        for path in leaves:
            if path not in self._schema:
                raise InvalidArgumentError(f"{where}: unexpected leaf {path!r} (not in the model's schema)")
        for path, leaf in self._schema.items():
            a = leaves.get(path)
            if a is None:
                raise InvalidArgumentError(f"{where}: missing leaf {path!r}")
            if isinstance(a, Rows):
                _check_rows(where, path, a, leaf.spec)
                continue
            if tuple(a.shape) != leaf.spec.shape:
                raise InvalidArgumentError(
                    f"{where}: leaf {path!r}: shape {list(a.shape)}, the model's is {list(leaf.spec.shape)}"
                )
            if leaf.spec.dtype in FLOAT_DTYPES and a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InvalidArgumentError(f"{where}: leaf {path!r}: non-finite gradient (NaN or Inf)")

    def _norm_sq(self, leaves: dict[str, np.ndarray], wire_dtype: str | None) -> float | None:
        """The whole gradient's squared norm, when the spec starts with clip_by_global_norm
        (ShardMap.global_norm), from the values as the shards receive them (after `wire_dtype`)."""
        if not self.shard_map.global_norm:
            return None
        total = 0.0
        for path, leaf in self._schema.items():
            if leaf.spec.dtype not in FLOAT_DTYPES:
                continue
            a = leaves[path]
            if isinstance(a, Rows):  # the norm of the dense gradient it stands for: summed rows
                uniq, inverse = np.unique(a.ids, return_inverse=True)
                summed = np.zeros((len(uniq), *a.values.shape[1:]), np.float32)
                np.add.at(summed, inverse, a.values.astype(np.float32))
                a = summed
            if wire_dtype:
                a = a.astype(DTYPES[wire_dtype])
            total += float(np.square(a, dtype=np.float64).sum())
        return total

    def _split(self, leaves: dict[str, np.ndarray]) -> list[dict]:
        """Each shard's part of a tree given by path: nested dicts of its leaves and row ranges
        (views, never copies)."""
        return [
            pytree.nested_dicts([(path, _piece(leaves[path], rows)) for path, rows in part]) for part in self._parts
        ]

    def pull_rows(self, rows: Mapping[str, Any], **kwargs: Any) -> dict[str, np.ndarray]:
        """`Model.pull_rows` over the shards: each id asked of the shard that holds its row, every
        shard's rows of one step (`_rows_of_one_step`: the newest step the shards asked answered with)."""
        asked, where = self._route_rows(rows)
        wanted = [i for i in range(len(self.shards)) if asked[i]]
        answers = self.fanout.run(lambda i: self.shards[i].pull_rows(asked[i], **kwargs), wanted)
        got = dict(zip(wanted, answers, strict=True))
        rest = {k: v for k, v in kwargs.items() if k not in ("min_step", "exact_step")}
        self.last_step = self._rows_of_one_step(
            asked,
            got,
            {i: self.shards[i].last_step for i in wanted},
            lambda i, exact, least: self.shards[i].pull_rows(asked[i], exact_step=exact, min_step=least, **rest),
        )
        return merge_rows(rows, where, got)

    def _rows_of_one_step(
        self,
        asked: list[dict[str, np.ndarray]],
        got: dict[int, dict[str, np.ndarray]],
        steps: dict[int, int],
        pull: Callable[[int, int | None, int | None], dict[str, np.ndarray]],
        fanout: Fanout | None = None,
    ) -> int:
        """Brings the rows the shards answered with (`got` by shard, of the steps `steps`) to one
        step as `_consistent` does a pull's parts: a shard whose rows are of another step is asked
        for them again (`pull(shard, exact_step, min_step)`, into `got`). A shard in `steps` asked
        for no rows (a push_pull's shard that only pushed) counts for the step only. Returns it."""
        shards = sorted(steps)

        def again(j: int, step: int) -> int:
            i = shards[j]
            if not asked[i]:  # none of its rows returned: nothing to pull again
                return step

            def pull_at(exact: int | None, least: int | None) -> None:
                got[i] = pull(i, exact, least)

            return pull_exactly(pull_at, self.shards[i], step)

        return self._consistent([steps[i] for i in shards], again, fanout)

    def _route_rows(self, rows: Mapping[str, Any]) -> tuple[list[dict[str, np.ndarray]], dict]:
        """Each shard's ids of a pull of rows (counted from its piece's start), and where each
        shard's answer goes: {path: [(shard, mask over the asked ids)]}."""
        asked: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        where: dict[str, list[tuple[int, np.ndarray]]] = {}
        for path, ids in rows.items():
            leaf = self._schema.get(path)
            if leaf is None:
                raise InvalidArgumentError(f"model {self.name!r}: pull of rows: no leaf {path!r} in the schema")
            ids = np.asarray(ids, np.int64)
            for piece in leaf.pieces:
                mask = (ids >= piece.start) & (ids < piece.stop) if leaf.split else np.ones(len(ids), bool)
                asked[piece.shard][path] = ids[mask] - (piece.start if leaf.split else 0)
                where.setdefault(path, []).append((piece.shard, mask))
        return asked, where

    def _targets(self, out: Any, wire_dtype: str | None) -> tuple[dict[str, np.ndarray], list[dict]]:
        """Where a pull writes: `out`'s arrays when given (pytree.writable_leaves), else new arrays of
        the model's dtypes; and each shard's part of them (row ranges as views)."""
        if out is not None:
            arrays = dict(pytree.writable_leaves(out))
            self._check_out(arrays)
        else:
            arrays = {path: np.empty(leaf.spec.shape, DTYPES[leaf.spec.dtype]) for path, leaf in self._schema.items()}
        return arrays, self._split(arrays)

    def _check_out(self, arrays: dict[str, np.ndarray]) -> None:
        where = f"model {self.name!r}: out"
        for path, leaf in self._schema.items():
            a = arrays.get(path)
            if a is None or tuple(a.shape) != leaf.spec.shape:
                got = "missing" if a is None else f"shape {list(a.shape)}"
                raise ValueError(f"{where}: leaf {path!r}: {got}, the model's is {list(leaf.spec.shape)}")

    def _result(self, arrays: dict[str, np.ndarray], like: Any, out: Any) -> Any:
        if out is not None:
            return out
        structure = pytree.flatten(like)[1] if like is not None else self._structure
        if structure is not None and set(structure.paths) == set(arrays):
            return pytree.unflatten(structure, [arrays[p] for p in structure.paths])
        return pytree.nested_dicts(list(arrays.items()))

    def _consistent(self, steps: list[int], pull: Callable[[int, int], int], fanout: Fanout | None = None) -> int:
        """Brings every shard's part to one step: `pull(shard, step)` pulls shard's part again at
        least at `step` and returns the step it got (through `fanout`, default the model's).
        Returns the common step."""
        fanout = fanout or self.fanout
        for _ in range(CONSISTENT_PULL_ATTEMPTS):
            target = max(steps)
            behind = [i for i, s in enumerate(steps) if s != target]
            if not behind:
                return target
            got = fanout.run(functools.partial(swap, pull, target), behind)
            for i, s in zip(behind, got, strict=True):
                steps[i] = s
        raise UnavailableError(
            f"model {self.name!r}: its shards kept moving during the pull (steps {steps} after "
            f"{CONSISTENT_PULL_ATTEMPTS} attempts); retry"
        )

    # -- data path --------------------------------------------------------------------------------

    def push(
        self, grads: Any, *, base_step: int | None = None, weight: float | None = None, wire_dtype: str | None = None
    ) -> int:
        """Sends a gradient pytree, each shard its part. Returns (async) the step after the update
        (the largest of the shards'), (sync) the step it joins.

        Where shard 0 decides the sync rounds (`decides_rounds`), the push is named on every shard by
        a number drawn for it (PushHeader.contribution), and its round's decision is relayed in the
        background, as a `ShardedWorker`'s are (client/rounds.py)."""
        leaves = self._leaves(grads, "gradient")
        self._check_grads(leaves)
        parts, norm_sq = self._split(leaves), self._norm_sq(leaves, wire_dtype)
        contribution = (secrets.randbits(63) or 1) if self.decides_rounds else 0
        steps = self.fanout.run(
            lambda i: self.shards[i].push(
                parts[i],
                base_step=base_step,
                weight=weight,
                wire_dtype=wire_dtype,
                global_norm_sq=norm_sq,
                contribution=contribution,
            )
        )
        step = max(steps)
        if contribution:
            self._relays().start(lambda: self.relay(step), step)
        return step

    def _relays(self) -> Relays:
        """The background relays of this handle's anonymous pushes (`push`), made at the first."""
        with self._lock:
            if self._anonymous_relays is None:
                self._anonymous_relays = Relays(self.name)
            return self._anonymous_relays

    def pull(
        self,
        *,
        like: Any = None,
        min_step: int | None = None,
        timeout: float | None = None,
        ema: bool = False,
        wire_dtype: str | None = None,
        if_newer_than: int | None = None,
        out: Any = None,
    ) -> Any:
        """The parameters of one step of every shard, as one pytree (arguments as `Model.pull`)."""
        if out is not None and like is not None:
            raise ValueError("pass `like` or `out`, not both")
        arrays, parts = self._targets(out, wire_dtype)

        def pull_one(i: int, step: int | None, newer: int | None) -> int | None:
            m = self.shards[i]
            got = m.pull(
                min_step=step, timeout=timeout, ema=ema, wire_dtype=wire_dtype, if_newer_than=newer, out=parts[i]
            )
            return None if got is None else m.last_step

        got = self.fanout.run(lambda i: pull_one(i, min_step, if_newer_than))
        if all(s is None for s in got):
            self._note()
            return None
        # a shard that had nothing newer while another had: pull its part after all
        steps = [-1 if s is None else s for s in got]

        def again(i: int, step: int) -> int:
            return pull_exactly(
                lambda exact, least: self.shards[i].pull(
                    exact_step=exact, min_step=least, timeout=timeout, ema=ema, wire_dtype=wire_dtype, out=parts[i]
                ),
                self.shards[i],
                step,
            )

        self._consistent(steps, again)
        self._note()
        return self._result(arrays, like, out)

    def _note(self) -> None:
        self.last_step = max(m.last_step for m in self.shards)
        self.last_incarnation = ",".join(m.last_incarnation for m in self.shards)

    def push_pull(
        self,
        grads: Any,
        *,
        base_step: int | None = None,
        weight: float | None = None,
        wire_dtype: str | None = None,
        like: Any = None,
        out: Any = None,
        rows: Mapping[str, Any] | None = None,
    ) -> Any:
        """Pushes a gradient and returns the parameters of one step of every shard after it; with
        `rows` ({path: ids}), only those rows, of that step on every shard (`_rows_of_one_step`).
        Where shard 0 decides the sync rounds, a push (`push`, which relays its round) and then a
        pull of the step it joins: the same result as the unsharded model's PushPull."""
        if self.decides_rounds:
            step = self.push(grads, base_step=base_step, weight=weight, wire_dtype=wire_dtype)
            if rows is not None:
                return self.pull_rows(rows, min_step=step, wire_dtype=wire_dtype)
            return self.pull(like=like, out=out, min_step=step, wire_dtype=wire_dtype)
        leaves = self._leaves(grads, "gradient")
        self._check_grads(leaves)
        grad_parts, norm_sq = self._split(leaves), self._norm_sq(leaves, wire_dtype)
        if rows is not None:
            asked, where = self._route_rows(rows)

            def with_rows(i: int) -> tuple[dict[str, np.ndarray], int]:
                m = self.shards[i]
                if not asked[i]:  # no rows of this shard asked: its part is only pushed
                    step = m.push(
                        grad_parts[i], base_step=base_step, weight=weight, wire_dtype=wire_dtype, global_norm_sq=norm_sq
                    )
                    return {}, step
                got = m.push_pull(
                    grad_parts[i],
                    base_step=base_step,
                    weight=weight,
                    wire_dtype=wire_dtype,
                    rows=asked[i],
                    global_norm_sq=norm_sq,
                )
                return got, m.last_step

            answers = self.fanout.run(with_rows)
            got = {i: a[0] for i, a in enumerate(answers)}
            step = self._rows_of_one_step(
                asked,
                got,
                {i: a[1] for i, a in enumerate(answers)},
                lambda i, exact, least: self.shards[i].pull_rows(
                    asked[i], exact_step=exact, min_step=least, wire_dtype=wire_dtype
                ),
            )
            self._note()
            self.last_step = step
            return merge_rows(rows, where, got)
        arrays, parts = self._targets(out, wire_dtype)

        def one(i: int) -> int:
            m = self.shards[i]
            m.push_pull(
                grad_parts[i],
                base_step=base_step,
                weight=weight,
                wire_dtype=wire_dtype,
                out=parts[i],
                global_norm_sq=norm_sq,
            )
            return m.last_step

        steps = self.fanout.run(one)
        self._consistent(steps, lambda i, step: self._pull_part(i, step, wire_dtype, parts[i]))
        self._note()
        return self._result(arrays, like, out)

    def _pull_part(self, i: int, step: int, wire_dtype: str | None, out: Any) -> int:
        m = self.shards[i]
        return pull_exactly(
            lambda exact, least: m.pull(exact_step=exact, min_step=least, wire_dtype=wire_dtype, out=out), m, step
        )

    # -- management -------------------------------------------------------------------------------

    def info(self) -> dict:
        """`Model.info()` of the whole model: the schema of every leaf, bytes summed over the shards,
        the step of the shard furthest behind, and "shards": each shard's target, step, leaves (with
        the rows of split ones), bytes, and how its server holds them ("packing", "placement" over its
        devices, "device_bytes"), which say nothing of the whole model and so are only there."""
        infos = self.fanout.run(lambda i: self.shards[i].info())
        whole = {k: v for k, v in infos[0].items() if k not in _PER_SHARD}
        whole["schema"] = [
            {"path": leaf.spec.path, "dtype": leaf.spec.dtype, "shape": leaf.spec.shape}
            for leaf in self.shard_map.leaves
        ]
        whole["step"] = min(i["step"] for i in infos)
        for key in ("param_bytes", "state_bytes"):
            whole[key] = sum(i[key] for i in infos)
        whole["shard"] = None
        whole["shard_map"] = {
            "model_id": self.shard_map.model_id,
            "version": self.shard_map.version,
            "split_bytes": self.shard_map.split_bytes,
        }
        whole["shards"] = [
            {
                "index": n,
                "target": self.fanout.targets[n],
                "step": i["step"],
                "incarnation": i["incarnation"],
                "leaves": [
                    {"path": path, "rows": None if rows is None else (rows.start, rows.stop)}
                    for path, rows in self._parts[n]
                ],
                "param_bytes": i["param_bytes"],
                "state_bytes": i["state_bytes"],
                "last_checkpoint_step": i["last_checkpoint_step"],
                **{k: i[k] for k in _PER_SHARD},
            }
            for n, i in enumerate(infos)
        ]
        return whole

    @property
    def step(self) -> int:
        return self.info()["step"]

    def set_hyperparams(self, **values: float) -> dict:
        """Changes tunable hyperparameters on every shard (each validates them the same way)."""
        return self.fanout.run(lambda i: self.shards[i].set_hyperparams(**values))[0]

    def worker(self, worker_id: str, **kwargs: Any) -> ShardedWorker:
        return ShardedWorker(self, worker_id, **kwargs)

    # -- checkpoints ------------------------------------------------------------------------------

    def _steps(self, fanout: Fanout | None = None) -> list[int]:
        """Each shard's step now (header-only pulls)."""

        def step(i: int) -> int:
            self.shards[i].pull(if_newer_than=2**62)
            return self.shards[i].last_step

        return (fanout or self.fanout).run(step)

    def save(self, timeout: float | None = None) -> int:
        """A checkpoint of one step on every shard: the step of the shard furthest ahead, which each
        shard saves when it gets there (SaveCheckpointRequest.step, waiting up to `timeout` seconds,
        default 60). Returns that step once every shard has committed it. A shard that moved past it
        meanwhile (pushes in flight) makes it try again at the new step, up to 16 times."""
        for _ in range(CONSISTENT_PULL_ATTEMPTS):
            step = max(self._steps())
            try:
                self.fanout.run(functools.partial(self._save_shard, step, timeout))
                return step
            except FailedPreconditionError as e:
                if "cannot be saved" not in e.message:
                    raise
        raise UnavailableError(f"model {self.name!r}: its shards kept moving past the step to save; retry")

    def _save_shard(self, step: int, timeout: float | None, shard: int) -> int:
        return self.shards[shard].save(step, timeout)

    def checkpoints(self) -> list[dict]:
        """The checkpoints complete on every shard (the same step on each), bytes summed."""
        lists = self.fanout.run(lambda i: self.shards[i].checkpoints())
        common = set.intersection(*({c["step"] for c in cs} for cs in lists))
        out = []
        for c in lists[0]:
            if c["step"] in common:
                size = sum(x["bytes"] for cs in lists for x in cs if x["step"] == c["step"])
                out.append({**c, "bytes": size})
        return out

    def restore(self, step: int = 0, tag: str = "", fanout: Fanout | None = None) -> int:
        """Restores every shard to one committed step (0: the newest complete on all shards).
        tag: RestoreCheckpointRequest.tag (`realign` passes one)."""
        if not step:
            steps = [c["step"] for c in self.checkpoints()]
            if not steps:
                raise FailedPreconditionError(f"model {self.name!r}: no checkpoint is complete on every shard")
            step = max(steps)
        return (fanout or self.fanout).run(lambda i: self.shards[i].restore(step, tag))[0]

    def realign(self, fanout: Fanout | None = None) -> int:
        """Brings every shard back to the newest step checkpointed on all of them, after a shard
        restarted behind the others (it lost steps the others hold: a SIGKILL) or went back. Tagged
        with the shards' incarnations, so that the workers that noticed the same restart restore
        each shard once (RestoreCheckpointRequest.tag). Returns the step."""
        fanout = fanout or self.fanout
        incarnations = fanout.run(lambda i: self.shards[i].client.server_info()["incarnation"])
        return self.restore(0, tag="realign:" + ",".join(incarnations), fanout=fanout)

    def download(self, path: str | os.PathLike, *, progress: Progress | None = None) -> int:
        """Writes the whole model's state into one file, as `Model.download` does for an unsharded
        model (no "shard" in it; README.md, "Sharded models"); returns its size in bytes. Every
        shard's file is downloaded at once and gathered (`optserve.wire.resharding.gather`).
        FailedPreconditionError naming the tensor or field and the shards when they do not hold one
        state (at different steps: download while no push is in flight, e.g. between sync rounds).
        progress: called with (bytes received, the shards' files' sizes) as they arrive."""
        where = os.path.dirname(os.path.abspath(path))
        parts = None if progress is None else PartsProgress(progress, len(self.shards))
        with tempfile.TemporaryDirectory(prefix=".optserve-download-", dir=where) as tmp:
            files = [os.path.join(tmp, f"shard-{i}.safetensors") for i in range(len(self.shards))]
            self.fanout.run(
                lambda i: self.shards[i].download(files[i], progress=None if parts is None else parts.part(i))
            )
            states = [state_file.read_state(f) for f in files]
        try:
            whole = resharding.gather(states, self.fanout.targets)
        except WireError as e:
            raise FailedPreconditionError(str(e)) from None
        return state_file.write_state(path, whole)

    def close(self) -> None:
        self.fanout.close()
        if self._anonymous_relays is not None:
            self._anonymous_relays.close()


def _piece(a: Any, rows: slice | None) -> Any:
    """A leaf's part on one shard: its rows `rows` (None: all of it); for `Rows`, the ids in that
    range, counted from its start (a shard's ids are its own rows: proto RowSparseGradient)."""
    if rows is None:
        return a
    if isinstance(a, Rows):
        mask = (a.ids >= rows.start) & (a.ids < rows.stop)
        return Rows(a.ids[mask] - rows.start, a.values[mask])
    return a[rows]


def _check_rows(where: str, path: str, a: Rows, spec: LeafSpec) -> None:
    """A `Rows` gradient refused before any shard sees it, as a shard would refuse its part."""
    if not spec.shape or tuple(a.values.shape[1:]) != tuple(spec.shape[1:]):
        raise InvalidArgumentError(
            f"{where}: leaf {path!r}: rows of shape {list(a.values.shape[1:])}, the model's are {list(spec.shape[1:])}"
        )
    if a.ids.size and (int(a.ids.min()) < 0 or int(a.ids.max()) >= spec.shape[0]):
        raise InvalidArgumentError(f"{where}: leaf {path!r}: an id is outside the leaf's rows [0, {spec.shape[0]})")
    if a.values.dtype.kind == "f" and not np.isfinite(a.values).all():
        raise InvalidArgumentError(f"{where}: leaf {path!r}: non-finite gradient (NaN or Inf)")
