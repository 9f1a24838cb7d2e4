"""The status page over HTTP (`--status-port`): `/status` (HTML), `/status.json` (the report).

    GET /status[?refresh=S][&token=T]    the page; it reloads itself every S seconds (default 5, 0: never)
    GET /status.json[?token=T]           the report (status_page/report.py), keys stable
    GET /                                redirects to /status
    GET /metrics (and any other path)    Prometheus, when the status shares the metrics port

Tokens apply as they do to the RPCs (api/auth.py): with a token table, a request needs a known token,
either as `Authorization: Bearer <token>` (scripts, `optserve top`) or as `?token=<token>` (a
browser, where a person cannot set headers; the page's own reloads and links keep it). A missing or
unknown token is 401; a token limited to some models sees only those models. A token in a URL can
end up in browser history and proxy logs: prefer the header where you can, and TLS in front of the
page (it is plain HTTP) when it leaves the host. The metrics on a shared port stay open as before.

Each request is served on a thread of its own (ThreadingHTTPServer); building a report reads the
models without holding their locks for more than `info()` does, so a poller does not slow pushes.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from optserve.server.api.auth import Token, match_token
from optserve.server.status_page import render

log = logging.getLogger("optserve.status")

DEFAULT_REFRESH_SECONDS = 5
MAX_REFRESH_SECONDS = 3600
STATUS_PATHS = ("/", "/status", "/status/", "/status.json", "/favicon.ico")


def presented_token(headers: Any, query: dict[str, list[str]]) -> str:
    """The token of a request: its `Authorization: Bearer` header, else its `token` query parameter."""
    header = headers.get("Authorization", "") or ""
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return (query.get("token") or [""])[0]


class StatusEndpoint:
    """An HTTP listener for the status page (and the metrics, when they share its port).

    build(allowed): the report for a caller allowed those models (None: all); tokens: the server's
    token table (None: open); metrics: the Prometheus registry to serve on every other path (None:
    not served here).
    """

    def __init__(
        self,
        build: Callable[[frozenset[str] | None], dict[str, Any]],
        *,
        tokens: Sequence[Token] | None,
        metrics: CollectorRegistry | None = None,
    ):
        self.build = build
        self.tokens = None if tokens is None else list(tokens)
        self.metrics = metrics
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        """Listens on host:port (0: a free port); returns the port."""
        handler = _handler_class(self)
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer  # "::", "::1"
        self._http = server_class((host, port), handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="optserve-status-http", daemon=True)
        self._thread.start()
        log.info("status page on http://%s:%d/status", host, self.port, extra={"event": "status_started"})
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def allowed(self, token: str) -> tuple[bool, frozenset[str] | None]:
        """(known, the models it may see: None for all)."""
        if self.tokens is None:
            return True, None
        found = match_token(self.tokens, token.encode()) if token else None
        if found is None:
            return False, frozenset()
        return True, found.models


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler_class(endpoint: StatusEndpoint) -> type[BaseHTTPRequestHandler]:
    # With the metrics on this port, requests that are not the status page's go to prometheus_client's
    # own handler (content negotiation, gzip, name[] filters as on a metrics-only port).
    base: type[BaseHTTPRequestHandler] = (
        MetricsHandler.factory(endpoint.metrics) if endpoint.metrics is not None else BaseHTTPRequestHandler
    )

    class Handler(base):  # type: ignore[valid-type,misc]
        server_version = "optserve-status"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            """Nothing on stderr per request (the server logs through `logging`)."""

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path not in STATUS_PATHS:
                if endpoint.metrics is not None:
                    super().do_GET()
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /status or /status.json\n")
                return
            if url.path == "/favicon.ico":
                self._send(204, "image/x-icon", b"")
                return
            query = parse_qs(url.query)
            token = presented_token(self.headers, query)
            known, allowed = endpoint.allowed(token)
            if not known:
                reason = "missing bearer token" if not token else "invalid bearer token"
                self._send(
                    401,
                    "text/plain; charset=utf-8",
                    f"{reason}: send Authorization: Bearer <token>, or add ?token=<token> to the URL\n".encode(),
                    {"WWW-Authenticate": 'Bearer realm="optserve"'},
                )
                return
            keep = {"token": token} if "token" in query else {}  # the page's links and reloads keep it
            if url.path in ("/", "/status/"):
                self._send(302, "text/plain", b"", {"Location": "/status" + (f"?{url.query}" if url.query else "")})
                return
            started = time.perf_counter()
            try:
                report = endpoint.build(allowed)
            except Exception:
                log.exception("status report failed")
                self._send(500, "text/plain; charset=utf-8", b"the status report failed; see the server's log\n")
                return
            built = time.perf_counter()
            if url.path == "/status.json":
                body, content_type = json.dumps(report).encode(), "application/json"
            else:
                json_href = "/status.json" + (f"?{urlencode(keep)}" if keep else "")
                body = render.page(report, refresh=_refresh(query), json_href=json_href).encode()
                content_type = "text/html; charset=utf-8"
            # what the server spent (a browser's developer tools show it; bench/status_page.py reads it)
            timing = f"report;dur={1e3 * (built - started):.2f}, render;dur={1e3 * (time.perf_counter() - built):.2f}"
            self._send(200, content_type, body, {"Server-Timing": timing})

        def _send(self, code: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")  # a report is of now; never a cached one
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _refresh(query: dict[str, list[str]]) -> int:
    text = (query.get("refresh") or [""])[0]
    try:
        return min(max(int(text), 0), MAX_REFRESH_SECONDS)
    except ValueError:
        return DEFAULT_REFRESH_SECONDS
