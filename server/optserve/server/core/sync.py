"""Sync mode: the rounds in which the first `quorum` gradients pushed against a step are averaged.

docs/design.md, "Life of a push": `mode="sync", workers=N, quorum=k`. Every push names the step it was
computed against (`base_step`; absent means the current step). A *round* collects the contributions
for the current step; the k-th one completes it, and the model takes one update with their weighted
mean (weight = the push's `weight`, 0 meaning 1) through its jitted step (`LockedModel.apply`).
Pushes for a step already applied are stale: FAILED_PRECONDITION naming the current step (backup-
worker semantics: a straggler's late gradient is dropped, it pulls and joins a later step). With
`sync_timeout`, a round that has at least one contribution is applied when that many seconds have
passed since its first contribution, so a dead or stalled worker never blocks the rest forever.

Memory and "a partial push is never counted" -- the choice made here:

- The round keeps ONE running sum per trainable leaf, in float32 (float64 for float64 leaves), and a
  total weight: never N copies of the gradient.
- A push in flight stages its own chunks as they arrive, in its wire dtype (so a bfloat16 push
  stages half of a float32 copy), in the aligned buffers of its `TensorAssembler`, exactly as an
  async push does: each chunk is checked for NaN/Inf as it lands, and each leaf starts its device
  transfer as soon as it is complete. Only when the stream has ended and every leaf is complete and
  valid does `commit` fold it into the round's sum, under the model lock, with one fused jitted
  `sum + weight * grad` that donates (overwrites) the sum.
- So a stream that dies (client SIGKILLed, cancelled, malformed) leaves nothing behind: its staging
  buffers are dropped and the round's sum was never touched. Folding each chunk straight into the
  shared sum would save the staging buffer, but a dead stream's partial data could then only be
  taken out again by subtraction, which is not exact in floating point (or by saving the touched
  range first, which costs the same memory as staging). Staging costs one gradient per push *in
  flight*, freed at commit; concurrency is bounded by the server's RPC threads.

A refused round (settings.reject_nonfinite_updates: the weighted mean would make the state
non-finite) is dropped whole: the model's state and step are untouched, no contributor's seq is
recorded, the push that completed it gets FAILED_PRECONDITION, and so does every call waiting for a
step beyond the current one (`drops()` changes; see api/data_plane.py, DataPlane._wait_for_step).
Contributors push again against the same step.

Lazy rules (spec/lazy.py; docs/optimizers.md, "Row-sparse gradients (embedding tables)"): a lazy
leaf pushed as rows is summed at the union of the ids the round's contributions sent, on the host
(core/round_sums.py), and the update takes the mean of those rows only, padded as an async push's
are, so rows no contributor touched keep their parameters and optimizer state bitwise, and a round
costs the rows it touched, not the table. A contribution that sends the leaf dense makes it dense
for the rest of the round (it touched every row).

Membership (core/membership.py): a round expects the members that were live when it opened (the
model reached its step), less those whose lease expired since, plus the `workers` slots that no
worker has filled yet (a model starts expecting `workers` contributors, so its first rounds wait for
the job to arrive); `ModelSettings.needed` turns that into the contributions that complete it (a
quorum count, or a fraction of the expected members). With leases (settings.heartbeat_seconds > 0):
an expiry that leaves the pending contributions enough closes the round at once
(`membership_changed`), so a dead worker costs its lease, not sync_timeout; a worker that joins
while a round is open is counted from the next round (its push to this one is refused, unless it
fills a slot), and a join beyond `workers` live members is refused. Without leases the membership is
fixed: every round expects `workers`, as before leases existed. The last HISTORY closed rounds are
kept (`closed_rounds`: contributors in order, epoch, why it closed) for ModelInfo.

Retries: a contribution's (worker_id, seq) and reply are kept in the round until it is applied,
then move to the model's per-worker records (core/workers.py, which keep the replies of each
worker's last `REPLY_WINDOW` applied pushes). A repeat of the pair returns the original reply
(duplicate) and is never counted twice; a second, different push of the same worker
to the same round is refused. Because pending contributions are not in the worker records until their
step is applied, a checkpoint (which saves the per-worker seqs) never claims a seq whose gradient
was lost with an unfinished round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import jax

from optserve.server.core.aggregation import LockedModel, Receiver, finish_reading
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, NonFiniteUpdate, ResourceExhausted
from optserve.server.core.receiving import GradientAssembler, device_putter
from optserve.server.core.round_sums import RoundSum
from optserve.server.core.workers import PushReply

log = logging.getLogger("optserve.aggregation")


@dataclasses.dataclass
class Contribution:
    """What a round remembers of one accepted push: enough to answer its retry."""

    seq: int
    base_step: int
    weight: float
    reply: PushReply
    session: int = 0


@dataclasses.dataclass
class Round:
    """The contributions for one step (the model's current step)."""

    step: int  # the model step the gradients were computed against; applying it makes step + 1
    sums: RoundSum | None = None  # the weighted sum of its contributions (core/round_sums.py)
    total_weight: float = 0.0
    count: int = 0
    anonymous: int = 0  # contributions without a worker_id (no dedup possible)
    contributors: dict[str, Contribution] = dataclasses.field(default_factory=dict)
    deadline: float | None = None  # monotonic time at which a timeout applies it
    dropped: str = ""  # why the round was refused (reject_nonfinite_updates); "" while pending or applied
    members: frozenset[str] = frozenset()  # the members it expects (live when it opened, or filling a slot)
    slots: int = 0  # `workers` slots no worker had filled when it opened (a joiner fills one)
    opened_epoch: int = 0  # the membership epoch when it opened


HISTORY = 64  # closed rounds kept for ModelInfo.recent_rounds


@dataclasses.dataclass(frozen=True)
class ClosedRound:
    """How one sync round ended: ModelInfo.recent_rounds."""

    step: int  # the step its update made
    contributors: tuple[tuple[str, int], ...]  # (worker_id, seq) in the order they were summed
    anonymous: int  # contributions without a worker_id
    expected: int  # the members it expected when it closed
    opened_epoch: int
    epoch: int  # the membership epoch when it closed
    closed_by: str  # "quorum", "timeout" or "membership" (an expiry left it complete)


def check_weight(model_name: str, weight: float) -> float:
    """The effective weight of a contribution (0 means 1); negative or non-finite is refused."""
    if not math.isfinite(weight) or weight < 0:
        raise InvalidArgument(f"model {model_name!r}: weight must be a finite number >= 0 (0 means 1), got {weight}")
    return float(weight) or 1.0


class SyncAggregator:
    """The round state of one sync-mode model. The model calls it with its lock held (core/aggregation.py)."""

    screens_pushes = True

    def __init__(self, model: LockedModel):
        self.model = model
        self.quorum = model.settings.needed(model.settings.workers)  # with every member live
        self.timeout = model.settings.sync_timeout
        self.elastic = model.settings.heartbeat_seconds > 0  # leases expire: the membership changes
        self._closed: list[ClosedRound] = []
        self._round = self._open_round()
        # (rounds refused by reject_nonfinite_updates, why the last one was), replaced as one tuple:
        # calls waiting for a step read it without the lock (from their wait's give_up) and compare
        # the count with the one they started with (api/data_plane.py, DataPlane._wait_for_step)
        self._drops: tuple[int, str] = (0, "")

    # -- receiving ---------------------------------------------------------------------------------

    def open_push(
        self,
        *,
        base_step: int | None,
        worker_id: str,
        seq: int,
        weight: float,
        packs: bool = False,
        session: int = 0,
    ) -> SyncPush:
        """A receiver for one push stream (no lock held: touches nothing shared)."""
        push = SyncPush(self.model, base_step, worker_id, seq, check_weight(self.model.name, weight), packs, session)
        push.reads_in_place = True  # commit materializes the round's sum when the gradient lies in a region
        return push

    # -- membership --------------------------------------------------------------------------------

    def _open_round(self) -> Round:
        """A round for the model's current step, expecting the members live now."""
        members = self.model.membership
        slots = max(0, self.model.settings.workers - members.seen())
        return Round(step=self.model.step, members=members.live(), slots=slots, opened_epoch=members.epoch)

    def expected(self, rnd: Round) -> int:
        """The members the round waits for: `workers` without leases; with them, its members still
        live plus the slots nobody filled."""
        workers = self.model.settings.workers
        if not self.elastic:
            return workers
        return min(workers, len(rnd.members & self.model.membership.live()) + rnd.slots)

    def needed(self, rnd: Round) -> int:
        return self.model.settings.needed(self.expected(rnd))

    def membership_changed(self) -> None:
        rnd = self._current_round()
        if not self.elastic:
            return
        live = self.model.membership.live()
        joiners = sorted(live - rnd.members)
        while joiners and rnd.slots > 0:  # a worker that joins fills a slot the round holds open
            rnd.members, rnd.slots = rnd.members | {joiners.pop(0)}, rnd.slots - 1
        if rnd.count == 0 and rnd.slots == 0 and not rnd.members & live:
            rnd.members = live  # every member it expected left before contributing: it expects who is here
        if rnd.count and rnd.count >= self.needed(rnd):
            with contextlib.suppress(NonFiniteUpdate):  # dropped and logged by _apply
                self._apply(rnd, closed_by="membership")

    def screen(self, receiver: Receiver) -> None:
        """A push already known to be stale is refused before its bytes (a retry must reach commit,
        which answers it with the original reply)."""
        assert isinstance(receiver, SyncPush)
        base_step = receiver.base_step
        if (
            base_step is not None
            and base_step < self.model.step
            and not self._is_retry(receiver.worker_id, receiver.seq, receiver.session)
        ):
            raise self._stale(base_step)

    def _is_retry(self, worker_id: str, seq: int, session: int) -> bool:
        if not worker_id:
            return False
        pending = self._current_round().contributors.get(worker_id)
        if pending is not None and (not session or pending.session == session) and seq <= pending.seq:
            return True
        return seq <= self.model.last_applied_seq(worker_id, session)

    def _stale(self, base_step: int) -> FailedPrecondition:
        m = self.model
        m.count("stale_rejected")
        return FailedPrecondition(
            f"model {m.name!r}: sync push computed against step {base_step}, which was already applied; "
            f"the current step is {m.step}: pull step {m.step} and push against it"
        )

    def _current_round(self) -> Round:
        """The round for the model's current step (a round left behind by a restore is dropped)."""
        if self._round.step != self.model.step:
            if self._round.count:
                log.warning(
                    "model %r: dropping %d sync contributions for step %d: the model is now at step %d",
                    self.model.name,
                    self._round.count,
                    self._round.step,
                    self.model.step,
                )
            self._round = self._open_round()
        return self._round

    def commit(self, receiver: Receiver) -> tuple[PushReply, bool]:
        """Adds a complete, validated push to the round; applies the round when it reaches the quorum.

        Returns (reply, duplicate). The reply's step is the step this gradient is part of; `applied`
        says whether that step was already applied when the reply was made (true for the push that
        completes the round). `push.round` is set to the round the push joined (its `dropped` says
        later whether that round was refused). A push with `push.must_complete` set (a PushPull
        that found no free waiting slot) is refused with RESOURCE_EXHAUSTED, before it is counted,
        unless it completes the round.
        """
        push = receiver
        assert isinstance(push, SyncPush)
        model = self.model
        # on the device already (moved leaf by leaf as each completed) and checked finite by the assembler
        device_grads = {k: push.on_device[k] for k in model.trainable}
        rnd = self._current_round()
        dup = self._duplicate(rnd, push.worker_id, push.seq, push.session)
        if dup is not None:
            return dup, True
        base_step = rnd.step if push.base_step is None else push.base_step
        if base_step < rnd.step:
            raise self._stale(base_step)
        if base_step > rnd.step:
            raise InvalidArgument(
                f"model {model.name!r}: base_step {base_step} is ahead of the current step {rnd.step}"
            )
        if push.worker_id and push.worker_id in rnd.contributors:
            raise FailedPrecondition(
                f"model {model.name!r}: worker {push.worker_id!r} already contributed seq "
                f"{rnd.contributors[push.worker_id].seq} to step {rnd.step + 1}; wait for step {rnd.step + 1}, "
                "pull it and push against it"
            )
        if self.elastic and push.worker_id and push.worker_id not in rnd.members:
            lease = dict(model.membership.members()).get(push.worker_id)
            joined = "" if lease is None else f" at membership epoch {lease.joined_epoch}"
            raise FailedPrecondition(
                f"model {model.name!r}: worker {push.worker_id!r} joined{joined}, after the round for step "
                f"{rnd.step + 1} began (epoch {rnd.opened_epoch}); it is counted from the next round: pull step "
                f"{rnd.step + 1} (min_step) and push against it"
            )
        if model.deleted:
            raise FailedPrecondition(f"model {model.name!r} was deleted")
        model.check_step_room(rnd.step)
        needed = self.needed(rnd)
        if push.must_complete and rnd.count + 1 < needed:
            raise ResourceExhausted(push.must_complete)
        push.round = rnd
        if rnd.sums is None:
            rnd.sums = RoundSum(model.schema_map, model.placement)
        rnd.sums.add(device_grads, push.assembler.row_sums(), push.weight)
        if push.assembler.in_place:  # the sum read the client's region: done before the reply
            rnd.sums.wait()
        rnd.total_weight += push.weight
        rnd.count += 1
        completes = rnd.count >= needed
        reply = PushReply(rnd.step + 1, applied=completes)
        if push.worker_id:
            rnd.contributors[push.worker_id] = Contribution(push.seq, base_step, push.weight, reply, push.session)
        else:
            rnd.anonymous += 1
        if completes:
            self._apply(rnd, closed_by="quorum")
        elif self.timeout > 0 and rnd.deadline is None:
            rnd.deadline = time.monotonic() + self.timeout
        return reply, False

    def _duplicate(self, rnd: Round, worker_id: str, seq: int, session: int) -> PushReply | None:
        """The original reply of a repeated (worker_id, seq): pending in this round, or one of the
        worker's last applied pushes (LockedModel.applied_reply, which refuses older applied seqs);
        None for a new push."""
        if not worker_id:
            return None
        pending = rnd.contributors.get(worker_id)
        if pending is not None and session and pending.session != session:
            pending = None  # another session's: this push is not its retry (0: no session, any)
        if pending is not None and seq == pending.seq:
            self.model.count("duplicates")
            return pending.reply
        reply = self.model.applied_reply(worker_id, seq, session)
        if reply is None and pending is not None and seq < pending.seq:  # above every applied seq: never seen
            self.model.count("duplicates")
            raise FailedPrecondition(
                f"model {self.model.name!r}: worker {worker_id!r} seq {seq} is older than its pending seq "
                f"{pending.seq} and was never applied; push new gradients with a higher seq"
            )
        return reply

    # -- applying ----------------------------------------------------------------------------------

    def _apply(self, rnd: Round, *, closed_by: str) -> None:
        """One update with the round's weighted mean; the contributors become the workers' records.
        A refused update (NonFiniteUpdate) drops the round and wakes the waiting calls, then raises."""
        model = self.model
        assert rnd.sums is not None  # a round is applied once it has a contribution
        grads, row_ids = rnd.sums.mean().update_inputs(model.schema_map, model.placement)
        rnd.sums = None
        try:
            model.apply(grads, 1.0, row_ids)
        except NonFiniteUpdate as e:
            why = (
                f"{e.message}; the sync round for step {rnd.step + 1} ({rnd.count} contributions) was dropped: "
                f"push again against step {rnd.step}"
            )
            self._drops = (self._drops[0] + 1, why)
            log.warning("%s", why)
            rnd.dropped = why
            self._round = self._open_round()
            model.notify_waiters()  # waiting calls see drops() change
            raise NonFiniteUpdate(why) from None
        for worker_id, c in rnd.contributors.items():
            model.record_worker(worker_id, c.seq, c.base_step, c.reply, c.session)
        self._closed.append(
            ClosedRound(
                rnd.step + 1,
                tuple((w, c.seq) for w, c in rnd.contributors.items()),
                rnd.anonymous,
                self.expected(rnd),
                rnd.opened_epoch,
                model.membership.epoch,
                closed_by,
            )
        )
        del self._closed[:-HISTORY]
        if closed_by == "timeout":
            model.count("sync_timeouts")
            log.warning(
                "model %r: sync step %d applied by timeout (%.3gs) with %d of %d expected contributions (needed %d); "
                "missing workers' late pushes will be stale",
                model.name,
                rnd.step + 1,
                self.timeout,
                rnd.count,
                self.expected(rnd),
                self.needed(rnd),
            )
        self._round = self._open_round()

    def time_left(self) -> float | None:
        """Seconds until the round's sync_timeout applies it (None: no contribution, or no timeout)."""
        rnd = self._current_round()
        if rnd.deadline is None or rnd.count == 0:
            return None
        return rnd.deadline - time.monotonic()

    def expire(self) -> None:
        """Applies a round whose deadline has passed with what has arrived; a failure drops it."""
        rnd = self._current_round()
        if rnd.deadline is None or rnd.count == 0 or time.monotonic() < rnd.deadline:
            return
        try:
            self._apply(rnd, closed_by="timeout")
        except NonFiniteUpdate:
            pass  # dropped and logged by _apply
        except Exception:  # never kill the model's timer silently; drop the round
            log.exception("model %r: applying sync step %d by timeout failed", self.model.name, rnd.step + 1)
            self._round = self._open_round()

    # -- visibility and lifecycle ------------------------------------------------------------------

    def pending(self) -> int:
        """Contributions received for the current step and not applied yet."""
        return self._current_round().count

    def pending_workers(self) -> dict[str, tuple[int, int]]:
        return {w: (c.seq, c.base_step) for w, c in self._current_round().contributors.items()}

    def drops(self) -> tuple[int, str]:
        return self._drops

    def closed_rounds(self) -> list[ClosedRound]:
        """The last HISTORY closed rounds, oldest first."""
        return list(self._closed)

    def reset(self) -> None:
        """Drops the pending round (the model's state was replaced, e.g. by a checkpoint restore)."""
        if self._round.count:
            log.warning(
                "model %r: dropping %d pending sync contributions: the model's state was replaced",
                self.model.name,
                self._round.count,
            )
        self._round = self._open_round()


class SyncPush:
    """One push stream in sync mode: staged privately, folded into the round only at commit."""

    # Whether its gradient may be read in place from a shared-memory region (core/receiving.py,
    # read_in_place): SyncAggregator's pushes only, whose commit leaves nothing reading it (a
    # subclass that stages gradients beyond its commit keeps copying them).
    reads_in_place = False

    def __init__(
        self,
        model: LockedModel,
        base_step: int | None,
        worker_id: str,
        seq: int,
        weight: float,
        packs: bool,
        session: int = 0,
    ):
        self.base_step, self.worker_id, self.seq, self.weight = base_step, worker_id, seq, weight
        self.session = session
        self.on_device: dict[str, jax.Array] = {}
        # NaN/Inf is refused (INVALID_ARGUMENT naming the leaf) before anything is counted; each
        # complete trainable leaf starts its device transfer while later chunks arrive
        self.assembler = GradientAssembler(
            model.push_schema,
            model.layout,
            what=model.label,
            on_complete=device_putter(self.on_device, model.placement, frozenset(model.trainable)),
            buffers=model.gradient_buffers.take(),
            packs=packs,
        )
        # set by require_completion: refuse (with this message) unless this push completes its round
        self.must_complete = ""
        self.round: Round | None = None  # the round this push joined (set by commit)

    def require_completion(self, why: str) -> None:
        self.must_complete = why

    def dropped_check(self) -> Callable[[], str] | None:
        joined = self.round
        if joined is None:  # refused, or a retry answered with its original reply
            return None
        return lambda: joined.dropped

    def abort(self) -> None:
        """Nothing to undo: the round's sum is only touched at commit; the staging buffers are dropped."""
        self.on_device = {}

    def finish_reading(self) -> None:
        if self.assembler.in_place:
            finish_reading(self.assembler, self.on_device)
            self.on_device = {}  # its device arrays alias the region: dropped with the reply
