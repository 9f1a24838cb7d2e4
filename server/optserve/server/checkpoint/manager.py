"""Checkpoints: when they are taken, and the checkpoint half of DeleteModel (docs/design.md,
"Checkpoints"; README.md, "Checkpoint format").

The files, their names and their atomic commit protocol are checkpoint/files.py; which checkpoint a
restore uses (at start and on request) is checkpoint/restore.py; the directory of each model and
where unusable checkpoints go is checkpoint/directory.py. This module restores every model at
start, decides when to save (on request, every N steps or S seconds, at shutdown), prunes to
`keep` after each commit, and serves the checkpoint calls and the checkpoint half of DeleteModel.

"Unchanged since the last save" is decided by the model's `state_version` (bumped by every update,
worker record, hyperparameter change and restore), not by its step: another state of a step that
has a checkpoint is committed as `step_<N>.<k>`. A model directory holds only the checkpoints of
the model object that owns it (checkpoint/track.py).

A save snapshots the model under its lock (device copies only, model_state.capture) and writes
outside it, so training continues. One save per model at a time (`Track.save_lock`). Periodic
saves are started by one polling thread, off the update path; a failed one is retried with a
bounded backoff even when the model does not change. Failures are logged and reported by
`describe()` (`last_error`) and by `shutdown()`, never swallowed.

Model names and steps from clients are validated (store.check_model_name, files.check_step)
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
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from optserve.server.checkpoint.directory import CheckpointRoot
from optserve.server.checkpoint.files import (
    DELETED_PREFIX,
    Checkpoint,
    CheckpointFailed,
    CheckpointInfo,
    committed,
    fsync_dir,
    info_of,
    next_name,
    remove_tree,
    write_checkpoint,
)
from optserve.server.checkpoint.restore import restore_all, restore_on_request
from optserve.server.checkpoint.track import Track
from optserve.server.core.errors import FailedPrecondition, NotFound, ServiceError
from optserve.server.core.model import Model, ModelState
from optserve.server.core.store import ModelStore
from optserve.server.state import model_state

log = logging.getLogger("optserve.checkpoints")

RETRY_FIRST_SECONDS = 0.5  # a failed periodic save is retried after this, doubling each time ...
RETRY_MAX_SECONDS = 10.0  # ... up to this


@dataclasses.dataclass(frozen=True)
class CheckpointStatus:
    """What GetModel reports of a model's checkpoints."""

    last_step: int  # step of its newest checkpoint, written or restored (0: none)
    last_error: str  # why its latest save failed ("": it did not)
    last_unix: float = 0.0  # when the newest checkpoint was committed (its directory's mtime; 0: none)


class SaveMetrics(Protocol):
    """Where every save's duration, size or failure is recorded (the server's ServerMetrics)."""

    def checkpoint(self, model: str, seconds: float, nbytes: int | None, ok: bool) -> None: ...


class CheckpointManager:
    """Saves, lists, restores and prunes the checkpoints of every model of a store.

    every_steps / every_seconds: periodic checkpoints (0: off); keep: committed checkpoints kept per
    model (older ones are pruned after each commit); metrics: the server's ServerMetrics (every
    save's duration, size or failure is recorded there), or None.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        keep: int = 3,
        poll_seconds: float = 0.05,
        metrics: SaveMetrics | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if every_steps < 0 or every_seconds < 0:
            raise ValueError("every_steps and every_seconds must be >= 0")
        self._root = CheckpointRoot(checkpoint_dir)
        self.every_steps = int(every_steps)
        self.every_seconds = float(every_seconds)
        self.keep = int(keep)
        self.poll_seconds = poll_seconds
        self._tracks: dict[str, Track] = {}
        self._tracks_lock = threading.Lock()
        self._store: ModelStore | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="optserve-checkpoint")
        self.metrics = metrics  # the server's ServerMetrics (or None): every save's duration, size or failure

    def _track(self, name: str) -> Track:
        with self._tracks_lock:
            return self._tracks.setdefault(name, Track())

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, store: ModelStore) -> None:
        """Restores every model found (restore.py's rule), then starts periodic saves."""
        self._store = store
        restore_all(self._root, store, self._track)
        if self.every_steps or self.every_seconds:
            self._poller = threading.Thread(target=self._poll, name="optserve-checkpoint-poller", daemon=True)
            self._poller.start()

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
            except Exception as e:  # reported, and the other models still get theirs
                failure = f"model {model.name!r}: {self._lost(model)}: the final checkpoint failed: {e}"
                log.error("%s", failure)
                failures.append(failure)
        return failures

    def _lost(self, model: Model) -> str:
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

    def adopt(self, model: Model) -> None:
        """Called when a model is created or uploaded: checkpoints left under its name by a model not
        in memory (one that could not be restored) are archived now, so that neither a restart nor
        its first checkpoint mixes the two. A failure is logged; the first save tries again."""
        track = self._track(model.name)
        with track.save_lock:
            try:
                if not model.deleted:
                    self._root.claim_locked(model, track)
            except OSError as e:
                log.warning(
                    "model %r: could not archive the checkpoints left under its name: %s; retried at its "
                    "first checkpoint",
                    model.name,
                    e,
                )

    def save_now(self, model: Model, at_step: int | None = None, timeout: float = 60.0) -> CheckpointInfo:
        """Checkpoints the model's current state, or with `at_step` the state of exactly that step
        (waiting up to `timeout` seconds for the model to reach it: the shards of a model over
        several servers save one step, core/sharding.py); returns once committed (waits for a save
        in flight)."""
        track = self._track(model.name)
        with track.save_lock:
            return self._save_locked(model, track, at_step, timeout)

    def _capture(self, model: Model, at_step: int | None, timeout: float) -> tuple[ModelState, int]:
        if at_step is not None:
            return model.capture_at(at_step, timeout)
        if model.shard is not None:  # the step multiple the shards all capture, when one waits
            kept = model.take_captured()
            if kept is not None:
                return kept
        return model.capture_state()

    def _save_locked(
        self, model: Model, track: Track, at_step: int | None = None, timeout: float = 60.0
    ) -> CheckpointInfo:
        if model.deleted:  # a save that waited for DeleteModel must not bring its directory back
            raise NotFound(f"model {model.name!r} was deleted; not checkpointed")
        model_dir = self._root.model_dir(model.name)
        snapshot, version = model_state.snapshot_of(model, self._capture(model, at_step, timeout))
        track.attempted_step, track.attempted_mono = snapshot.step, time.monotonic()
        began = time.perf_counter()
        try:
            saved = track.saved
            if (
                track.owned_by(model)
                and saved is not None
                and track.saved_version == version
                and os.path.isdir(saved.path)
            ):
                return info_of(model.name, saved)  # nothing changed since it was written or restored
            self._root.claim_locked(model, track)
            state = snapshot.to_host()
            del snapshot
            if not os.path.isdir(model_dir):
                os.makedirs(model_dir, exist_ok=True)
                fsync_dir(self._root.path)
            info = write_checkpoint(model_dir, state, next_name(model_dir, state.step))
        except Exception as e:
            track.error = f"step {track.attempted_step}: {e}"
            track.failures += 1
            if self.metrics is not None:
                self.metrics.checkpoint(model.name, time.perf_counter() - began, None, ok=False)
            log.error("model %r: checkpoint at step %d failed: %s", model.name, track.attempted_step, e)
            if isinstance(e, ServiceError):
                raise
            raise CheckpointFailed(
                f"model {model.name!r}: checkpoint at step {track.attempted_step} failed: {e}"
            ) from e
        track.mark_saved(model, Checkpoint.at(os.path.join(model_dir, info.name)), version)
        if self.metrics is not None:
            self.metrics.checkpoint(model.name, time.perf_counter() - began, info.bytes, ok=True)
        log.info(
            "model %r: checkpoint %s committed (%d bytes, %.2fs)",
            model.name,
            info.name,
            info.bytes,
            time.perf_counter() - began,
        )
        self._prune(model.name, model_dir)
        return info

    def _prune(self, name: str, model_dir: str) -> None:
        for checkpoint in committed(model_dir)[self.keep :]:
            try:
                remove_tree(checkpoint.path)
            except OSError as e:
                log.warning("model %r: could not prune %s: %s", name, checkpoint.path, e)

    def _due(self, model: Model, track: Track) -> bool:
        """Whether a periodic save of the model should start now."""
        # Read without the save lock (a save may be updating the track): each field once, into locals.
        saved, saved_version, failures = track.saved, track.saved_version, track.failures
        owned = track.owned_by(model)
        if owned and saved is not None and saved_version == model.state_version:
            return False  # its newest checkpoint holds its current state
        now = time.monotonic()
        if failures:  # retried whether or not the model changes meanwhile
            return now - track.attempted_mono >= min(
                RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** min(failures - 1, 16)
            )
        if not owned or saved is None:
            return True  # never checkpointed
        step = model.step
        if step == saved.step:
            return True  # changed without an update (hyperparameters): no step will come to count
        if model.shard is not None:
            # a shard saves the multiples of every_steps, captured as the model leaves them (_poll
            # sets capture_every), so that every shard of the model holds checkpoints of the same steps
            if model.has_captured():
                return True
        elif self.every_steps and abs(step - saved.step) >= self.every_steps:
            return True
        return bool(self.every_seconds) and now - track.attempted_mono >= self.every_seconds

    def _poll(self) -> None:
        """Starts periodic saves; a model with a save in flight is skipped until it is done."""
        while not self._stop.wait(self.poll_seconds):
            store = self._store
            for model in store.models() if store is not None else ():
                if model.shard is not None:
                    model.capture_every = self.every_steps
                track = self._track(model.name)
                if not self._due(model, track) or not track.save_lock.acquire(blocking=False):
                    continue
                try:
                    self._writers.submit(self._periodic, model, track)
                except RuntimeError:  # shutting down
                    track.save_lock.release()
                    return

    def _periodic(self, model: Model, track: Track) -> None:
        try:
            if not model.deleted:
                self._save_locked(model, track)
        except Exception:  # already logged and recorded in track.error
            pass
        finally:
            track.save_lock.release()

    # -- queries, restore, delete ------------------------------------------------------------------

    def list(self, name: str) -> list[CheckpointInfo]:
        """Committed checkpoints of a model, newest first."""
        return [info_of(name, c) for c in committed(self._root.model_dir(name))]

    def describe(self, name: str) -> CheckpointStatus:
        """The model's newest checkpoint step and latest save error."""
        track = self._track(name)
        saved, when = track.saved, 0.0
        if saved is not None:
            try:
                when = os.stat(saved.path).st_mtime
            except OSError:  # pruned or moved aside meanwhile: no age to tell
                when = 0.0
        return CheckpointStatus(last_step=track.committed_step, last_error=track.error, last_unix=when)

    def restore(self, store: ModelStore, name: str, step: int, tag: str = "") -> Model:
        """RestoreCheckpoint: the newest checkpoint of `step` (0: of any step) that verifies
        replaces the model's state (restore.restore_on_request; `tag`: RestoreCheckpointRequest.tag)."""
        return restore_on_request(self._root, store, name, step, self._track, tag)

    def delete_model(self, store: ModelStore, name: str, *, delete_checkpoints: bool) -> None:
        """DeleteModel, all or nothing: the model's checkpoints are moved out of the way first (to
        `.archive/`, or to a `.deleted-*` directory removed afterwards when `delete_checkpoints`),
        under its save lock so that no save races; only then is the model removed from the store.
        If they cannot be moved, the model stays, and the error (FAILED_PRECONDITION) says why."""
        store.get(name)  # NOT_FOUND before anything else
        model_dir = self._root.model_dir(name)
        track = self._track(name)
        moved = None
        with track.save_lock:
            store.get(name)  # a concurrent delete may have won the lock first
            if os.path.isdir(model_dir):
                try:
                    if delete_checkpoints:
                        moved = os.path.join(self._root.path, f"{DELETED_PREFIX}{name}-{secrets.token_hex(4)}")
                        os.rename(model_dir, moved)
                        fsync_dir(self._root.path)
                    else:
                        moved = self._root.archive_locked(name, "deleted")
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
