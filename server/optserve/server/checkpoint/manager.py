"""Checkpoints: when they are taken, restored and pruned (design.md, Checkpoints; README.md,
"Checkpoint format").

The files, their names and their atomic commit protocol are `checkpoint_files`; this module decides
when to save (on request, every N steps or S seconds, at shutdown), restores every model at start,
prunes to `keep` after each commit, and serves the checkpoint RPCs and the checkpoint half of
DeleteModel.

Restore rule (at start and for RestoreCheckpoint): a checkpoint is used only if its manifest and
every file verify and the state it describes installs (the model builds from it); otherwise it is
moved aside to `<name>.corrupt-<hex>` with a warning naming it and the reason, and the previous one
is tried. A model is never dropped while one good checkpoint exists; when none is good, its whole
directory is moved to `.archive/`, so that a model re-created under that name starts clean.

"Unchanged since the last save" is decided by the model's `state_version` (bumped by every update,
worker record, hyperparameter change and restore), not by its step: another state of a step that
has a checkpoint is committed as `step_<N>.<k>`. Restoring an older checkpoint on request moves the
newer ones aside (`<name>.superseded-<hex>`), so that a restart comes back at the restored state.
A model directory holds only the checkpoints of the model object that owns it (`_Track.owner`):
checkpoints left under the name of a model that is not in memory are archived before a new model
of that name is checkpointed.

A save snapshots the model under its lock (device copies only, state_io.capture) and writes
outside it, so training continues. One save per model at a time (`_Track.save_lock`). Periodic
saves are started by one polling thread, off the update path; a failed one is retried with a
bounded backoff even when the model does not change. Failures are logged and reported by `info()`
(`last_checkpoint_error`) and by `shutdown()`, never swallowed.

Model names and steps from clients are validated (store.check_model_name, checkpoint_files.check_step)
and every path is checked to stay inside the model's directory.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from optserve.server.state import state_io
from optserve.server.checkpoint.files import (
    ARCHIVE_DIR,
    CORRUPT_MARK,
    DELETED_PREFIX,
    SUPERSEDED_MARK,
    TMP_MARK,
    Checkpoint,
    CheckpointFailed,
    check_step,
    committed,
    fsync_dir,
    info_of,
    move_aside,
    next_name,
    parse_name,
    read_checkpoint,
    remove_tree,
    write_checkpoint,
)
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError
from optserve.server.state.state_io import StateError
from optserve.server.core.store import ModelStore, check_model_name
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.checkpoints")

# Failures to build a model from a checkpoint that say nothing against the checkpoint (the server's
# limits, memory): the checkpoints stay where they are and the next start tries again.
NOT_THE_CHECKPOINTS_FAULT = (ResourceExhausted, MemoryError, jax.errors.JaxRuntimeError)
RETRY_FIRST_SECONDS = 0.5  # a failed periodic save is retried after this, doubling each time ...
RETRY_MAX_SECONDS = 10.0  # ... up to this


@dataclasses.dataclass
class _Track:
    """Per-model checkpoint bookkeeping (kept per name; reset when the model is deleted)."""

    save_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    owner: weakref.ref | None = None  # the model object whose checkpoints the directory holds
    saved: Checkpoint | None = None  # the owner's newest checkpoint, written or restored
    saved_version: int = -1  # the owner's state_version that `saved` holds
    committed_step: int = 0  # step of `saved` (0: none), for info()
    error: str = ""
    failures: int = 0  # consecutive failed saves: the periodic retry's backoff
    attempted_step: int = -1
    attempted_mono: float = float("-inf")

    def owned_by(self, model: Any) -> bool:
        return self.owner is not None and self.owner() is model

    def forget(self) -> None:
        """The directory no longer holds anything of a model in memory."""
        self.owner, self.saved, self.saved_version, self.committed_step = None, None, -1, 0
        self.error, self.failures, self.attempted_step, self.attempted_mono = "", 0, -1, float("-inf")

    def mark_saved(self, model: Any, checkpoint: Checkpoint, version: int) -> None:
        self.owner, self.saved, self.saved_version = weakref.ref(model), checkpoint, version
        self.committed_step, self.error, self.failures = checkpoint.step, "", 0


class CheckpointManager:
    """Saves, lists, restores and prunes the checkpoints of every model of a store.

    every_steps / every_seconds: periodic checkpoints (0: off); keep: committed checkpoints kept per
    model (older ones are pruned after each commit).
    """

    def __init__(self, checkpoint_dir: str, *, every_steps: int = 0, every_seconds: float = 0.0, keep: int = 3,
                 poll_seconds: float = 0.05, metrics: Any = None):  # fmt: skip
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if every_steps < 0 or every_seconds < 0:
            raise ValueError("every_steps and every_seconds must be >= 0")
        self.root = os.path.realpath(checkpoint_dir)
        self.every_steps = int(every_steps)
        self.every_seconds = float(every_seconds)
        self.keep = int(keep)
        self.poll_seconds = poll_seconds
        self._tracks: dict[str, _Track] = {}
        self._tracks_lock = threading.Lock()
        self._store: ModelStore | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="optserve-checkpoint")
        self.metrics = metrics  # the server's ServerMetrics (or None): every save's duration, size or failure

    # -- paths ------------------------------------------------------------------------------------

    def model_dir(self, name: str) -> str:
        """The model's checkpoint directory; names that could escape it are INVALID_ARGUMENT."""
        check_model_name(name)
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.dirname(path) != self.root:
            raise InvalidArgument(f"model name {name!r}: resolves outside the checkpoint directory")
        return path

    def _track(self, name: str) -> _Track:
        with self._tracks_lock:
            return self._tracks.setdefault(name, _Track())

    def _archive_locked(self, name: str, reason: str) -> str:
        """Moves the model's whole directory to `.archive/<name>-<time>-<hex>-<reason>/` (the caller
        holds its save lock): kept for manual recovery, never restored nor mixed with a new model."""
        archive_root = os.path.join(self.root, ARCHIVE_DIR)
        os.makedirs(archive_root, exist_ok=True)
        target = os.path.join(archive_root, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}-{reason}")
        os.rename(self.model_dir(name), target)
        fsync_dir(self.root)
        fsync_dir(archive_root)
        return target

    def _set_aside(self, name: str, checkpoint: Checkpoint, reason: Exception) -> None:
        """A checkpoint that does not verify or install: moved aside, so it is never tried again."""
        try:
            aside = move_aside(checkpoint.path, CORRUPT_MARK)
        except OSError as e:
            log.warning("model %r: skipping checkpoint %s: %s; could not move it aside: %s", name, checkpoint.path, reason, e)
            return
        log.warning("model %r: skipping checkpoint %s: %s; moved aside to %s", name, checkpoint.path, reason,
                    os.path.basename(aside))  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, store: ModelStore) -> None:
        """Restores every model found (the restore rule, module docstring), then starts periodic saves."""
        self._store = store
        os.makedirs(self.root, exist_ok=True)
        for entry in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, entry)
            if entry.startswith(DELETED_PREFIX) or TMP_MARK in entry and entry.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not os.path.isdir(path) or entry == ARCHIVE_DIR:
                continue
            try:
                self.model_dir(entry)
            except InvalidArgument:
                log.warning("checkpoint directory %s: %r is not a model name; ignored", self.root, entry)
                continue
            self._remove_leftovers(path)
            try:
                self._restore_at_start(store, entry)
            except Exception as e:  # noqa: BLE001 - one model's problem must not keep the others down
                log.error("model %r: could not be restored from %s: %s", entry, path, e)
        if self.every_steps or self.every_seconds:
            self._poller = threading.Thread(target=self._poll, name="optserve-checkpoint-poller", daemon=True)
            self._poller.start()

    def _remove_leftovers(self, model_dir: str) -> None:
        for n in os.listdir(model_dir):
            if TMP_MARK in n:
                log.info("removing incomplete checkpoint %s", os.path.join(model_dir, n))
                shutil.rmtree(os.path.join(model_dir, n), ignore_errors=True)

    def _restore_at_start(self, store: ModelStore, name: str) -> None:
        model_dir = self.model_dir(name)
        track = self._track(name)
        with track.save_lock:
            for checkpoint in committed(model_dir):
                try:
                    state = read_checkpoint(checkpoint.path, name)
                    model = state_io.admit_state(store, name, state)
                except NOT_THE_CHECKPOINTS_FAULT as e:
                    log.error("model %r: not restored: %s; its checkpoints stay in %s for the next start", name, e, model_dir)
                    return
                except Exception as e:  # noqa: BLE001 - whatever the reason, this checkpoint cannot be used
                    self._set_aside(name, checkpoint, e)
                    continue
                # No call reaches the model before the server is ready, so its version is the restored state's.
                track.mark_saved(model, checkpoint, model.state_version)
                log.info("model %r: restored from %s (step %d)", name, checkpoint.path, state.step)
                return
            if not os.listdir(model_dir):
                os.rmdir(model_dir)  # nothing to keep
                return
            try:
                target = self._archive_locked(name, "unrestorable")
            except OSError as e:
                log.error("model %r: no checkpoint in %s verifies; not restored, and the directory could not be moved "
                          "to %s: %s", name, model_dir, ARCHIVE_DIR, e)  # fmt: skip
                return
            log.error("model %r: no checkpoint in %s verifies; not restored; the directory was moved to %s so that a "
                      "model created under that name starts clean", name, model_dir, target)  # fmt: skip

    def shutdown(self, store: ModelStore) -> list[str]:
        """Stops periodic saves, lets saves in flight finish, then checkpoints every model. Returns one
        description per model whose final checkpoint failed, naming the steps that are lost (empty:
        every model's state is committed)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        self._writers.shutdown(wait=True)
        failures = []
        for model in store.models():
            try:
                info = self.save_now(model)
                log.info("model %r: final checkpoint %s (step %d)", model.name, info.name, info.step)
            except Exception as e:  # noqa: BLE001 - reported, and the other models still get theirs
                failure = f"model {model.name!r}: {self._lost(model)}: the final checkpoint failed: {e}"
                log.error("%s", failure)
                failures.append(failure)
        return failures

    def _lost(self, model: Any) -> str:
        """What of the model's acknowledged state no checkpoint holds."""
        track = self._track(model.name)
        step = model.step
        saved = track.saved if track.owned_by(model) else None
        if saved is None:
            return f"steps 0..{step} are lost (it has no checkpoint)"
        if step > saved.step:
            return f"steps {saved.step + 1}..{step} are lost (its last checkpoint is {saved.name})"
        return f"its changes since checkpoint {saved.name} of step {step} (hyperparameters, a restore) are lost"

    # -- saving -----------------------------------------------------------------------------------

    def adopt(self, model: Any) -> None:
        """Called when a model is created or uploaded: checkpoints left under its name by a model not
        in memory (one that could not be restored) are archived now, so that neither a restart nor
        its first checkpoint mixes the two. A failure is logged; the first save tries again."""
        track = self._track(model.name)
        with track.save_lock:
            try:
                if not model.deleted:
                    self._claim_locked(model, track)
            except OSError as e:
                log.warning("model %r: could not archive the checkpoints left under its name: %s; retried at its "
                            "first checkpoint", model.name, e)  # fmt: skip

    def _claim_locked(self, model: Any, track: _Track) -> None:
        if track.owned_by(model):
            return
        model_dir = self.model_dir(model.name)
        if os.path.isdir(model_dir) and os.listdir(model_dir):
            target = self._archive_locked(model.name, "replaced")
            log.warning("model %r: %s held checkpoints of an earlier model of that name (not restored); moved to %s so "
                        "that they are neither restored nor mixed with the new model", model.name, model_dir, target)  # fmt: skip
        track.forget()
        track.owner = weakref.ref(model)

    def save_now(self, model: Any) -> pb.CheckpointInfo:
        """Checkpoints the model's current state; returns once committed (waits for a save in flight)."""
        track = self._track(model.name)
        with track.save_lock:
            return self._save_locked(model, track)

    def _save_locked(self, model: Any, track: _Track) -> pb.CheckpointInfo:
        if model.deleted:  # a save that waited for DeleteModel must not bring its directory back
            raise NotFound(f"model {model.name!r} was deleted; not checkpointed")
        model_dir = self.model_dir(model.name)
        snapshot, version = state_io.capture_versioned(model)
        track.attempted_step, track.attempted_mono = snapshot.step, time.monotonic()
        began = time.perf_counter()
        try:
            saved = track.saved
            if track.owned_by(model) and saved is not None and track.saved_version == version and os.path.isdir(saved.path):
                return info_of(model.name, saved)  # nothing changed since it was written or restored
            self._claim_locked(model, track)
            state = snapshot.to_host()
            del snapshot
            if not os.path.isdir(model_dir):
                os.makedirs(model_dir, exist_ok=True)
                fsync_dir(self.root)
            info = write_checkpoint(model_dir, state, next_name(model_dir, state.step))
        except Exception as e:
            track.error = f"step {track.attempted_step}: {e}"
            track.failures += 1
            if self.metrics is not None:
                self.metrics.checkpoint(model.name, time.perf_counter() - began, None, ok=False)
            log.error("model %r: checkpoint at step %d failed: %s", model.name, track.attempted_step, e)
            if isinstance(e, ServiceError):
                raise
            raise CheckpointFailed(f"model {model.name!r}: checkpoint at step {track.attempted_step} failed: {e}") from e
        step, k = parse_name(info.name)
        track.mark_saved(model, Checkpoint(step, k, os.path.join(model_dir, info.name)), version)
        if self.metrics is not None:
            self.metrics.checkpoint(model.name, time.perf_counter() - began, info.bytes, ok=True)
        log.info("model %r: checkpoint %s committed (%d bytes, %.2fs)", model.name, info.name, info.bytes,
                 time.perf_counter() - began)  # fmt: skip
        self._prune(model.name, model_dir)
        return info

    def _prune(self, name: str, model_dir: str) -> None:
        for checkpoint in committed(model_dir)[self.keep :]:
            try:
                remove_tree(checkpoint.path)
            except OSError as e:
                log.warning("model %r: could not prune %s: %s", name, checkpoint.path, e)

    def _due(self, model: Any, track: _Track) -> bool:
        """Whether a periodic save of the model should start now."""
        # Read without the save lock (a save may be updating the track): each field once, into locals.
        saved, saved_version, failures = track.saved, track.saved_version, track.failures
        owned = track.owned_by(model)
        if owned and saved is not None and saved_version == model.state_version:
            return False  # its newest checkpoint holds its current state
        now = time.monotonic()
        if failures:  # retried whether or not the model changes meanwhile
            return now - track.attempted_mono >= min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** min(failures - 1, 16))
        if not owned or saved is None:
            return True  # never checkpointed
        step = model.step
        if step == saved.step:
            return True  # changed without an update (hyperparameters): no step will come to count
        if self.every_steps and abs(step - saved.step) >= self.every_steps:
            return True
        return bool(self.every_seconds) and now - track.attempted_mono >= self.every_seconds

    def _poll(self) -> None:
        """Starts periodic saves; a model with a save in flight is skipped until it is done."""
        while not self._stop.wait(self.poll_seconds):
            store = self._store
            for model in store.models() if store is not None else ():
                track = self._track(model.name)
                if not self._due(model, track) or not track.save_lock.acquire(blocking=False):
                    continue
                try:
                    self._writers.submit(self._periodic, model, track)
                except RuntimeError:  # shutting down
                    track.save_lock.release()
                    return

    def _periodic(self, model: Any, track: _Track) -> None:
        try:
            if not model.deleted:
                self._save_locked(model, track)
        except Exception:  # noqa: BLE001 - already logged and recorded in track.error
            pass
        finally:
            track.save_lock.release()

    # -- queries, restore, delete ------------------------------------------------------------------

    def list(self, name: str) -> list[pb.CheckpointInfo]:
        """Committed checkpoints of a model, newest first."""
        return [info_of(name, c) for c in committed(self.model_dir(name))]

    def describe(self, name: str, info: pb.ModelInfo) -> None:
        """Fills ModelInfo's checkpoint fields."""
        track = self._track(name)
        info.last_checkpoint_step = track.committed_step
        info.last_checkpoint_error = track.error

    def restore(self, store: ModelStore, name: str, step: int) -> Any:
        """Replaces the model's state by the newest checkpoint of `step` (0: of any step) that
        verifies and installs (the others are moved aside as corrupt); checkpoints newer than it are
        moved aside as superseded, so that a restart comes back at this state too."""
        model_dir = self.model_dir(name)
        check_step(step, name)
        model = store.get(name)
        track = self._track(name)
        with track.save_lock:  # not while one of its saves is in flight
            if model.deleted:
                raise NotFound(f"model {name!r} not found")
            try:
                self._claim_locked(model, track)
            except OSError as e:
                raise CheckpointFailed(f"model {name!r}: not restored: could not archive the checkpoints left under "
                                       f"its name: {e}") from None  # fmt: skip
            candidates = [c for c in committed(model_dir) if step == 0 or c.step == step]
            if not candidates:
                have = ", ".join(c.name for c in committed(model_dir)) or "none"
                raise NotFound(f"model {name!r}: " + (f"no checkpoint at step {step} (committed: {have})" if step else "no checkpoint"))
            reasons = []
            for checkpoint in candidates:
                try:
                    state = read_checkpoint(checkpoint.path, name)
                    prepared = state_io.prepare(model, state)
                except StateError as e:
                    self._set_aside(name, checkpoint, e)
                    reasons.append(f"{checkpoint.name}: {e}")
                    continue
                break
            else:
                raise FailedPrecondition(f"model {name!r}: no checkpoint {f'of step {step} ' if step else ''}verifies "
                                         f"(moved aside): {'; '.join(reasons)}")  # fmt: skip
            self._supersede_newer_locked(name, model_dir, checkpoint)
            track.mark_saved(model, checkpoint, model.replace_state(prepared))
        log.info("model %r: restored from %s (step %d)", name, checkpoint.path, state.step)
        return model

    def _supersede_newer_locked(self, name: str, model_dir: str, restored: Checkpoint) -> None:
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
                raise CheckpointFailed(f"model {name!r}: not restored: could not move the newer checkpoint "
                                       f"{checkpoint.name} aside: {e}") from None  # fmt: skip
        if moved:
            log.info("model %r: checkpoints newer than %s moved aside (superseded by the restore): %s", name,
                     restored.name, ", ".join(os.path.basename(a) for _, a in moved))  # fmt: skip

    def delete_model(self, store: ModelStore, name: str, *, delete_checkpoints: bool) -> None:
        """DeleteModel, all or nothing: the model's checkpoints are moved out of the way first (to
        `.archive/`, or to a `.deleted-*` directory removed afterwards when `delete_checkpoints`),
        under its save lock so that no save races; only then is the model removed from the store.
        If they cannot be moved, the model stays, and the error (FAILED_PRECONDITION) says why."""
        store.get(name)  # NOT_FOUND before anything else
        model_dir = self.model_dir(name)
        track = self._track(name)
        moved = None
        with track.save_lock:
            store.get(name)  # a concurrent delete may have won the lock first
            if os.path.isdir(model_dir):
                try:
                    if delete_checkpoints:
                        moved = os.path.join(self.root, f"{DELETED_PREFIX}{name}-{secrets.token_hex(4)}")
                        os.rename(model_dir, moved)
                        fsync_dir(self.root)
                    else:
                        moved = self._archive_locked(name, "deleted")
                except OSError as e:
                    raise FailedPrecondition(
                        f"model {name!r} was not deleted: its checkpoint directory {model_dir} could not be moved "
                        f"aside ({e}); fix the checkpoint directory and retry"
                    ) from None
            try:
                store.delete(name)
            except BaseException:
                if moved is not None:
                    os.rename(moved, model_dir)
                raise
            track.forget()
        if delete_checkpoints and moved is not None:
            shutil.rmtree(moved, ignore_errors=True)  # what remains is removed at the next start
        log.info("model %r: checkpoints %s", name, "deleted" if delete_checkpoints else f"archived to {moved}")
