"""Progress of long transfers (Model.download, Client.upload): a callback `progress(done, total)`
called with the bytes moved so far and the bytes to move, from whichever thread moves them. The
optserve CLI draws it as a bar on a terminal (optserve.server.cli.progress); any callable will do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Progress = Callable[[int, int], None]


class PartsProgress:
    """One `progress` over several parts moved at once (a sharded model's shards, each on its own
    thread): each part reports through `part(i)`, and `progress` gets the sums, once per report."""

    def __init__(self, progress: Progress, parts: int):
        self._progress = progress
        self._done = [0] * parts
        self._total = [0] * parts
        self._lock = threading.Lock()

    def part(self, i: int) -> Progress:
        def report(done: int, total: int) -> None:
            with self._lock:
                self._done[i], self._total[i] = done, total
                self._progress(sum(self._done), sum(self._total))

        return report
