"""Progress of the long CLI operations (upload, download, restore, reshard): a bar on stderr when it
is a terminal, nothing at all in a pipe or a file, so that scripts read only the result line the
command prints on stdout. Drawn with rich, loaded only when there is a terminal to draw on.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

Report = Callable[[int, int], None]  # (done, total): optserve.client.progress's callback


def _quiet(done: int, total: int) -> None:
    """The report where there is no terminal: nothing."""


@contextlib.contextmanager
def progress_bar(what: str, unit: str = "bytes", stream: TextIO | None = None) -> Iterator[Report]:
    """A bar named `what` for the `with` block, fed by the report it yields (thread-safe: rich's
    Progress locks its updates). unit: "bytes" (sizes and speed) or a noun counted whole
    ("checkpoints"). On a stream that is not a terminal the report does nothing."""
    stream = sys.stderr if stream is None else stream
    if not stream.isatty():
        yield _quiet
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    amount = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(), TextColumn(unit))
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *amount, TimeElapsedColumn())
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(what, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield report


@contextlib.contextmanager
def activity(what: str, stream: TextIO | None = None) -> Iterator[None]:
    """A bar without an end (it pulses) and the time elapsed while the `with` block runs: for an
    operation the server does in one call (a restore), whose share done it cannot tell. Nothing off
    a terminal."""
    stream = sys.stderr if stream is None else stream
    if not stream.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=Console(file=stream)
    ) as bar:
        bar.add_task(what, total=None)
        yield
