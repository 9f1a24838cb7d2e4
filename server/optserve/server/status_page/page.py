"""`StatusPage`: the history sampler and the HTTP listener of one server, as `Server` starts and stops them."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from optserve.server.api.auth import Token
from optserve.server.status_page import report
from optserve.server.status_page.endpoint import StatusEndpoint
from optserve.server.status_page.history import History


class StatusPage:
    """The history sampler and the HTTP listener of one server."""

    def __init__(self, sources: report.Sources, tokens: Sequence[Token] | None, metrics: CollectorRegistry | None):
        """metrics: the registry to serve on the same port (None: the metrics are served elsewhere, or not)."""
        self.sources = sources
        self.history = sources.history
        self.endpoint = StatusEndpoint(lambda allowed: report.build(sources, allowed), tokens=tokens, metrics=metrics)

    def start(self, port: int, host: str) -> int:
        self.history.start()
        return self.endpoint.start(port, host)

    def stop(self) -> None:
        self.endpoint.stop()
        self.history.stop()


__all__ = ["History", "StatusPage"]
