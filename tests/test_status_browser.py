"""The status page in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it)
driven over the DevTools protocol loads the page of an `optserve serve --status-port` process under
training, the DOM shows the model, its step goes up between two loads (the second is the page's own
`<meta http-equiv="refresh">`), the worker table is there, no console error or exception occurred,
and a screenshot is saved under the test's temporary directory.

Skipped, saying why, only when no `chromium` is on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from optserve.client import Client, optim
from tests.conftest import stop_server_process, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
)
TOKEN = "browser-secret"
G = {"w": np.ones(4, np.float32)}
SERVE = [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--status-port", "0"]
MAX_RELOADS = 60  # a bound on the page's own reloads the test looks at, not a wait on the clock


def wait_for_line(path: Any, pattern: str, what: str, proc: subprocess.Popen, timeout: float = 120.0) -> re.Match:
    """The first line of the file a process writes to that matches `pattern` (polled, bounded: the
    process's output goes to a file, so that nothing it writes later can fill a pipe and block it)."""
    found: list[re.Match] = []

    def said() -> bool:
        with open(path, errors="replace") as f:
            found.extend(m for line in f if (m := re.search(pattern, line)))
        if not found and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}) before saying it")
        return bool(found)

    wait_until(said, what, timeout)
    return found[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(gRPC address, status URL) of an `optserve serve` process with a status port and a token."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    out = tokens.parent / "server.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [*SERVE, "--checkpoint-dir", "", "--token-file", str(tokens), "--log-level", "WARNING"],
            stdout=f,
            stderr=subprocess.DEVNULL,
        )
    try:
        address = wait_for_line(out, r"optserve listening on (\S+:\d+)", "the listening line", proc).group(1)
        status = wait_for_line(out, r"optserve status on (http://\S+)/status", "the status line", proc).group(1)
        yield address, status
    finally:
        stop_server_process(proc)


class DevTools:
    """The DevTools protocol over the browser's websocket, one page attached (flat sessions)."""

    def __init__(self, url: str):
        import websocket  # websocket-client: a test dependency only

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())  # bounded by the socket's timeout
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.call(method, params, session=True)

    def wait_event(self, method: str, after: int) -> dict:
        """The first `method` event past index `after` of the events seen (receiving more as needed)."""
        while True:
            for event in self.events[after:]:
                if event.get("method") == method:
                    return event
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def errors(self) -> list[dict]:
        """Console errors, uncaught exceptions and the browser's own error log entries (failed loads)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            console_error = method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert")
            if method == "Runtime.exceptionThrown" or console_error:
                out.append(params)
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(params["entry"])
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[DevTools]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    args = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-first-run", "--disable-extensions"]
    args += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    log = profile / "chromium.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=f)
    try:
        url = wait_for_line(log, r"DevTools listening on (ws://\S+)", "Chromium's DevTools address", proc).group(1)
        tools = DevTools(url)
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


DOM_FACTS = """JSON.stringify({
  title: document.title,
  models: [...document.querySelectorAll('tr.model')]
    .map(r => [r.dataset.model, r.querySelector('td.step').textContent]),
  workers: [...document.querySelectorAll('table.workers[data-model="trained"] tr.worker')].map(r => r.dataset.worker),
  charts: document.querySelectorAll('section.model-detail svg').length,
})"""


def test_the_page_in_a_browser(served, browser, tmp_path):
    address, status_url = served
    with Client(address, token=TOKEN, timeout=60) as c:
        model = c.create_model("trained", {"w": np.zeros(4, np.float32)}, optim.sgd(0.1))
        workers = [model.worker(f"worker-{i}") for i in range(3)]
        for w in workers:
            w.push(G)
        for tool in ("Page", "Runtime", "Log"):
            browser.page(f"{tool}.enable")
        seen = len(browser.events)
        # refresh=1: the page reloads itself every second; the second load below is its own doing
        browser.page("Page.navigate", {"url": f"{status_url}/status?refresh=1&token={TOKEN}"})
        browser.wait_event("Page.loadEventFired", seen)
        first = json.loads(browser.evaluate(DOM_FACTS))
        assert first["title"] == "optserve status"
        steps = dict(first["models"])
        assert "trained" in steps, first
        assert sorted(first["workers"]) == ["worker-0", "worker-1", "worker-2"], first

        for _ in range(5):  # training goes on between the two loads
            for w in workers:
                w.push(G)
        # The page's own reloads: one that began while the pushes went on may still show the old step,
        # so look at the reloads that follow (a bounded number of them) until one shows the new step
        # and its charts (steps/s and bytes/s: drawn once the server has sampled twice).
        second = first
        for _ in range(MAX_RELOADS):
            seen = len(browser.events)
            browser.wait_event("Page.loadEventFired", seen)
            second = json.loads(browser.evaluate(DOM_FACTS))
            if int(dict(second["models"])["trained"]) > int(steps["trained"]) and second["charts"] >= 2:
                break
        else:
            raise AssertionError(f"no reload of {MAX_RELOADS} showed a later step and the charts: {first}, {second}")
        assert sorted(second["workers"]) == sorted(first["workers"]), second

    shot = base64.b64decode(browser.page("Page.captureScreenshot", {"format": "png"})["data"])
    path = tmp_path / "status-page.png"
    path.write_bytes(shot)
    assert shot.startswith(b"\x89PNG") and path.stat().st_size > 1000
    assert browser.errors() == [], browser.errors()
