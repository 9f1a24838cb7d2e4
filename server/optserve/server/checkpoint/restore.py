"""Restoring models from their checkpoints: every model at start, and one model on request.

Restore rule (at start and for RestoreCheckpoint): a checkpoint is used only if its manifest and
every file verify and the state it describes installs (the model builds from it); otherwise it is
moved aside to `<name>.corrupt-<hex>` with a warning naming it and the reason, and the previous one
is tried. A model is never dropped while one good checkpoint exists; when none is good, its whole
directory is moved to `.archive/`, so that a model re-created under that name starts clean. A
directory with no checkpoint in it (not even a corrupt or incomplete one) is not a model's and is
left as it is: the checkpoint directory may hold other files.
Failures that say nothing against the checkpoints (the server's limits, memory) leave them where
they are, for the next start.

Restoring an older checkpoint on request moves the newer ones aside (`<name>.superseded-<hex>`),
so that a restart comes back at the restored state.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import jax

from optserve.server.checkpoint.directory import CheckpointRoot, remove_leftovers
from optserve.server.checkpoint.files import (
    ARCHIVE_DIR,
    COMPILE_CACHE_DIR,
    DELETED_PREFIX,
    SUPERSEDED_MARK,
    TMP_MARK,
    Checkpoint,
    CheckpointFailed,
    check_step,
    committed,
    made_by_checkpoints,
    move_aside,
    read_checkpoint,
)
from optserve.server.checkpoint.track import Track
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from optserve.server.core.model import Model
from optserve.server.core.store import ModelStore
from optserve.server.state import model_state
from optserve.server.state.errors import StateError

log = logging.getLogger("optserve.checkpoints")

# Failures to build a model from a checkpoint that say nothing against the checkpoint (the server's
# limits, memory): the checkpoints stay where they are and the next start tries again.
NOT_THE_CHECKPOINTS_FAULT = (ResourceExhausted, MemoryError, jax.errors.JaxRuntimeError)


def restore_all(root: CheckpointRoot, store: ModelStore, track_for: Callable[[str], Track]) -> None:
    """Restores every model found under `root` into `store` (the restore rule, module docstring),
    after removing what interrupted deletes and saves left behind. One model's failure is logged
    and does not keep the others down."""
    os.makedirs(root.path, exist_ok=True)
    for entry in sorted(os.listdir(root.path)):
        path = os.path.join(root.path, entry)
        if entry.startswith(DELETED_PREFIX) or (TMP_MARK in entry and entry.startswith(".")):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not os.path.isdir(path) or entry in (ARCHIVE_DIR, COMPILE_CACHE_DIR):
            continue
        try:
            root.model_dir(entry)
        except InvalidArgument:
            log.warning("checkpoint directory %s: %r is not a model name; ignored", root.path, entry)
            continue
        if not any(made_by_checkpoints(n) for n in os.listdir(path)):
            # Not a model's directory (nothing in it is a checkpoint's): someone else's files, e.g. a
            # checkpoint directory pointed at a project. Never removed, moved or archived.
            if os.listdir(path):
                log.warning("checkpoint directory %s: %r holds no checkpoint; left alone", root.path, entry)
            continue
        remove_leftovers(path)
        try:
            _restore_at_start(root, store, entry, track_for(entry))
        except Exception as e:  # one model's problem must not keep the others down
            log.error("model %r: could not be restored from %s: %s", entry, path, e)


def _restore_at_start(root: CheckpointRoot, store: ModelStore, name: str, track: Track) -> None:
    model_dir = root.model_dir(name)
    with track.save_lock:
        for checkpoint in committed(model_dir):
            try:
                state = read_checkpoint(checkpoint.path, name)
                model = model_state.admit_state(store, name, state)
            except NOT_THE_CHECKPOINTS_FAULT as e:
                log.error(
                    "model %r: not restored: %s; its checkpoints stay in %s for the next start", name, e, model_dir
                )
                return
            except Exception as e:  # whatever the reason, this checkpoint cannot be used
                root.set_aside(name, checkpoint, e)
                continue
            # No call reaches the model before the server is ready, so its version is the restored state's.
            track.mark_saved(model, checkpoint, model.state_version)
            log.info("model %r: restored from %s (step %d)", name, checkpoint.path, state.step)
            return
        if not os.listdir(model_dir):
            os.rmdir(model_dir)  # only incomplete checkpoints were there: nothing to keep
            return
        try:
            target = root.archive_locked(name, "unrestorable")
        except OSError as e:
            log.error(
                "model %r: no checkpoint in %s verifies; not restored, and the directory could not be moved to %s: %s",
                name,
                model_dir,
                ARCHIVE_DIR,
                e,
            )
            return
        log.error(
            "model %r: no checkpoint in %s verifies; not restored; the directory was moved to %s so that a "
            "model created under that name starts clean",
            name,
            model_dir,
            target,
        )


def restore_on_request(
    root: CheckpointRoot, store: ModelStore, name: str, step: int, track_for: Callable[[str], Track], tag: str = ""
) -> Model:
    """Replaces the model's state by the newest checkpoint of `step` (0: of any step) that
    verifies and installs (the others are moved aside as corrupt); checkpoints newer than it are
    moved aside as superseded, so that a restart comes back at this state too. A non-empty `tag`
    equal to the model's last restore's does nothing (RestoreCheckpointRequest.tag)."""
    model_dir = root.model_dir(name)
    check_step(step, name)
    model = store.get(name)
    track = track_for(name)
    with track.save_lock:  # not while one of its saves is in flight
        if model.deleted:
            raise NotFound(f"model {name!r} not found")
        if tag and model.restore_tag == tag:
            return model
        try:
            root.claim_locked(model, track)
        except OSError as e:
            raise CheckpointFailed(
                f"model {name!r}: not restored: could not archive the checkpoints left under its name: {e}"
            ) from None
        candidates = [c for c in committed(model_dir) if step == 0 or c.step == step]
        if not candidates:
            have = ", ".join(c.name for c in committed(model_dir)) or "none"
            raise NotFound(
                f"model {name!r}: " + (f"no checkpoint at step {step} (committed: {have})" if step else "no checkpoint")
            )
        reasons = []
        for checkpoint in candidates:
            try:
                state = read_checkpoint(checkpoint.path, name)
                prepared = model_state.prepare(model, state)
            except StateError as e:
                root.set_aside(name, checkpoint, e)
                reasons.append(f"{checkpoint.name}: {e}")
                continue
            break
        else:
            raise FailedPrecondition(
                f"model {name!r}: no checkpoint {f'of step {step} ' if step else ''}verifies "
                f"(moved aside): {'; '.join(reasons)}"
            )
        _supersede_newer_locked(name, model_dir, checkpoint)
        track.mark_saved(model, checkpoint, model.replace_state(prepared))
        model.restore_tag = tag
    log.info("model %r: restored from %s (step %d)", name, checkpoint.path, state.step)
    return model


def _supersede_newer_locked(name: str, model_dir: str, restored: Checkpoint) -> None:
    """Moves the checkpoints newer than `restored` aside, oldest first: should one fail, the
    newest is still in place (and the ones moved are moved back), the model is left as it was."""
    newer = sorted(c for c in committed(model_dir) if (c.step, c.k) > (restored.step, restored.k))
    moved: list[tuple[str, str]] = []
    for checkpoint in newer:
        try:
            moved.append((checkpoint.path, move_aside(checkpoint.path, SUPERSEDED_MARK)))
        except OSError as e:
            for original, aside in reversed(moved):
                try:
                    os.rename(aside, original)
                except OSError as err:
                    log.error("model %r: could not move %s back to %s: %s", name, aside, original, err)
            raise CheckpointFailed(
                f"model {name!r}: not restored: could not move the newer checkpoint {checkpoint.name} aside: {e}"
            ) from None
    if moved:
        log.info(
            "model %r: checkpoints newer than %s moved aside (superseded by the restore): %s",
            name,
            restored.name,
            ", ".join(os.path.basename(a) for _, a in moved),
        )
