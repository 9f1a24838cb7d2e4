"""Calls to every shard of a model over several servers at once (docs/design.md, "Shards"), and the
pulls that bring a shard's part to one step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from optserve.client.errors import FailedPreconditionError, OptserveError
from optserve.client.worker import ServerMovedError, WorkerModel

T = TypeVar("T")


def swap(pull: Callable[[int, int], int], step: int, shard: int) -> int:
    return pull(shard, step)


def pull_exactly(pull: Callable[[int | None, int | None], Any], model: WorkerModel, step: int) -> int:
    """Pulls a shard's part at exactly `step` (PullRequest.exact_step: a shard behind gets there and
    keeps it for this pull however fast it moves on); a shard already past it, at its newest step.
    Returns the step pulled."""
    try:
        pull(step, None)
    except FailedPreconditionError as e:
        if "is gone" not in e.message:
            raise
        pull(None, step)
    return model.last_step


# Pulls of a shard that is behind the others before a pull gives up (UnavailableError: retry).
CONSISTENT_PULL_ATTEMPTS = 16
# Threads that may call one ShardedModel at once (beyond that, calls queue for its fan-out threads).
CONCURRENT_CALLERS = 16
# Pushes each worker of a sharded model keeps to replay to a shard that restarted behind them (copies:
# this many gradients' worth of memory; `model.worker(id, replay_window=0)` keeps none).
REPLAY_WINDOW = 4
# Seconds a worker's pull waits for a shard behind the others before it checks whether it restarted.
LAGGING_SHARD_WAIT = 5.0


class Fanout:
    """Runs one call per shard in parallel and names the shard whose call failed.

    callers: how many threads may fan out through it at once. Calls may wait on each other (a sync
    round waits for every worker's push), so each caller needs threads of its own: a `ShardedWorker`
    has its own Fanout, a `ShardedModel` one for this many concurrent callers (threads start lazily).
    """

    def __init__(self, name: str, targets: Sequence[str], callers: int = 1):
        self.targets = list(targets)
        self._pool = ThreadPoolExecutor(max_workers=len(targets) * callers, thread_name_prefix=f"optserve-{name}")

    def run(self, call: Callable[[int], T], shards: Sequence[int] | None = None) -> list[T]:
        """[call(shard) for each of `shards` (default: every shard)], run in parallel. Waits for every
        call; if any failed, raises the first failure (in shard order) with its shard named."""
        shards = list(range(len(self.targets))) if shards is None else list(shards)
        if len(shards) == 1:
            return [self._named(call, shards[0])]
        futures = [self._pool.submit(self._named, call, s) for s in shards]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        # a shard that restarted behind the others decides what happens next (ShardedWorker)
        for e in sorted(errors, key=lambda e: not isinstance(e, ServerMovedError)):
            raise e
        return [f.result() for f in futures]

    def _named(self, call: Callable[[int], T], shard: int) -> T:
        try:
            return call(shard)
        except OptserveError as e:
            if e.message.startswith("shard "):
                raise
            raise type(e)(f"shard {shard} ({self.targets[shard]}): {e.message}", e.code) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False)
