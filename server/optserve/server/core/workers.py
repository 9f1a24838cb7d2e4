"""What a model remembers of each worker's pushes, so that a retry gets its original answer."""

from __future__ import annotations

import dataclasses

# Applied pushes per worker whose replies are kept: a retry of any of them (the same worker_id and
# seq) gets its original reply, also after pushes with higher seqs (a client with several pushes in
# flight retries them in any order). Older seqs are refused: memory stays bounded per worker.
REPLY_WINDOW = 16


@dataclasses.dataclass(frozen=True)
class PushReply:
    """The answer to one push: the step its gradient is part of, and whether that step was already
    applied when the answer was made (sync mode: false until its round completes). The API adds
    the model's name, the server's incarnation and whether the push was a retry."""

    step: int
    applied: bool = True


@dataclasses.dataclass
class WorkerRecord:
    """The applied pushes of one worker: enough to answer a retry of its recent ones."""

    last_seq: int = 0  # highest applied seq
    last_base_step: int = -1  # base_step of that push
    # seq -> reply, the last REPLY_WINDOW, oldest first
    replies: dict[int, PushReply] = dataclasses.field(default_factory=dict)
    # the worker's session these seqs belong to (core/membership.py): a new session starts a new
    # record, its seqs from 1 again
    session: int = 0

    def remember(self, seq: int, base_step: int, reply: PushReply) -> None:
        """Records an applied push (seq > last_seq) and forgets replies beyond the window."""
        self.last_seq, self.last_base_step = seq, base_step
        self.replies[seq] = reply
        while len(self.replies) > REPLY_WINDOW:
            del self.replies[next(iter(self.replies))]

    def copy(self) -> WorkerRecord:
        return dataclasses.replace(self, replies=dict(self.replies))
