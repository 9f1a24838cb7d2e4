"""Relaying shard 0's sync-round decisions to the other shards of a model (docs/design.md, "Shards",
"Sync rounds"; the server's side is core/shard_rounds.py).

Where shards could close a sync round with different contributors (quorum below workers, a
sync_timeout, leases: each shard sees its own joins and expiries) or must clip the round's mean by
the whole model's norm (a head clip_by_global_norm), shard 0 alone decides each round and the other
shards wait to be told. Nothing but the clients tells them: every worker that pushed to a round
relays its decision (`relay`), so one dead worker does not hold up the others, and a decision is
idempotent on every shard (the first one counts, an identical one again is a no-op). With a head
clip, the relaying client also adds up the shards' partial squared norms of the round's mean (in
shard order, so every relayer sends the same total) and sends the total back, upon which each shard
applies.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from optserve.client.errors import OptserveError
from optserve.client.worker import RETRYABLE

T = TypeVar("T")

log = logging.getLogger("optserve.client")

# Seconds a relay waits for shard 0 to close a round, or a shard for a contribution it was told of.
ROUND_WAIT = 60.0
# Seconds a relay keeps trying a shard that is away, slow, or behind (restarted, being caught up).
RELAY_FOR = 180.0
# Rounds whose contributors shard 0 keeps (core/shard_rounds.py, HISTORY): a shard further behind
# cannot be caught up by relays.
KEPT_ROUNDS = 64
# Relays one worker may have running at once (each waits for its round; a push_pull's returns with it).
CONCURRENT_RELAYS = 4


def decides_rounds(settings: dict, shards: int, global_norm: bool) -> bool:
    """Whether shard 0 decides the model's sync rounds (as the server decides it: core/shard_rounds.py)."""
    if shards <= 1 or settings.get("mode") != "sync":
        return False
    workers = settings.get("workers") or 0
    quorum = settings.get("quorum") or workers
    leases = bool(settings.get("heartbeat"))  # info's settings: heartbeat_seconds, None for 0
    return quorum < workers or bool(settings.get("sync_timeout")) or leases or global_norm


def relay(
    shards: Sequence[Any],
    run: Callable[[Callable[[int], Any], Sequence[int]], list],
    step: int,
    clips: bool,
    timeout: float = ROUND_WAIT,
) -> list[tuple[str, int]]:
    """Asks shard 0 for the contributors of the round that makes `step` (waiting for it to close),
    sends them to every other shard (`run(call, shards)` calls them in parallel), and with a head
    clip sends every shard the total of their partial squared norms. Returns the contributors."""
    deadline = time.monotonic() + RELAY_FOR
    first = _persisting(lambda: shards[0].decide_round(step, timeout=timeout), shards[0], step, deadline)
    contributors = [tuple(c) for c in first["contributors"]]
    closed_by = first.get("closed_by", 0)  # why shard 0 closed it: each shard records it
    others = list(range(1, len(shards)))
    outs = run(
        lambda i: _persisting(
            lambda: shards[i].decide_round(step, contributors, timeout=timeout, closed_by=closed_by),
            shards[i],
            step,
            deadline,
        ),
        others,
    )
    if clips:
        partials = [first["partial_norm_sq"], *(o["partial_norm_sq"] for o in outs)]
        if any(p is None for p in partials):
            raise RuntimeError(f"round for step {step}: a shard gave no partial_norm_sq ({partials})")
        total = 0.0
        for p in partials:  # in shard order: every relayer sends the very same total
            total += p
        run(
            lambda i: _persisting(
                lambda: shards[i].decide_round(
                    step, contributors, global_norm_sq=total, timeout=timeout, closed_by=closed_by
                ),
                shards[i],
                step,
                deadline,
            ),
            range(len(shards)),
        )
    return contributors


def _persisting(call: Callable[[], T], shard: Any, step: int, deadline: float) -> T:
    """`call()`, again (with backoff, until `deadline`) while the shard is away (UNAVAILABLE), slow
    (DEADLINE_EXCEEDED: a named contribution not there yet) or behind the round (it restarted and is
    being caught up: replay.py): a relay that gave up then would leave that round undecided there."""
    delay = 0.05
    while True:
        try:
            return call()
        except OptserveError as e:
            if e.code not in RETRYABLE and not (
                e.code == grpc.StatusCode.FAILED_PRECONDITION and "no sync round" in e.message and _behind(shard, step)
            ):
                raise
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(random.uniform(0, delay))
        delay = min(delay * 2, 2.0)


def _behind(shard: Any, step: int) -> bool:
    """Whether the shard has yet to get to the round that makes `step` (header-only pull)."""
    try:
        shard.pull(if_newer_than=2**62)
    except OptserveError:
        return True
    return shard.last_step < step - 1


class Relays:
    """A worker's relays, run in the background on threads of their own (a relay waits for its
    round, which may need this worker's own push to every shard first)."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=CONCURRENT_RELAYS, thread_name_prefix=f"optserve-relay-{name}")

    def start(self, call: Callable[[], list[tuple[str, int]]], step: int) -> Future:
        def quiet() -> list[tuple[str, int]]:
            try:
                return call()
            except OptserveError as e:  # another relayer may well have done it; the caller's calls tell
                log.info("relaying the sync round for step %d: %s", step, e.message)
                raise

        return self._pool.submit(quiet)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
