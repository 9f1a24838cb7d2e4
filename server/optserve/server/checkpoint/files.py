"""Checkpoint directories on disk: names, the atomic commit, reading and verifying (docs/design.md, "Checkpoints").

Layout: `<checkpoint_dir>/<model>/step_<N>/` holding `params.safetensors`, `opt_state.safetensors`,
`ema.safetensors` (when the model keeps an EMA) and `manifest.json` (state/manifest.py's to_manifest
plus the sha256 and size of every file, and the sha256 of the manifest's own fields). A second,
different state of the same step (hyperparameters changed, a restore) is committed as
`step_<N>.<k>` (k = 1, 2, ...): checkpoints are ordered by (step, k), newest last. Key layout and
the restore rule: README.md, "Checkpoint format".

Commit protocol: write into `<name>.tmp-<random>/` beside the final name (same filesystem), fsync
every file and the manifest, fsync the directory, rename it to `<name>` (never replacing an existing
one), fsync the model directory. A crash at any point leaves either the complete new checkpoint or
none; leftover `*.tmp-*` directories are removed at start (checkpoint/manager.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple

import safetensors.numpy

from optserve.server.core.errors import InvalidArgument, ServiceError
from optserve.server.core.step import MAX_STEP
from optserve.server.state.errors import StateError
from optserve.server.state.manifest import FORMAT_VERSION, from_manifest, to_manifest
from optserve.server.state.model_state import HostState
from optserve.server.state.safetensors_io import parse_safetensors, sha256_file, to_specs

log = logging.getLogger("optserve.checkpoints")

MANIFEST = "manifest.json"
FILES = {"params": "params.safetensors", "opt": "opt_state.safetensors", "ema": "ema.safetensors"}
# step_<N> or step_<N>.<k>: the k-th further state of step N; steps up to model.MAX_STEP (16 digits)
CHECKPOINT_NAME = re.compile(r"^step_(0|[1-9][0-9]{0,15})(?:\.([1-9][0-9]{0,8}))?$")
# Version 2 = version 1 (manifest.FORMAT_VERSION's fields) + `manifest_sha256`. Version 1 checkpoints
# (written before) are still read, without that check; downloaded files stay at manifest's version.
MANIFEST_VERSION = 2
MANIFEST_DIGEST = "manifest_sha256"
TMP_MARK = ".tmp-"
CORRUPT_MARK = ".corrupt-"  # does not verify or does not install: kept aside for inspection
SUPERSEDED_MARK = ".superseded-"  # newer than a checkpoint restored on request: kept for manual recovery
DELETED_PREFIX = ".deleted-"  # not a valid model name, so never mistaken for one
ARCHIVE_DIR = ".archive"  # checkpoints of deleted models (DeleteModel without delete_checkpoints)
COMPILE_CACHE_DIR = ".compile-cache"  # `optserve serve`'s default compilation cache (core/compilation.py)


class CheckpointFailed(ServiceError):
    """Writing a checkpoint failed (disk full, permissions ...): INTERNAL, with the cause."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as the checkpoint RPCs describe it (the API copies it into
    pb.CheckpointInfo, whose fields have these names)."""

    model: str
    step: int
    name: str  # the directory's name: step_<step> or step_<step>.<k>
    bytes: int  # of its files and manifest
    created_unix: float


class Checkpoint(NamedTuple):
    """A committed checkpoint directory: step_<step> (k = 0) or step_<step>.<k>."""

    step: int
    k: int
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @classmethod
    def at(cls, path: str) -> Checkpoint:
        """The committed checkpoint directory `path`; ValueError when its name is not one."""
        key = parse_name(os.path.basename(path))
        if key is None:
            raise ValueError(f"{path}: not a checkpoint directory name (step_<N> or step_<N>.<k>)")
        return cls(*key, path)


def checkpoint_name(step: int, k: int = 0) -> str:
    return f"step_{step}" if k == 0 else f"step_{step}.{k}"


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, k) of a committed checkpoint's directory name; None for any other name."""
    m = CHECKPOINT_NAME.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def made_by_checkpoints(name: str) -> bool:
    """Whether an entry of a model directory is one the checkpoint code makes: a committed
    checkpoint (`step_<n>[.<k>]`), or one marked incomplete, corrupt or superseded. A directory
    holding none of them is not a model's (someone else's files under the checkpoint directory)."""
    for mark in (TMP_MARK, CORRUPT_MARK, SUPERSEDED_MARK):
        name = name.split(mark, 1)[0]
    return parse_name(name) is not None


def check_step(step: int, model: str) -> int:
    if not isinstance(step, int) or not 0 <= step <= MAX_STEP:
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


def move_aside(path: str, mark: str) -> str:
    """Renames `path` to `<path><mark><random>` (a name no listing takes for a checkpoint) and
    fsyncs the parent, so the move survives a crash; returns the new path. OSError if it fails."""
    aside = f"{path}{mark}{secrets.token_hex(4)}"
    os.rename(path, aside)
    fsync_dir(os.path.dirname(path))
    return aside


# ---------------------------------------------------------------------------------------------
# The manifest's own checksum


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of every field but the digest:
    it does not depend on the file's formatting, and any change to a value changes it."""
    fields = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


_unchecked_logged: set[str] = set()  # model directories whose version-1 manifests were reported


def _check_manifest_digest(manifest: dict, mpath: str) -> dict:
    """The manifest as from_manifest reads it, once its own checksum verifies (version 2); version 1 has
    none and is accepted as it is, reported once per model directory."""
    version = manifest.get("format_version")
    if version == 1:
        model_dir = os.path.dirname(os.path.dirname(mpath))
        if model_dir not in _unchecked_logged:
            _unchecked_logged.add(model_dir)
            log.info(
                "%s: format_version 1 (written by an older optserve): its manifest has no checksum of its own, "
                "only its files are verified",
                mpath,
            )
        return manifest
    if version != MANIFEST_VERSION:
        raise StateError(
            f"{mpath}: unsupported format_version {version!r} (this server reads 1 and {MANIFEST_VERSION})"
        )
    stated = manifest.get(MANIFEST_DIGEST)
    actual = manifest_digest(manifest)
    if stated != actual:
        raise StateError(
            f"{mpath}: {MANIFEST_DIGEST} mismatch (stated {str(stated)[:16]}..., fields hash to "
            f"{actual[:16]}...): the manifest was edited or is corrupt"
        )
    fields = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    fields["format_version"] = FORMAT_VERSION  # the state fields are version 1's
    return fields


# ---------------------------------------------------------------------------------------------
# One checkpoint directory


def write_checkpoint(model_dir: str, state: HostState, name: str | None = None) -> CheckpointInfo:
    """Writes and commits `state` as `model_dir/<name>` (default `step_<step>`) with the atomic protocol."""
    name = checkpoint_name(state.step) if name is None else name
    parsed = parse_name(name)
    if parsed is None or parsed[0] != state.step:
        raise ValueError(f"{name!r} is not a checkpoint name of step {state.step}")
    final = os.path.join(model_dir, name)
    if os.path.lexists(final):
        raise FileExistsError(f"{final} already exists")
    tmp = f"{final}{TMP_MARK}{secrets.token_hex(6)}"
    os.mkdir(tmp)
    try:
        manifest = to_manifest(state)
        manifest["format_version"] = MANIFEST_VERSION
        manifest["created_unix"] = time.time()
        manifest["files"] = {}
        for group, tensors in state.tensor_groups().items():
            path = os.path.join(tmp, FILES[group])
            safetensors.numpy.save_file(to_specs(tensors), path)
            fsync_file(path)
            digest, size = sha256_file(path)
            manifest["files"][FILES[group]] = {"sha256": digest, "bytes": size}
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
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
    return CheckpointInfo(
        model=state.name, step=state.step, name=name, bytes=total, created_unix=manifest["created_unix"]
    )


def read_manifest(step_dir: str) -> dict:
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise StateError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateError(f"{path}: not valid JSON, truncated or corrupt ({e})") from None
    if not isinstance(manifest, dict):
        raise StateError(f"{path}: not a JSON object (a {type(manifest).__name__})")
    return manifest


def read_checkpoint(step_dir: str, expect_model: str) -> HostState:
    """Loads a committed checkpoint once everything verifies: the manifest's own checksum, every
    file's size and sha256, the tensors against the manifest's schema, and the directory's name
    against the model and step; StateError (naming the file and the problem) otherwise."""
    try:
        return _read_checkpoint(step_dir, expect_model)
    except StateError:
        raise
    except OSError as e:
        raise StateError(f"{step_dir}: cannot be read ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # a field of the wrong type
        raise StateError(f"{os.path.join(step_dir, MANIFEST)}: malformed ({type(e).__name__}: {e})") from None


def _read_checkpoint(step_dir: str, expect_model: str) -> HostState:
    mpath = os.path.join(step_dir, MANIFEST)
    manifest = _check_manifest_digest(read_manifest(step_dir), mpath)
    files = manifest.get("files")
    if not isinstance(files, dict) or FILES["params"] not in files or FILES["opt"] not in files:
        raise StateError(f"{mpath}: lists no params/opt_state files")
    groups = {}
    for group, fname in FILES.items():
        entry = files.get(fname)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise StateError(f"{mpath}: files[{fname!r}] is not an object")
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
            raise StateError(
                f"{path}: sha256 mismatch (file {digest[:16]}..., manifest {str(entry.get('sha256'))[:16]}...)"
            )
        groups[group] = parse_safetensors(data, path)[0]
    state = from_manifest(manifest, groups, mpath)
    parsed = parse_name(os.path.basename(step_dir))
    if state.name != expect_model or parsed is None or parsed[0] != state.step:
        raise StateError(f"{mpath}: describes model {state.name!r} step {state.step}, not this directory")
    _check_params(state, os.path.join(step_dir, FILES["params"]))
    return state


def _check_params(state: HostState, where: str) -> None:
    """The parameter tensors are exactly the manifest's schema (dtype and shape): a schema that
    disagrees with its tensors is corrupt, and must not be taken for a model of another size."""
    schema = {leaf.path: leaf for leaf in state.schema}
    extra = sorted(set(state.params) - set(schema))
    if extra:
        raise StateError(f"{where}: tensor {extra[0]!r} is not in the manifest's schema")
    for path, leaf in schema.items():
        a = state.params.get(path)
        if a is None:
            raise StateError(f"{where}: no tensor for schema leaf {path!r}")
        if a.dtype.name != leaf.dtype or tuple(a.shape) != tuple(leaf.shape):
            raise StateError(
                f"{where}: tensor {path!r} is {a.dtype.name}{list(a.shape)}, the manifest's schema says "
                f"{leaf.dtype}{list(leaf.shape)}"
            )


def committed(model_dir: str) -> list[Checkpoint]:
    """The committed checkpoints in a model directory, newest (highest (step, k)) first."""
    try:
        names = os.listdir(model_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [Checkpoint(*key, os.path.join(model_dir, n)) for n in names if (key := parse_name(n)) is not None]
    return sorted(found, reverse=True)


def next_name(model_dir: str, step: int) -> str:
    """The name for a new checkpoint of `step`: `step_<step>`, or `step_<step>.<k>` after the
    highest k committed for that step, so that it sorts after every checkpoint of that step."""
    ks = [c.k for c in committed(model_dir) if c.step == step]
    return checkpoint_name(step, max(ks) + 1 if ks else 0)


def info_of(model: str, checkpoint: Checkpoint) -> CheckpointInfo:
    """CheckpointInfo from a manifest (not verified: listing stays cheap)."""
    try:
        manifest = read_manifest(checkpoint.path)
        size = sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values())
        size += os.path.getsize(os.path.join(checkpoint.path, MANIFEST))
        created = float(manifest.get("created_unix", 0.0))
    except (StateError, OSError, AttributeError, TypeError, ValueError):
        size, created = 0, 0.0
    return CheckpointInfo(model=model, step=checkpoint.step, name=checkpoint.name, bytes=size, created_unix=created)
