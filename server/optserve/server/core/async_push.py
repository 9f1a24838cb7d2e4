"""Async mode: every push is applied as soon as it has arrived whole (docs/design.md, "Life of a push").

A push names the step it was computed against (`base_step`, absent: the current step); its
staleness is how many steps were applied since. `max_staleness` refuses pushes beyond it
(FAILED_PRECONDITION: pull and recompute); `staleness_scaling="inverse"` scales an update by
1 / (1 + staleness).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from optserve.server.core.aggregation import LockedModel, Receiver, finish_reading
from optserve.server.core.errors import FailedPrecondition, InvalidArgument
from optserve.server.core.receiving import GradientAssembler, device_putter
from optserve.server.core.round_sums import scaled
from optserve.server.core.workers import PushReply


class AsyncPush:
    """One push in async mode: assembled in its own buffers, applied at commit (all or nothing)."""

    # Whether its gradient may be read in place from a shared-memory region (core/receiving.py,
    # read_in_place): set by the aggregators that have read it completely when commit returns.
    reads_in_place = False

    def __init__(
        self, model: LockedModel, base_step: int | None, worker_id: str, seq: int, packs: bool = False, session: int = 0
    ):
        self.base_step, self.worker_id, self.seq, self.session = base_step, worker_id, seq, session
        # a shard's: the whole gradient's squared norm (PushHeader.global_norm_sq; core/sharding.py)
        self.global_norm_sq: float | None = None
        self.on_device: dict[str, jax.Array] = {}
        self.assembler = GradientAssembler(
            model.push_schema,
            model.layout,
            what=model.label,
            on_complete=device_putter(self.on_device, model.placement),
            buffers=model.gradient_buffers.take(),
            packs=packs,
        )

    def require_completion(self, why: str) -> None:
        """Nothing to require: an async push is applied at commit, so a reply never waits for it."""

    def dropped_check(self) -> Callable[[], str] | None:
        return None

    def abort(self) -> None:
        """Nothing to undo: the push's buffers were private."""

    def finish_reading(self) -> None:
        if self.assembler.in_place:
            finish_reading(self.assembler, self.on_device)
            self.on_device = {}  # its device arrays alias the region: dropped with the reply


class AsyncAggregator:
    """Applies each push at commit. Stateless beyond the model's worker records."""

    screens_pushes = False

    def __init__(self, model: LockedModel):
        self.model = model

    def open_push(
        self,
        *,
        base_step: int | None,
        worker_id: str,
        seq: int,
        weight: float,
        packs: bool = False,
        session: int = 0,
    ) -> AsyncPush:
        push = AsyncPush(self.model, base_step, worker_id, seq, packs, session)
        push.reads_in_place = True  # commit waits for the update when the gradient lies in a region
        return push

    def screen(self, receiver: Receiver) -> None:
        """Nothing is known against an async push before it arrives."""

    def commit(self, receiver: Receiver) -> tuple[PushReply, bool]:
        assert isinstance(receiver, AsyncPush)
        model = self.model
        dup = model.applied_reply(receiver.worker_id, receiver.seq, receiver.session)
        if dup is not None:
            return dup, True
        model.check_step_room(model.step)
        staleness = self._staleness(receiver.base_step)
        limit = model.settings.max_staleness
        if limit is not None and staleness > limit:
            model.count("stale_rejected")
            raise FailedPrecondition(
                f"model {model.name!r}: push computed against step {receiver.base_step} is {staleness} steps behind "
                f"the current step {model.step} (max_staleness={limit}); pull and recompute"
            )
        scale = 1.0 / (1.0 + staleness) if model.settings.staleness_scaling == "inverse" else 1.0
        # Already on the device (moved leaf by leaf as each completed) and checked for NaN/Inf.
        grads = {k: receiver.on_device[k] for k in model.trainable}
        factor = model.clip_factor(receiver.global_norm_sq)
        if factor != 1.0:  # a shard's part of a gradient clipped by its whole norm
            grads = scaled(grads, np.float32(factor))
        step = model.apply(grads, scale, receiver.assembler.row_ids())
        if receiver.assembler.in_place:  # the update reads the client's region: done before the reply
            model.wait_for_update()
        reply = PushReply(step, applied=True)
        model.record_worker(receiver.worker_id, receiver.seq, receiver.base_step, reply, receiver.session)
        return reply, False

    def _staleness(self, base_step: int | None) -> int:
        model = self.model
        if base_step is None:
            return 0
        if base_step > model.step:
            raise InvalidArgument(
                f"model {model.name!r}: base_step {base_step} is ahead of the current step {model.step}"
            )
        if base_step < 0:
            raise InvalidArgument(f"model {model.name!r}: base_step {base_step} is negative")
        return model.step - base_step

    def pending(self) -> int:
        return 0

    def pending_workers(self) -> dict[str, tuple[int, int]]:
        return {}

    def drops(self) -> tuple[int, str]:
        return 0, ""

    def time_left(self) -> float | None:
        return None

    def expire(self) -> None:
        """Nothing waits in async mode."""

    def reset(self) -> None:
        """Nothing pending in async mode."""

    def membership_changed(self) -> None:
        """Async mode records the membership; its pushes do not depend on it."""
