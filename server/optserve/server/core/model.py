"""One model on the server: parameters and optimizer state on the device, and the compiled step.

Concurrency (docs/design.md, "Concurrency" and "Life of a pull"):
- one update at a time per model (`_lock`);
- a pull takes a consistent (parameters, step) snapshot under the lock and *pins* that version;
  an update only donates the parameter buffers when no pull pins them, so a pull streams without
  holding the lock and never sees a half-applied update, and memory is not doubled otherwise;
- optimizer-state buffers are always donated: nothing else reads them outside the lock.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optserve.wire.dtypes import FLOAT_DTYPES, LeafSpec
from optserve.server.core.sync import SyncAggregator, SyncPush
from optserve.server.core.datapath import host_buffer_reaper, release_host_buffers
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, NonFiniteUpdate
from optserve.server.core.gradient_buffers import GradientBuffers
from optserve.server.core.receiving import GradientAssembler, device_putter
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import CompiledOptimizer, ema

# The highest step a model may reach: steps stay exact in JSON and in JavaScript readers of the
# manifest (Number.MAX_SAFE_INTEGER). Uploads, checkpoints and restores accept [0, MAX_STEP]; an
# update that would go past it is refused (Model.check_step_room_locked), so every step a model
# reaches can be saved and restored.
MAX_STEP = 2**53 - 1


@dataclasses.dataclass
class Counters:
    pushes_applied: int = 0
    stale_rejected: int = 0
    duplicates: int = 0
    sync_timeouts: int = 0
    pulls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    nonfinite_rejected: int = 0


# Applied pushes per worker whose replies are kept: a retry of any of them (the same worker_id and
# seq) gets its original reply, also after pushes with higher seqs (a client with several pushes in
# flight retries them in any order). Older seqs are refused: memory stays bounded per worker.
REPLY_WINDOW = 16


@dataclasses.dataclass
class WorkerRecord:
    """The applied pushes of one worker: enough to answer a retry of its recent ones."""

    last_seq: int = 0  # highest applied seq
    last_base_step: int = -1  # base_step of that push
    replies: dict[int, Any] = dataclasses.field(default_factory=dict)  # seq -> reply, the last REPLY_WINDOW, oldest first

    def remember(self, seq: int, base_step: int, reply: Any) -> None:
        """Records an applied push (seq > last_seq) and forgets replies beyond the window."""
        self.last_seq, self.last_base_step = seq, base_step
        self.replies[seq] = reply
        while len(self.replies) > REPLY_WINDOW:
            del self.replies[next(iter(self.replies))]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent view for a pull: the arrays of one step, pinned against donation."""

    step: int
    arrays: Mapping[str, jax.Array]


def _apply_updates(params: dict, updates: dict, scale: jax.Array) -> dict:
    # optax.apply_updates with an update scale (staleness scaling); x * 1.0 is exact, so an
    # unscaled step equals optax bit for bit.
    return {k: (p + scale * updates[k]).astype(p.dtype) if k in updates else p for k, p in params.items()}


def _finite_flags(trainable: dict, opt_state: Any, ema_state: Any) -> jax.Array:
    """One bool per floating-point leaf of (trainable params, optimizer state, EMA), in the order of
    `state_leaf_names`: whether every value of that leaf is finite."""
    leaves = [*trainable.values(), *jax.tree.leaves(opt_state), *jax.tree.leaves(ema_state)]
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags) if flags else jnp.ones([0], bool)


def state_leaf_names(trainable: tuple[str, ...], opt_state: Any, ema_state: Any) -> list[str]:
    """Names of the leaves `_finite_flags` checks, in its order (for the refusal's message)."""
    names = [f"parameter {p!r}" for p in trainable]
    for what, tree in (("optimizer state", opt_state), ("EMA", ema_state)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if jnp.issubdtype(x.dtype, jnp.inexact):
                names.append(f"{what} {jax.tree_util.keystr(path)}")
    return names


def make_step(compiled: CompiledOptimizer, trainable: tuple[str, ...], donate_params: bool, settings: ModelSettings):
    """The jitted update: (params, opt_state, ema_state, grads, scale) -> (params, opt_state, ema_state),
    plus, with settings.reject_nonfinite_updates, a vector of per-leaf finiteness flags.

    grads may arrive in a narrower wire dtype; the cast to the parameter dtype happens here, fused
    into the update. Non-float leaves are carried unchanged (they are not trainable). The parameter
    EMA (objax semantics, `spec.ema`), when the model keeps one, is updated in the same computation.
    The optimizer state is always donated; parameters and EMA only when no pull pins them.

    reject_nonfinite_updates: when any new floating-point value is not finite, every output is the
    corresponding input (a select inside the computation, bit for bit), so the donated buffers are
    still valid and the caller only has to read the flags back to know whether to count the step.
    """
    decay = settings.ema_decay
    check = settings.reject_nonfinite_updates

    def step(params: dict, opt_state: Any, ema_state: Any, grads: dict, scale: jax.Array):
        train = {k: params[k] for k in trainable}
        g = {k: grads[k].astype(train[k].dtype) for k in trainable}
        updates, new_opt_state = compiled.update(g, opt_state, train)
        new_params = _apply_updates(params, updates, scale)
        new_ema = ema_state
        if ema_state is not None:
            new_ema = ema.ema_update(ema_state, {k: new_params[k] for k in trainable}, decay)
        if not check:
            return new_params, new_opt_state, new_ema
        flags = _finite_flags({k: new_params[k] for k in trainable}, new_opt_state, new_ema)
        ok = jnp.all(flags)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        return keep(new_params, params), keep(new_opt_state, opt_state), keep(new_ema, ema_state), flags

    return jax.jit(step, donate_argnums=(0, 1, 2) if donate_params else (1,))


# Below this, the host buffers jax keeps until its next call are too small to be worth waking the
# reaper thread for; on small models that wake-up costs more latency than the memory is worth.
REAP_MIN_BYTES = 1 << 20


def own_buffers(tree: Any) -> Any:
    """The tree with every array leaf in a buffer of its own.

    An optimizer's init may put one array in two places (e.g. two accumulators starting from the
    same zeros); donating that state would donate the buffer twice, which XLA refuses. Copies are
    made only for the repeats, so a well-behaved state costs nothing.
    """
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(own, tree)


class Model:
    """Parameters, optimizer state, step and bookkeeping of one named model."""

    def __init__(
        self,
        name: str,
        schema: list[LeafSpec],
        params: Mapping[str, np.ndarray],
        compiled: CompiledOptimizer,
        settings: ModelSettings,
        device: jax.Device,
    ):
        self.name = name
        self.schema = schema
        self.schema_map = {leaf.path: leaf for leaf in schema}
        self.trainable = tuple(l.path for l in schema if l.dtype in FLOAT_DTYPES)
        self.compiled = compiled
        self.settings = settings
        self.device = device
        self.param_bytes = sum(np.asarray(a).nbytes for a in params.values())
        # may_alias=False: the parameters get buffers of their own. Aliasing the received host buffer
        # (zero copy on CPU) would save one copy, once, but the first donated update cannot reuse an
        # aliased buffer, and jax would keep it alive until an unrelated later call: +1 model of RSS.
        self.params: dict[str, jax.Array] = {
            p: jax.device_put(params[p], device, may_alias=False) for p in self.schema_map
        }
        with jax.default_device(device):
            # device_put commits the state to the device, as the step's outputs are: jit keys its
            # cache on that too, so uncommitted initial state would compile the step a second time at
            # the second push (measured: +1.3 s for 300 leaves, minutes for 10k).
            self.opt_state = jax.device_put(own_buffers(compiled.init({k: self.params[k] for k in self.trainable})), device)
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.opt_state) if hasattr(x, "nbytes"))
        self.step = 0
        # Bumped (under the lock) by every change a checkpoint must hold: an update, a worker record, a
        # hyperparameter change, an installed checkpoint. Checkpoints compare it, not the step, to tell
        # "unchanged since the last save": a change at the same step must still be saved.
        self.state_version = 0
        self.counters = Counters()
        self.workers: dict[str, WorkerRecord] = {}
        self.created_unix = time.time()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pins: dict[int, int] = {}
        self.ema_state = None  # parameter EMA (spec/ema.py), kept when settings.ema_decay is set
        if settings.ema_decay is not None:
            with jax.default_device(device):
                self.ema_state = jax.device_put(ema.ema_init({k: self.params[k] for k in self.trainable}), device)
        self._steps = {donate: make_step(compiled, self.trainable, donate, settings) for donate in (True, False)}
        self.deleted = False
        self.closing = False  # the server is shutting down: waits end
        # sync mode: the rounds of contributions (aggregation.py); None in async mode
        self.aggregator = SyncAggregator(self) if settings.mode == "sync" else None
        # pushes assemble large leaves in the buffers of earlier pushes (gradient_buffers.py)
        self.gradient_buffers = GradientBuffers(schema)

    # -- device -----------------------------------------------------------------------------------

    def to_device(self, arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.device_put(arrays[k], self.device) for k in self.schema_map}

    # -- updates --------------------------------------------------------------------------------

    def open_push(self, *, base_step: int | None, worker_id: str, seq: int, weight: float) -> AsyncPush | SyncPush:
        """A receiver for one push stream: its assembler collects the chunks, commit() applies it
        (async) or adds it to the current sync round (sync, see aggregation.py)."""
        release_host_buffers()  # finished updates' inputs go before this push allocates its own
        if self.aggregator is not None:
            return self.aggregator.open_push(base_step=base_step, worker_id=worker_id, seq=seq, weight=weight)
        return AsyncPush(self, base_step, worker_id, seq)

    def pending_contributions(self) -> int:
        """sync: contributions received for the current step and not applied yet (async: 0)."""
        if self.aggregator is None:
            return 0
        with self._lock:
            return self.aggregator.pending_locked()

    def worker_states(self) -> list[tuple[str, int, int]]:
        """(worker_id, last seq, base_step of that push) per worker, including sync contributions
        still pending in the current round."""
        with self._lock:
            states = {w: (r.last_seq, r.last_base_step) for w, r in self.workers.items()}
            if self.aggregator is not None:
                for w, c in self.aggregator.pending_workers_locked().items():
                    states[w] = (c.seq, c.base_step)
        return [(w, seq, base) for w, (seq, base) in sorted(states.items())]

    def _apply_locked(self, grads: Mapping[str, jax.Array], scale: float) -> int:
        """Applies one update; the caller holds the lock and has validated everything.

        With settings.reject_nonfinite_updates, raises NonFiniteUpdate (FAILED_PRECONDITION) when the
        update would make the state non-finite; the state is then bitwise what it was (make_step).
        """
        donate = self._pins.get(self.step, 0) == 0
        # np.float32, not jnp.float32: jit's C++ fast path takes a numpy scalar in microseconds, while
        # building a jax scalar first costs ~60 us, a third of a small model's whole update.
        out = self._steps[donate](self.params, self.opt_state, self.ema_state, dict(grads), np.float32(scale))
        self.params, self.opt_state, self.ema_state = out[:3]
        if self.param_bytes >= REAP_MIN_BYTES:  # then the gradient's host buffers can go (datapath)
            host_buffer_reaper.after(self.params)
        if self.settings.reject_nonfinite_updates:
            # Read back before anyone is told: this waits until the update has run on the device.
            flags = np.asarray(out[3])
            if not flags.all():
                self.counters.nonfinite_rejected += 1
                leaf = state_leaf_names(self.trainable, self.opt_state, self.ema_state)[int(np.argmin(flags))]
                raise NonFiniteUpdate(
                    f"model {self.name!r}: update refused: it would make {leaf} non-finite (inf or NaN) "
                    f"(settings.reject_nonfinite_updates); parameters, optimizer state and step {self.step} are "
                    "unchanged. Lower the learning rate or check the gradients"
                )
        self.step += 1
        self.state_version += 1
        self.counters.pushes_applied += 1
        self._changed.notify_all()
        return self.step

    def push_async(
        self, grads: Mapping[str, jax.Array], *, base_step: int | None, worker_id: str, seq: int, make_reply
    ) -> tuple[Any, bool]:
        """Applies a gradient now (async mode). Returns (reply, duplicate).

        `make_reply(step)` builds the reply; it is remembered per worker so that a retry of the same
        (worker_id, seq) gets the same answer and is never applied twice.
        """
        # Already on the device (AsyncPush moved each leaf as it completed) and checked for NaN/Inf.
        device_grads = {k: grads[k] for k in self.schema_map}
        with self._lock:
            dup = self._duplicate_locked(worker_id, seq)
            if dup is not None:
                return dup, True
            self.check_step_room_locked(self.step)
            staleness = self._staleness_locked(base_step)
            limit = self.settings.max_staleness
            if limit is not None and staleness > limit:
                self.counters.stale_rejected += 1
                raise FailedPrecondition(
                    f"model {self.name!r}: push computed against step {base_step} is {staleness} steps behind the "
                    f"current step {self.step} (max_staleness={limit}); pull and recompute"
                )
            scale = 1.0 / (1.0 + staleness) if self.settings.staleness_scaling == "inverse" else 1.0
            step = self._apply_locked(device_grads, scale)
            reply = make_reply(step)
            self._record_worker_locked(worker_id, seq, base_step, reply)
            return reply, False

    def _staleness_locked(self, base_step: int | None) -> int:
        if base_step is None:
            return 0
        if base_step > self.step:
            raise InvalidArgument(f"model {self.name!r}: base_step {base_step} is ahead of the current step {self.step}")
        if base_step < 0:
            raise InvalidArgument(f"model {self.name!r}: base_step {base_step} is negative")
        return self.step - base_step

    def _duplicate_locked(self, worker_id: str, seq: int) -> Any:
        """The original reply if (worker_id, seq) is one of the worker's last REPLY_WINDOW applied
        pushes; None for a seq above its highest applied one (a new push); FAILED_PRECONDITION for
        any other seq (applied too long ago for its reply to be kept, or never pushed)."""
        if not worker_id:
            return None
        record = self.workers.get(worker_id)
        if record is None or seq > record.last_seq:
            return None
        self.counters.duplicates += 1
        if seq in record.replies:
            return record.replies[seq]
        kept = f"seqs {min(record.replies)}..{record.last_seq}" if record.replies else "none"
        raise FailedPrecondition(
            f"model {self.name!r}: worker {worker_id!r} seq {seq} is not above its highest applied seq "
            f"{record.last_seq}, and no reply is kept for it: the server answers retries of a worker's last "
            f"{REPLY_WINDOW} applied pushes only (kept: {kept}); push new gradients with seq > {record.last_seq}"
        )

    def _record_worker_locked(self, worker_id: str, seq: int, base_step: int | None, reply: Any) -> None:
        if worker_id:
            record = self.workers.setdefault(worker_id, WorkerRecord())
            record.remember(seq, self.step - 1 if base_step is None else base_step, reply)
            self.state_version += 1

    def check_step_room_locked(self, step: int) -> None:
        """Refuses an update from `step` that would take the model past MAX_STEP (steps stay exact in JSON, and
        every step a model reaches must be savable and restorable)."""
        if step >= MAX_STEP:
            raise FailedPrecondition(
                f"model {self.name!r} is at step {step}, the last step a model can reach (2**53 - 1: steps stay "
                "exact in checkpoint manifests and in every JSON reader); no further update can be applied"
            )

    # -- reads ----------------------------------------------------------------------------------

    def wait_for_step(self, min_step: int, timeout: float | None, give_up=None) -> bool:
        """Blocks until step >= min_step; True if reached. Also ends on timeout, deletion, server
        shutdown, or when `give_up()` turns true (checked whenever `notify_waiters` is called, e.g. by
        the call's cancellation callback), so no thread waits for a step that nobody awaits."""

        def done() -> bool:
            return self.step >= min_step or self.deleted or self.closing or (give_up is not None and give_up())

        with self._lock:
            self._changed.wait_for(done, timeout)
            return self.step >= min_step and not self.deleted

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
            step, arrays = self.step, (self.ema_params() if ema else self.params)
            self._pins[step] = self._pins.get(step, 0) + 1
            self.counters.pulls += 1
        try:
            yield Snapshot(step, arrays)
        finally:
            with self._lock:
                left = self._pins[step] - 1
                if left:
                    self._pins[step] = left
                else:
                    del self._pins[step]

    def ema_params(self) -> Mapping[str, jax.Array]:
        """The parameter EMA (debiased as the model's settings say); non-float leaves as they are."""
        value = ema.ema_value(self.ema_state, self.settings.ema_debias)
        return {k: value.get(k, v) for k, v in self.params.items()}

    # -- hyperparameters ------------------------------------------------------------------------

    def hyperparams(self) -> dict[str, float]:
        with self._lock:
            return self.compiled.hyperparams(self.opt_state)

    def set_hyperparams(self, values: Mapping[str, float]) -> dict[str, float]:
        with self._lock:
            self.opt_state = self.compiled.set_hyperparams(self.opt_state, dict(values))
            self.state_version += 1
            return self.compiled.hyperparams(self.opt_state)

    # -- checkpoints (state/model_state.py, checkpoint/manager.py) ---------------------------------

    def checkpoint_snapshot(self) -> Any:
        """A consistent copy of the whole state (params, optimizer state, EMA, step, worker records),
        taken under the lock as device copies; `.to_host()` on it, outside the lock, gives numpy."""
        return self.versioned_checkpoint_snapshot()[0]

    def versioned_checkpoint_snapshot(self) -> tuple[Any, int]:
        """`checkpoint_snapshot()` and the `state_version` it holds, taken together under the lock."""
        from optserve.server.state import model_state

        with self._lock:
            return model_state.capture(self), self.state_version

    def install_checkpoint(self, prepared: Any) -> int:
        """Replaces the whole state by one validated and put on the device by `model_state.prepare`;
        returns the `state_version` of the installed state (read under the same lock, so a later
        update is never mistaken for part of it)."""
        from optserve.server.state import model_state

        with self._lock:
            model_state.install(self, prepared)
            if self.aggregator is not None:  # pending sync contributions were computed against the old state
                self.aggregator.reset_locked()
            self.state_version += 1
            return self.state_version

    def wake_waiters(self) -> None:
        """The server is shutting down: ends the waits for a step and stops the sync timeout timer."""
        self._end("closing")

    def mark_deleted(self) -> None:
        self._end("deleted")

    def _end(self, flag: str) -> None:
        with self._lock:
            setattr(self, flag, True)
            if self.aggregator is not None:
                self.aggregator.close_locked()
            self._changed.notify_all()


class AsyncPush:
    """One push in async mode: assembled in its own buffers, applied at commit (all or nothing)."""

    def __init__(self, model: Model, base_step: int | None, worker_id: str, seq: int):
        self.model = model
        self.base_step, self.worker_id, self.seq = base_step, worker_id, seq
        self.on_device: dict[str, jax.Array] = {}
        self.assembler = GradientAssembler(model.schema_map, what=f"model {model.name!r}",
                                           on_complete=device_putter(self.on_device, model.device),
                                           buffers=model.gradient_buffers.take())  # fmt: skip

    def commit(self, grads: Mapping[str, np.ndarray], make_reply) -> tuple[Any, bool]:
        self.model.gradient_buffers.keep(grads)
        return self.model.push_async(
            self.on_device, base_step=self.base_step, worker_id=self.worker_id, seq=self.seq, make_reply=make_reply
        )

    def abort(self) -> None:
        """Nothing to undo: the push's buffers were private."""
