"""`Model`: a handle on one model of a server (push, pull, push_pull, info, checkpoints).

Bulky calls stream chunks framed by `optserve.wire`; tensors that fit in one chunk use the unary
twins (PushOne, PullOne, PushPullOne), which cost a third of a stream in grpcio.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from optserve.client import pytree
from optserve.client.errors import InvalidArgumentError, OptserveError
from optserve.client.messages import info_to_dict, to_wire
from optserve.client.transport import Connection
from optserve.client.worker import Worker
from optserve.v1 import optserve_pb2 as pb
from optserve.wire import dtypes
from optserve.wire.assembler import TensorAssembler, buffer_of
from optserve.wire.chunks import WireLeaf, chunk_messages
from optserve.wire.dtypes import LeafSpec
from optserve.wire.framing import parse_message


class _IntoArrays(TensorAssembler):
    """A pull assembled in the caller's arrays (`out`): each leaf whose wire dtype and shape its
    array has is received straight into it (others, e.g. narrowed on the wire, in fresh buffers)."""

    def __init__(self, schema: dict[str, LeafSpec], *, what: str, targets: dict[str, np.ndarray] | None):
        super().__init__(schema, what=what, cast_floats=True)
        self._targets = targets or {}

    def allocate(self, path: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        given = buffer_of(self._targets.get(path), dtype, shape)
        return given if given is not None else super().allocate(path, dtype, shape, nbytes)


class Model:
    """A handle on one model. Cheap to create; holds no server resources.

    client: the connection its calls go through (a `Client`)."""

    def __init__(self, client: Connection, name: str, structure: pytree.Structure | None, info: pb.ModelInfo | None):
        self.client = client
        self.name = name
        self._structure = structure
        self._schema = {leaf.path: leaf for leaf in info.schema} if info is not None else None
        # Parameters that fit in one chunk come back through the unary twins (PullOne, PushPullOne).
        self._params_fit_one_chunk = info is not None and info.param_bytes <= client.chunk_bytes

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self.client.target})"

    # -- data path --------------------------------------------------------------------------------

    def _push_header(
        self, base_step: int | None, weight: float | None, worker_id: str = "", seq: int = 0
    ) -> pb.PushHeader:
        h = pb.PushHeader(model=self.name, worker_id=worker_id, seq=seq, weight=weight or 0.0)
        if base_step is not None:
            h.base_step = base_step
        return h

    def _grad_leaves(self, grads: Any, wire_dtype: str | None) -> Sequence[WireLeaf]:
        leaves, structure = pytree.flatten(grads)
        if self._structure is None:
            self._structure = structure
        return to_wire(leaves, wire_dtype)

    def _push_messages(self, header: pb.PushHeader, leaves: Sequence[WireLeaf]) -> tuple[bytes | None, Iterator[bytes]]:
        """(the only message, or None) and the message stream: a gradient that frames into one
        message goes through a unary twin; a bigger one starts streaming after one lookahead."""
        msgs = chunk_messages(pb.PushRequest(header=header), leaves, self.client.chunk_bytes)
        first = next(msgs)
        second = next(msgs, None)
        if second is None:
            return first, iter((first,))
        return None, itertools.chain((first, second), msgs)

    def push_raw(
        self, header: pb.PushHeader, leaves: Sequence[WireLeaf], timeout: float | None = None
    ) -> pb.PushResponse:
        only, msgs = self._push_messages(header, leaves)
        if only is not None:
            return self.client.call(self.client._push_one, only, timeout=timeout)
        return self.client.call(self.client._push, msgs, timeout=timeout)

    def push(
        self, grads: Any, *, base_step: int | None = None, weight: float | None = None, wire_dtype: str | None = None
    ) -> int:
        """Sends a gradient pytree. Returns (async) the step after the update, (sync) the step it joins."""
        resp = self.push_raw(self._push_header(base_step, weight), self._grad_leaves(grads, wire_dtype))
        return resp.step

    def _pull_request(
        self,
        *,
        min_step: int | None,
        timeout: float | None,
        ema: bool,
        wire_dtype: str | None,
        if_newer_than: int | None,
    ) -> pb.PullRequest:
        req = pb.PullRequest(
            model=self.name,
            timeout_seconds=timeout or 0.0,
            ema=ema,
            wire_dtype=wire_dtype or "",
            max_message_bytes=self.client.max_receive_bytes,
        )
        if min_step is not None:
            req.min_step = min_step
        if if_newer_than is not None:
            req.if_newer_than = if_newer_than
        return req

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
        """Fetches the parameters as a pytree (the structure of `like`, of the create/push, or nested dicts).

        min_step: wait (up to `timeout` seconds) until the model reaches that step.
        if_newer_than: return None when the model's step is not greater than this.
        out: a pytree of writable numpy arrays (or CPU torch tensors) with the model's leaves, dtypes
            and shapes, e.g. the previous pull's result: the parameters are written into it and `out`
            itself is returned. A loop that pulls every step then reuses its memory instead of having
            the OS map and zero fresh pages for every pull (measured on a 2-core VM: ~200 ms of a
            400 MB pull). If the pull fails midway, `out` may hold a mix of old and new values.
        """
        if out is not None and like is not None:
            raise ValueError("pass `like` or `out`, not both")
        req = self._pull_request(
            min_step=min_step, timeout=timeout, ema=ema, wire_dtype=wire_dtype, if_newer_than=if_newer_than
        )
        deadline = None if timeout is None else timeout + (self.client.timeout or 30.0)
        if self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._pull_one, req, timeout=deadline),)
        else:
            replies = self.client.stream(self.client._pull, req, timeout=deadline)
        step, params = self.read_pull_stream(replies, like, out=out)
        self.last_step = step
        return params

    def push_pull(
        self,
        grads: Any,
        *,
        base_step: int | None = None,
        weight: float | None = None,
        wire_dtype: str | None = None,
        like: Any = None,
        out: Any = None,
    ) -> Any:
        """Pushes a gradient and returns the updated parameters in one round trip (`out`: see pull)."""
        header = self._push_header(base_step, weight)
        header.pull.CopyFrom(
            self._pull_request(min_step=None, timeout=None, ema=False, wire_dtype=wire_dtype, if_newer_than=None)
        )
        return self.push_pull_raw(header, self._grad_leaves(grads, wire_dtype), like, out=out)[1]

    def push_pull_raw(
        self,
        header: pb.PushHeader,
        leaves: Sequence[WireLeaf],
        like: Any = None,
        timeout: float | None = None,
        out: Any = None,
    ) -> tuple[pb.PushResponse, Any]:
        if not header.pull.max_message_bytes:  # replies as large as this channel receives
            header.pull.max_message_bytes = self.client.max_receive_bytes
        only, msgs = self._push_messages(header, leaves)
        if only is not None and self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._push_pull_one, only, timeout=timeout),)
        else:
            replies = self.client.stream(self.client._push_pull, msgs, timeout=timeout)
        box: list[pb.PushResponse] = []
        step, params = self.read_pull_stream(replies, like, push_reply=box, out=out)
        self.last_step = step
        return box[0], params

    def read_pull_stream(
        self, replies: Iterable[bytes], like: Any, push_reply: list | None = None, out: Any = None
    ) -> tuple[int, Any]:
        """Assembles a PullResponse stream into (step, pytree or None when not modified)."""
        targets = self._out_targets(out) if out is not None else None
        assembler = None
        step = -1
        schema: dict[str, LeafSpec] = {}  # set by the header, the first message
        for raw in replies:
            msg, payload = parse_message(raw, pb.PullResponse)
            if msg.HasField("header"):
                if push_reply is not None and msg.HasField("push"):
                    push_reply.append(msg.push)
                step = msg.header.step
                self.last_incarnation = msg.header.incarnation
                if msg.header.not_modified:
                    return step, None
                schema = {leaf.path: LeafSpec(leaf.path, leaf.dtype, tuple(leaf.shape)) for leaf in msg.header.schema}
                if targets is not None:
                    self._check_out(schema, targets)
                assembler = _IntoArrays(schema, what=f"model {self.name!r}", targets=targets)
            if assembler is None:
                raise InvalidArgumentError(f"model {self.name!r}: pull stream did not start with a header")
            if msg.slices:
                assembler.add(msg.slices, payload)
        if assembler is None:
            raise OptserveError(f"model {self.name!r}: empty pull stream")
        arrays = assembler.finish()
        if targets is not None:
            for path, a in arrays.items():  # leaves that came in another dtype were received apart
                if a.dtype != targets[path].dtype or a.ctypes.data != targets[path].ctypes.data:
                    np.copyto(targets[path], a, casting="unsafe")
            return step, out
        for path, a in arrays.items():  # undo a narrower wire dtype
            if dtypes.dtype_name(a.dtype) != schema[path].dtype:
                arrays[path] = a.astype(dtypes.wire_dtype(schema[path].dtype))
        return step, self._rebuild(arrays, like)

    def _out_targets(self, out: Any) -> dict[str, np.ndarray]:
        try:
            return dict(pytree.writable_leaves(out))
        except TypeError as e:
            raise InvalidArgumentError(f"model {self.name!r}: out: {e}") from None

    def _check_out(self, schema: dict[str, LeafSpec], targets: dict[str, np.ndarray]) -> None:
        """`out` must have exactly the model's leaves, each with the parameter's dtype and shape."""
        for path in targets:
            if path not in schema:
                raise InvalidArgumentError(f"model {self.name!r}: out leaf {path!r} is not a leaf of the model")
        for path, spec in schema.items():
            t = targets.get(path)
            if t is None:
                raise InvalidArgumentError(f"model {self.name!r}: out has no leaf {path!r}")
            if t.shape != spec.shape or t.dtype != dtypes.wire_dtype(spec.dtype):
                raise InvalidArgumentError(
                    f"model {self.name!r}: out leaf {path!r} is {t.dtype.name}{list(t.shape)}, the model's "
                    f"{spec.dtype}{list(spec.shape)}"
                )

    def _rebuild(self, arrays: dict[str, np.ndarray], like: Any) -> Any:
        structure = pytree.flatten(like)[1] if like is not None else self._structure
        if structure is None:
            return pytree.nested_dicts(list(arrays.items()))
        missing = [p for p in structure.paths if p not in arrays]
        if missing or len(structure.paths) != len(arrays):
            raise InvalidArgumentError(
                f"model {self.name!r}: the structure given has {len(structure.paths)} leaves, the model "
                f"{len(arrays)}" + (f"; no leaf {missing[0]!r} on the server" if missing else "")
            )
        return pytree.unflatten(structure, [arrays[p] for p in structure.paths])

    # -- management -------------------------------------------------------------------------------

    def info(self) -> dict:
        """Step, schema, spec, settings, hyperparameters, per-worker state and counters."""
        return info_to_dict(self.client.call(self.client._stub.GetModel, pb.GetModelRequest(model=self.name)))

    @property
    def step(self) -> int:
        return self.info()["step"]

    def set_hyperparams(self, **values: float) -> dict:
        """Changes tunable hyperparameters (e.g. learning_rate=1e-4) without resetting state."""
        req = pb.SetHyperparamsRequest(
            model=self.name, values=[pb.Hyperparam(name=k, value=float(v)) for k, v in values.items()]
        )
        return info_to_dict(self.client.call(self.client._stub.SetHyperparams, req))["hyperparams"]

    def worker(self, worker_id: str, **kwargs: Any) -> Worker:
        """A Worker: push/pull/push_pull that track base_step and a retry-safe sequence number."""
        return Worker(self, worker_id, **kwargs)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> int:
        """Takes a checkpoint now; returns its step once it is committed to disk."""
        return self.client.call(self.client._stub.SaveCheckpoint, pb.SaveCheckpointRequest(model=self.name)).step

    def checkpoints(self) -> list[dict]:
        resp = self.client.call(self.client._stub.ListCheckpoints, pb.ListCheckpointsRequest(model=self.name))
        return [
            {"step": c.step, "name": c.name, "bytes": c.bytes, "created_unix": c.created_unix} for c in resp.checkpoints
        ]

    def restore(self, step: int = 0) -> int:
        """Restores a committed checkpoint (0: the newest that verifies); returns the model's step."""
        req = pb.RestoreCheckpointRequest(model=self.name, step=step)
        return self.client.call(self.client._stub.RestoreCheckpoint, req).step

    def download(self, path: str | os.PathLike) -> int:
        """Writes the model's complete state into one safetensors file; returns its size in bytes."""
        tmp = f"{os.fspath(path)}.part"
        size = 0
        with open(tmp, "wb") as f:
            for raw in self.client.stream(self.client._download, pb.DownloadRequest(model=self.name)):
                msg, data = parse_message(raw, pb.FileChunk)
                if msg.offset != size:
                    raise InvalidArgumentError(
                        f"model {self.name!r}: download chunk at offset {msg.offset}, expected {size}"
                    )
                f.write(data)
                size += len(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return size
