"""`Model`: a handle on one model of a server (push, pull, push_pull, info, checkpoints).

Bulky calls stream chunks framed by `optserve.wire`; tensors that fit in one chunk use the unary
twins (PushOne, PullOne, PushPullOne), which cost a third of a stream in grpcio.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from optserve.client import pytree, shared_arrays
from optserve.client import shared_memory as shared
from optserve.client.errors import InvalidArgumentError
from optserve.client.layout import Layout
from optserve.client.messages import info_to_dict, to_wire
from optserve.client.progress import Progress
from optserve.client.pulls import PullReader
from optserve.client.shared_arrays import SharedArrays
from optserve.client.tables import Init, Rows, read_rows, row_selections
from optserve.client.transport import Connection
from optserve.client.worker import Worker
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import WireLeaf, chunk_messages
from optserve.wire.dtypes import DTYPES
from optserve.wire.errors import WireError
from optserve.wire.framing import parse_message

T = TypeVar("T")


class Model:
    """A handle on one model. Cheap to create; holds no server resources.

    client: the connection its calls go through (a `Client`).
    packed: push and pull the model's packed tensors (ModelInfo.packing) as one tensor each instead
        of leaf by leaf (the client's `packed`, True by default). Models without packs, and servers
        that announce none, are always sent leaf by leaf."""

    def __init__(self, client: Connection, name: str, structure: pytree.Structure | None, info: pb.ModelInfo | None):
        self.client = client
        self.name = name
        self.packed: bool = getattr(client, "packed", True)
        self._structure = structure
        self._reader = PullReader(name)
        self.last_step = -1
        self.last_incarnation = ""
        # the model's, as its info and then the last pull's header said (a Worker's heartbeat interval)
        self.heartbeat_seconds = info.settings.heartbeat_seconds if info is not None else 0.0
        # The layout pushes use: the ModelInfo's, then that of every packed pull's reply.
        self._layout: Layout | None = self._layout_of(info) if info is not None else None
        # Parameters that fit in one chunk come back through the unary twins (PullOne, PushPullOne).
        self._params_fit_one_chunk = info is not None and info.param_bytes <= client.chunk_bytes
        self._pull_sizes: dict[tuple[str, str], int] = {}  # (layout id, wire dtype) -> a pull's tensor bytes

    def _layout_of(self, info: pb.ModelInfo) -> Layout | None:
        try:
            return self._reader.layouts.of_info(info)
        except WireError:  # a packing that does not fit the schema: leaf by leaf always works
            return None

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self.client.target})"

    # -- data path --------------------------------------------------------------------------------

    def _push_header(
        self,
        base_step: int | None,
        weight: float | None,
        worker_id: str = "",
        seq: int = 0,
        global_norm_sq: float | None = None,
        session: int = 0,
        contribution: int = 0,
    ) -> pb.PushHeader:
        h = pb.PushHeader(
            model=self.name,
            worker_id=worker_id,
            seq=seq,
            weight=weight or 0.0,
            session=session,
            contribution=contribution,
        )
        if base_step is not None:
            h.base_step = base_step
        if global_norm_sq is not None:
            h.global_norm_sq = global_norm_sq
        return h

    def _grad_leaves(self, grads: Any, wire_dtype: str | None) -> Sequence[WireLeaf]:
        """The gradient as the wire carries it (`_wire_grads`; a push that sends it names the layout)."""
        return self._wire_grads(grads, wire_dtype)[0]

    def _wire_grads(self, grads: Any, wire_dtype: str | None, rows: Any = None) -> tuple[Sequence[WireLeaf], str]:
        """The gradient as the wire carries it, and the layout id its packs come from ("" when it
        sends none): with `packed` and a layout with packs, each pack as one tensor
        (`layout.Plan.wire_leaves`), else leaf by leaf; with `Rows` leaves, leaf by leaf, their ids
        appended to `rows` (PushHeader.rows: `_row_sparse`). A gradient of the structure seen before is
        flattened without rebuilding its paths (`pytree.flatten_as`)."""
        structure = self._structure
        arrays = pytree.flatten_as(grads, structure) if structure is not None else None
        if structure is None or arrays is None:
            leaves, structure = pytree.flatten(grads)
            if self._structure is None:
                self._structure = structure
            arrays = [a for _, a in leaves]
        layout = self._layout
        if any(type(a) is Init for a in arrays):
            path = next(p for p, a in zip(structure.paths, arrays, strict=True) if type(a) is Init)
            raise TypeError(f"leaf {path!r}: Init declares a parameter; a gradient is an array or Rows")
        if any(type(a) is Rows for a in arrays):
            return self._row_sparse(structure.paths, arrays, wire_dtype, rows)
        if self.packed and layout is not None and layout.packs:
            plan = layout.plan(structure)
            wire = plan.wire_leaves(arrays, wire_dtype) if plan is not None else None
            if wire is not None:
                return wire, layout.layout_id
        return to_wire(list(zip(structure.paths, arrays, strict=True)), wire_dtype), ""

    def _row_sparse(
        self, paths: Sequence[str], arrays: Sequence[Any], wire_dtype: str | None, rows: Any
    ) -> tuple[Sequence[WireLeaf], str]:
        """A gradient with `Rows` leaves, leaf by leaf: each Rows as its values under its path, its
        ids appended to `rows` (PushHeader.rows; None: a caller that only wants the leaves); a Rows
        on a leaf the server holds in a packed tensor (a small leaf) is sent dense, as the server
        takes only loose leaves sparse."""
        layout = self._layout
        packed = {p for pack in layout.packs for p in pack.leaves} if layout is not None else set()
        leaves: list[tuple[str, Any]] = []
        for path, a in zip(paths, arrays, strict=True):
            if type(a) is Rows:
                if path in packed:
                    assert layout is not None
                    spec = layout.schema[path]
                    a = a.densify(spec.shape, DTYPES[spec.dtype])
                else:
                    if rows is not None:
                        rows.append(pb.RowSparseGradient(path=path, ids=a.ids))
                    a = a.values
            leaves.append((path, a))
        return to_wire(leaves, wire_dtype), ""

    def _send_grads(
        self, grads: Any, wire_dtype: str | None, header: pb.PushHeader, send: Callable[[Sequence[WireLeaf]], T]
    ) -> T:
        """send(the gradient's wire leaves), `header` naming the layout its packs come from
        (PushHeader.layout_id). A push of packs that the server refuses as invalid (a model deleted and
        created again with another layout) is sent again once if the model's packing changed
        meanwhile: a refused push applied nothing."""
        layout = self._layout
        del header.rows[:]
        try:
            leaves, header.layout_id = self._wire_grads(grads, wire_dtype, header.rows)
            return send(leaves)
        except InvalidArgumentError:
            if not (self.packed and layout is not None and layout.packs) or not self._refresh_layout(layout):
                raise
        del header.rows[:]
        leaves, header.layout_id = self._wire_grads(grads, wire_dtype, header.rows)
        return send(leaves)

    def _refresh_layout(self, old: Layout) -> bool:
        """Reads the model's layout again; True if its packs changed (else the refusal was about
        something else, e.g. a NaN, and is not worth sending again)."""
        new = self._layout = self._layout_of(self._get_info())
        return new is not old and (new is None or new.packs != old.packs)

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
        reply = shared.push(self.client, header, leaves, f"model {self.name!r}", timeout)
        if reply is not None:
            return reply
        only, msgs = self._push_messages(header, leaves)
        if only is not None:
            return self.client.call(self.client._push_one, only, timeout=timeout)
        return self.client.call(self.client._push, msgs, timeout=timeout)

    def push(
        self,
        grads: Any,
        *,
        base_step: int | None = None,
        weight: float | None = None,
        wire_dtype: str | None = None,
        global_norm_sq: float | None = None,
        contribution: int = 0,
    ) -> int:
        """Sends a gradient pytree. Returns (async) the step after the update, (sync) the step it joins.
        global_norm_sq, contribution: PushHeader's (a `ShardedModel` sends them to its shards)."""
        header = self._push_header(base_step, weight, global_norm_sq=global_norm_sq, contribution=contribution)
        return self._send_grads(grads, wire_dtype, header, lambda leaves: self.push_raw(header, leaves)).step

    def _pull_request(
        self,
        *,
        min_step: int | None,
        timeout: float | None,
        ema: bool,
        wire_dtype: str | None,
        if_newer_than: int | None,
        exact_step: int | None = None,
        member: tuple[str, int] | None = None,
    ) -> pb.PullRequest:
        req = pb.PullRequest(
            model=self.name,
            timeout_seconds=timeout or 0.0,
            ema=ema,
            wire_dtype=wire_dtype or "",
            max_message_bytes=self.client.max_receive_bytes,
            packed=self.packed,
        )
        if self.packed and self._layout is not None:
            # the reply then leaves out schema and packing, which this process already holds
            req.layout_id = self._layout.layout_id
        if min_step is not None:
            req.min_step = min_step
        if if_newer_than is not None:
            req.if_newer_than = if_newer_than
        if exact_step is not None:
            req.exact_step = exact_step
        if member is not None:  # the pulling worker and its session: the pull renews its lease
            req.worker_id, req.session = member
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
        exact_step: int | None = None,
        member: tuple[str, int] | None = None,
    ) -> Any:
        """Fetches the parameters as a pytree (the structure of `like`, of the create/push, or nested dicts).

        min_step: wait (up to `timeout` seconds) until the model reaches that step.
        exact_step: the parameters of exactly that step (waited for like min_step; PullRequest.exact_step).
        if_newer_than: return None when the model's step is not greater than this.
        out: a pytree of writable numpy arrays (or CPU torch tensors) with the model's leaves, dtypes
            and shapes, e.g. the previous pull's result: the parameters are written into it and `out`
            itself is returned. A loop that pulls every step then reuses its memory instead of having
            the OS map and zero fresh pages for every pull (measured on a 2-core VM: ~200 ms of a
            400 MB pull). If the pull fails midway, `out` may hold a mix of old and new values.
            The leaves of a packed tensor that a pull returns are views of one buffer per pack; an
            `out` of exactly those arrays receives each pack straight into its buffer (no copy),
            any other `out` is written leaf by leaf.
        member: (worker_id, session) of the pulling worker, whose lease the pull renews (a Worker's pulls).
        """
        if out is not None and like is not None:
            raise ValueError("pass `like` or `out`, not both")
        req = self._pull_request(
            min_step=min_step,
            timeout=timeout,
            ema=ema,
            wire_dtype=wire_dtype,
            if_newer_than=if_newer_than,
            exact_step=exact_step,
            member=member,
        )
        deadline = None if timeout is None else timeout + (self.client.timeout or 30.0)
        used, params = shared.pull(
            self.client,
            req,
            self._pull_bytes(wire_dtype),
            deadline,
            lambda reply, view: self._read((reply,), like, out=out, packed=req.packed, shared_view=view),
            out=out,
        )
        if used:
            return params
        if self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._pull_one, req, timeout=deadline),)
        else:
            replies = self.client.stream(self.client._pull, req, timeout=deadline)
        return self._read(replies, like, out=out, packed=req.packed)

    def push_pull(
        self,
        grads: Any,
        *,
        base_step: int | None = None,
        weight: float | None = None,
        wire_dtype: str | None = None,
        like: Any = None,
        out: Any = None,
        global_norm_sq: float | None = None,
        rows: Mapping[str, Any] | None = None,
    ) -> Any:
        """Pushes a gradient and returns the updated parameters in one round trip (`out`: see pull).
        rows: return only these rows ({path: ids}, as `pull_rows`), e.g. those of the next batch."""
        header = self._push_header(base_step, weight, global_norm_sq=global_norm_sq)
        if rows is not None:
            header.pull.CopyFrom(self.rows_pull(rows, wire_dtype))

            return self._send_grads(
                grads, wire_dtype, header, lambda leaves: self.push_pull_rows_raw(header, leaves)[1]
            )
        header.pull.CopyFrom(
            self._pull_request(min_step=None, timeout=None, ema=False, wire_dtype=wire_dtype, if_newer_than=None)
        )
        return self._send_grads(
            grads, wire_dtype, header, lambda leaves: self.push_pull_raw(header, leaves, like, out=out)
        )[1]

    def pull_rows(
        self,
        rows: Mapping[str, Any],
        *,
        min_step: int | None = None,
        timeout: float | None = None,
        ema: bool = False,
        wire_dtype: str | None = None,
        exact_step: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Some rows of some leaves: `pull_rows({"embed": ids})` -> {"embed": array [k, *row_shape]},
        row i of each being row ids[i] (PullRequest.rows). Leaves by path ("a/b" for {"a": {"b": ...}}).
        min_step, exact_step, timeout: as `pull`."""
        req = self._pull_request(
            min_step=min_step,
            timeout=timeout,
            ema=ema,
            wire_dtype=wire_dtype,
            if_newer_than=None,
            exact_step=exact_step,
        )
        req.packed, req.layout_id = False, ""
        req.rows.extend(row_selections(rows))
        deadline = None if timeout is None else timeout + (self.client.timeout or 30.0)
        step, got = read_rows(self.client.stream(self.client._pull, req, timeout=deadline), self.name)
        self.last_step = step
        return got

    def rows_pull(self, rows: Mapping[str, Any], wire_dtype: str | None) -> pb.PullRequest:
        """PushHeader.pull of a push_pull that returns rows (PullRequest.rows)."""
        req = pb.PullRequest(wire_dtype=wire_dtype or "", rows=row_selections(rows))
        req.max_message_bytes = self.client.max_receive_bytes
        return req

    def push_pull_rows_raw(
        self, header: pb.PushHeader, leaves: Sequence[WireLeaf], timeout: float | None = None
    ) -> tuple[pb.PushResponse, dict[str, np.ndarray]]:
        """A PushPull whose pull asks for rows (header.pull.rows): (the push's reply, the rows)."""
        msgs = chunk_messages(pb.PushRequest(header=header), leaves, self.client.chunk_bytes)
        box: list[pb.PushResponse] = []
        step, got = read_rows(self.client.stream(self.client._push_pull, msgs, timeout=timeout), self.name, box)
        self.last_step = step
        return box[0], got

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
        box: list[pb.PushResponse] = []
        used, params = shared.push_pull(
            self.client,
            header,
            leaves,
            self._pull_bytes(header.pull.wire_dtype),
            f"model {self.name!r}",
            timeout,
            lambda reply, view: self._read(
                (reply,), like, push_reply=box, out=out, packed=header.pull.packed, shared_view=view
            ),
            out=out,
        )
        if used:
            return box[0], params
        only, msgs = self._push_messages(header, leaves)
        if only is not None and self._params_fit_one_chunk:
            replies: Iterable[bytes] = (self.client.call(self.client._push_pull_one, only, timeout=timeout),)
        else:
            replies = self.client.stream(self.client._push_pull, msgs, timeout=timeout)
        params = self._read(replies, like, push_reply=box, out=out, packed=header.pull.packed)
        return box[0], params

    def read_pull_stream(
        self, replies: Iterable[bytes], like: Any, push_reply: list | None = None, out: Any = None
    ) -> tuple[int, Any]:
        """Assembles a PullResponse stream into (step, pytree or None when not modified)."""
        params = self._read(replies, like, push_reply=push_reply, out=out)
        return self.last_step, params

    def shared_arrays(self, *, like: Any = None) -> SharedArrays:
        """(grads, params): pytrees of numpy arrays of the model's leaves (the structure of `like`, of
        the create/push, or nested dicts) living where the server reads a push's gradient and writes
        a pull's parameters: a push of `grads` is sent from where it lies, a pull (or push_pull)
        `out=params` is written there by the server; neither is copied on this side. Plain arrays
        when shared memory is not available; the rules: client/shared_arrays.py."""
        layout = self._layout
        if layout is None:
            layout = self._layout = self._layout_of(self._get_info())
            if layout is None:
                raise InvalidArgumentError(f"model {self.name!r}: its packing does not fit its schema")
        if like is not None:
            structure = pytree.flatten(like)[1]
        else:
            structure = self._structure if self._structure is not None else layout.default_structure
        return shared_arrays.allocate(
            self.client.shared_memory if self._pull_bytes(None) else None,
            layout,
            structure,
            lambda tree: self._wire_grads(tree, None)[0],
            self.packed,
            self._reader,
            f"model {self.name!r}",
        )

    def _pull_bytes(self, wire_dtype: str | None) -> int:
        """The bytes of a pull's tensors in `wire_dtype`; 0 without shared memory, or while the
        model's layout is not known (such a pull uses the byte stream)."""
        layout, shm = self._layout, self.client.shared_memory
        if layout is None or shm is None or shm.unavailable:
            return 0
        key = (layout.layout_id, wire_dtype or "")
        size = self._pull_sizes.get(key)
        if size is None:  # once per layout and wire dtype: a schema walk costs per leaf
            if len(self._pull_sizes) > 8:
                self._pull_sizes.clear()
            size = self._pull_sizes[key] = shared.pull_bytes(layout.schema.values(), wire_dtype)
        return size

    def _read(
        self,
        replies: Iterable[bytes],
        like: Any,
        push_reply: list | None = None,
        out: Any = None,
        packed: bool = False,
        shared_view: Any = None,
    ) -> Any:
        pulled = self._reader.read(
            replies,
            self._structure,
            like=like,
            out=out,
            push_reply=push_reply,
            packed=packed,
            known=self._layout,
            shared=shared_view,
        )
        self.last_step, self.last_incarnation = pulled.step, pulled.incarnation
        self.heartbeat_seconds = pulled.heartbeat_seconds
        if packed and pulled.layout is not None:
            self._layout = pulled.layout  # the model's packing now (a re-created model may have another)
        return pulled.params

    # -- management -------------------------------------------------------------------------------

    def _get_info(self) -> pb.ModelInfo:
        return self.client.call(self.client._stub.GetModel, pb.GetModelRequest(model=self.name))

    def info(self) -> dict:
        """Step, schema, spec, settings, hyperparameters, per-worker state, counters, and the packed
        tensors of the model's layout ("packing": name, dtype, leaves, elements of each)."""
        return info_to_dict(self._get_info())

    @property
    def step(self) -> int:
        return self.info()["step"]

    def set_hyperparams(self, **values: float) -> dict:
        """Changes tunable hyperparameters (e.g. learning_rate=1e-4) without resetting state."""
        req = pb.SetHyperparamsRequest(
            model=self.name, values=[pb.Hyperparam(name=k, value=float(v)) for k, v in values.items()]
        )
        return info_to_dict(self.client.call(self.client._stub.SetHyperparams, req))["hyperparams"]

    def heartbeat(self, worker_id: str, session: int, timeout: float | None = None) -> int:
        """Renews a worker's lease (a header-only PullOne naming it; PullRequest.worker_id) without
        touching what this handle remembers of its pulls; returns the membership epoch."""
        req = pb.PullRequest(model=self.name, if_newer_than=2**62, worker_id=worker_id, session=session)
        raw = self.client.call(self.client._pull_one, req, timeout=timeout)
        msg, _ = parse_message(raw, pb.PullResponse)
        return msg.header.membership_epoch

    def worker(self, worker_id: str, **kwargs: Any) -> Worker:
        """A Worker: push/pull/push_pull that track base_step and a retry-safe sequence number."""
        return Worker(self, worker_id, **kwargs)

    def decide_round(
        self,
        step: int,
        contributors: Sequence[tuple[str, int]] = (),
        *,
        global_norm_sq: float | None = None,
        timeout: float = 60.0,
        closed_by: int = 0,
    ) -> dict:
        """DecideRound on this shard (client/rounds.py): asks (no contributors; shard 0) or relays the
        contributors of the sync round that makes `step`, waiting up to `timeout` seconds; closed_by:
        why shard 0 closed it (a RoundClose value, as shard 0's outcome said). Returns {"step",
        "contributors": [(worker_id, seq)], "partial_norm_sq" (or None), "applied", "closed_by"}."""
        req = pb.RoundDecision(model=self.name, step=step, timeout_seconds=timeout)
        req.closed_by = pb.RoundClose.ValueType(closed_by)
        req.contributors.extend(pb.RoundContributor(worker_id=w, seq=s) for w, s in contributors)
        if global_norm_sq is not None:
            req.global_norm_sq = global_norm_sq
        out = self.client.call(self.client._stub.DecideRound, req, timeout=timeout + (self.client.timeout or 30.0))
        return {
            "step": out.step,
            "contributors": [(c.worker_id, c.seq) for c in out.contributors],
            "partial_norm_sq": out.partial_norm_sq if out.HasField("partial_norm_sq") else None,
            "applied": out.applied,
            "closed_by": out.closed_by,
        }

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, step: int | None = None, timeout: float | None = None) -> int:
        """Takes a checkpoint now, or with `step` of exactly that step (waiting up to `timeout`
        seconds, default 60, for the model to get there: SaveCheckpointRequest.step); returns its
        step once it is committed to disk."""
        req = pb.SaveCheckpointRequest(model=self.name, timeout_seconds=timeout or 0.0)
        if step is not None:
            req.step = step
        wait = None if timeout is None and step is None else (timeout or 60.0) + (self.client.timeout or 30.0)
        return self.client.call(self.client._stub.SaveCheckpoint, req, timeout=wait).step

    def checkpoints(self) -> list[dict]:
        resp = self.client.call(self.client._stub.ListCheckpoints, pb.ListCheckpointsRequest(model=self.name))
        return [
            {"step": c.step, "name": c.name, "bytes": c.bytes, "created_unix": c.created_unix} for c in resp.checkpoints
        ]

    def restore(self, step: int = 0, tag: str = "") -> int:
        """Restores a committed checkpoint (0: the newest that verifies); returns the model's step.
        tag: a restore with the tag of the model's last restore does nothing (RestoreCheckpointRequest.tag)."""
        req = pb.RestoreCheckpointRequest(model=self.name, step=step, tag=tag)
        return self.client.call(self.client._stub.RestoreCheckpoint, req).step

    def download(self, path: str | os.PathLike, *, progress: Progress | None = None) -> int:
        """Writes the model's complete state into one safetensors file; returns its size in bytes.
        progress: called with (bytes written, the file's size) after every chunk (client/progress.py)."""
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
                if progress is not None:
                    progress(size, msg.total_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return size
