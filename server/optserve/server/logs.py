"""Logging setup: one line per lifecycle event or rejected request; JSON lines with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("event", "model", "rpc", "code", "status"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Libraries whose INFO lines a server's operator need not read: jax logs "Unable to initialize
# backend 'tpu' ... libtpu.so" at every start on a machine without a TPU, which reads like a failure.
# They speak from WARNING up (e.g. jax's "a GPU may be present but jaxlib has no CUDA"), or at
# everything with --log-level DEBUG.
QUIET_LIBRARIES = ("jax", "jaxlib", "absl")


class CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record is written, not the one at setup:
    `optserve serve` run in process (tests) sets logging up under a swapped stderr (pytest's
    capture) that is closed later, while the server threads of other tests go on logging."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = CurrentStderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(
            root.level if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
        )
