"""Push, Pull, PushPull and their unary twins: the hot path of the service.

A push is read chunk by chunk into its receiver's private buffers (core/aggregation.py) and counted
only once whole; a pull streams a pinned snapshot without holding the model's lock; a call that
waits for a step holds one of a bounded number of slots, so waiters never take every RPC thread.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from optserve.server.api import messages, shared_spans
from optserve.server.api import requests as requests_
from optserve.server.api.call_context import CallContext
from optserve.server.api.metrics import ServerMetrics
from optserve.server.core import pulls
from optserve.server.core.aggregation import Receiver
from optserve.server.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.server.core.model import ExpectedStep, Model
from optserve.server.core.rows import check_row_pull
from optserve.server.core.shared_memory import SharedRegions
from optserve.server.core.store import ModelStore
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages
from optserve.wire.dtypes import LeafSpec

WAIT_SLICE_SECONDS = 0.25  # how often a waiting pull checks whether its client is still there


def waiting_call_limit(max_workers: int) -> int:
    """How many calls may wait for a step at once on a server with `max_workers` RPC threads.

    A waiting call holds its thread (grpcio's synchronous server has no other way to wait), so
    waiters that took every thread would starve every other call, health checks included. A reserve
    of an eighth of the threads (at least 2: a health check and one more call) stays for the rest;
    at least one call may always wait.
    """
    return max(1, max_workers - max(2, max_workers // 8))


class WaitingSlots:
    """A non-blocking counter of the calls waiting for a step, bounded by `limit`."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.waiting = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    def try_take(self) -> bool:
        with self._lock:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            if self._on_change is not None:
                self._on_change(self.waiting)
            return True

    def give_back(self) -> None:
        with self._lock:
            self.waiting -= 1
            if self._on_change is not None:
                self._on_change(self.waiting)


def check_accepting(accepting: threading.Event) -> None:
    if not accepting.is_set():
        raise Unavailable("server is shutting down; retry against its replacement")


class Pushed(NamedTuple):
    """A push that was counted: its model, header and reply; `round_dropped`: whether the round it
    joined was dropped (Receiver.dropped_check; None when it joined none)."""

    model: Model
    header: pb.PushHeader
    response: pb.PushResponse
    round_dropped: Callable[[], str] | None


class DataPlane:
    """The push and pull side of one service (api/service.py delegates its data RPCs here)."""

    def __init__(
        self,
        store: ModelStore,
        metrics: ServerMetrics,
        *,
        incarnation: str,
        chunk_bytes: int,
        max_workers: int,
        accepting: threading.Event,
        shared: SharedRegions | None = None,
    ):
        """max_workers: the server's RPC threads; calls that wait for a step are bounded by
        `waiting_call_limit(max_workers)` so that they never hold every thread. accepting: cleared
        while the server shuts down (pushes are refused, waits end)."""
        self.store = store
        self.metrics = metrics
        self.incarnation = incarnation
        self.chunk_bytes = chunk_bytes
        self.max_workers = max_workers
        self.accepting = accepting
        self.shared = shared
        self.waiting = WaitingSlots(waiting_call_limit(max_workers), on_change=metrics.waiting_calls.set)
        metrics.waiting_limit.set(self.waiting.limit)
        # per model: the serialized first message of a pull: plain, packed, packed to a client that knows the layout
        self._pull_headers: weakref.WeakKeyDictionary[Model, tuple[bytes, bytes, bytes]] = weakref.WeakKeyDictionary()
        # per model and wire dtype: the bound of a one-message pull reply's slices and payload
        self._single_reply_bytes: weakref.WeakKeyDictionary[Model, dict[str, int]] = weakref.WeakKeyDictionary()

    # -- push -------------------------------------------------------------------------------------

    def receive_push(
        self,
        requests: Iterator[bytes],
        call: CallContext,
        prepare: Callable[[Model, pb.PushHeader, Receiver], None] | None = None,
    ) -> Pushed:
        """Reads a whole push stream, validates it and counts it (applied, or added to the sync round).

        prepare(model, header, receiver): more checks of the header (PushPull's pull), called before
        any gradient byte is read and so before anything is applied.
        """
        check_accepting(self.accepting)
        first, payload = requests_.first_message(requests, pb.PushRequest, "header")
        h = first.header
        model = self.store.get(call.authorize(h.model))
        base_step = h.base_step if h.HasField("base_step") else None
        if h.worker_id and h.seq < 1:
            raise InvalidArgument(f"model {model.name!r}: worker {h.worker_id!r}: seq must be >= 1")
        if h.session and not h.worker_id:
            raise InvalidArgument(f"model {model.name!r}: session {h.session} given without a worker_id")
        if h.contribution and h.worker_id:
            raise InvalidArgument(
                f"model {model.name!r}: worker {h.worker_id!r}: contribution is for anonymous pushes only (its seq "
                "names its contribution)"
            )
        if h.HasField("shared_memory"):  # validated before anything is opened
            payload = shared_spans.push_payload(self.shared, h.shared_memory, first, payload, model)
        if h.layout_id and h.layout_id != messages.layout_id(model):
            raise InvalidArgument(
                f"model {model.name!r}: the push's packed tensors are of layout {h.layout_id!r}, the model's is "
                f"{messages.layout_id(model)!r} (it was created again): read its packing again and resend"
            )
        receiver = model.open_push(
            base_step=base_step,
            worker_id=h.worker_id,
            # an anonymous push's contribution number stands for its seq: only the rounds shard 0
            # decides (core/shard_rounds.py) read it, to name the contribution; nothing records it
            seq=h.seq if h.worker_id else h.contribution,
            weight=h.weight,
            packs=bool(h.layout_id),
            global_norm_sq=h.global_norm_sq if h.HasField("global_norm_sq") else None,
            rows=[(r.path, np.array(r.ids, np.int64)) for r in h.rows],
            session=h.session,
            in_region=h.HasField("shared_memory"),
        )
        try:
            try:
                if prepare is not None:
                    prepare(model, h, receiver)
                grads = requests_.receive_tensors(first, payload, requests, pb.PushRequest, receiver.assembler)
            except BaseException:
                receiver.abort()
                raise
            received = receiver.assembler.received_bytes
            model.count_received(received)
            started = time.perf_counter()
            step_before = model.step
            reply, duplicate = model.commit_push(receiver, grads)
        finally:
            # A gradient read in place from the client's region is the server's until this reply:
            # nothing may read it after (docs/design.md, "Shared memory")
            receiver.finish_reading()
        call.pushed = True  # a later failure of PushPull is its pull's
        outcome = "duplicate" if duplicate else "applied" if reply.applied else "accepted"
        staleness = None if base_step is None else max(step_before - base_step, 0)
        self.metrics.pushed(model.name, outcome, received, time.perf_counter() - started, staleness)
        model.activity.pushed(h.worker_id, duplicate=duplicate, staleness=staleness)
        response = messages.push_response(model.name, reply, duplicate=duplicate, incarnation=self.incarnation)
        return Pushed(model, h, response, receiver.dropped_check())

    # -- pull -------------------------------------------------------------------------------------

    def check_pull(self, model: Model, req: pb.PullRequest, single: bool) -> None:
        """Validates a pull's fields before it waits, streams or (PushPull) before its push is applied."""
        if not math.isfinite(req.timeout_seconds) or req.timeout_seconds < 0:
            raise InvalidArgument(
                f"model {model.name!r}: timeout_seconds must be a finite number >= 0, got {req.timeout_seconds}"
            )
        pulls.check_wire_dtype(req.wire_dtype, model.name)
        if req.session and not req.worker_id:
            raise InvalidArgument(f"model {model.name!r}: pull session {req.session} given without a worker_id")
        if req.ema and model.settings.ema_decay is None:
            raise FailedPrecondition(f"model {model.name!r} keeps no parameter EMA (create it with ema=<decay>)")
        if req.rows:
            if req.packed or req.HasField("shared_memory"):
                raise InvalidArgument(
                    f"model {model.name!r}: a pull of rows (PullRequest.rows) is neither packed nor shared"
                )
            rows = self._pulled_rows(model, req)
            if single:
                header = len(self._first_pull_response(model, False, "").SerializeToString()) + len(model.name) + 128
                parts = [
                    LeafSpec(p, model.schema_map[p].dtype, (len(i), *model.schema_map[p].shape[1:])) for p, i in rows
                ]
                requests_.check_single_reply(
                    model.name,
                    pulls.single_reply_bytes(parts, req.wire_dtype, header),
                    requests_.pull_message_bytes(req.max_message_bytes),
                )
        elif req.HasField("shared_memory"):  # one message of slices, the tensors in the span
            shared_spans.check_pull(self.shared, model, req)
        elif single:
            requests_.check_single_reply(
                model.name,
                self._single_reply_bound(model, req.wire_dtype),
                requests_.pull_message_bytes(req.max_message_bytes),
            )

    @staticmethod
    def _pulled_rows(model: Model, req: pb.PullRequest) -> list[tuple[str, np.ndarray]]:
        """PullRequest.rows, validated (core/rows.py)."""
        return check_row_pull(model.label, [(r.path, np.array(r.ids, np.int64)) for r in req.rows], model.schema_map)

    def _single_reply_bound(self, model: Model, wire_dtype: str) -> int:
        """Upper bound of a one-message pull reply of `model`: header (with a push reply) and tensors."""
        bounds = self._single_reply_bytes.get(model)
        if bounds is None:
            bounds = self._single_reply_bytes[model] = {}
        bound = bounds.get(wire_dtype)
        if bound is None:
            # header (cached, without step) + its step, not_modified and a PushResponse (name, step,
            # flags, incarnation), each well within 64 bytes besides the name
            header = (
                len(self._first_pull_response(model, True, "").SerializeToString()) + len(model.name.encode()) + 128
            )
            bound = bounds[wire_dtype] = pulls.single_reply_bytes(model.schema, wire_dtype, header)
        return bound

    @contextmanager
    def waiting_slot(self, model: Model, what: str) -> Iterator[None]:
        """Holds one of the bounded slots for calls that wait for a step, or refuses the call."""
        if not self.waiting.try_take():
            raise ResourceExhausted(self._too_many_waiting(model, what))
        try:
            yield
        finally:
            self.waiting.give_back()

    def _too_many_waiting(self, model: Model, what: str) -> str:
        return (
            f"model {model.name!r}: {what}, but {self.waiting.limit} calls are already waiting for a step, the most "
            f"this server lets wait (its {self.max_workers} RPC threads less a reserve for other calls; "
            "--max-workers raises it); nothing was applied: retry later"
        )

    def pull_stream(
        self,
        model: Model,
        req: pb.PullRequest,
        call: CallContext,
        push: pb.PushResponse | None = None,
        single: bool = False,
        round_dropped: Callable[[], str] | None = None,
        slot_held: bool = False,
    ) -> Iterator[bytes]:
        """The PullResponse messages; `single`: exactly one message (the unary twins), or refused.

        round_dropped: for a sync PushPull, why the round its push joined was dropped ("" while it
        was not); slot_held: the caller already holds a waiting slot (PushPull takes it before its push).
        """
        self.check_pull(model, req, single)
        model.renew_lease(req.worker_id, req.session)  # a pull (or heartbeat) naming a worker renews its lease
        exact = model.expect_step(req.exact_step, ema=req.ema) if req.HasField("exact_step") else None
        try:
            yield from self._pull_messages(model, req, call, push, single, round_dropped, slot_held, exact)
        finally:
            if exact is not None:
                model.forget_step(exact)

    def _pull_messages(
        self,
        model: Model,
        req: pb.PullRequest,
        call: CallContext,
        push: pb.PushResponse | None,
        single: bool,
        round_dropped: Callable[[], str] | None,
        slot_held: bool,
        exact: ExpectedStep | None,
    ) -> Iterator[bytes]:
        if exact is not None and (not req.HasField("min_step") or req.min_step < exact.step):
            wait = pb.PullRequest()
            wait.CopyFrom(req)
            wait.min_step = exact.step  # the step is waited for as a min_step is
            req = wait
        if req.HasField("min_step") and model.step < req.min_step:
            if slot_held:
                self._wait_for_step(model, req, call, round_dropped)
            else:
                with self.waiting_slot(model, f"this pull would wait for step {req.min_step}"):
                    self._wait_for_step(model, req, call, round_dropped)
        max_message = requests_.pull_message_bytes(req.max_message_bytes)
        if single:  # check_pull made sure that everything fits in one message
            chunk_bytes, bound = max_message, None
        else:
            chunk_bytes, bound = requests_.pull_chunk_bytes(req.chunk_bytes, self.chunk_bytes), max_message
        first = self._first_pull_response(model, req.packed, req.layout_id)
        if push is not None:
            first.push.CopyFrom(push)
        if req.HasField("if_newer_than") and model.step <= req.if_newer_than:
            first.header.step, first.header.not_modified = model.step, True
            self._mark_applied(first, push)
            yield from chunk_messages(first, [], chunk_bytes, bound)
            self.metrics.pulled(model.name, "not_modified", 0)
            return
        with model.snapshot(ema=req.ema) if exact is None else model.snapshot_of(exact) as snap:
            first.header.step = snap.step
            self._mark_applied(first, push)
            if req.rows:
                leaves: list = pulls.row_leaves(model, snap.arrays, self._pulled_rows(model, req), req.wire_dtype)
            else:
                leaves = pulls.host_leaves(model, snap.arrays, req.wire_dtype, packed=req.packed)
            if req.HasField("shared_memory"):
                raw = shared_spans.pull_reply(self.shared, model, req, first, leaves)
                model.count_sent(len(raw))
                self.metrics.pulled(model.name, "ok", len(raw))
                yield raw
                return
            sent = 0
            for raw in chunk_messages(first, leaves, chunk_bytes, bound):
                model.count_sent(len(raw))
                sent += len(raw)
                yield raw
        self.metrics.pulled(model.name, "ok", sent)

    @staticmethod
    def _mark_applied(first: pb.PullResponse, push: pb.PushResponse | None) -> None:
        """A PushPull's reply goes with parameters at or after the step its push joined: by then that
        step is applied, whatever the push's reply said when it was made (sync: applied false)."""
        if push is not None and not push.applied and first.header.step >= push.step:
            first.push.applied = True

    def _first_pull_response(self, model: Model, packed: bool, known_layout: str) -> pb.PullResponse:
        """A pull's first message with the header's constant part filled in: name, incarnation, layout
        id, and the schema (and for a packed pull the packing) unless the packed pull's client knows
        the layout (PullRequest.layout_id). Parsed from serializations cached per model, so a pull of
        a many-leaf model does not rebuild the schema's messages in Python (protobuf's C parser does
        it in microseconds)."""
        cached = self._pull_headers.get(model)
        if cached is None:
            header = pb.PullHeader(
                model=model.name,
                incarnation=self.incarnation,
                layout_id=messages.layout_id(model),
                heartbeat_seconds=model.settings.heartbeat_seconds,
            )
            short = pb.PullResponse(header=header).SerializeToString()
            header.schema.extend(messages.schema_to_proto(model.schema))
            plain = pb.PullResponse(header=header).SerializeToString()
            header.packing.extend(messages.packing_to_proto(model.layout))
            full = pb.PullResponse(header=header).SerializeToString()
            cached = self._pull_headers[model] = (plain, full, short)
        plain, full, short = cached
        if not packed:
            first = pb.PullResponse.FromString(plain)
        else:
            first = pb.PullResponse.FromString(short if known_layout == messages.layout_id(model) else full)
        first.header.membership_epoch = model.membership.epoch  # one read: no lock
        return first

    def _wait_for_step(
        self, model: Model, req: pb.PullRequest, call: CallContext, round_dropped: Callable[[], str] | None = None
    ) -> None:
        """Waits for req.min_step, bounded by timeout_seconds (0: the call's deadline).

        Waits in short slices so that a waiter whose client went away, whose model was deleted or
        whose server is shutting down lets go of its thread at once instead of at the deadline.
        In sync mode a round refused by reject_nonfinite_updates ends the wait with FAILED_PRECONDITION:
        `round_dropped()` says why for a PushPull whose own round it was; a plain pull ends when any
        round is dropped while its step is still ahead (its contributors must push again).
        """
        dropped_why = round_dropped
        if dropped_why is None and model.settings.mode == "sync":
            seen = model.dropped_rounds()[0]

            def dropped_why() -> str:
                count, why = model.dropped_rounds()
                return why if count != seen and model.step < req.min_step else ""

        limit = req.timeout_seconds or call.time_remaining()  # None: no deadline
        started = time.monotonic()
        while True:
            reached = model.wait_for_step(
                req.min_step,
                WAIT_SLICE_SECONDS
                if limit is None
                else min(WAIT_SLICE_SECONDS, max(limit - (time.monotonic() - started), 0.0)),
                give_up=None if dropped_why is None else lambda: bool(dropped_why()),
            )
            dropped = dropped_why() if dropped_why is not None else ""
            if dropped:
                raise FailedPrecondition(f"model {model.name!r}: waiting for step {req.min_step}: {dropped}")
            if reached:
                break
            if model.deleted:
                raise NotFound(f"model {model.name!r} was deleted while waiting for step {req.min_step}")
            check_accepting(self.accepting)
            if not call.is_active():
                raise Unavailable(f"model {model.name!r}: the client went away while waiting for step {req.min_step}")
            if limit is not None and time.monotonic() - started >= limit:
                raise DeadlineExceeded(
                    f"model {model.name!r}: step {req.min_step} not reached within {limit:.3g}s "
                    f"(current step {model.step})"
                )
        self.metrics.waited(model.name, time.monotonic() - started)

    # -- push, then pull --------------------------------------------------------------------------

    def push_pull(self, requests: Iterator[bytes], call: CallContext, single: bool) -> Iterator[bytes]:
        """A push, then a pull as its header's `pull` says; the pull is validated (and, in sync mode,
        a waiting slot taken) before the push is applied, so a refused call applies nothing."""
        slot: list[bool] = []  # [True] while this call holds a waiting slot

        def prepare(model: Model, header: pb.PushHeader, receiver: Receiver) -> None:
            if header.pull.model and header.pull.model != model.name:
                raise InvalidArgument(
                    f"model {model.name!r}: pull.model {header.pull.model!r} names another model; a PushPull pulls "
                    "the model it pushes to (leave pull.model empty)"
                )
            self.check_pull(model, header.pull, single)
            sync = model.settings.mode == "sync"
            if sync or header.pull.HasField("min_step"):  # the reply may wait: take a slot first
                what = (
                    "this PushPull would wait for its sync round" if sync else "this PushPull may wait for its min_step"
                )
                if self.waiting.try_take():
                    slot.append(True)
                elif sync:  # a push that completes its round does not wait: that one may go on
                    receiver.require_completion(self._too_many_waiting(model, what))
                else:
                    raise ResourceExhausted(self._too_many_waiting(model, what))

        try:
            pushed = self.receive_push(requests, call, prepare)
            pull = pb.PullRequest()
            pull.CopyFrom(pushed.header.pull)
            round_dropped = None
            if not pushed.response.applied:  # sync: return once the step this gradient joined is applied
                pull.min_step = pushed.response.step
                round_dropped = pushed.round_dropped  # None for a retry (duplicate)
            yield from self.pull_stream(
                pushed.model,
                pull,
                call,
                push=pushed.response,
                single=single,
                round_dropped=round_dropped,
                slot_held=bool(slot),
            )
        finally:
            if slot:
                self.waiting.give_back()
