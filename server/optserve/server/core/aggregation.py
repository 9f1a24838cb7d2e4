"""How pushes become updates: the protocol between a Model and its aggregator.

A model in async mode applies each push at once (core/async_push.py); in sync mode it averages the
pushes of a round (core/sync.py). Either is an `Aggregator`, chosen when the model is built; the
model owns the lock and calls its aggregator with it held, except `open_push`, which builds a
receiver for the bytes of a push and touches no shared state. The aggregator reaches its model only
through `LockedModel`, a narrow view whose mutating members are used only inside those calls.

    service                    Model                         Aggregator
    open_push(...)       ->    aggregator.open_push(...)     validates, builds the Receiver
                               [lock] aggregator.screen(r)   (sync: refuses a stale push early)
    chunks               ->    receiver.assembler            (no lock: private buffers)
    commit_push(r, grads) ->   [lock] aggregator.commit(r)   LockedModel.apply / record_worker ...
                               [lock] deadline timer         aggregator.time_left() / expire()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

from optserve.server.core.gradient_buffers import GradientBuffers
from optserve.server.core.layout import Layout
from optserve.server.core.membership import Membership
from optserve.server.core.placement import ModelPlacement
from optserve.server.core.settings import ModelSettings
from optserve.server.core.workers import PushReply
from optserve.wire.assembler import TensorAssembler
from optserve.wire.dtypes import LeafSpec


class LockedModel(Protocol):
    """A model as its aggregator sees it. `name` ... `gradient_buffers` never change; every other
    member is used only while the model's lock is held (inside the Model's calls to the aggregator)."""

    name: str
    label: str  # "model 'm'", or "model 'm' (shard 1 of 3)": how messages name it
    settings: ModelSettings
    schema_map: Mapping[str, LeafSpec]
    push_schema: Mapping[str, LeafSpec]  # every leaf, and every pack of `layout` in place of its leaves
    layout: Layout
    trainable: tuple[str, ...]  # the buffers the update rule sees (layout.trainable)
    lazy_leaves: frozenset[str]  # loose leaves under a lazy rule, updated row by row (core/rows.py)
    device: jax.Device  # the first of its devices (the only one without a mesh)
    placement: ModelPlacement  # where its buffers live (core/placement.py)
    gradient_buffers: GradientBuffers

    @property
    def step(self) -> int: ...

    @property
    def deleted(self) -> bool: ...

    membership: Membership  # its members and epoch (core/membership.py)

    def applied_reply(self, worker_id: str, seq: int, session: int) -> PushReply | None:
        """The original reply if (worker_id, seq) is one of the worker's last applied pushes of that
        session whose reply is kept (counted as a duplicate); None for a seq above its highest
        applied one or a session whose seqs the model holds none of; FAILED_PRECONDITION for any
        other seq."""
        ...

    def last_applied_seq(self, worker_id: str, session: int) -> int:
        """The worker's highest applied seq in that session (0: none)."""
        ...

    def check_step_room(self, step: int) -> None:
        """FAILED_PRECONDITION when an update from `step` would take the model past MAX_STEP."""
        ...

    def apply(self, grads: Mapping[str, Any], scale: float, row_ids: Mapping[str, Any] | None = None) -> int:
        """One update with `grads` (by trainable buffer, on the device) times `scale`; returns the new
        step. NonFiniteUpdate when settings.reject_nonfinite_updates refuses it (state unchanged).
        row_ids: for buffers whose grads are the padded rows of a lazy rule, their ids (core/rows.py)."""
        ...

    def clip_factor(self, global_norm_sq: float | None) -> float:
        """What a shard whose spec starts with clip_by_global_norm scales a push's gradient by, given
        the whole gradient's squared norm (core/sharding.py, GlobalClip); 1.0 for any other model."""
        ...

    def record_worker(self, worker_id: str, seq: int, base_step: int | None, reply: PushReply, session: int) -> None:
        """Remembers an applied push of a worker ('' : anonymous, nothing to remember); a push of a
        session that the worker has since replaced is not remembered (its calls are refused)."""
        ...

    def count(self, counter: str, n: int = 1) -> None:
        """Adds to one of the model's counters (core/model.py, Counters)."""
        ...

    def notify_waiters(self) -> None:
        """Wakes the calls waiting for a step, so that they look again (e.g. a round was dropped)."""
        ...

    def wait_for_update(self) -> None:
        """Blocks until the last update applied has run (its outputs are ready)."""
        ...


class Receiver(Protocol):
    """One push stream being received: its assembler collects the chunks into private buffers."""

    worker_id: str
    seq: int
    session: int

    @property
    def assembler(self) -> TensorAssembler: ...

    def require_completion(self, why: str) -> None:
        """Refuse the push at commit (RESOURCE_EXHAUSTED, `why`) unless the step it joins is applied
        by it, i.e. unless a reply that waits for that step would not have to wait."""
        ...

    def dropped_check(self) -> Callable[[], str] | None:
        """After commit: a function saying why the round the push joined was dropped ('' while it
        was not); None when it joined no round (async mode, or a retry answered from a record)."""
        ...

    def abort(self) -> None:
        """The stream failed: nothing of it may count."""
        ...

    def finish_reading(self) -> None:
        """The push is answered (committed, refused or aborted): after this nothing of the server
        reads or holds its received gradient's memory (which may be a client's shared-memory
        region: core/receiving.py, read_in_place). Waits for transfers still reading it."""
        ...


def finish_reading(assembler: TensorAssembler, on_device: Mapping[str, Any]) -> None:
    """Receiver.finish_reading for receivers whose device copies are in `on_device`: when the push
    was read in place from a region, waits for their host-to-device transfers (an accelerator's
    are asynchronous; jax on CPU aliases the memory and has none), so that a push refused after its
    leaves were moved cannot leave a transfer reading the client's memory after the reply. The
    update that reads the gradient was already waited for in commit (or never ran)."""
    if getattr(assembler, "in_place", None):
        jax.block_until_ready(dict(on_device))


class Aggregator(Protocol):
    """How a model's pushes become updates. The model holds its lock around every call but
    `open_push` and `drops`."""

    # whether `screen` has anything to refuse before a push's bytes arrive (sync: stale pushes)
    screens_pushes: bool

    def open_push(
        self,
        *,
        base_step: int | None,
        worker_id: str,
        seq: int,
        weight: float,
        packs: bool = False,
        session: int = 0,
    ) -> Receiver:
        """A receiver for one push stream; INVALID_ARGUMENT for arguments no state can make valid.
        packs: the push may send the packs of the model's layout in place of their leaves.
        session: the worker's session (core/membership.py) its seq counts in."""
        ...

    def screen(self, receiver: Receiver) -> None:
        """Refuses, before its bytes, a push that is already known to be refused at commit; called
        (when `screens_pushes`) for pushes that name their base_step."""
        ...

    def commit(self, receiver: Receiver) -> tuple[PushReply, bool]:
        """Counts a completely received push; returns (reply, duplicate). A retry of an applied or
        pending push gets its original reply and counts nothing."""
        ...

    def pending(self) -> int:
        """Contributions received and not applied yet."""
        ...

    def pending_workers(self) -> dict[str, tuple[int, int]]:
        """worker_id -> (seq, base_step) of each pending contribution."""
        ...

    def drops(self) -> tuple[int, str]:
        """(rounds dropped so far, why the last one was); calls waiting for a step compare counts.
        Called without the lock too (from a wait's give_up, which runs under it): one read."""
        ...

    def time_left(self) -> float | None:
        """Seconds until pending work must be applied without waiting for more (<= 0: now), or None."""
        ...

    def expire(self) -> None:
        """Applies the pending work whose time is up (time_left() <= 0); never raises."""
        ...

    def reset(self) -> None:
        """Drops the pending work: the model's state was replaced (a checkpoint restore)."""
        ...

    def membership_changed(self) -> None:
        """The model's membership changed (a join, a new session, an expiry): a sync round whose
        expected members left may now be complete and is applied."""
        ...
