"""Sync mode: the rounds in which the first `quorum` gradients pushed against a step are averaged.

docs/design.md, "Life of a push": `mode="sync", workers=N, quorum=k`. Every push names the step it was
computed against (`base_step`; absent means the current step). A *round* collects the contributions
for the current step; the k-th one completes it, and the model takes one update with their weighted
mean (weight = the push's `weight`, 0 meaning 1) through its jitted step (`Model._apply_locked`).
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
step beyond the current one (`dropped_rounds` changes; see service._wait_for_step). Contributors
push again against the same step.

Retries: a contribution's (worker_id, seq) and reply are kept in the round until it is applied,
then move to the model's per-worker records (`Model.workers`, which keep the replies of each
worker's last `model.REPLY_WINDOW` applied pushes). A repeat of the pair returns the original reply
(duplicate) and is never counted twice; a second, different push of the same worker
to the same round is refused. Because pending contributions are not in `Model.workers` until their
step is applied, a checkpoint (which saves the per-worker seqs) never claims a seq whose gradient
was lost with an unfinished round.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from optserve.server.core.errors import FailedPrecondition, InvalidArgument, NonFiniteUpdate, ResourceExhausted
from optserve.server.core.receiving import GradientAssembler, device_putter

if TYPE_CHECKING:
    from optserve.server.core.model import Model

log = logging.getLogger("optserve.aggregation")

# A timer thread with no round to watch waits this long for one, then exits (a new one starts with
# the next round), so an idle model holds no thread.
_TIMER_IDLE_EXIT_S = 5.0


def _accumulation_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


@jax.jit
def _first(grads: dict, weight: jax.Array) -> dict:
    out = {}
    for k, g in grads.items():
        acc = _accumulation_dtype(g.dtype)
        out[k] = weight.astype(acc) * g.astype(acc)
    return out


def _fold(sums: dict, grads: dict, weight: jax.Array) -> dict:
    return {k: s + weight.astype(s.dtype) * grads[k].astype(s.dtype) for k, s in sums.items()}


_fold_jit = jax.jit(_fold, donate_argnums=(0,))


def _mean(sums: dict, total: jax.Array) -> dict:
    return {k: s / total.astype(s.dtype) for k, s in sums.items()}


_mean_jit = jax.jit(_mean, donate_argnums=(0,))


@dataclasses.dataclass
class Contribution:
    """What a round remembers of one accepted push: enough to answer its retry."""

    seq: int
    base_step: int
    weight: float
    reply: Any


@dataclasses.dataclass
class Round:
    """The contributions for one step (the model's current step)."""

    step: int  # the model step the gradients were computed against; applying it makes step + 1
    sums: dict[str, jax.Array] | None = None
    total_weight: float = 0.0
    count: int = 0
    anonymous: int = 0  # contributions without a worker_id (no dedup possible)
    contributors: dict[str, Contribution] = dataclasses.field(default_factory=dict)
    deadline: float | None = None  # monotonic time at which a timeout applies it
    dropped: str = ""  # why the round was refused (reject_nonfinite_updates); "" while pending or applied


def check_weight(model_name: str, weight: float) -> float:
    """The effective weight of a contribution (0 means 1); negative or non-finite is refused."""
    if not math.isfinite(weight) or weight < 0:
        raise InvalidArgument(f"model {model_name!r}: weight must be a finite number >= 0 (0 means 1), got {weight}")
    return float(weight) or 1.0


class SyncAggregator:
    """The round state of one sync-mode model. All state is guarded by the model's lock."""

    def __init__(self, model: Model):
        self.model = model
        self.quorum = model.settings.quorum or model.settings.workers
        self.timeout = model.settings.sync_timeout
        self._round = Round(step=model.step)
        self._timer_wakeup = threading.Condition(model._lock)
        self._timer: threading.Thread | None = None
        self._closed = False
        # Rounds refused by reject_nonfinite_updates, and why the last one was: calls waiting for a
        # step compare the count with the one they started with (service._wait_for_step).
        self.dropped_rounds = 0
        self.last_drop = ""

    # -- receiving ---------------------------------------------------------------------------------

    def open_push(self, *, base_step: int | None, worker_id: str, seq: int, weight: float) -> SyncPush:
        """A receiver for one push stream; a push already known to be stale is refused before its bytes."""
        w = check_weight(self.model.name, weight)
        if base_step is not None:
            with self.model._lock:
                if base_step < self.model.step and not self._is_retry_locked(worker_id, seq):
                    raise self._stale_locked(base_step)
        return SyncPush(self, base_step, worker_id, seq, w)

    def _is_retry_locked(self, worker_id: str, seq: int) -> bool:
        """A retry must reach commit, which answers it with the original reply."""
        if not worker_id:
            return False
        pending = self._current_round_locked().contributors.get(worker_id)
        record = self.model.workers.get(worker_id)
        return (pending is not None and seq <= pending.seq) or (record is not None and seq <= record.last_seq)

    def _stale_locked(self, base_step: int) -> FailedPrecondition:
        self.model.counters.stale_rejected += 1
        m = self.model
        return FailedPrecondition(
            f"model {m.name!r}: sync push computed against step {base_step}, which was already applied; "
            f"the current step is {m.step}: pull step {m.step} and push against it"
        )

    def _current_round_locked(self) -> Round:
        """The round for the model's current step (a round left behind by a restore is dropped)."""
        if self._round.step != self.model.step:
            if self._round.count:
                log.warning("model %r: dropping %d sync contributions for step %d: the model is now at step %d",
                            self.model.name, self._round.count, self._round.step, self.model.step)  # fmt: skip
            self._round = Round(step=self.model.step)
        return self._round

    def commit(self, push: SyncPush, grads: Mapping[str, np.ndarray], make_reply) -> tuple[Any, bool]:
        """Adds a complete, validated push to the round; applies the round when it reaches the quorum.

        Returns (reply, duplicate). The reply's step is the step this gradient is part of; `applied`
        says whether that step was already applied when the reply was made (true for the push that
        completes the round). `push.round` is set to the round the push joined (its `dropped` says
        later whether that round was refused). A push with `push.must_complete` set (a PushPull
        that found no free waiting slot) is refused with RESOURCE_EXHAUSTED, before it is counted,
        unless it completes the round.
        """
        model = self.model
        # on the device already (moved leaf by leaf as each completed) and checked finite by the assembler
        device_grads = {k: push.on_device[k] for k in model.trainable}
        weight = jnp.float32(push.weight)
        with model._lock:
            rnd = self._current_round_locked()
            dup = self._duplicate_locked(rnd, push.worker_id, push.seq)
            if dup is not None:
                return dup, True
            base_step = rnd.step if push.base_step is None else push.base_step
            if base_step < rnd.step:
                raise self._stale_locked(base_step)
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
            if model.deleted:
                raise FailedPrecondition(f"model {model.name!r} was deleted")
            model.check_step_room_locked(rnd.step)
            if push.must_complete and rnd.count + 1 < self.quorum:
                raise ResourceExhausted(push.must_complete)
            push.round = rnd
            rnd.sums = _first(device_grads, weight) if rnd.sums is None else _fold_jit(rnd.sums, device_grads, weight)
            rnd.total_weight += push.weight
            rnd.count += 1
            completes = rnd.count >= self.quorum
            reply = make_reply(rnd.step + 1, completes)
            if push.worker_id:
                rnd.contributors[push.worker_id] = Contribution(push.seq, base_step, push.weight, reply)
            else:
                rnd.anonymous += 1
            if completes:
                self._apply_locked(rnd, timed_out=False)
            elif self.timeout > 0 and rnd.deadline is None:
                rnd.deadline = time.monotonic() + self.timeout
                self._ensure_timer_locked()
            return reply, False

    def _duplicate_locked(self, rnd: Round, worker_id: str, seq: int) -> Any:
        """The original reply of a repeated (worker_id, seq): pending in this round, or one of the
        worker's last applied pushes (Model._duplicate_locked, which refuses older applied seqs);
        None for a new push."""
        if not worker_id:
            return None
        pending = rnd.contributors.get(worker_id)
        if pending is not None and seq == pending.seq:
            self.model.counters.duplicates += 1
            return pending.reply
        reply = self.model._duplicate_locked(worker_id, seq)
        if reply is None and pending is not None and seq < pending.seq:  # above every applied seq: never seen
            self.model.counters.duplicates += 1
            raise FailedPrecondition(
                f"model {self.model.name!r}: worker {worker_id!r} seq {seq} is older than its pending seq {pending.seq} "
                "and was never applied; push new gradients with a higher seq"
            )
        return reply

    # -- applying ----------------------------------------------------------------------------------

    def _apply_locked(self, rnd: Round, *, timed_out: bool) -> None:
        """One update with the round's weighted mean; the contributors become the workers' records.
        A refused update (NonFiniteUpdate) drops the round and wakes the waiting calls, then raises."""
        model = self.model
        mean = _mean_jit(rnd.sums, jnp.float32(rnd.total_weight))
        rnd.sums = None
        try:
            model._apply_locked(mean, 1.0)
        except NonFiniteUpdate as e:
            self.dropped_rounds += 1
            self.last_drop = (f"{e.message}; the sync round for step {rnd.step + 1} ({rnd.count} contributions) "
                              f"was dropped: push again against step {rnd.step}")  # fmt: skip
            log.warning("%s", self.last_drop)
            rnd.dropped = self.last_drop
            self._round = Round(step=model.step)
            self._timer_wakeup.notify_all()
            model._changed.notify_all()  # waiting calls see dropped_rounds change
            raise NonFiniteUpdate(self.last_drop) from None
        for worker_id, c in rnd.contributors.items():
            model._record_worker_locked(worker_id, c.seq, c.base_step, c.reply)
        if timed_out:
            model.counters.sync_timeouts += 1
            log.warning(
                "model %r: sync step %d applied by timeout (%.3gs) with %d of %d contributions (quorum %d); "
                "missing workers' late pushes will be stale", model.name, rnd.step + 1, self.timeout, rnd.count,
                model.settings.workers, self.quorum,
            )  # fmt: skip
        self._round = Round(step=model.step)
        self._timer_wakeup.notify_all()

    def _ensure_timer_locked(self) -> None:
        if self._closed or (self._timer is not None and self._timer.is_alive()):
            self._timer_wakeup.notify_all()
            return
        self._timer = threading.Thread(target=self._run_timer, name=f"optserve-sync-timeout-{self.model.name}",
                                       daemon=True)  # fmt: skip
        self._timer.start()

    def _run_timer(self) -> None:
        """Applies a round whose deadline has passed; exits when closed or idle for a while."""
        with self._timer_wakeup:
            idle_since = None
            while not self._closed and not self.model.deleted:
                rnd = self._current_round_locked()
                now = time.monotonic()
                if rnd.deadline is None or rnd.count == 0:
                    idle_since = idle_since or now
                    if now - idle_since >= _TIMER_IDLE_EXIT_S:
                        break
                    self._timer_wakeup.wait(_TIMER_IDLE_EXIT_S)
                    continue
                idle_since = None
                if now >= rnd.deadline:
                    try:
                        self._apply_locked(rnd, timed_out=True)
                    except NonFiniteUpdate:
                        pass  # dropped and logged by _apply_locked
                    except Exception:  # noqa: BLE001 - never kill the timer silently; drop the round
                        log.exception("model %r: applying sync step %d by timeout failed", self.model.name,
                                      rnd.step + 1)  # fmt: skip
                        self._round = Round(step=self.model.step)
                    continue
                self._timer_wakeup.wait(rnd.deadline - now)
            if self._timer is threading.current_thread():
                self._timer = None

    # -- visibility and lifecycle ------------------------------------------------------------------

    def pending_locked(self) -> int:
        """Contributions received for the current step and not applied yet."""
        return self._current_round_locked().count

    def pending_workers_locked(self) -> dict[str, Contribution]:
        return dict(self._current_round_locked().contributors)

    def reset_locked(self) -> None:
        """Drops the pending round (the model's state was replaced, e.g. by a checkpoint restore)."""
        if self._round.count:
            log.warning("model %r: dropping %d pending sync contributions: the model's state was replaced",
                        self.model.name, self._round.count)  # fmt: skip
        self._round = Round(step=self.model.step)
        self._timer_wakeup.notify_all()

    def close_locked(self) -> None:
        """Stops the timer thread (model deleted, server shutting down); pending contributions are dropped."""
        self._closed = True
        self._timer_wakeup.notify_all()


class SyncPush:
    """One push stream in sync mode: staged privately, folded into the round only at commit."""

    def __init__(self, aggregator: SyncAggregator, base_step: int | None, worker_id: str, seq: int, weight: float):
        self.aggregator = aggregator
        self.base_step, self.worker_id, self.seq, self.weight = base_step, worker_id, seq, weight
        model = aggregator.model
        self.on_device: dict[str, jax.Array] = {}
        # NaN/Inf is refused (INVALID_ARGUMENT naming the leaf) before anything is counted; each
        # complete trainable leaf starts its device transfer while later chunks arrive
        self.assembler = GradientAssembler(model.schema_map, what=f"model {model.name!r}",
                                           on_complete=device_putter(self.on_device, model.device, frozenset(model.trainable)),
                                           buffers=model.gradient_buffers.take())  # fmt: skip
        # set by the service: refuse (with this message) unless this push completes its round
        self.must_complete = ""
        self.round: Round | None = None  # the round this push joined (set by commit)

    def commit(self, grads: Mapping[str, np.ndarray], make_reply) -> tuple[Any, bool]:
        self.aggregator.model.gradient_buffers.keep(grads)
        return self.aggregator.commit(self, grads, make_reply)

    def abort(self) -> None:
        """Nothing to undo: the round's sum is only touched at commit; the staging buffers are dropped."""
        self.on_device = {}
