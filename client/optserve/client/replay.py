"""`ReplayLog`: a worker's last pushes, kept so that a server that restarted behind them can be
given them again (docs/design.md, "Shards").

A server killed with SIGKILL restarts from its newest checkpoint and has lost the steps applied
since, pushes it acknowledged. For one server that is the checkpoint's promise; for one shard of a
model over several servers it would leave that shard behind the others for good. So each Worker of
a `ShardedWorker` keeps copies of its last pushes: when its shard comes back behind them, it sends
them again, in order and under their own (worker_id, seq) and base_step, waiting before each for
the step it was computed against (the other workers replay theirs meanwhile), and the shard rolls
forward to where the others are, by the same updates. A push the shard still has is answered as a
duplicate. When a lost push is no longer kept (more steps lost than the log holds), there is
nothing to replay it from: the caller falls back to bringing every shard back to one checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import Cast, WireLeaf


@dataclass(frozen=True)
class Sent:
    """One acknowledged push: its header (push part only), a copy of its leaves, and the step its
    reply gave (async: the step after it; sync: the step of the round it joined)."""

    header: pb.PushHeader
    leaves: tuple[WireLeaf, ...]
    step: int


def _copy(leaf: WireLeaf) -> WireLeaf:
    path, a = leaf
    if isinstance(a, Cast):
        return path, Cast(np.array(a.array).reshape(a.shape), a.dtype)
    return path, np.array(a)


class ReplayLog:
    """The last `size` pushes a worker had acknowledged (size 0: none kept)."""

    def __init__(self, size: int):
        self.size = size
        self._sent: deque[Sent] = deque()
        self._forgotten_step = -1  # the largest step of a push no longer kept

    def record(self, header: pb.PushHeader, leaves: Sequence[WireLeaf], step: int) -> None:
        if self.size <= 0:
            return
        kept = pb.PushHeader()
        kept.CopyFrom(header)
        kept.ClearField("pull")
        self._sent.append(Sent(kept, tuple(_copy(leaf) for leaf in leaves), step))
        while len(self._sent) > self.size:
            self._forgotten_step = max(self._forgotten_step, self._sent.popleft().step)

    def lost_after(self, step: int) -> list[Sent] | None:
        """The kept pushes a server restored at `step` no longer has, oldest first; None when one it
        lost is no longer kept (it cannot be replayed)."""
        if self._forgotten_step > step:
            return None
        return [s for s in self._sent if s.step > step]

    def replay(
        self,
        lost: Sequence[Sent],
        push: Callable[[pb.PushHeader, Sequence[WireLeaf]], object],
        wait_for_step: Callable[[int], None],
    ) -> None:
        """Sends `lost` again in order, each once the server is at the step it was computed against."""
        for sent in lost:
            if sent.header.HasField("base_step"):
                wait_for_step(sent.header.base_step)
            push(sent.header, sent.leaves)
