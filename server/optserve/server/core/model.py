"""One model on the server: parameters and optimizer state on the device, and its bookkeeping.

Concurrency (docs/design.md, "Concurrency" and "Life of a pull"):
- one update at a time per model (`_lock`); the model owns its lock and calls its aggregator
  (core/aggregation.py) with it held, so no other module takes it or touches the state behind it;
- a pull takes a consistent (parameters, step) snapshot under the lock and *pins* that version;
  an update only donates the parameter buffers when no pull pins them, so a pull streams without
  holding the lock and never sees a half-applied update, and memory is not doubled otherwise;
- optimizer-state buffers are always donated: nothing else reads them outside the lock.

The API, each call taking the lock itself:
- pushes: `open_push`, `commit_push`; what is pending: `pending_contributions`, `worker_states`,
  `dropped_rounds` (lock-free), `closed_rounds`;
- membership (core/membership.py): `renew_lease` (pulls, heartbeats; pushes renew at commit),
  `membership_info`, `wait_for_epoch`, `check_deadlines`;
- pulls: `snapshot`, `wait_for_step`, `notify_waiters`;
- hyperparameters: `hyperparams`, `set_hyperparams`;
- persistence: `capture_state`, `replace_state`;
- bookkeeping: `counters`, `count_received`, `count_sent`; lifecycle: `wake_waiters`, `mark_deleted`.
`step`, `state_version` and `deleted` read one field each (no lock); `locked()` hands the
aggregator's view (`LockedModel`) to code that drives updates itself (benchmarks, unit tests).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np

from optserve.server.core.aggregation import Aggregator, LockedModel, Receiver
from optserve.server.core.async_push import AsyncAggregator
from optserve.server.core.compilation import model_alive, step_grad_avals, warm_up_steps
from optserve.server.core.counters import Counters, CounterSet
from optserve.server.core.deadlines import DeadlineTimer, TimedWork
from optserve.server.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NonFiniteUpdate,
    ResourceExhausted,
)
from optserve.server.core.gradient_buffers import GradientBuffers
from optserve.server.core.host_memory import REAP_MIN_BYTES, host_buffer_reaper, release_host_buffers
from optserve.server.core.layout import Packing, plan_packing
from optserve.server.core.membership import Lease, Membership, MembershipState
from optserve.server.core.placement import BufferInfo, Placement
from optserve.server.core.rows import check_rows
from optserve.server.core.settings import ModelSettings
from optserve.server.core.shard_rounds import Decision, ShardRounds, decides_rounds
from optserve.server.core.sharding import Shard
from optserve.server.core.step import (
    MAX_STEP,
    StepShardings,
    make_row_step,
    make_step,
    nonfinite_leaf_name,
    own_buffers,
)
from optserve.server.core.sync import ClosedRound, SyncAggregator
from optserve.server.core.worker_activity import WorkerActivity
from optserve.server.core.workers import REPLY_WINDOW, PushReply, WorkerRecord
from optserve.server.spec import CompiledOptimizer, ema
from optserve.server.spec.laziness import lazy_leaves
from optserve.wire.assembler import ALIGNMENT
from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec


class ExpectedStep:
    """A pull waiting for exactly one step (`Model.expect_step`): filled with copies of the
    parameters (or EMA) if the model leaves that step while it waits."""

    __slots__ = ("arrays", "ema", "step")

    def __init__(self, step: int, ema: bool):
        self.step, self.ema = step, ema
        self.arrays: Mapping[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent view for a pull: the arrays of one step, pinned against donation."""

    step: int
    arrays: Mapping[str, jax.Array]  # by buffer (Model.layout.keys)


@dataclasses.dataclass(frozen=True)
class ModelState:
    """The changing part of a model (everything but name, schema, spec and settings): what
    `capture_state` copies out and `replace_state` puts in. Arrays are on the model's device, by
    buffer (params by `Model.layout.keys`; optimizer and EMA state over the trainable buffers):
    state/model_state.py converts to and from the leaf form of checkpoints."""

    step: int
    params: dict[str, jax.Array]
    opt_state: Any
    ema_state: Any  # None: the model keeps no parameter EMA
    workers: dict[str, WorkerRecord]
    membership: MembershipState | None = None  # None: files written before memberships (none)


class Model:
    """Parameters, optimizer state, step and bookkeeping of one named model."""

    def __init__(
        self,
        name: str,
        schema: list[LeafSpec],
        params: Mapping[str, np.ndarray],
        compiled: CompiledOptimizer,
        settings: ModelSettings,
        device: jax.Device | Placement,
        packing: Packing | None = None,
        shard: Shard | None = None,
    ):
        """params: one host array per schema leaf. device: the device, or the devices (a mesh,
        core/placement.py) holding the model. packing: how to hold the leaves (core/layout.py,
        `plan_packing`; None: planned here, alike small leaves packed). shard: which shard of a
        model over several servers this is (core/sharding.py; None: the whole model)."""
        self.name = name
        self.shard = shard
        # how messages about what a push sends name the model: a shard says which (a leaf it lacks
        # may be another shard's)
        self.label = (
            f"model {name!r}" if shard is None else f"model {name!r} (shard {shard.index} of {shard.map.shards})"
        )
        self.schema = schema
        self.schema_map = {leaf.path: leaf for leaf in schema}
        self.float_leaves = frozenset(leaf.path for leaf in schema if leaf.dtype in FLOAT_DTYPES)
        self.compiled = compiled  # over leaves: the spec, hyperparameters, checkpoint templates
        self.settings = settings
        devices = device if isinstance(device, Placement) else Placement([device])
        self.device = devices.device  # the first (the only one without a mesh)
        if packing is None:
            packing = plan_packing(schema, compiled, keeps_ema=settings.ema_decay is not None)
        self.packing = packing
        self.layout = self.packing.layout
        self.placement = devices.for_model(self.layout, schema)  # where each buffer lives, and how
        self.trainable = self.layout.trainable  # the buffers the update rule sees
        # what a push may send: every leaf, and every pack in place of its leaves
        self.push_schema = {**self.schema_map, **{p.name: p.spec for p in self.layout.packs}}
        self.param_bytes = sum(np.asarray(a).nbytes for a in params.values())
        # put: may_alias=False: the parameters get buffers of their own. Aliasing the received host buffer
        # (zero copy on CPU) would save one copy, once, but the first donated update cannot reuse an
        # aliased buffer, and jax would keep it alive until an unrelated later call: +1 model of RSS.
        buffers = self.layout.pack_arrays(params)
        self._params: dict[str, jax.Array] = {
            k: self.placement.put(k, buffers[k], may_alias=False) for k in self.layout.keys
        }
        del buffers
        optimizer = self.packing.optimizer
        trained = {k: self._params[k] for k in self.trainable}
        self._opt_state = self._init_state(lambda t: own_buffers(optimizer.init(t)), trained)
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self._opt_state) if hasattr(x, "nbytes"))
        self._ema_state: ema.EmaState | None = None  # parameter EMA (spec/ema.py), kept when settings.ema_decay is set
        if settings.ema_decay is not None:
            self._ema_state = self._init_state(ema.ema_init, trained)
        self.step_shardings: StepShardings | None = None  # None: one device (core/placement.py)
        if self.placement.sharded:
            self.step_shardings = StepShardings(
                self.placement,
                self.placement.shardings(self.layout.keys),
                self.placement.state_shardings(self._opt_state),
                None if self._ema_state is None else self.placement.state_shardings(self._ema_state),
            )
        self._steps = {
            donate: make_step(optimizer, self.trainable, donate, settings, self.step_shardings)
            for donate in (True, False)
        }
        # Row-sparse pushes (core/rows.py): the leaves held loose, and those of them whose rule is lazy
        # and so updated row by row (on one device or a mesh alike), received as their padded rows (a
        # sync round sums them at the union of their ids: core/round_sums.py).
        self.packed_leaves = {leaf: pack.name for pack in self.layout.packs for leaf in pack.leaves}
        self.lazy_leaves = lazy_leaves(optimizer) & frozenset(self.layout.loose)
        self._row_steps = {
            donate: make_row_step(optimizer, self.trainable, donate, settings, self.step_shardings)
            for donate in (True, False)
        }
        self._step = 0
        # Bumped (under the lock) by every change a checkpoint must hold: an update, a worker record, a
        # hyperparameter change, an installed checkpoint. Checkpoints compare it, not the step, to tell
        # "unchanged since the last save": a change at the same step must still be saved.
        self._state_version = 0
        self._workers: dict[str, WorkerRecord] = {}
        self.membership = Membership(settings.lease_seconds)  # behind the lock (core/membership.py)
        self._counters = CounterSet()
        # what people see of each worker (the status page); counted by the API after each push
        self.activity = WorkerActivity()
        self.created_unix = time.time()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # waits for a step
        self._pins: dict[int, int] = {}
        # Captures of the state of exact steps (`capture_at`): steps a save waits for, and states
        # captured as the model left such a step (or, with `capture_every`, each multiple of it: the
        # shards of a model over several servers checkpoint the same steps, core/sharding.py).
        self._capture_steps: set[int] = set()
        self._captured: dict[int, tuple[ModelState, int]] = {}
        self.capture_every = 0
        self.restore_tag = ""  # the tag of the last RestoreCheckpoint (checkpoint/restore.py)
        self._expected: dict[int, list[ExpectedStep]] = {}  # pulls of an exact step (expect_step)
        self._deleted = False
        self._closing = False  # the server is shutting down: waits end
        # pushes assemble large leaves in the buffers of earlier pushes (gradient_buffers.py)
        self.gradient_buffers = GradientBuffers(self.layout.storage_schema(schema))
        self._view = _Locked(self)
        self._aggregator: Aggregator = _aggregator_of(self._view, settings, shard)
        # applies the aggregator's pending work when its time is up (sync_timeout) and expires leases
        self._timed = TimedWork(self._aggregator, self.membership, self._view)
        self._timer = DeadlineTimer(threading.Condition(self._lock), self._timed, f"optserve-sync-timeout-{name}")
        self._warm_ups = self._warm_up()

    def _warm_up(self) -> dict:
        """Compiles the step variants in the background (core/compilation.py), so that the first push
        does not wait for XLA; `_ready(donate)` is where an update waits for that (or skips it)."""
        grads = step_grad_avals(
            self.layout.storage_schema(self.schema), self.trainable, self.settings.mode, self.placement
        )
        state = (self._params, self._opt_state, self._ema_state)
        return warm_up_steps(self._steps, state, grads, f"model {self.name!r}", model_alive(self))

    def _ready(self, donate: bool) -> None:
        """Waits (bounded) for the warm-up of that step variant if it is compiling, rather than compile it
        a second time beside it; one still queued is cancelled, and the caller compiles."""
        self._warm_ups[donate].wait()

    # -- plain reads ------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def state_version(self) -> int:
        return self._state_version

    @property
    def deleted(self) -> bool:
        return self._deleted

    def to_device(self, arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A gradient given by leaf path, on the device by buffer (as pushes deliver it to `apply`;
        for benchmarks and tests that drive updates themselves)."""
        return {k: self.placement.put(k, v) for k, v in self.layout.pack_arrays(arrays).items()}

    def _init_state(self, init: Callable[[Any], Any], trained: dict[str, jax.Array]) -> Any:
        """A state's init over the trainable buffers, committed to the model's devices as the
        step's outputs are (jit keys its cache on that too: uncommitted initial state would compile
        the step a second time at the second push; measured +1.3 s for 300 leaves, minutes for 10k).
        On a mesh, init runs as one program whose outputs follow their parameters' shardings."""
        if not self.placement.sharded:
            with jax.default_device(self.device):
                return jax.device_put(init(trained), self.device)
        shardings = self.placement.state_shardings(jax.eval_shape(init, trained))
        # own_buffers again: a jitted init may forward one input or constant to two outputs
        return own_buffers(jax.jit(init, out_shardings=shardings)(trained))

    # -- pushes -----------------------------------------------------------------------------------

    def open_push(
        self,
        *,
        base_step: int | None,
        worker_id: str,
        seq: int,
        weight: float,
        packs: bool = False,
        global_norm_sq: float | None = None,
        rows: Sequence[tuple[str, np.ndarray]] = (),
        session: int = 0,
        in_region: bool = False,
    ) -> Receiver:
        """A receiver for one push stream; its assembler collects the chunks, `commit_push` counts it.
        A push already known to be refused (sync: stale) is refused here, before its bytes. packs: the
        push may send packs of the model's layout (it named the layout; core/receiving.py).
        global_norm_sq: the whole gradient's squared norm, which a shard whose spec starts with
        clip_by_global_norm requires (core/sharding.py); ignored by other models. rows: the leaves
        sent row-sparse and their ids (PushHeader.rows), validated here (core/rows.py). session: the
        worker's session (core/membership.py), in which its seq counts. in_region: the push's bytes
        lie in a client's shared-memory region, owned by this push until its reply: read them in
        place where the aggregator allows it (core/receiving.py, read_in_place); the caller calls
        `receiver.finish_reading()` before replying."""
        clip = self.shard.clip if self.shard is not None else None
        if clip is not None and (global_norm_sq is None or not (math.isfinite(global_norm_sq) and global_norm_sq >= 0)):
            got = "none" if global_norm_sq is None else repr(global_norm_sq)
            raise InvalidArgument(
                f"{self.label}: global_norm_sq must be the whole gradient's squared norm (finite, >= 0), got {got}: "
                f"the spec starts with {clip.rule!r}, which scales by the norm over every shard's leaves"
            )
        sparse = check_rows(self.label, rows, self.schema_map, self.packed_leaves, self.lazy_leaves) if rows else {}
        release_host_buffers()  # finished updates' inputs go before this push allocates its own
        receiver = self._aggregator.open_push(
            base_step=base_step, worker_id=worker_id, seq=seq, weight=weight, packs=packs, session=session
        )
        if sparse:
            receiver.assembler.take_rows(sparse)  # type: ignore[attr-defined]  # a GradientAssembler
        if in_region and getattr(receiver, "reads_in_place", False):
            # jax on CPU aliases host memory 64-byte aligned (wire/assembler.py, ALIGNMENT); an
            # accelerator copies it to the device once, from wherever it lies
            alignment = ALIGNMENT if self.device.platform == "cpu" else 1
            receiver.assembler.read_in_place(alignment)  # type: ignore[attr-defined]  # a GradientAssembler
        if clip is not None:
            receiver.global_norm_sq = global_norm_sq  # type: ignore[attr-defined]  # async only (sharding.py)
        if self._aggregator.screens_pushes and base_step is not None:
            with self._lock:
                self._aggregator.screen(receiver)
        return receiver

    def commit_push(self, receiver: Receiver, grads: Mapping[str, np.ndarray]) -> tuple[PushReply, bool]:
        """Counts a completely received push (`grads`: what its assembler returned): applied (async)
        or added to the current round (sync). Returns (reply, duplicate)."""
        rows = receiver.assembler.rows  # type: ignore[attr-defined]  # a GradientAssembler
        self.gradient_buffers.keep({k: v for k, v in grads.items() if k not in rows} if rows else grads)
        self._ready(True)  # outside the lock: pulls go on while the step compiles
        with self._lock:
            try:
                self._admit_member_locked(receiver)
                return self._aggregator.commit(receiver)
            finally:
                self._timer.watch_locked()

    # -- membership (core/membership.py) ------------------------------------------------------------

    def _elastic_sync(self) -> bool:
        """Sync with leases, its membership deciding its rounds: not a shard whose rounds shard 0
        decides (core/shard_rounds.py), which refuses no push or join for its own membership."""
        rounds = self._aggregator
        follower = isinstance(rounds, ShardRounds) and not rounds.leader
        return self.settings.mode == "sync" and self.settings.heartbeat_seconds > 0 and not follower

    def _admit_member_locked(self, receiver: Receiver) -> None:
        """A push renews its worker's lease, joining it first (or starting its new session): refused
        for a retired session, and (sync with leases) for a join beyond `workers` live members,
        unless it is a retry of a push already applied."""
        worker_id, session = receiver.worker_id, receiver.session
        if not worker_id:
            return
        members = self.membership
        members.check_session(self.label, worker_id, session)
        if not members.is_member(worker_id) and self._elastic_sync():
            record = self._workers.get(worker_id)
            retry = record is not None and record.session == session and receiver.seq <= record.last_seq
            if not retry and len(members.live()) >= self.settings.workers:
                raise ResourceExhausted(
                    f"model {self.name!r}: worker {worker_id!r} cannot join: the membership is full "
                    f"({self.settings.workers} live members, settings.workers); it may join once a lease expires"
                )
        if members.renew(worker_id, session) != "renewed":
            self._membership_changed_locked()

    def _membership_changed_locked(self) -> None:
        self._aggregator.membership_changed()
        self._changed.notify_all()  # wait_for_epoch

    def renew_lease(self, worker_id: str, session: int) -> None:
        """A pull or heartbeat of a worker: renews its lease, joining it (or starting its new
        session) first; a join beyond `workers` live members (sync with leases) is not made, the
        pull goes on. FAILED_PRECONDITION for a retired session."""
        if not worker_id:
            return
        with self._lock:
            members = self.membership
            members.check_session(self.label, worker_id, session)
            if (
                not members.is_member(worker_id)
                and self._elastic_sync()
                and len(members.live()) >= self.settings.workers
            ):
                return
            try:
                if members.renew(worker_id, session) != "renewed":
                    self._membership_changed_locked()
            finally:
                self._timer.watch_locked()

    def membership_info(self) -> tuple[int, list[tuple[str, Lease, float]]]:
        """(epoch, [(worker_id, lease, seconds left)]) of the live members."""
        with self._lock:
            members = self.membership
            return members.epoch, [(w, lease, members.seconds_left(lease)) for w, lease in members.members()]

    def closed_rounds(self) -> list[ClosedRound]:
        """sync: the last closed rounds, oldest first (core/sync.py, HISTORY); [] otherwise."""
        with self._lock:
            rounds = self._aggregator
            return rounds.closed_rounds() if isinstance(rounds, (SyncAggregator, ShardRounds)) else []

    def wait_for_epoch(self, epoch: int, timeout: float) -> bool:
        """Blocks until the membership epoch is at least `epoch` (True) or `timeout` seconds pass."""
        with self._lock:
            return self._changed.wait_for(lambda: self.membership.epoch >= epoch, timeout)

    def check_deadlines(self) -> None:
        """Does the timed work that is due now (expired leases, a sync round past its timeout), as the
        timer thread would: for tests that move the clock themselves (tests/conftest.py, ManualClock)."""
        with self._lock:
            self._timed.expire()
            self._timer.watch_locked()

    def pending_contributions(self) -> int:
        """sync: contributions received for the current step and not applied yet (async: 0)."""
        with self._lock:
            return self._aggregator.pending()

    def worker_states(self) -> list[tuple[str, int, int]]:
        """(worker_id, last seq, base_step of that push) per worker, including sync contributions
        still pending in the current round."""
        with self._lock:
            states = {w: (r.last_seq, r.last_base_step) for w, r in self._workers.items()}
            states.update(self._aggregator.pending_workers())
        return [(w, seq, base) for w, (seq, base) in sorted(states.items())]

    def worker_sessions(self) -> dict[str, int]:
        """worker_id -> the session of its record (its live session when it is a member)."""
        with self._lock:
            sessions = {w: r.session for w, r in self._workers.items()}
            sessions.update({w: lease.session for w, lease in self.membership.members()})
            return sessions

    def decide_round(
        self,
        step: int,
        contributors: Sequence[tuple[str, int]],
        global_norm_sq: float | None,
        timeout: float | None,
        closed_by: str = "",
    ) -> Decision:
        """DecideRound: the round that makes `step`, asked about (shard 0) or decided (core/shard_rounds.py),
        waiting up to `timeout` seconds (None: unbounded) for shard 0 to close it or for the named
        contributions to arrive. DEADLINE_EXCEEDED past it; what was recorded stays."""
        rounds = self._aggregator
        if not isinstance(rounds, ShardRounds):
            raise FailedPrecondition(
                f"{self.label}: takes no round decisions (only the shards of a sync model over several servers with "
                "leases, quorum below workers, a sync_timeout or a head clip_by_global_norm do)"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                try:
                    decision = rounds.decide(step, contributors, global_norm_sq, closed_by)
                finally:
                    self._timer.watch_locked()
                if decision is not None:
                    return decision
                if self._deleted or self._closing:
                    raise FailedPrecondition(f"{self.label} was deleted or its server is stopping")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = rounds.missing(step)
                    what = f"the contributions {missing} it names" if missing else "shard 0 to close that round"
                    raise DeadlineExceeded(
                        f"{self.label}: round for step {step}: waited {timeout:.3g}s for {what} (current step "
                        f"{self._step})"
                    )
                self._changed.wait(0.25 if left is None else min(left, 0.25))

    def dropped_rounds(self) -> tuple[int, str]:
        """(sync rounds dropped so far by reject_nonfinite_updates, why the last one was). Without
        the lock: a wait's give_up, which runs under it, calls this."""
        return self._aggregator.drops()

    @contextmanager
    def locked(self) -> Iterator[LockedModel]:
        """The model's lock, and the view its aggregator works through: for code that drives
        updates itself (benchmarks, unit tests). The service goes through the calls above."""
        with self._lock:
            yield self._view

    # -- what the aggregator does through its view (_Locked), the lock held ------------------------

    def _apply_locked(
        self, grads: Mapping[str, jax.Array], scale: float, row_ids: Mapping[str, Any] | None = None
    ) -> int:
        """Applies one update; the caller holds the lock and has validated everything.

        With settings.reject_nonfinite_updates, raises NonFiniteUpdate (FAILED_PRECONDITION) when the
        update would make the state non-finite; the state is then bitwise what it was (make_step).
        """
        self._capture_leaving_locked()
        donate = self._pins.get(self._step, 0) == 0
        self._ready(donate)
        # np.float32, not jnp.float32: jit's C++ fast path takes a numpy scalar in microseconds, while
        # building a jax scalar first costs ~60 us, a third of a small model's whole update.
        if row_ids:  # lazy rules on the touched rows only (core/step.py, make_row_step)
            out = self._row_steps[donate](
                self._params, self._opt_state, self._ema_state, dict(grads), dict(row_ids), np.float32(scale)
            )
        else:
            out = self._steps[donate](self._params, self._opt_state, self._ema_state, dict(grads), np.float32(scale))
        self._params, self._opt_state, self._ema_state = out[:3]
        if self.param_bytes >= REAP_MIN_BYTES:  # then the gradient's host buffers can go (host_memory)
            host_buffer_reaper.after(self._params)
        if self.settings.reject_nonfinite_updates:
            # Read back before anyone is told: this waits until the update has run on the device.
            flags, firsts = np.asarray(out[3]), np.asarray(out[4])
            if not flags.all():
                self._count("nonfinite_rejected")
                bad = int(np.argmin(flags))
                leaf = nonfinite_leaf_name(self.packing, self._opt_state, self._ema_state, bad, int(firsts[bad]))
                raise NonFiniteUpdate(
                    f"model {self.name!r}: update refused: it would make {leaf} non-finite (inf or NaN) "
                    f"(settings.reject_nonfinite_updates); parameters, optimizer state and step {self._step} are "
                    "unchanged. Lower the learning rate or check the gradients"
                )
        self._step += 1
        self._state_version += 1
        self._count("pushes_applied")
        self._changed.notify_all()
        return self._step

    def _applied_reply_locked(self, worker_id: str, seq: int, session: int) -> PushReply | None:
        """The original reply if (worker_id, seq) is one of the worker's last REPLY_WINDOW applied
        pushes; None for a seq above its highest applied one (a new push); FAILED_PRECONDITION for
        any other seq (applied too long ago for its reply to be kept, or never pushed)."""
        if not worker_id:
            return None
        record = self._workers.get(worker_id)
        if record is None or (session and record.session != session) or seq > record.last_seq:
            return None  # a new push (in a new session its seqs start again; session 0: any session)
        self._count("duplicates")
        if seq in record.replies:
            return record.replies[seq]
        kept = f"seqs {min(record.replies)}..{record.last_seq}" if record.replies else "none"
        raise FailedPrecondition(
            f"model {self.name!r}: worker {worker_id!r} seq {seq} is not above its highest applied seq "
            f"{record.last_seq}, and no reply is kept for it: the server answers retries of a worker's last "
            f"{REPLY_WINDOW} applied pushes only (kept: {kept}); push new gradients with seq > {record.last_seq}"
        )

    def _record_worker_locked(
        self, worker_id: str, seq: int, base_step: int | None, reply: PushReply, session: int
    ) -> None:
        if not worker_id:
            return
        record = self._workers.get(worker_id)
        live = self.membership.session_of(worker_id)
        if not session:  # a client without sessions: its seqs continue the worker's record
            record = record or self._workers.setdefault(worker_id, WorkerRecord())
        elif live is not None and live not in (0, session):
            return  # a replaced session's push, applied after its successor started: not its record
        elif record is None or record.session != session:
            record = self._workers[worker_id] = WorkerRecord(session=session)  # a new session: seqs from 1
        record.remember(seq, self._step - 1 if base_step is None else base_step, reply)
        self._state_version += 1

    def _check_step_room(self, step: int) -> None:
        """Refuses an update from `step` that would take the model past MAX_STEP (steps stay exact in
        JSON, and every step a model reaches must be savable and restorable)."""
        if step >= MAX_STEP:
            raise FailedPrecondition(
                f"model {self.name!r} is at step {step}, the last step a model can reach (2**53 - 1: steps stay "
                "exact in checkpoint manifests and in every JSON reader); no further update can be applied"
            )

    # -- counters ---------------------------------------------------------------------------------

    def _count(self, counter: str, n: int = 1) -> None:
        self._counters.add(counter, n)

    def count_received(self, nbytes: int) -> None:
        """Gradient payload bytes taken from a push."""
        self._count("bytes_in", nbytes)

    def count_sent(self, nbytes: int) -> None:
        """Bytes of a pull reply message."""
        self._count("bytes_out", nbytes)

    def counters(self) -> Counters:
        """A copy of the counters (they count since creation or the last restore)."""
        return self._counters.values()

    # -- reads ------------------------------------------------------------------------------------

    def wait_for_step(self, min_step: int, timeout: float | None, give_up: Callable[[], bool] | None = None) -> bool:
        """Blocks until step >= min_step; True if reached. Also ends on timeout, deletion, server
        shutdown, or when `give_up()` turns true (checked whenever `notify_waiters` is called, e.g. by
        the call's cancellation callback), so no thread waits for a step that nobody awaits."""

        def done() -> bool:
            return self._step >= min_step or self._deleted or self._closing or (give_up is not None and give_up())

        with self._lock:
            self._changed.wait_for(done, timeout)
            return self._step >= min_step and not self._deleted

    def notify_waiters(self) -> None:
        """Wakes the waits so that they re-check their conditions (e.g. a waiting call was cancelled)."""
        with self._lock:
            self._changed.notify_all()

    @contextmanager
    def snapshot(self, *, ema: bool = False) -> Iterator[Snapshot]:
        """A pinned, consistent (step, parameters or EMA): updates meanwhile do not donate these buffers."""
        if ema and self.settings.ema_decay is None:
            raise FailedPrecondition(f"model {self.name!r} keeps no parameter EMA (create it with ema=<decay>)")
        with self._lock:
            step, arrays = self._step, (self._ema_params() if ema else self._params)
            self._pins[step] = self._pins.get(step, 0) + 1
            self._count("pulls")
        try:
            yield Snapshot(step, arrays)
        finally:
            with self._lock:
                left = self._pins[step] - 1
                if left:
                    self._pins[step] = left
                else:
                    del self._pins[step]

    def expect_step(self, step: int, *, ema: bool = False) -> ExpectedStep:
        """Registers a pull of exactly `step` (PullRequest.exact_step) before it waits for it, so that
        the model keeps that step's values for it if it moves on meanwhile; FailedPrecondition if the
        model is already past it. Release it with `forget_step`."""
        with self._lock:
            if self._step > step:
                raise FailedPrecondition(f"{self.label}: step {step} is gone: the model is at step {self._step}")
            pull = ExpectedStep(step, ema)
            self._expected.setdefault(step, []).append(pull)
            return pull

    def forget_step(self, pull: ExpectedStep) -> None:
        with self._lock:
            waiting = self._expected.get(pull.step, [])
            if pull in waiting:
                waiting.remove(pull)
            if not waiting:
                self._expected.pop(pull.step, None)

    @contextmanager
    def snapshot_of(self, pull: ExpectedStep) -> Iterator[Snapshot]:
        """The values of the step `pull` waited for (after a wait for it as min_step): those kept when
        the model left it, else the live ones pinned as `snapshot` pins them; FailedPrecondition if
        the model went back past it (a restore)."""
        if pull.arrays is not None:
            with self._lock:
                self._count("pulls")
            yield Snapshot(pull.step, pull.arrays)
            return
        with self.snapshot(ema=pull.ema) as snap:
            if pull.arrays is not None:  # left it between the wait and the snapshot
                yield Snapshot(pull.step, pull.arrays)
            elif snap.step != pull.step:
                raise FailedPrecondition(f"{self.label}: step {pull.step} is gone: the model is at step {snap.step}")
            else:
                yield snap

    def _ema_params(self) -> Mapping[str, jax.Array]:
        """The parameter EMA (debiased as the model's settings say); non-float leaves as they are."""
        assert self._ema_state is not None  # snapshot(ema=True) refuses a model that keeps no EMA
        value = ema.ema_value(self._ema_state, self.settings.ema_debias)
        return {k: value.get(k, v) for k, v in self._params.items()}

    # -- devices ------------------------------------------------------------------------------------

    def placement_info(self) -> tuple[list[BufferInfo], list[int]]:
        """Each buffer's sharding and bytes per device, and the bytes the whole model (parameters,
        optimizer and EMA state) holds on each device of the server (core/placement.py)."""
        with self._lock:  # shapes and shardings only: the arrays' data are not read
            trees = (self._params, self._opt_state, self._ema_state)
            return self.placement.describe(self._params, trees[1:]), self.placement.device_bytes(trees)

    # -- hyperparameters --------------------------------------------------------------------------

    def hyperparams(self) -> dict[str, float]:
        with self._lock:
            return self.compiled.hyperparams(self._opt_state)

    def set_hyperparams(self, values: Mapping[str, float]) -> dict[str, float]:
        with self._lock:
            self._opt_state = self.compiled.set_hyperparams(self._opt_state, dict(values))
            if self.step_shardings is not None:  # the new values where the step expects them
                self._opt_state = jax.device_put(self._opt_state, self.step_shardings.opt_state)
            self._state_version += 1
            return self.compiled.hyperparams(self._opt_state)

    # -- persistence (state/) ---------------------------------------------------------------------

    def capture_state(self) -> tuple[ModelState, int]:
        """A consistent copy of the whole changing state, and the `state_version` it holds.

        Taken under the lock as fresh device copies: `device_put(may_alias=False)` dispatches them
        and returns at once, so the lock is held for the dispatch only, and the next update (which
        donates the live buffers) is ordered after the copies by the runtime. Host views of the live
        buffers would be unsafe: on CPU `np.asarray` aliases them and a donated update overwrites them.
        """
        with self._lock:
            return self._capture_locked()

    def _capture_locked(self) -> tuple[ModelState, int]:
        params, opt_state, ema_state = jax.device_put((self._params, self._opt_state, self._ema_state), may_alias=False)
        workers = {w: r.copy() for w, r in self._workers.items()}
        state = ModelState(self._step, params, opt_state, ema_state, workers, self.membership.state())
        return state, self._state_version

    def _capture_leaving_locked(self) -> None:
        """Before an update moves the model past its step: captures that step's state if a save
        waits for it (`capture_at`) or it is a multiple of `capture_every`. Only the two newest
        captures are kept (each holds a copy of the state until a save writes it)."""
        step = self._step
        for pull in self._expected.get(step, ()):
            if pull.arrays is None:  # fresh copies: the update about to run donates the live buffers
                pull.arrays = jax.device_put(self._ema_params() if pull.ema else self._params, may_alias=False)
        if step in self._capture_steps or (self.capture_every and step and step % self.capture_every == 0):
            self._capture_steps.discard(step)
            self._captured[step] = self._capture_locked()
            for old in sorted(self._captured)[:-2]:
                del self._captured[old]

    def capture_at(self, step: int, timeout: float) -> tuple[ModelState, int]:
        """The state of exactly `step` (as `capture_state`): now if the model is there, else when it
        gets there (waiting up to `timeout` seconds: DeadlineExceeded), or as captured when it left
        it; FailedPrecondition if the model is past it and no capture holds it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            try:
                while True:
                    if self._step == step:
                        return self._capture_locked()
                    kept = self._captured.pop(step, None)
                    if kept is not None:
                        return kept
                    if self._step > step:
                        raise FailedPrecondition(
                            f"model {self.name!r}: step {step} cannot be saved: the model is at step {self._step}"
                        )
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._deleted or self._closing:
                        raise DeadlineExceeded(
                            f"model {self.name!r}: step {step} not reached (the model is at step {self._step})"
                        )
                    self._capture_steps.add(step)
                    self._changed.wait(remaining)
            finally:
                self._capture_steps.discard(step)

    def take_captured(self) -> tuple[ModelState, int] | None:
        """The newest state captured on leaving a multiple of `capture_every` (and forgets the
        older ones), or None."""
        with self._lock:
            if not self._captured:
                return None
            newest = max(self._captured)
            kept = self._captured.pop(newest)
            self._captured.clear()
            return kept

    def has_captured(self) -> bool:
        return bool(self._captured)

    def replace_state(self, state: ModelState) -> int:
        """Replaces the whole changing state by one already validated against this model and put on
        its device (state/: prepare); pending sync contributions, computed against the old state, are
        dropped, and counters start again. Returns the `state_version` of the installed state (read
        under the same lock, so a later update is never mistaken for part of it)."""
        with self._lock:
            self._params, self._opt_state, self._step = dict(state.params), state.opt_state, state.step
            if state.ema_state is not None:
                self._ema_state = state.ema_state
            self._workers = {w: r.copy() for w, r in state.workers.items()}
            self.membership.restore(
                state.membership or MembershipState()
            )  # leases expire unless renewed  # counters count since creation or restore
            self._captured.clear()  # states of the history this one replaces
            self._counters.reset()
            self._aggregator.reset()
            self._state_version += 1
            self._changed.notify_all()
            self._timer.watch_locked()
            return self._state_version

    # -- lifecycle --------------------------------------------------------------------------------

    def wake_waiters(self) -> None:
        """The server is shutting down: ends the waits for a step and stops the deadline timer."""
        with self._lock:
            self._closing = True
            self._end_locked()

    def mark_deleted(self) -> None:
        with self._lock:
            self._deleted = True
            self._end_locked()

    def _end_locked(self) -> None:
        self._changed.notify_all()
        self._timer.stop_locked()


def _aggregator_of(view: LockedModel, settings: ModelSettings, shard: Shard | None) -> Aggregator:
    """Async, sync, or sync rounds decided by shard 0 (core/shard_rounds.py)."""
    if settings.mode != "sync":
        return AsyncAggregator(view)
    clips = shard is not None and shard.clip is not None
    if shard is not None and decides_rounds(settings, shard.map.shards, clips):
        return ShardRounds(view, leader=shard.index == 0, clips=clips)
    return SyncAggregator(view)


class _Locked:
    """The model as its aggregator sees it (core/aggregation.py, LockedModel): the constant
    description, and the updates and records that the model's lock guards."""

    def __init__(self, model: Model):
        # a proxy: the model holds this view (through its aggregator), and a strong reference back
        # would make every model a reference cycle, its device memory freed only by the cyclic GC
        self._model = weakref.proxy(model)
        self.name, self.settings, self.device = model.name, model.settings, model.device
        self.label = model.label
        self.placement = model.placement
        self.schema_map: Mapping[str, LeafSpec] = model.schema_map  # read-only here (LockedModel)
        self.push_schema: Mapping[str, LeafSpec] = model.push_schema
        self.layout = model.layout
        self.trainable = model.trainable
        self.lazy_leaves = model.lazy_leaves
        self.gradient_buffers = model.gradient_buffers
        self.membership = model.membership

    @property
    def step(self) -> int:
        return self._model._step

    @property
    def deleted(self) -> bool:
        return self._model._deleted

    def applied_reply(self, worker_id: str, seq: int, session: int) -> PushReply | None:
        return self._model._applied_reply_locked(worker_id, seq, session)

    def last_applied_seq(self, worker_id: str, session: int) -> int:
        record = self._model._workers.get(worker_id)
        return 0 if record is None or (session and record.session != session) else record.last_seq

    def check_step_room(self, step: int) -> None:
        self._model._check_step_room(step)

    def clip_factor(self, global_norm_sq: float | None) -> float:
        shard = self._model.shard
        if shard is None or shard.clip is None or global_norm_sq is None:
            return 1.0
        model = self._model
        return shard.clip.factor(global_norm_sq, lambda: model.compiled.hyperparams(model._opt_state))

    def apply(self, grads: Mapping[str, Any], scale: float, row_ids: Mapping[str, Any] | None = None) -> int:
        return self._model._apply_locked(grads, scale, row_ids)

    def record_worker(self, worker_id: str, seq: int, base_step: int | None, reply: PushReply, session: int) -> None:
        self._model._record_worker_locked(worker_id, seq, base_step, reply, session)

    def count(self, counter: str, n: int = 1) -> None:
        self._model._count(counter, n)

    def notify_waiters(self) -> None:
        self._model._changed.notify_all()

    def wait_for_update(self) -> None:
        model = self._model
        jax.block_until_ready((model._params, model._opt_state, model._ema_state))
