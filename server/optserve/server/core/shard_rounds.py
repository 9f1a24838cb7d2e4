"""Sync rounds that every shard of a model closes with the same contributors (docs/design.md,
"Shards", "Sync rounds").

With quorum below workers or a sync_timeout, a shard left to itself would close each round with the
first pushes it happens to see, and the shards of one model could average different workers'
gradients. So shard 0 decides for all of them: it closes its rounds as core/sync.py does (the
quorum-th contribution, or the timeout) and keeps the contributors of each, in order (`Decision`).
The other shards (followers) keep each contribution apart (`Staged`: never folded into a sum
before the round's contributors are known) and close a round only when a client relays shard 0's
decision to them (DecideRound); contributions the decision leaves out are dropped, their pushes
answered as stale, as shard 0 answered them. Every shard sums the chosen gradients in shard 0's
order, so each holds the same round as the unsharded model fed those pushes in that order.

clip_by_global_norm at the head of the chain (core/sharding.py, GlobalClip) clips the round's mean
gradient by the whole model's norm: once a shard holds its part of the mean it reports the sum of
its squares (`partial_norm_sq`) and waits; a client adds up every shard's and sends the total back
with the decision, and each shard scales its part by the rule's factor and applies. Shard 0 then
waits for the total as well, so that no shard applies what another might not.

Leases (settings.heartbeat_seconds > 0): shard 0's membership alone decides who a round expects,
as core/sync.py does for an unsharded model (the live members when the round opened, the `workers`
slots nobody filled; a joiner counted from the next round; an expiry that leaves the round complete
closes it, "membership"). Each shard keeps its own leases (for info and metrics), but a follower
refuses no push for its membership: its rounds are whatever shard 0 decides, so the shards never
disagree however their leases happen to expire. Each shard keeps its closed rounds (ModelInfo.
recent_rounds) with why shard 0 closed them (the decision carries it).

Decisions are idempotent: the first one a shard receives for a step is kept (with those of the last
`HISTORY` closed rounds), an identical one again is answered from it, a different one is refused
(FAILED_PRECONDITION) and changes nothing. Exactly once per (worker_id, seq) holds as in
core/sync.py: a staged contribution answers its retries, and becomes the worker's record only when
its round is applied. An anonymous push (no worker_id) is named by the number its client drew for
it, the same on every shard (PushHeader.contribution, the contributor's seq with an empty
worker_id); it counts towards the quorum and is never a member, as in core/sync.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax

from optserve.server.core.aggregation import LockedModel, Receiver
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from optserve.server.core.round_sums import RoundMean, RoundSum, Rows
from optserve.server.core.sync import ClosedRound, SyncPush, check_weight
from optserve.server.core.workers import PushReply

log = logging.getLogger("optserve.aggregation")

HISTORY = 64  # closed rounds whose decision a shard keeps, to answer a decision relayed late


@dataclasses.dataclass
class Staged:
    """One contribution received for the open round, kept apart until the round's contributors are known."""

    seq: int
    base_step: int
    weight: float
    reply: PushReply
    grads: dict[str, jax.Array]
    dropped: str = ""  # why it was left out of its round ("" while it may still count)
    session: int = 0  # the worker's session (core/membership.py)
    rows: dict[str, Rows] = dataclasses.field(default_factory=dict)  # lazy leaves sent as rows (core/round_sums.py)
    worker_id: str = ""  # "" for an anonymous push, `seq` then its PushHeader.contribution


# A contribution's key in a round: a worker's id (one contribution per worker and round), or for an
# anonymous push ("", its contribution number).
Key = str | tuple[str, int]


def key(worker_id: str, seq: int) -> Key:
    """The key of contribution (worker_id, seq) in a round's `staged` (`Key`)."""
    return worker_id or (worker_id, seq)


@dataclasses.dataclass
class OpenRound:
    step: int  # the model step the gradients were computed against; the round makes step + 1
    staged: dict[Key, Staged] = dataclasses.field(default_factory=dict)  # in order of arrival
    decided: tuple[tuple[str, int], ...] | None = None  # the contributors (worker_id, seq), in order
    mean: RoundMean | None = None  # once every decided contribution is summed
    partial_norm_sq: float | None = None  # of this shard's part of `mean` (head clip only)
    deadline: float | None = None  # shard 0 with sync_timeout: when it closes the round
    closed_by: str = ""  # why shard 0 closed it: "quorum", "timeout", "membership" ("" while open)
    members: frozenset[str] = frozenset()  # shard 0 with leases: the members it expects (core/sync.py)
    slots: int = 0  # shard 0 with leases: `workers` slots nobody had filled when it opened
    opened_epoch: int = 0  # this shard's membership epoch when it opened


@dataclasses.dataclass(frozen=True)
class Decision:
    """What DecideRound answers: a round's contributors and where this shard stands with it."""

    step: int  # the step the round makes
    contributors: tuple[tuple[str, int], ...]
    partial_norm_sq: float | None
    applied: bool
    global_norm_sq: float | None = None  # the total it was applied with (head clip only)
    closed_by: str = ""  # why shard 0 closed it ("" while it is open there, or when not told)


class ShardPush(SyncPush):
    """A sync push to a shard whose rounds shard 0 decides; `dropped_check` reports its own exclusion."""

    staged: Staged | None = None

    def dropped_check(self) -> Callable[[], str] | None:
        staged = self.staged
        if staged is None:
            return None
        return lambda: staged.dropped


class ShardRounds:
    """The sync rounds of one shard of a model whose rounds shard 0 decides; the model calls it with
    its lock held, as any aggregator (core/aggregation.py), and `decide` for DecideRound."""

    screens_pushes = True

    def __init__(self, model: LockedModel, leader: bool, clips: bool):
        self.model = model
        self.leader = leader  # shard 0: closes its rounds itself
        self.clips = clips  # the spec starts with clip_by_global_norm: apply once the total norm is known
        # with leases, shard 0's membership decides who its rounds expect; a follower's never does
        self.elastic = leader and model.settings.heartbeat_seconds > 0
        self.timeout = model.settings.sync_timeout if leader else 0.0
        self._closed: OrderedDict[int, Decision] = OrderedDict()
        self._records: list[ClosedRound] = []  # the last HISTORY closed rounds (ModelInfo.recent_rounds)
        self._round = self._open_round()

    def _open_round(self) -> OpenRound:
        """A round for the model's current step, expecting (shard 0 with leases) the members live now."""
        members = self.model.membership
        slots = max(0, self.model.settings.workers - members.seen())
        return OpenRound(step=self.model.step, members=members.live(), slots=slots, opened_epoch=members.epoch)

    def expected(self, rnd: OpenRound) -> int:
        """The members the round waits for (shard 0): `workers` without leases; with them, its
        members still live plus the slots nobody filled (core/sync.py, SyncAggregator.expected)."""
        workers = self.model.settings.workers
        if not self.elastic:
            return workers
        return min(workers, len(rnd.members & self.model.membership.live()) + rnd.slots)

    def needed(self, rnd: OpenRound) -> int:
        return self.model.settings.needed(self.expected(rnd))

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
    ) -> ShardPush:
        if not worker_id and not seq:
            raise InvalidArgument(
                f"{self.model.label}: an anonymous sync push to a model over several shards needs "
                "PushHeader.contribution (shard 0's decision names each round's contributions; a client of this "
                "version sends one)"
            )
        weight = check_weight(self.model.name, weight)
        return ShardPush(self.model, base_step, worker_id, seq, weight, packs, session)

    def screen(self, receiver: Receiver) -> None:
        assert isinstance(receiver, ShardPush)
        base = receiver.base_step
        retry = self._is_retry(receiver.worker_id, receiver.seq, receiver.session)
        if base is not None and base < self.model.step and not retry:
            raise self._stale(base, f"which was already applied; the current step is {self.model.step}")

    def _is_retry(self, worker_id: str, seq: int, session: int) -> bool:
        if not worker_id:  # an anonymous push is not retried; the same contribution twice is answered in commit
            return False
        staged = self._current().staged.get(worker_id)
        if staged is not None and (not session or staged.session == session) and seq <= staged.seq:
            return True
        return seq <= self.model.last_applied_seq(worker_id, session)

    def _stale(self, base_step: int, why: str) -> FailedPrecondition:
        m = self.model
        m.count("stale_rejected")
        return FailedPrecondition(
            f"{m.label}: sync push computed against step {base_step}, {why}: pull step {base_step + 1} or later "
            "and push against it"
        )

    def _current(self) -> OpenRound:
        """The round for the model's current step (one left behind by a restore is dropped)."""
        if self._round.step != self.model.step:
            self._drop_all("the model's state was replaced")
            self._round = self._open_round()
        return self._round

    def commit(self, receiver: Receiver) -> tuple[PushReply, bool]:
        push = receiver
        assert isinstance(push, ShardPush)
        model = self.model
        rnd = self._current()
        pending = rnd.staged.get(key(push.worker_id, push.seq))
        same_session = not push.session or (pending is not None and pending.session == push.session)
        if pending is not None and same_session and push.seq == pending.seq:
            model.count("duplicates")
            return pending.reply, True
        applied = model.applied_reply(push.worker_id, push.seq, push.session)
        if applied is not None:
            return applied, True
        base = rnd.step if push.base_step is None else push.base_step
        if base < rnd.step:
            raise self._stale(base, f"which was already applied; the current step is {rnd.step}")
        if base > rnd.step:
            raise InvalidArgument(f"{model.label}: base_step {base} is ahead of the current step {rnd.step}")
        if pending is not None:
            raise FailedPrecondition(
                f"{model.label}: worker {push.worker_id!r} already contributed seq {pending.seq} to step "
                f"{rnd.step + 1}; wait for step {rnd.step + 1}, pull it and push against it"
            )
        named = rnd.decided
        if named is not None and (push.worker_id, push.seq) not in named:
            raise self._stale(base, f"whose round (step {rnd.step + 1}) shard 0 closed without this push")
        if self.elastic and push.worker_id and push.worker_id not in rnd.members:
            lease = dict(model.membership.members()).get(push.worker_id)
            joined = "" if lease is None else f" at membership epoch {lease.joined_epoch}"
            raise FailedPrecondition(
                f"{model.label}: worker {push.worker_id!r} joined{joined}, after the round for step {rnd.step + 1} "
                f"began (epoch {rnd.opened_epoch}); it is counted from the next round: pull step {rnd.step + 1} "
                "(min_step) and push against it"
            )
        if model.deleted:
            raise FailedPrecondition(f"{model.label} was deleted")
        model.check_step_room(rnd.step)
        closes = self.leader and named is None and len(rnd.staged) + 1 >= self.needed(rnd)
        applies_now = closes and not self.clips
        if push.must_complete and not applies_now:
            raise ResourceExhausted(push.must_complete)
        grads = {k: push.on_device[k] for k in model.trainable}
        reply = PushReply(rnd.step + 1, applied=applies_now)
        rows = push.assembler.row_sums()
        staged = Staged(
            push.seq, base, push.weight, reply, grads, session=push.session, rows=rows, worker_id=push.worker_id
        )
        push.staged = rnd.staged[key(push.worker_id, push.seq)] = staged
        if closes:
            self._decide_locally(rnd, "quorum")
        else:
            if self.timeout > 0 and rnd.deadline is None and self.leader:
                rnd.deadline = time.monotonic() + self.timeout
            self._try_close(rnd)
        model.notify_waiters()  # a DecideRound may be waiting for this contribution or this close
        return reply, False

    # -- closing -----------------------------------------------------------------------------------

    def _decide_locally(self, rnd: OpenRound, closed_by: str) -> None:
        """Shard 0 closes its round with what it has staged, in order of arrival."""
        rnd.decided = tuple((s.worker_id, s.seq) for s in rnd.staged.values())
        rnd.closed_by = closed_by
        self._try_close(rnd)
        self.model.notify_waiters()

    def _try_close(self, rnd: OpenRound) -> None:
        """Once the contributors are known and all received: sums them in the decision's order and
        applies (or, with a head clip, computes this shard's partial squared norm and waits)."""
        if rnd.decided is None or rnd.mean is not None:
            return
        if any(key(w, seq) not in rnd.staged for w, seq in rnd.decided):
            return
        self._drop_undecided(rnd)
        sums = RoundSum(self.model.schema_map, self.model.placement)
        for w, seq in rnd.decided:
            s = rnd.staged[key(w, seq)]
            sums.add(s.grads, s.rows, s.weight)
            s.grads, s.rows = {}, {}
        rnd.mean = sums.mean()
        if not self.clips:
            self._apply(rnd, None)
        else:
            rnd.partial_norm_sq = rnd.mean.squared_norm()

    def _apply(self, rnd: OpenRound, global_norm_sq: float | None) -> None:
        model = self.model
        assert rnd.mean is not None and rnd.decided is not None
        mean = rnd.mean
        if global_norm_sq is not None:
            factor = model.clip_factor(global_norm_sq)
            if factor != 1.0:
                mean = mean.scaled(factor)
        # lazy leaves' mean rows at the rows the decided contributions touched, as core/sync.py applies them
        grads, row_ids = mean.update_inputs(model.schema_map, model.placement)
        model.apply(grads, 1.0, row_ids)
        for w, seq in rnd.decided:
            s = rnd.staged[key(w, seq)]
            model.record_worker(w, s.seq, s.base_step, s.reply, s.session)  # nothing for an anonymous push
        # a decision relayed without its reason (an older client): short of the quorum is a timeout
        if rnd.closed_by == "timeout" or (not rnd.closed_by and len(rnd.decided) < self.needed(rnd)):
            model.count("sync_timeouts")
        self._closed[rnd.step + 1] = Decision(
            rnd.step + 1, rnd.decided, rnd.partial_norm_sq, True, global_norm_sq, rnd.closed_by
        )
        while len(self._closed) > HISTORY:
            self._closed.popitem(last=False)
        epoch = model.membership.epoch
        # a follower does not know whom shard 0's round expected: 0 (shard 0's record says it)
        expected = self.expected(rnd) if self.leader else 0
        # as core/sync.py records a round: its workers' contributions, and how many anonymous ones
        workers = tuple((w, seq) for w, seq in rnd.decided if w)
        anonymous = len(rnd.decided) - len(workers)
        self._records.append(
            ClosedRound(rnd.step + 1, workers, anonymous, expected, rnd.opened_epoch, epoch, rnd.closed_by)
        )
        del self._records[:-HISTORY]
        self._round = self._open_round()

    def _drop_undecided(self, rnd: OpenRound) -> None:
        """Drops the staged contributions that the round's decision leaves out."""
        assert rnd.decided is not None
        decided = {key(w, seq) for w, seq in rnd.decided}
        for k in [k for k in rnd.staged if k not in decided]:
            self._drop(rnd.staged.pop(k), f"whose round (step {rnd.step + 1}) shard 0 closed without this push")

    def _drop(self, staged: Staged, why: str) -> None:
        self.model.count("stale_rejected")
        staged.dropped = f"{self.model.label}: sync push computed against step {staged.base_step}, {why}"
        staged.grads = {}

    def _drop_all(self, why: str) -> None:
        for s in self._round.staged.values():
            if not s.dropped:
                s.dropped = f"{self.model.label}: {why}; push again"
                s.grads = {}
        self.model.notify_waiters()

    # -- decisions (DecideRound) -------------------------------------------------------------------

    def decide(
        self,
        step: int,
        contributors: Sequence[tuple[str, int]],
        global_norm_sq: float | None,
        closed_by: str = "",
    ) -> Decision | None:
        """A decision for the round that makes `step`, or a question about it (shard 0, no
        contributors). Returns where this shard stands, or None while it must wait (shard 0 has not
        closed the round; a named contribution has not arrived). closed_by: why shard 0 closed it
        (recorded by a follower; informational). Bad input changes nothing."""
        model = self.model
        named = tuple((str(w), int(s)) for w, s in contributors)
        if global_norm_sq is not None and not (math.isfinite(global_norm_sq) and global_norm_sq >= 0):
            raise InvalidArgument(f"{model.label}: round for step {step}: global_norm_sq must be finite and >= 0")
        if not named and not self.leader:
            raise InvalidArgument(
                f"{model.label}: a decision for step {step} must name its contributors (only shard 0 is asked)"
            )
        done = self._closed.get(step)
        if done is not None:
            self._check_same(step, done.contributors, named)
            if global_norm_sq is not None and done.global_norm_sq is not None and global_norm_sq != done.global_norm_sq:
                raise FailedPrecondition(
                    f"{model.label}: round for step {step} was applied with global_norm_sq {done.global_norm_sq!r}, "
                    f"this decision says {global_norm_sq!r}"
                )
            return done
        rnd = self._current()
        if step != rnd.step + 1:
            raise FailedPrecondition(
                f"{model.label}: no sync round for step {step}: this shard is at step {rnd.step} (its open round "
                f"makes step {rnd.step + 1}; the decisions of its last {HISTORY} rounds are kept)"
            )
        if rnd.decided is None:
            if not named:
                return None  # shard 0's round still open: wait
            if self.leader:
                raise FailedPrecondition(
                    f"{model.label}: round for step {step} is still open on shard 0, which decides its contributors"
                )
            self._check_contributors(step, named)
            rnd.decided, rnd.closed_by = named, closed_by
            self._drop_undecided(rnd)
            model.notify_waiters()
        else:
            self._check_same(step, rnd.decided, named)
        self._try_close(rnd)
        done = self._closed.get(step)
        if done is not None:
            return done
        if rnd.mean is None:
            return None if named else Decision(step, rnd.decided, None, False, closed_by=rnd.closed_by)
        if global_norm_sq is not None and self.clips:
            self._apply(rnd, global_norm_sq)
            return self._closed[step]
        return Decision(step, rnd.decided, rnd.partial_norm_sq, False, closed_by=rnd.closed_by)

    def missing(self, step: int) -> list[tuple[str, int]]:
        """The decided contributions of the open round not received yet (for a wait's message)."""
        rnd = self._round
        if rnd.decided is None or rnd.step + 1 != step:
            return []
        return [(w, s) for w, s in rnd.decided if key(w, s) not in rnd.staged]

    def _check_same(self, step: int, have: tuple[tuple[str, int], ...], named: tuple[tuple[str, int], ...]) -> None:
        if named and named != have:
            raise FailedPrecondition(
                f"{self.model.label}: round for step {step} was decided with contributors {_names(have)}, this "
                f"decision names {_names(named)}; nothing changed"
            )

    def _check_contributors(self, step: int, named: tuple[tuple[str, int], ...]) -> None:
        model = self.model
        keys = [key(w, seq) for w, seq in named]
        if (
            any(not w and seq < 1 for w, seq in named)
            or len(set(keys)) != len(keys)
            or len(keys) > (model.settings.workers or len(keys))
        ):
            raise InvalidArgument(
                f"{model.label}: round for step {step}: contributors must be distinct worker ids (or anonymous "
                f"contributions, an empty worker id with a seq >= 1), at most {model.settings.workers}; got "
                f"{_names(named)}"
            )
        for w, seq in named:
            if not w:
                continue  # an anonymous contribution: nothing of it is recorded before its round applies
            staged = self._round.staged.get(w)
            if staged is not None and staged.seq != seq:
                raise FailedPrecondition(
                    f"{model.label}: round for step {step}: decision names worker {w!r} seq {seq}, this shard holds "
                    f"its seq {staged.seq} for that round; nothing changed"
                )
            session = model.membership.session_of(w) or 0
            if staged is None and seq <= model.last_applied_seq(w, session):
                raise FailedPrecondition(
                    f"{model.label}: round for step {step}: decision names worker {w!r} seq {seq}, which this shard "
                    "already applied in an earlier round; nothing changed"
                )

    # -- the rest of the aggregator protocol ---------------------------------------------------------

    def time_left(self) -> float | None:
        rnd = self._current()
        if rnd.deadline is None or rnd.decided is not None or not rnd.staged:
            return None
        return rnd.deadline - time.monotonic()

    def expire(self) -> None:
        rnd = self._current()
        if rnd.deadline is None or rnd.decided is not None or not rnd.staged or time.monotonic() < rnd.deadline:
            return
        try:
            self._decide_locally(rnd, "timeout")
        except Exception:  # never kill the model's timer silently; the round stays decided, unapplied
            log.exception("%s: closing the sync round for step %d by timeout failed", self.model.label, rnd.step + 1)

    def pending(self) -> int:
        return len(self._current().staged)

    def pending_workers(self) -> dict[str, tuple[int, int]]:
        return {s.worker_id: (s.seq, s.base_step) for s in self._current().staged.values() if s.worker_id}

    def drops(self) -> tuple[int, str]:
        return 0, ""  # reject_nonfinite_updates is refused over several shards (core/sharding.py)

    def closed_rounds(self) -> list[ClosedRound]:
        """The last HISTORY closed rounds, oldest first."""
        return list(self._records)

    def membership_changed(self) -> None:
        """Shard 0 with leases, as core/sync.py: a joiner fills a slot the round holds open; a round
        whose expected members all left before contributing expects who is here; an expiry that
        leaves what has arrived enough closes the round ("membership"). A follower's membership
        changes nothing: shard 0 decides its rounds."""
        rnd = self._current()
        if not self.elastic or rnd.decided is not None:
            return
        live = self.model.membership.live()
        joiners = sorted(live - rnd.members)
        while joiners and rnd.slots > 0:
            rnd.members, rnd.slots = rnd.members | {joiners.pop(0)}, rnd.slots - 1
        if not rnd.staged and rnd.slots == 0 and not rnd.members & live:
            rnd.members = live
        if rnd.staged and len(rnd.staged) >= self.needed(rnd):
            self._decide_locally(rnd, "membership")

    def reset(self) -> None:
        self._drop_all("the model's state was replaced")
        self._round = self._open_round()
        self._closed.clear()


def _names(contributors: Sequence[tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{w}#{s}" if w else f"anonymous#{s}" for w, s in contributors) + "]"


def decides_rounds(settings: Any, shards: int, clips: bool) -> bool:
    """Whether a shard's sync rounds are decided by shard 0: only where a shard left to itself could
    close a round with other contributors than another (quorum below workers, a sync_timeout,
    leases: each shard would see its own joins and expiries), or clip the round's mean by a norm it
    cannot know alone."""
    if shards <= 1 or settings.mode != "sync":
        return False
    return (
        settings.needed(settings.workers) < settings.workers
        or settings.sync_timeout > 0
        or settings.heartbeat_seconds > 0
        or clips
    )
