"""`ShardedWorker`: a `Worker` for a model over several servers (docs/design.md, "Shards"): one
Worker per shard under one worker_id, their seqs in step, so that each push is one (worker_id, seq)
on every shard and each Worker retries its own shard; a shard that restarted behind the others is
caught up by replays (replay.py), and where shard 0 decides the sync rounds every push relays its
round's decision to the other shards (rounds.py, "Sync rounds" in the design)."""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from optserve.client.errors import FailedPreconditionError, OptserveError, UnavailableError
from optserve.client.fanout import LAGGING_SHARD_WAIT, REPLAY_WINDOW, Fanout, pull_exactly
from optserve.client.rounds import KEPT_ROUNDS, Relays
from optserve.client.tables import merge_rows
from optserve.client.worker import ServerMovedError, Worker


class ShardedModelView(Protocol):
    """What a ShardedWorker uses of its `ShardedModel` (client/sharded.py, which builds it)."""

    name: str
    shards: list[Any]  # a Model per shard
    fanout: Fanout
    last_step: int

    @property
    def decides_rounds(self) -> bool: ...

    def relay(self, step: int, fanout: Fanout | None = None, sequential: bool = False) -> list[tuple[str, int]]: ...

    def realign(self, fanout: Fanout | None = None) -> int: ...

    def _leaves(self, tree: Any, what: str) -> dict[str, np.ndarray]: ...

    def _check_grads(self, leaves: dict[str, np.ndarray]) -> None: ...

    def _norm_sq(self, leaves: dict[str, np.ndarray], wire_dtype: str | None) -> float | None: ...

    def _split(self, leaves: dict[str, np.ndarray]) -> list[dict]: ...

    def _route_rows(self, rows: Any) -> tuple[list[dict[str, np.ndarray]], dict]: ...

    def _targets(self, out: Any, wire_dtype: str | None) -> tuple[dict[str, np.ndarray], list[dict]]: ...

    def _result(self, arrays: dict[str, np.ndarray], like: Any, out: Any) -> Any: ...

    def _consistent(self, steps: list[int], pull: Callable[[int, int], int], fanout: Fanout | None = None) -> int: ...

    def _rows_of_one_step(
        self,
        asked: list[dict[str, np.ndarray]],
        got: dict[int, dict[str, np.ndarray]],
        steps: dict[int, int],
        pull: Callable[[int, int | None, int | None], dict[str, np.ndarray]],
        fanout: Fanout | None = None,
    ) -> int: ...


class ShardedWorker:
    """`Worker` for a sharded model: one Worker per shard under the same worker_id, their seqs in
    step, so each push is one (worker_id, seq) on every shard; each retries its own shard."""

    def __init__(self, model: ShardedModelView, worker_id: str, **kwargs: Any):
        self.model = model
        self.worker_id = worker_id
        # a shard that restarted behind the others is caught up by each worker replaying the pushes
        # it lost (replay.py); only when that cannot be done does every shard go back to one
        # checkpointed step (ShardedModel.realign), and the caller pulls again
        kwargs.setdefault("replay_window", REPLAY_WINDOW)
        # one session for every shard (as one seq): the shards' worker records agree, and a gathered
        # or resharded state holds the session the worker goes on with
        kwargs.setdefault("session", secrets.randbits(63) or 1)
        self.workers = [Worker(m, worker_id, follow_restarts=False, **kwargs) for m in model.shards]
        self.session = self.workers[0].session
        self.realigned = 0
        self.fanout = Fanout(f"{model.name}-{worker_id}", model.fanout.targets)
        # where shard 0 decides the sync rounds, each push relays its round's decision (rounds.py)
        self.relays = Relays(f"{model.name}-{worker_id}")
        self._relay_fanout = Fanout(f"{model.name}-{worker_id}-rounds", model.fanout.targets, callers=2)
        for i, w in enumerate(self.workers[1:], start=1):
            w.on_catch_up = functools.partial(self._catch_up_rounds, i)

    def _catch_up_rounds(self, shard: int, step: int) -> None:
        """A follower shard that restarted behind the others is being caught up (replay.py) to `step`:
        where shard 0 decides the sync rounds, it gets there only by being told each round's
        contributors (shard 0 keeps those of its last rounds), so this relays them, one round after
        another, each once every worker has replayed its part. A failure is left to the caller's wait
        (which falls back to `realign`)."""
        if not self.model.decides_rounds:
            return
        model = self.workers[shard].model
        for _ in range(KEPT_ROUNDS + 1):
            try:
                model.pull(if_newer_than=2**62)  # header only: where the shard is
                if model.last_step >= step:
                    return
                self.model.relay(model.last_step + 1, sequential=True)
            except OptserveError:
                return

    def _relay_round(self) -> None:
        """Where shard 0 decides the sync rounds: relays, in the background, the decision of the
        round this worker's next push joins (pulling first if it never did, for that push's base_step)."""
        if not self.model.decides_rounds:
            return
        if self.workers[0].base_step is None:
            self.pull()
        step = (self.workers[0].base_step or 0) + 1
        self.relays.start(lambda: self.model.relay(step, self._relay_fanout), step)

    def __repr__(self) -> str:
        return f"ShardedWorker({self.worker_id!r}, model={self.model.name!r}, seq={self.seq})"

    def __enter__(self) -> ShardedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops every shard's heartbeat: each lease then expires unless the worker's calls renew it
        (Worker.close)."""
        for w in self.workers:
            w.close()

    @property
    def seq(self) -> int:
        return self.workers[0].seq

    @property
    def retries(self) -> int:
        return sum(w.retries for w in self.workers)

    @property
    def restarts_seen(self) -> int:
        return sum(w.restarts_seen for w in self.workers)

    @contextlib.contextmanager
    def _realigning(self) -> Iterator[None]:
        """When a shard restarted behind the others or went back during the block: brings every shard
        back to one step and raises FailedPreconditionError (pull, then push again)."""
        try:
            yield
        except ServerMovedError as e:
            step = self.model.realign(self.fanout)
            self.realigned += 1
            for w in self.workers:
                w.base_step = None
                w.incarnation = None
            raise FailedPreconditionError(
                f"model {self.model.name!r}: every shard went back to step {step} ({e.message}); pull and push again"
            ) from None

    def pull(self, *, out: Any = None, like: Any = None, wire_dtype: str | None = None, **kwargs: Any) -> Any:
        m = self.model
        arrays, parts = m._targets(out, wire_dtype)

        def one(i: int) -> int:
            self.workers[i].pull(out=parts[i], wire_dtype=wire_dtype, **kwargs)
            return self.workers[i].model.last_step

        with self._realigning():
            steps = self.fanout.run(one)
            m.last_step = m._consistent(
                steps, fanout=self.fanout, pull=lambda i, step: self._pull_part(i, step, wire_dtype, parts[i])
            )
        return m._result(arrays, like, out)

    def _pull_part(self, i: int, step: int, wire_dtype: str | None, out: Any) -> int:
        w = self.workers[i]
        # a shard that does not get there soon may have restarted behind: the Worker retries a
        # DEADLINE_EXCEEDED after checking for that (ServerMovedError), else waits again
        return pull_exactly(
            lambda exact, least: w.pull(
                exact_step=exact, min_step=least, timeout=LAGGING_SHARD_WAIT, wire_dtype=wire_dtype, out=out
            ),
            w.model,
            step,
        )

    def push(self, grads: Any, *, weight: float | None = None, wire_dtype: str | None = None) -> int:
        m = self.model
        leaves = m._leaves(grads, "gradient")
        m._check_grads(leaves)
        parts, norm_sq = m._split(leaves), m._norm_sq(leaves, wire_dtype)
        self._relay_round()
        with self._realigning():
            steps = self.fanout.run(
                lambda i: self.workers[i].push(parts[i], weight=weight, wire_dtype=wire_dtype, global_norm_sq=norm_sq)
            )
        return max(steps)

    def _push_pull_rows(
        self, grad_parts: list[dict], norm_sq: float | None, weight: float | None, wire_dtype: str | None, rows: Any
    ) -> dict[str, np.ndarray]:
        m = self.model
        asked, where = m._route_rows(rows)
        self._relay_round()

        def one(i: int) -> tuple[dict[str, np.ndarray], int]:
            w = self.workers[i]
            if not asked[i]:  # no rows of this shard asked: its part is only pushed
                return {}, w.push(grad_parts[i], weight=weight, wire_dtype=wire_dtype, global_norm_sq=norm_sq)
            got: dict[str, np.ndarray] = w.push_pull(
                grad_parts[i], weight=weight, wire_dtype=wire_dtype, rows=asked[i], global_norm_sq=norm_sq
            )
            return got, w.model.last_step

        def pull_rows(i: int, exact: int | None, least: int | None) -> dict[str, np.ndarray]:
            # as _pull_part: a shard that does not get there soon may have restarted behind
            return self.workers[i].pull_rows(  # type: ignore[no-any-return]
                asked[i], exact_step=exact, min_step=least, timeout=LAGGING_SHARD_WAIT, wire_dtype=wire_dtype
            )

        with self._realigning():
            answers = self.fanout.run(one)
            got = {i: a[0] for i, a in enumerate(answers)}
            with self._applied_everywhere():
                m.last_step = m._rows_of_one_step(
                    asked, got, {i: a[1] for i, a in enumerate(answers)}, pull_rows, fanout=self.fanout
                )
        return merge_rows(rows, where, got)

    @contextlib.contextmanager
    def _applied_everywhere(self) -> Iterator[None]:
        """Around bringing a push_pull's reply to one step: its push stands on every shard, so that
        a failure to do so must not make the caller push it again."""
        try:
            yield
        except UnavailableError as e:
            raise FailedPreconditionError(
                f"{e.message}; the push (worker {self.worker_id!r}, seq {self.seq}) was applied on every shard: "
                "pull the parameters, do not push it again"
            ) from None

    def push_pull(
        self,
        grads: Any,
        *,
        weight: float | None = None,
        wire_dtype: str | None = None,
        like: Any = None,
        out: Any = None,
        rows: Any = None,
    ) -> Any:
        """`rows` ({path: ids}): only those rows, of one step on every shard, the step the push's
        parameters are at (`ShardedModel.push_pull`)."""
        m = self.model
        leaves = m._leaves(grads, "gradient")
        m._check_grads(leaves)
        grad_parts, norm_sq = m._split(leaves), m._norm_sq(leaves, wire_dtype)
        if rows is not None:
            return self._push_pull_rows(grad_parts, norm_sq, weight, wire_dtype, rows)
        arrays, parts = m._targets(out, wire_dtype)
        self._relay_round()

        def one(i: int) -> int:
            self.workers[i].push_pull(
                grad_parts[i], weight=weight, wire_dtype=wire_dtype, out=parts[i], global_norm_sq=norm_sq
            )
            return self.workers[i].model.last_step

        with self._realigning():
            steps = self.fanout.run(one)
            with self._applied_everywhere():
                m.last_step = m._consistent(
                    steps, fanout=self.fanout, pull=lambda i, step: self._pull_part(i, step, wire_dtype, parts[i])
                )
        return m._result(arrays, like, out)
