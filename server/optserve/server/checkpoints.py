"""Checkpoints: when they are taken, restored and pruned (design.md, Checkpoints).

The files and their atomic commit protocol are `checkpoint_files`; this module decides when to
save (on request, every N steps or S seconds, at shutdown), restores every model at start (newest
checkpoint that verifies, corrupt ones moved aside), prunes to `keep` after each commit, and serves
the checkpoint RPCs.

A save snapshots the model under its lock (device copies only, state_io.capture) and writes
outside it, so training continues. One save per model at a time (`_Track.save_lock`). Periodic
saves (every N steps / S seconds) are started by one polling thread, off the update path. Failures
are logged and reported by `info()` (`last_checkpoint_error`), never swallowed.

Model names and steps from clients are validated (store.check_model_name, 0 <= step <= 2**53) and
every path is checked to stay inside the model's directory.
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

from optserve.server import state_io
from optserve.server.checkpoint_files import (
    ARCHIVE_DIR,
    CORRUPT_MARK,
    DELETED_PREFIX,
    TMP_MARK,
    CheckpointFailed,
    check_step,
    committed,
    fsync_dir,
    info_of,
    read_checkpoint,
    remove_tree,
    write_checkpoint,
)
from optserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from optserve.server.state_io import HostState, StateError
from optserve.server.store import ModelStore, check_model_name
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.checkpoints")

@dataclasses.dataclass
class _Track:
    """Per-model checkpoint bookkeeping."""

    save_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    committed_step: int = 0  # newest committed (0: none), for info()
    error: str = ""
    # What the newest checkpoint written or restored holds (the model, its step and
    # hyperparameters): saving the same state again is a no-op instead of a name clash.
    held: tuple[Any, int, dict] | None = None
    attempted_step: int = -1
    attempted_unix: float = 0.0


class CheckpointManager:
    """Saves, lists, restores and prunes the checkpoints of every model of a store.

    every_steps / every_seconds: periodic checkpoints (0: off); keep: committed checkpoints kept per
    model (older ones are pruned after each commit).
    """

    def __init__(self, checkpoint_dir: str, *, every_steps: int = 0, every_seconds: float = 0.0, keep: int = 3,
                 poll_seconds: float = 0.05):  # fmt: skip
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
        self.metrics: Any = None  # the server's ServerMetrics: every save's duration, size or failure

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

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, store: ModelStore) -> None:
        """Restores every model found (newest checkpoint that verifies), then starts periodic saves."""
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
        try:
            step_dir, state = self._newest_verified(name)
        except NotFound:
            log.error("model %r: no checkpoint in %s verifies; not restored", name, self.model_dir(name))
            return
        model = state_io.create_model(store, name, state)
        track = self._track(name)
        track.committed_step = state.step
        track.held = (weakref.ref(model), state.step, state.hyperparams)
        track.attempted_step = state.step
        log.info("model %r: restored from %s (step %d)", name, step_dir, state.step)

    def _newest_verified(self, name: str) -> tuple[str, HostState]:
        """The newest checkpoint that verifies; corrupt ones are logged and moved aside."""
        for step, step_dir in committed(self.model_dir(name)):
            try:
                return step_dir, read_checkpoint(step_dir, name)
            except StateError as e:
                aside = f"{step_dir}{CORRUPT_MARK}{secrets.token_hex(4)}"
                log.warning("model %r: skipping checkpoint %s: %s; moved aside to %s", name, step_dir, e, os.path.basename(aside))
                try:
                    os.rename(step_dir, aside)
                except OSError as err:
                    log.warning("model %r: could not move %s aside: %s", name, step_dir, err)
        raise NotFound(f"model {name!r}: no checkpoint that verifies in {self.model_dir(name)}")

    def shutdown(self, store: ModelStore) -> None:
        """Stops periodic saves, lets saves in flight finish, then checkpoints every model."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        self._writers.shutdown(wait=True)
        for model in store.models():
            try:
                info = self.save_now(model)
                log.info("model %r: final checkpoint %s (step %d)", model.name, info.name, info.step)
            except Exception as e:  # noqa: BLE001 - reported, and the other models still get theirs
                log.error("model %r: final checkpoint failed: %s", model.name, e)

    # -- saving -----------------------------------------------------------------------------------

    def save_now(self, model: Any) -> pb.CheckpointInfo:
        """Checkpoints the model's current state; returns once committed (waits for a save in flight)."""
        track = self._track(model.name)
        with track.save_lock:
            return self._save_locked(model, track)

    def _save_locked(self, model: Any, track: _Track) -> pb.CheckpointInfo:
        model_dir = self.model_dir(model.name)
        snapshot = model.checkpoint_snapshot()
        track.attempted_step, track.attempted_unix = snapshot.step, time.time()
        began = time.perf_counter()
        try:
            state = snapshot.to_host()
            del snapshot
            held = track.held
            step_dir = os.path.join(model_dir, f"step_{state.step}")
            if held is not None and held[0]() is model and held[1] == state.step and held[2] == state.hyperparams \
                    and os.path.isdir(step_dir):  # fmt: skip
                return info_of(model.name, state.step, step_dir)  # nothing changed since it was written
            if os.path.lexists(step_dir):
                raise FailedPrecondition(
                    f"model {model.name!r}: checkpoint {step_dir} already exists and holds another state of step "
                    f"{state.step} (the model was restored to an older step, or its hyperparameters changed); "
                    "checkpoints are never replaced: the next one can be taken after the next update"
                )
            if not os.path.isdir(model_dir):
                os.makedirs(model_dir, exist_ok=True)
                fsync_dir(self.root)
            info = write_checkpoint(model_dir, state)
        except Exception as e:
            track.error = f"step {track.attempted_step}: {e}"
            if self.metrics is not None:
                self.metrics.checkpoint(model.name, time.perf_counter() - began, None, ok=False)
            log.error("model %r: checkpoint at step %d failed: %s", model.name, track.attempted_step, e)
            if isinstance(e, ServiceError):
                raise
            raise CheckpointFailed(f"model {model.name!r}: checkpoint at step {track.attempted_step} failed: {e}") from e
        track.error = ""
        if self.metrics is not None:
            self.metrics.checkpoint(model.name, time.perf_counter() - began, info.bytes, ok=True)
        track.committed_step = max(track.committed_step, state.step)
        track.held = (weakref.ref(model), state.step, state.hyperparams)
        log.info("model %r: checkpoint %s committed (%d bytes, %.2fs)", model.name, info.name, info.bytes,
                 time.perf_counter() - began)  # fmt: skip
        self._prune(model.name, model_dir)
        return info

    def _prune(self, name: str, model_dir: str) -> None:
        for step, path in committed(model_dir)[self.keep :]:
            try:
                remove_tree(path)
            except OSError as e:
                log.warning("model %r: could not prune %s: %s", name, path, e)

    def _due(self, model: Any, track: _Track) -> bool:
        step = model.step
        if step == track.attempted_step:
            return False
        if self.every_steps and step - track.attempted_step >= self.every_steps:
            return True
        return bool(self.every_seconds) and time.time() - track.attempted_unix >= self.every_seconds

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
        return [info_of(name, step, path) for step, path in committed(self.model_dir(name))]

    def describe(self, name: str, info: pb.ModelInfo) -> None:
        """Fills ModelInfo's checkpoint fields."""
        track = self._track(name)
        info.last_checkpoint_step = track.committed_step
        info.last_checkpoint_error = track.error

    def restore(self, store: ModelStore, name: str, step: int) -> Any:
        """Replaces the model's state by checkpoint `step` (0: the newest that verifies)."""
        model_dir = self.model_dir(name)
        check_step(step, name)
        model = store.get(name)
        track = self._track(name)
        with track.save_lock:  # not while one of its saves is in flight
            if step == 0:
                step_dir, state = self._newest_verified(name)
            else:
                step_dir = os.path.join(model_dir, f"step_{step}")
                if not os.path.isdir(step_dir):
                    have = ", ".join(str(s) for s, _ in committed(model_dir)) or "none"
                    raise NotFound(f"model {name!r}: no checkpoint at step {step} (committed steps: {have})")
                try:
                    state = read_checkpoint(step_dir, name)
                except StateError as e:
                    raise FailedPrecondition(f"model {name!r}: checkpoint step_{step} does not verify: {e}") from None
            try:
                prepared = state_io.prepare(model, state)
            except StateError as e:
                raise FailedPrecondition(str(e)) from None
            model.install_checkpoint(prepared)
            track.held = (weakref.ref(model), state.step, state.hyperparams)
            track.attempted_step = state.step
        log.info("model %r: restored from %s (step %d)", name, step_dir, state.step)
        return model

    def archive(self, name: str) -> str | None:
        """Moves a deleted model's checkpoints to `.archive/<name>-<time>-<hex>/`: kept for manual
        recovery, but neither restored at the next start nor mixed with a new model of that name."""
        model_dir = self.model_dir(name)
        track = self._track(name)
        with track.save_lock:
            if not os.path.isdir(model_dir):
                return None
            archive_root = os.path.join(self.root, ARCHIVE_DIR)
            os.makedirs(archive_root, exist_ok=True)
            target = os.path.join(archive_root, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}")
            os.rename(model_dir, target)
            fsync_dir(self.root)
            fsync_dir(archive_root)
        with self._tracks_lock:
            self._tracks.pop(name, None)
        log.info("model %r: checkpoints archived to %s", name, target)
        return target

    def delete_all(self, name: str) -> None:
        """Removes every checkpoint of a model (after a save in flight, if any)."""
        model_dir = self.model_dir(name)
        track = self._track(name)
        with track.save_lock:
            if os.path.isdir(model_dir):
                doomed = os.path.join(self.root, f"{DELETED_PREFIX}{name}-{secrets.token_hex(4)}")
                os.rename(model_dir, doomed)
                fsync_dir(self.root)
                shutil.rmtree(doomed, ignore_errors=True)
        with self._tracks_lock:
            self._tracks.pop(name, None)
        log.info("model %r: checkpoints deleted", name)
