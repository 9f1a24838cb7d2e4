"""Who trains a model now: members holding leases, and the membership epoch (docs/design.md,
"Membership and leases").

A worker joins a model with its first push or pull that names it (worker_id and session) and holds
a lease that every later push, pull or client heartbeat renews. A lease lasts two heartbeat
intervals (settings.heartbeat_seconds; 0: forever, a fixed membership). The epoch counts the
changes of the membership: every join, every new session of a member (a restarted process reusing
its worker id) and every expiry advances it by one, so "the epoch moved" is the event a caller
waits for (Model.wait_for_epoch; ModelInfo.membership_epoch).

Sessions: a worker process picks a random session id when it starts (client/worker.py). A push or
pull of the same worker_id with another session is a new session of that worker: it replaces the
old one, whose id is retired (the last RETIRED_KEPT of them are remembered), and a call of a retired
session is refused, so a late retry of a dead process is never taken for the new process's push.
Session 0 is what clients that know no sessions send: no session. Its calls renew the member's
lease whatever its session, never start a new one, and count their seqs in the worker's record
whatever its session (core/model.py), exactly as before sessions existed.

Time comes from `time.monotonic` (the module's `time`, which tests replace by a clock they move:
tests/conftest.py, ManualClock); the model's timer thread calls `expire` when `time_left` says so
(core/deadlines.py). Restored leases (checkpoints) start a fresh lease at restore and expire unless
renewed. Everything here runs under the model's lock.
"""

from __future__ import annotations

import dataclasses
import math
import time

from optserve.server.core.errors import FailedPrecondition

RETIRED_KEPT = 8  # retired sessions remembered per worker, to refuse their late calls


@dataclasses.dataclass
class Lease:
    """A live member: its session, when it joined (the epoch that its join made), its lease."""

    session: int
    joined_epoch: int
    expires: float  # on the module's monotonic clock; inf: never
    renewed: float  # when it was last renewed


@dataclasses.dataclass(frozen=True)
class Expiry:
    """A lease that ran out: who, at which epoch it left, when it was last renewed and when it expired."""

    worker_id: str
    epoch: int
    renewed: float
    expired: float


@dataclasses.dataclass(frozen=True)
class MembershipState:
    """What a checkpoint holds of the membership: the epoch, the workers that ever joined (they fill
    the initial `workers` slots of a sync model) and the members with their sessions."""

    epoch: int = 0
    seen: tuple[str, ...] = ()
    members: tuple[tuple[str, int, int], ...] = ()  # (worker_id, session, joined_epoch)


class Membership:
    """The members of one model and its epoch. The model calls it with its lock held."""

    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds  # 0: leases never expire
        self.epoch = 0
        self._members: dict[str, Lease] = {}
        self._seen: set[str] = set()  # every worker that ever joined
        self._retired: dict[str, list[int]] = {}  # worker -> its retired sessions, oldest first
        self.expiries: list[Expiry] = []  # the last RETIRED_KEPT * 8 expiries, oldest first

    # -- reads ------------------------------------------------------------------------------------

    def live(self) -> frozenset[str]:
        return frozenset(self._members)

    def is_member(self, worker_id: str) -> bool:
        return worker_id in self._members

    def session_of(self, worker_id: str) -> int | None:
        lease = self._members.get(worker_id)
        return None if lease is None else lease.session

    def seen(self) -> int:
        """How many distinct workers ever joined."""
        return len(self._seen)

    def members(self) -> list[tuple[str, Lease]]:
        return sorted(self._members.items())

    def seconds_left(self, lease: Lease) -> float:
        return math.inf if math.isinf(lease.expires) else max(0.0, lease.expires - time.monotonic())

    # -- changes ----------------------------------------------------------------------------------

    def check_session(self, label: str, worker_id: str, session: int) -> None:
        """FAILED_PRECONDITION for a call of a retired session of the worker (a process that was
        replaced by a newer one of the same worker_id)."""
        if session and session in self._retired.get(worker_id, ()):
            current = self.session_of(worker_id)
            raise FailedPrecondition(
                f"{label}: worker {worker_id!r} session {session} was replaced by a newer session"
                f"{'' if current is None else f' ({current})'} of that worker id; a process reusing a worker id "
                "must not run beside the one it replaces"
            )

    def renew(self, worker_id: str, session: int) -> str:
        """Renews the worker's lease, joining it (or starting its new session) first when needed.
        Returns "renewed", "joined" or "new_session". The caller checks `check_session` (and any
        limit on joins) first."""
        now = time.monotonic()
        expires = now + self.lease_seconds if self.lease_seconds > 0 else math.inf
        lease = self._members.get(worker_id)
        if lease is not None and (lease.session == session or session == 0):
            lease.expires, lease.renewed = expires, now
            return "renewed"
        self.epoch += 1
        if lease is not None:
            self._retire(worker_id, lease.session)
            self._members[worker_id] = Lease(session, self.epoch, expires, now)
            return "new_session"
        self._members[worker_id] = Lease(session, self.epoch, expires, now)
        self._seen.add(worker_id)
        return "joined"

    def _retire(self, worker_id: str, session: int) -> None:
        retired = self._retired.setdefault(worker_id, [])
        if session not in retired:
            retired.append(session)
            del retired[:-RETIRED_KEPT]

    def time_left(self) -> float | None:
        """Seconds until the next lease expires (<= 0: one has), or None when none can."""
        if self.lease_seconds <= 0 or not self._members:
            return None
        return min(lease.expires for lease in self._members.values()) - time.monotonic()

    def expire(self) -> list[Expiry]:
        """Removes the members whose lease has run out, each advancing the epoch; returns them."""
        now = time.monotonic()
        gone = []
        for worker_id, lease in sorted(self._members.items(), key=lambda kv: kv[1].expires):
            if lease.expires <= now:
                del self._members[worker_id]
                self.epoch += 1
                gone.append(Expiry(worker_id, self.epoch, lease.renewed, lease.expires))
        self.expiries = (self.expiries + gone)[-RETIRED_KEPT * 8 :]
        return gone

    # -- persistence ------------------------------------------------------------------------------

    def state(self) -> MembershipState:
        return MembershipState(
            self.epoch,
            tuple(sorted(self._seen)),
            tuple((w, lease.session, lease.joined_epoch) for w, lease in sorted(self._members.items())),
        )

    def restore(self, state: MembershipState) -> None:
        """Installs a saved membership: every member gets a fresh lease from now, which expires
        unless the member renews it (its process may be gone with the server that saved it)."""
        now = time.monotonic()
        expires = now + self.lease_seconds if self.lease_seconds > 0 else math.inf
        self.epoch = state.epoch
        self._seen = set(state.seen) | {w for w, _, _ in state.members}
        self._members = {w: Lease(session, joined, expires, now) for w, session, joined in state.members}
        self._retired = {}
        self.expiries = []
