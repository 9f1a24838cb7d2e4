"""`optserve reshard`: a model's checkpoints moved from N shard servers' checkpoint directories to
M others, offline, with the servers stopped (README.md, "Sharded models"; docs/design.md, "Shards").

1. **Read.** In each source root (a server's `--checkpoint-dir`), the model's committed checkpoints;
   the newest step committed in every root (or the one asked for); in each root the newest
   checkpoint of that step, verified as a restore verifies it (checkpoint/files.py,
   `read_checkpoint`).
2. **Gather** (`optserve.wire.resharding.gather`): the sources must be every shard of one placement
   at one step, or one whole model.
3. **Place and split.** Over M > 1 targets the model is placed as PlanShards places it
   (`core/sharding.plan`, the spec compiled over the whole schema), with the old map's version + 1,
   and split; M = 1 gives a whole (unsharded) model. Each new state is checked as admission would
   check it (schema, spec, settings, the optimizer and EMA state the spec gives its leaves), without
   allocating anything, so that the servers restore what is written.
4. **Write**, all or nothing as far as one directory per root allows: every target root first gets
   the new checkpoint in a staging directory (`.<model>.tmp-reshard<hex>/`, committed inside with
   the atomic protocol; a server start removes such leftovers). Only once every root has it, each
   root's model directory, if it has one (the old shard's, when a root is both source and target),
   is moved to `.archive/<model>-<time>-<hex>-resharded/` and the staging directory renamed in its
   place. A crash between those two renames leaves that root without the model; the archive holds it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from optserve.server.checkpoint.directory import CheckpointRoot
from optserve.server.checkpoint.files import (
    TMP_MARK,
    checkpoint_name,
    committed,
    fsync_dir,
    read_checkpoint,
    write_checkpoint,
)
from optserve.server.core import sharding
from optserve.server.core.admission import compile_for
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.layout import plan_packing
from optserve.server.core.schema import check_schema
from optserve.server.core.store import check_model_name
from optserve.server.state.errors import StateError
from optserve.server.state.manifest import from_manifest, to_manifest
from optserve.server.state.model_state import HostState
from optserve.wire import resharding
from optserve.wire.errors import WireError
from optserve.wire.shards import ShardMap

STAGING_MARK = f"{TMP_MARK}reshard"


class ReshardError(Exception):
    """Why nothing was written: a source that is missing, does not verify or does not fit the others,
    or a placement that cannot be made; the message names the directory, field or tensor."""


class ReshardIncomplete(Exception):
    """Moving the staged checkpoints in failed midway (a rename refused): the message says which
    roots have the new model directory; the old ones are in each root's `.archive/`."""


class ReshardUsageError(ReshardError):
    """Arguments that cannot work (a model name that cannot be one, targets that do not match the
    target roots): the caller's mistake, found before anything is read."""


@dataclasses.dataclass(frozen=True)
class Written:
    """A checkpoint the resharding committed."""

    path: str  # its directory, <root>/<model>/step_<N>
    index: int | None  # the shard it holds (None: the whole model)
    target: str | None  # that shard's address in the new map
    archived: str | None  # where the root's earlier directory of the model went (None: it had none)


@dataclasses.dataclass(frozen=True)
class Resharded:
    step: int
    sources: list[str]  # the checkpoint directories read, in shard order
    shard_map: ShardMap | None  # the new placement (None: a whole model)
    written: list[Written]


def reshard(
    model: str,
    sources: Sequence[str],
    dests: Sequence[str],
    targets: Sequence[str] = (),
    *,
    step: int | None = None,
    split_bytes: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Resharded:
    """Moves `model` from the checkpoint roots `sources` (any order) to `dests`, shard i of the new
    placement into dests[i], answering at targets[i] (module docstring). ReshardError: nothing was
    written. progress: called with (checkpoints read and written so far, all of them) after each."""
    steps = len(sources) + len(dests)
    done = itertools.count(1)

    def advance() -> None:
        if progress is not None:
            progress(next(done), steps)

    try:
        check_model_name(model)
    except InvalidArgument as e:
        raise ReshardUsageError(f"--model: {e.message}") from None
    if len(dests) > 1 and len(targets) != len(dests):
        raise ReshardUsageError(f"{len(dests)} target roots need {len(dests)} targets, got {len(targets)}")
    try:
        chosen, read = _read_sources(model, sources, step, advance)
    except OSError as e:
        raise ReshardError(f"cannot read the source checkpoints: {e}") from None
    labels = [path for path, _ in read]
    try:
        whole = resharding.gather([_as_state(s) for _, s in read], labels)
    except WireError as e:
        raise ReshardError(str(e)) from None
    by_index = sorted(read, key=lambda r: r[1].shard.index if r[1].shard is not None else 0)
    whole_state = _from_state(whole, f"model {model!r}: the gathered state")
    old = read[0][1].shard
    if len(dests) == 1:
        parts, shard_map = [whole_state], None
    else:
        shard_map = _place(whole_state, targets, split_bytes, 1 if old is None else old.map.version + 1)
        parts = [
            _from_state(p, f"model {model!r}: shard {i}") for i, p in enumerate(resharding.split(whole, shard_map))
        ]
    for part in parts:
        _check_installs(part)
    written = _write(model, dests, parts, advance)
    return Resharded(chosen, [p for p, _ in by_index], shard_map, written)


def _read_sources(
    model: str, sources: Sequence[str], step: int | None, advance: Callable[[], None]
) -> tuple[int, list[tuple[str, HostState]]]:
    """(the step, [(checkpoint directory, its verified state)] per source root); `advance` after each read."""
    found = []
    for root in sources:
        try:
            model_dir = CheckpointRoot(root).model_dir(model)
        except InvalidArgument as e:
            raise ReshardError(e.message) from None
        checkpoints = committed(model_dir)
        if not checkpoints:
            raise ReshardError(f"{root}: no committed checkpoint of model {model!r} (looked in {model_dir})")
        found.append(checkpoints)
    steps = set.intersection(*({c.step for c in cps} for cps in found))
    if (step is None and not steps) or (step is not None and step not in steps):
        listed = "; ".join(f"{root}: {sorted({c.step for c in cps})}" for root, cps in zip(sources, found, strict=True))
        what = "no step is" if step is None else f"step {step} is not"
        raise ReshardError(f"model {model!r}: {what} committed in every source root (steps found: {listed})")
    chosen = max(steps) if step is None else step
    read = []
    for root, cps in zip(sources, found, strict=True):
        checkpoint = next(c for c in cps if c.step == chosen)  # the newest of that step
        try:
            read.append((checkpoint.path, read_checkpoint(checkpoint.path, model)))
        except StateError as e:
            raise ReshardError(f"{root}: checkpoint {checkpoint.name} does not verify: {e}") from None
        advance()
    return chosen, read


def _place(state: HostState, targets: Sequence[str], split_bytes: int, version: int) -> ShardMap:
    try:
        compiled = compile_for(state.name, state.spec, state.schema)
        placed = sharding.plan(state.name, compiled, state.settings, state.schema, targets, split_bytes)
    except InvalidArgument as e:
        raise ReshardError(e.message) from None
    return dataclasses.replace(placed, version=version)


def _as_state(state: HostState) -> resharding.State:
    tensors = {f"{g}/{k}": a for g, group in state.tensor_groups().items() for k, a in group.items()}
    return tensors, to_manifest(state)


def _from_state(state: resharding.State, where: str) -> HostState:
    tensors, manifest = state
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, a in tensors.items():
        group, _, rest = key.partition("/")
        groups.setdefault(group, {})[rest] = a
    try:
        return from_manifest(manifest, groups, where)
    except StateError as e:
        raise ReshardError(str(e)) from None


def _check_installs(state: HostState) -> None:
    """What admission and `model_state.prepare` check of a state before a server builds a model from
    it, without building one: the settings, the schema (the shard's part of its map), the spec
    compiled for it, every parameter, and the optimizer and EMA state the spec gives those leaves."""
    name = state.name
    where = f"model {name!r}" + ("" if state.shard is None else f" (shard {state.shard.index})")
    try:
        settings = state.settings.validated(name)
        schema = check_schema(name, [(leaf.path, leaf.dtype, leaf.shape) for leaf in state.schema])
        if state.shard is None:
            compiled = compile_for(name, state.spec, schema)
        else:
            whole = sharding.check_shard(name, schema, state.shard)
            compiled, _ = sharding.for_shard(name, compile_for(name, state.spec, whole), settings, state.shard)
    except InvalidArgument as e:
        raise ReshardError(e.message) from None
    for leaf in schema:
        a = state.params.get(leaf.path)
        if a is None or a.dtype.name != leaf.dtype or tuple(a.shape) != tuple(leaf.shape):
            raise ReshardError(f"{where}: params leaf {leaf.path!r} is missing or not {leaf.dtype}{list(leaf.shape)}")
    packing = plan_packing(schema, compiled, keeps_ema=settings.ema_decay is not None, enabled=False)
    wrong = packing.opt_map.check(state.opt, packing.opt_dtypes, "optimizer state")
    if not wrong and packing.ema_map is not None:
        wrong = packing.ema_map.check(state.ema or {}, packing.ema_dtypes, "EMA state")
    if wrong:
        raise ReshardError(f"{where}: {wrong}")


def _write(model: str, dests: Sequence[str], parts: Sequence[HostState], advance: Callable[[], None]) -> list[Written]:
    """Stages every part's checkpoint, then moves each in (module docstring, step 4); `advance`
    after each one staged."""
    roots = [CheckpointRoot(d) for d in dests]
    staged: list[str] = []
    try:
        for root, part in zip(roots, parts, strict=True):
            os.makedirs(root.path, exist_ok=True)
            stage = os.path.join(root.path, f".{model}{STAGING_MARK}{secrets.token_hex(4)}")
            os.mkdir(stage)
            staged.append(stage)
            write_checkpoint(stage, part)
            advance()
    except BaseException as e:
        for stage in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise ReshardError(f"cannot write the new checkpoints: {e}") from None
        raise
    written: list[Written] = []
    for root, stage, part in zip(roots, staged, parts, strict=True):
        model_dir = root.model_dir(model)
        try:
            archived = root.archive_locked(model, "resharded") if os.path.lexists(model_dir) else None
            os.rename(stage, model_dir)
            fsync_dir(root.path)
        except OSError as e:
            done = ", ".join(os.path.dirname(w.path) for w in written) or "none"
            raise ReshardIncomplete(
                f"{root.path}: could not move the new checkpoint in ({e}); moved in: {done}; the rest are staged "
                f"as .{model}{STAGING_MARK}* (a server start removes them), the old model directories are in "
                "each root's .archive/"
            ) from None
        shard = part.shard
        written.append(
            Written(
                path=os.path.join(model_dir, checkpoint_name(part.step)),
                index=None if shard is None else shard.index,
                target=None if shard is None else shard.target,
                archived=archived,
            )
        )
    return written
