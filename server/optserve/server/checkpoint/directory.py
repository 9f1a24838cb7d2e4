"""The checkpoint directory: one subdirectory per model name, and where checkpoints that must not
be used again go (moved aside beside the others, or the whole model directory into `.archive/`).

Model names from clients are validated (store.check_model_name) and every path is checked to stay
inside the checkpoint directory.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time

from optserve.server.checkpoint.files import (
    ARCHIVE_DIR,
    CORRUPT_MARK,
    TMP_MARK,
    Checkpoint,
    fsync_dir,
    made_by_checkpoints,
    move_aside,
)
from optserve.server.checkpoint.track import Track
from optserve.server.core.errors import InvalidArgument
from optserve.server.core.model import Model
from optserve.server.core.store import check_model_name

log = logging.getLogger("optserve.checkpoints")


class CheckpointRoot:
    """The directory holding every model's checkpoints (`path`, resolved)."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)

    def model_dir(self, name: str) -> str:
        """The model's checkpoint directory; names that could escape it are INVALID_ARGUMENT."""
        check_model_name(name)
        path = os.path.realpath(os.path.join(self.path, name))
        if os.path.dirname(path) != self.path:
            raise InvalidArgument(f"model name {name!r}: resolves outside the checkpoint directory")
        return path

    def archive_locked(self, name: str, reason: str) -> str:
        """Moves the model's whole directory to `.archive/<name>-<time>-<hex>-<reason>/` (the caller
        holds its save lock): kept for manual recovery, never restored nor mixed with a new model."""
        archive_root = os.path.join(self.path, ARCHIVE_DIR)
        os.makedirs(archive_root, exist_ok=True)
        target = os.path.join(archive_root, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}-{reason}")
        os.rename(self.model_dir(name), target)
        fsync_dir(self.path)
        fsync_dir(archive_root)
        return target

    def set_aside(self, name: str, checkpoint: Checkpoint, reason: Exception) -> None:
        """A checkpoint that does not verify or install: moved aside, so it is never tried again."""
        try:
            aside = move_aside(checkpoint.path, CORRUPT_MARK)
        except OSError as e:
            log.warning(
                "model %r: skipping checkpoint %s: %s; could not move it aside: %s", name, checkpoint.path, reason, e
            )
            return
        log.warning(
            "model %r: skipping checkpoint %s: %s; moved aside to %s",
            name,
            checkpoint.path,
            reason,
            os.path.basename(aside),
        )

    def claim_locked(self, model: Model, track: Track) -> None:
        """Makes `model` the owner of its name's directory (the caller holds its save lock):
        checkpoints found there that are not its own are archived first. OSError if they cannot be."""
        if track.owned_by(model):
            return
        model_dir = self.model_dir(model.name)
        # Other files (not a checkpoint's) are not archived: they are not ours to move.
        if os.path.isdir(model_dir) and any(made_by_checkpoints(n) for n in os.listdir(model_dir)):
            target = self.archive_locked(model.name, "replaced")
            log.warning(
                "model %r: %s held checkpoints of an earlier model of that name (not restored); moved to %s so "
                "that they are neither restored nor mixed with the new model",
                model.name,
                model_dir,
                target,
            )
        track.start_owning(model)


def remove_leftovers(model_dir: str) -> None:
    """Removes the incomplete checkpoints (`*.tmp-*`) an interrupted save or prune left behind."""
    for n in os.listdir(model_dir):
        if TMP_MARK in n and made_by_checkpoints(n):
            log.info("removing incomplete checkpoint %s", os.path.join(model_dir, n))
            shutil.rmtree(os.path.join(model_dir, n), ignore_errors=True)
