"""`Worker`: the push/pull loop of one training worker, safe to retry.

Each push carries (worker_id, seq); the server applies a given pair at most once and answers a
repeat with the original reply. So when a call fails with UNAVAILABLE or DEADLINE_EXCEEDED (the
reply was lost, the server is restarting), the worker resends the *same* seq after an exponential
backoff with full jitter, and can never apply a gradient twice.

The worker also tracks `base_step`, the step of the parameters it last pulled, which the server
uses for staleness checks (async) and for assigning the gradient to a round (sync).

Sessions and leases (docs/design.md, "Membership and leases"): a Worker picks a random session id
when it is made, sent with every push and pull, so that a process that restarts and reuses its
worker_id is a new session of that worker (its seqs start at 1 again) and never taken for a retry of
the old process. Its pushes and pulls renew its lease on the model; when the model's leases expire
(ModelSettings.heartbeat_seconds > 0, learned from the first pull's header), a daemon thread sends a
heartbeat (a header-only pull naming the worker) whenever no call has started for one interval,
also while a call waits for its sync round. `close()` (or the end of a `with` block) stops it; a
process that dies stops renewing, and its lease expires after two intervals.

Server restarts: every server start has a new incarnation id (in push replies and pull headers).
When a call fails and the server that answers afterwards is a new incarnation, the worker first
learns the restored step (a header-only pull) and only then resends, its gradient's base_step
capped at that step: the state was restored from a checkpoint, possibly older than what it pulled.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from optserve.client.errors import FailedPreconditionError, OptserveError
from optserve.client.replay import ReplayLog
from optserve.client.transport import Connection
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import WireLeaf

log = logging.getLogger("optserve.client")

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Failures after which the worker checks whether the server restarted (a push against a step the
# restored state has not reached yet is INVALID_ARGUMENT, a sync push against it FAILED_PRECONDITION).
RESTART_SYMPTOMS = (*RETRYABLE, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class ServerMovedError(FailedPreconditionError):
    """Raised instead of resynchronizing (a Worker made with follow_restarts=False): the server
    restarted behind the step this worker last pulled, or its state went back under the worker. The
    caller decides what the model does (a `ShardedWorker` brings every shard back to one step)."""


class WorkerModel(Protocol):
    """What a Worker uses of its model: `optserve.client.model.Model`, which creates workers (so
    this module cannot import it)."""

    name: str
    client: Connection
    last_step: int

    def pull(
        self,
        *,
        like: Any = ...,
        min_step: int | None = ...,
        timeout: float | None = ...,
        ema: bool = ...,
        wire_dtype: str | None = ...,
        if_newer_than: int | None = ...,
        out: Any = ...,
        exact_step: int | None = ...,
        member: tuple[str, int] | None = ...,
    ) -> Any: ...

    def _push_header(
        self,
        base_step: int | None,
        weight: float | None,
        worker_id: str = "",
        seq: int = 0,
        global_norm_sq: float | None = None,
        session: int = 0,
    ) -> pb.PushHeader: ...

    packed: bool

    def _grad_leaves(self, grads: Any, wire_dtype: str | None) -> Sequence[WireLeaf]: ...

    def _send_grads(
        self, grads: Any, wire_dtype: str | None, header: pb.PushHeader, send: Callable[[Sequence[WireLeaf]], T]
    ) -> T: ...

    def _pull_request(
        self,
        *,
        min_step: int | None,
        timeout: float | None,
        ema: bool,
        wire_dtype: str | None,
        if_newer_than: int | None,
        exact_step: int | None = None,
    ) -> pb.PullRequest: ...

    def push_raw(
        self, header: pb.PushHeader, leaves: Sequence[WireLeaf], timeout: float | None = None
    ) -> pb.PushResponse: ...

    def push_pull_raw(
        self,
        header: pb.PushHeader,
        leaves: Sequence[WireLeaf],
        like: Any = None,
        timeout: float | None = None,
        out: Any = None,
    ) -> tuple[pb.PushResponse, Any]: ...

    def rows_pull(self, rows: Any, wire_dtype: str | None) -> pb.PullRequest: ...

    def pull_rows(
        self,
        rows: Any,
        *,
        min_step: int | None = ...,
        timeout: float | None = ...,
        ema: bool = ...,
        wire_dtype: str | None = ...,
        exact_step: int | None = ...,
    ) -> Any: ...

    def push_pull_rows_raw(
        self, header: pb.PushHeader, leaves: Sequence[WireLeaf], timeout: float | None = None
    ) -> tuple[pb.PushResponse, Any]: ...

    def shared_arrays(self, *, like: Any = ...) -> Any: ...


class Worker:
    """push / pull / push_pull for one worker of a model.

    retry_for: give up retrying after this many seconds (then the last error is raised).
    backoff / max_backoff: first and largest retry delay in seconds (doubling, full jitter).
    session: this worker's session (PushHeader.session); None: a random one (a new session per Worker).
    heartbeat: seconds between heartbeats while idle; None: the model's heartbeat_seconds (none when
        its leases never expire); 0: none.
    """

    def __init__(
        self,
        model: WorkerModel,
        worker_id: str,
        *,
        retry_for: float = 120.0,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        first_seq: int = 1,
        follow_restarts: bool = True,
        replay_window: int = 0,
        catch_up_wait: float = 30.0,
        session: int | None = None,
        heartbeat: float | None = None,
    ):
        if not worker_id:
            raise ValueError("worker_id must be a non-empty string")
        self.model = model
        self.worker_id = worker_id
        self.retry_for = retry_for
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.seq = first_seq - 1
        self.base_step: int | None = None
        self.incarnation: str | None = None
        self.retries = 0
        self.restarts_seen = 0
        self.rollbacks_seen = 0  # the server's state went back to an older step under this worker
        # False (the Workers of a ShardedWorker): a server that restarted behind this worker is caught
        # up by replaying its pushes (replay.py) and waited for (up to catch_up_wait seconds) while
        # the other workers replay theirs; when that cannot be done, ServerMovedError
        self.follow_restarts = follow_restarts
        self.replays = ReplayLog(replay_window)
        self.catch_up_wait = catch_up_wait
        self.replayed = 0
        # a ShardedWorker's: called with the step this worker waits for its server to get back to
        # while catching it up, for what the server needs besides the replays to get there (the
        # decisions of sync rounds that shard 0 takes: client/rounds.py)
        self.on_catch_up: Callable[[int], None] | None = None
        self.session = (secrets.randbits(63) or 1) if session is None else session
        self.heartbeat = heartbeat
        self.heartbeats = 0  # sent so far
        self._last_call = time.monotonic()  # when the last call that renews the lease started
        self._heartbeat_thread: threading.Thread | None = None
        self._closed = threading.Event()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the heartbeat: the lease expires unless the worker's calls renew it."""
        self._closed.set()
        thread = self._heartbeat_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _renewing(self) -> None:
        """A call that renews the lease starts; starts the heartbeat once the interval is known."""
        self._last_call = time.monotonic()
        if self._heartbeat_thread is not None or self._closed.is_set():
            return
        interval = self.heartbeat if self.heartbeat is not None else getattr(self.model, "heartbeat_seconds", 0.0)
        if interval and interval > 0:
            self._heartbeat_thread = threading.Thread(
                target=self._beat, args=(float(interval),), name=f"optserve-heartbeat-{self.worker_id}", daemon=True
            )
            self._heartbeat_thread.start()

    def _beat(self, interval: float) -> None:
        heartbeat = getattr(self.model, "heartbeat", None)
        if heartbeat is None:
            return
        while not self._closed.wait(max(0.01, interval - (time.monotonic() - self._last_call))):
            if time.monotonic() - self._last_call < interval:
                continue
            self._last_call = time.monotonic()
            try:
                heartbeat(self.worker_id, self.session, timeout=interval)
                self.heartbeats += 1
            except FailedPreconditionError as e:  # this session was replaced: stop renewing it
                log.warning("worker %r: heartbeat refused, stopping: %s", self.worker_id, e.message)
                return
            except OptserveError as e:  # the server away or busy: the next beat tries again
                log.debug("worker %r: heartbeat failed: %s", self.worker_id, e)
            except ValueError as e:  # grpc: the client's channel was closed under the worker: nothing to renew with
                log.debug("worker %r: heartbeat stopped: %s", self.worker_id, e)
                return

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, model={self.model.name!r}, seq={self.seq}, base_step={self.base_step})"

    def _retrying(self, call: Callable[[], T], header: Any = None) -> T:
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff
        while True:
            try:
                return call()
            except OptserveError as e:
                try:
                    if e.code in RESTART_SYMPTOMS and self._resync_after_restart(header):
                        continue
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT and self._resync_after_rollback(header):
                        continue
                    retry = e.code in RETRYABLE
                except ServerMovedError:
                    raise
                except OptserveError as unsure:  # could not ask the server: a restart may be under way
                    retry = unsure.code in RETRYABLE
                if not retry or time.monotonic() + delay > deadline:
                    raise
            self.retries += 1
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self.max_backoff)

    def _resync_after_restart(self, header: Any) -> bool:
        """If the server is a new incarnation: learns its (restored) step before anything is pushed
        again and caps the pending push's base_step at it. True if it did."""
        if self.incarnation is None:
            return False
        # An OptserveError here (the server still away or too busy to answer) reaches the caller,
        # which backs off and retries when it is UNAVAILABLE or DEADLINE_EXCEEDED.
        now = self.model.client.server_info()["incarnation"]
        if not now or now == self.incarnation:
            return False
        self.model.pull(if_newer_than=2**62)  # header only: the restored step, no tensors
        if not self.follow_restarts:
            self._catch_up(self.model.last_step)
            self.incarnation = now
            self.restarts_seen += 1
            return True
        self.incarnation, self.base_step = now, self.model.last_step
        self.restarts_seen += 1
        if header is not None and header.HasField("base_step") and header.base_step > self.base_step:
            header.base_step = self.base_step
        return True

    def _resync_after_rollback(self, header: Any) -> bool:
        """The same server is behind the step this push was computed against: its state was replaced
        by an older checkpoint (RestoreCheckpoint, or a restart this worker did not see because the
        other calls of its process noticed it first). Learns the step and caps the push's base_step
        at it, as after a restart. True if the push was ahead and is now capped."""
        if header is None or not header.HasField("base_step"):
            return False
        self.model.pull(if_newer_than=2**62)  # header only: the current step, no tensors
        step = self.model.last_step
        if header.base_step <= step:
            return False  # not ahead: the INVALID_ARGUMENT was about something else
        if not self.follow_restarts:  # behind: catching up (other workers replaying), or gone back
            self._wait_for(header.base_step)
            return True
        self.base_step = header.base_step = step
        self.incarnation = getattr(self.model, "last_incarnation", None) or self.incarnation
        self.rollbacks_seen += 1
        return True

    def _catch_up(self, restored: int) -> None:
        """A server restarted at step `restored`: replays this worker's pushes it lost, then waits for
        the step this worker's next push is computed against (the other workers replay theirs).
        ServerMovedError when it cannot be caught up (a lost push no longer kept, or the step not
        reached in catch_up_wait seconds)."""
        lost = self.replays.lost_after(restored)
        if lost is None:
            raise ServerMovedError(
                f"model {self.model.name!r}: the server restarted at step {restored} and lost pushes of worker "
                f"{self.worker_id!r} older than the {self.replays.size} it keeps"
            )
        self.replays.replay(lost, self.model.push_raw, self._wait_for)
        self.replayed += len(lost)
        if self.base_step is not None:
            self._wait_for(self.base_step)

    def _wait_for(self, step: int) -> None:
        """Waits (header-only pulls) until the server is at `step`; ServerMovedError if it is not
        within catch_up_wait seconds."""
        if self.on_catch_up is not None:
            self.on_catch_up(step)
        try:
            self.model.pull(if_newer_than=2**62, min_step=step, timeout=self.catch_up_wait)
        except OptserveError as e:
            if e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise ServerMovedError(
                f"model {self.model.name!r}: the server did not get back to step {step} in {self.catch_up_wait}s "
                f"({e.message})"
            ) from None

    def _note(self, incarnation: str, step: int) -> None:
        self.incarnation = incarnation or self.incarnation
        self.base_step = step

    def pull(self, **kwargs: Any) -> Any:
        """Pulls the parameters and remembers their step as the base of the next push."""
        self._renewing()
        member = (self.worker_id, self.session)
        params = self._retrying(lambda: self.model.pull(member=member, **kwargs))
        self._renewing()
        self.base_step = self.model.last_step
        self.incarnation = getattr(self.model, "last_incarnation", None) or self.incarnation
        return params

    def pull_rows(self, rows: Any, **kwargs: Any) -> Any:
        """Some rows (`Model.pull_rows`), retried as a pull is; their step is the base of the next push."""
        got = self._retrying(lambda: self.model.pull_rows(rows, **kwargs))
        self.base_step = self.model.last_step
        return got

    def push(
        self,
        grads: Any,
        *,
        weight: float | None = None,
        wire_dtype: str | None = None,
        global_norm_sq: float | None = None,
    ) -> int:
        """Pushes a gradient computed against the last pulled parameters; returns the server's step."""
        self.seq += 1
        self._renewing()
        header = self.model._push_header(
            self.base_step, weight, self.worker_id, self.seq, global_norm_sq, session=self.session
        )

        def send(leaves: Sequence[WireLeaf]) -> pb.PushResponse:
            reply = self._retrying(lambda: self.model.push_raw(header, leaves), header)
            self.replays.record(header, leaves, reply.step)
            return reply

        reply = self.model._send_grads(grads, wire_dtype, header, send)
        self.incarnation = reply.incarnation or self.incarnation
        return reply.step

    def shared_arrays(self, *, like: Any = None) -> Any:
        """(grads, params) living in shared memory with the server: `push_pull(grads, out=params)`
        copies neither on this side (`Model.shared_arrays`; the rules: client/shared_arrays.py)."""
        return self.model.shared_arrays(like=like)

    def push_pull(
        self,
        grads: Any,
        *,
        weight: float | None = None,
        wire_dtype: str | None = None,
        like: Any = None,
        out: Any = None,
        global_norm_sq: float | None = None,
        rows: Any = None,
    ) -> Any:
        """Pushes a gradient and returns the parameters after its step, in one round trip; `rows`
        ({path: ids}): only those rows, as `Model.pull_rows` returns them (the next batch's)."""
        self.seq += 1
        self._renewing()
        header = self.model._push_header(
            self.base_step, weight, self.worker_id, self.seq, global_norm_sq, session=self.session
        )
        if rows is not None:
            header.pull.CopyFrom(self.model.rows_pull(rows, wire_dtype))
        else:
            header.pull.CopyFrom(
                self.model._pull_request(
                    min_step=None, timeout=None, ema=False, wire_dtype=wire_dtype, if_newer_than=None
                )
            )

        def exchange(leaves: Sequence[WireLeaf]) -> tuple[pb.PushResponse, Any]:
            if rows is not None:
                return self.model.push_pull_rows_raw(header, leaves)
            return self.model.push_pull_raw(header, leaves, like, out=out)

        def send(leaves: Sequence[WireLeaf]) -> tuple[pb.PushResponse, Any]:
            reply, params = self._retrying(lambda: exchange(leaves), header)
            self.replays.record(header, leaves, reply.step)
            return reply, params

        reply, params = self.model._send_grads(grads, wire_dtype, header, send)
        self._note(reply.incarnation, self.model.last_step)
        return params
