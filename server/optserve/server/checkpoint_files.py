"""Checkpoint directories on disk: the atomic commit protocol, reading and verifying (design.md).

Layout: `<checkpoint_dir>/<model>/step_<N>/` holding `params.safetensors`, `opt_state.safetensors`,
`ema.safetensors` (when the model keeps an EMA) and `manifest.json` (state_io.HostState.manifest()
plus the sha256 and size of every file). Key layout: README.md, "Checkpoint format".

Commit protocol: write into `step_N.tmp-<random>/` beside the final name (same filesystem), fsync
every file and the manifest, fsync the directory, rename it to `step_N` (never replacing an existing
one), fsync the model directory. A crash at any point leaves either the complete new checkpoint or
none; leftover `*.tmp-*` directories are removed at start (checkpoints.CheckpointManager).
"""
from __future__ import annotations

import hashlib
import time
import json
import logging
import os
import re
import secrets
import shutil

from optserve.server import state_io
from optserve.server.errors import InvalidArgument, ServiceError
from optserve.server.state_io import HostState, StateError
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.checkpoints")

MANIFEST = "manifest.json"
FILES = {"params": "params.safetensors", "opt": "opt_state.safetensors", "ema": "ema.safetensors"}
STEP_DIR = re.compile(r"^step_(0|[1-9][0-9]{0,15})$")  # steps up to state_io.MAX_STEP (16 digits)
TMP_MARK = ".tmp-"
CORRUPT_MARK = ".corrupt-"
DELETED_PREFIX = ".deleted-"  # not a valid model name, so never mistaken for one
ARCHIVE_DIR = ".archive"  # checkpoints of deleted models (DeleteModel without delete_checkpoints)


class CheckpointFailed(ServiceError):
    """Writing a checkpoint failed (disk full, permissions ...): INTERNAL, with the cause."""


def check_step(step: int, model: str) -> int:
    if not isinstance(step, int) or not 0 <= step <= state_io.MAX_STEP:
        raise InvalidArgument(f"model {model!r}: checkpoint step {step!r} must be an integer in [0, 2**53 - 1]")
    return step


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Removes a directory tree; renamed to a temporary name first so that a crash midway leaves
    a `*.tmp-*` directory (removed at the next start), never a partial `step_N`."""
    doomed = f"{path}{TMP_MARK}del{secrets.token_hex(4)}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)


# ---------------------------------------------------------------------------------------------
# One checkpoint directory


def write_checkpoint(model_dir: str, state: HostState) -> pb.CheckpointInfo:
    """Writes and commits `state` as `model_dir/step_<step>` with the atomic protocol."""
    final = os.path.join(model_dir, f"step_{state.step}")
    if os.path.lexists(final):
        raise FileExistsError(f"{final} already exists")
    tmp = f"{final}{TMP_MARK}{secrets.token_hex(6)}"
    os.mkdir(tmp)
    try:
        import safetensors.numpy

        manifest = state.manifest()
        manifest["created_unix"] = time.time()
        manifest["files"] = {}
        for group, tensors in state.tensor_groups().items():
            path = os.path.join(tmp, FILES[group])
            safetensors.numpy.save_file(state_io.to_specs(tensors), path)
            fsync_file(path)
            digest, size = state_io.sha256_file(path)
            manifest["files"][FILES[group]] = {"sha256": digest, "bytes": size}
        path = os.path.join(tmp, MANIFEST)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.lexists(final):  # one save per model at a time, so nothing races us here
            raise FileExistsError(f"{final} already exists")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(model_dir)
    total = sum(f["bytes"] for f in manifest["files"].values()) + os.path.getsize(os.path.join(final, MANIFEST))
    return pb.CheckpointInfo(model=state.name, step=state.step, name=os.path.basename(final), bytes=total,
                             created_unix=manifest["created_unix"])  # fmt: skip


def read_manifest(step_dir: str) -> dict:
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise StateError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path}: not valid JSON, truncated or corrupt ({e})") from None


def read_checkpoint(step_dir: str, expect_model: str) -> HostState:
    """Loads a committed checkpoint, verifying every file's size and sha256 first."""
    manifest = read_manifest(step_dir)
    mpath = os.path.join(step_dir, MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or FILES["params"] not in files or FILES["opt"] not in files:
        raise StateError(f"{mpath}: lists no params/opt_state files")
    groups = {}
    for group, fname in FILES.items():
        entry = files.get(fname)
        if entry is None:
            continue
        path = os.path.join(step_dir, fname)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StateError(f"{path}: missing (listed in the manifest)") from None
        if len(data) != entry.get("bytes"):
            raise StateError(f"{path}: {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated?)")

        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise StateError(f"{path}: sha256 mismatch (file {digest[:16]}..., manifest {str(entry.get('sha256'))[:16]}...)")
        groups[group] = state_io.parse_safetensors(data, path)[0]
    state = state_io.from_manifest(manifest, groups, mpath)
    m = STEP_DIR.match(os.path.basename(step_dir))
    if state.name != expect_model or m is None or int(m.group(1)) != state.step:
        raise StateError(f"{mpath}: describes model {state.name!r} step {state.step}, not this directory")
    return state


def committed(model_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the committed checkpoints in a model directory, newest first."""
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(model_dir, n)) for n in names if (m := STEP_DIR.match(n))]
    return sorted(found, reverse=True)


def info_of(model: str, step: int, step_dir: str) -> pb.CheckpointInfo:
    """CheckpointInfo from a manifest (not verified: listing stays cheap)."""
    try:
        manifest = read_manifest(step_dir)
        size = sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values())
        size += os.path.getsize(os.path.join(step_dir, MANIFEST))
        created = float(manifest.get("created_unix", 0.0))
    except (StateError, OSError, AttributeError, TypeError, ValueError):
        size, created = 0, 0.0
    return pb.CheckpointInfo(model=model, step=step, name=os.path.basename(step_dir), bytes=size, created_unix=created)


# ---------------------------------------------------------------------------------------------
# The manager
