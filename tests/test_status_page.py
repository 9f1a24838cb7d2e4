"""The status page without a browser: /status.json's report, the HTML, tokens, the shared metrics port,
checkpoint age, the bounded history and worker tallies (the browser test is test_status_browser.py)."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from optserve.client import optim
from optserve.server import Server
from optserve.server.api.auth import Token
from optserve.server.core.worker_activity import WorkerActivity
from optserve.server.status_page import render
from optserve.server.status_page.history import History

W = {"w": np.zeros(4, np.float32)}
G = {"w": np.ones(4, np.float32)}
TOKENS = [Token(b"admin-secret", None), Token(b"team-a-secret", frozenset({"alpha"}))]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(port=0, status_port=0, tokens=TOKENS, checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")))
    with s.client(token="admin-secret", timeout=60) as c:
        # a fixed membership: the report's epoch and live workers below hold however long the module runs
        alpha = c.create_model("alpha", W, optim.sgd(0.1), heartbeat=0)
        c.create_model("beta", W, optim.adam(1e-3), mode="sync", workers=2)
        w1, w2 = alpha.worker("w-1"), alpha.worker("<w-2>")  # an id that must be escaped in HTML
        s.status.history.chart_every = 1  # a chart point per sample: the two below make one
        s.status.history.sample()
        for _ in range(3):
            w1.push(G)
        w2.push(G)
        alpha.pull()
        s.status.history.sample()
    yield s
    s.stop(grace=1.0)


def get(srv: Server, path: str, token: str | None = "admin-secret", header: bool = True) -> tuple[int, dict, bytes]:
    url = f"http://127.0.0.1:{srv.status_port}{path}"
    headers = {}
    if token is not None and header:
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        url += ("&" if "?" in url else "?") + f"token={token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def report(srv: Server, **kw) -> dict:
    code, headers, body = get(srv, "/status.json", **kw)
    assert code == 200, body
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


def test_the_json_reports_the_server_models_and_workers(srv):
    r = report(srv)
    assert r["report_version"] == 1
    s = r["server"]
    assert s["version"] and s["uptime_s"] >= 0 and s["models"] == 2 and s["devices"][0]["name"] == "cpu:0"
    assert s["process_rss_bytes"] > 0
    alpha, beta = r["models"]
    assert (alpha["name"], beta["name"]) == ("alpha", "beta")
    assert alpha["step"] == 4 and alpha["pushes"] == 4 and alpha["counters"]["pulls"] == 1
    assert alpha["spec"] == {"sgd": {"learning_rate": 0.1}} and beta["settings"]["workers"] == 2
    # two joins (w-1's first push, <w-2>'s); alpha.pull() names no worker
    assert alpha["membership"] == {"epoch": 2, "live": {"w-1": True, "<w-2>": True}}
    workers = {w["id"]: w for w in alpha["workers"]}
    assert set(workers) == {"w-1", "<w-2>"}
    assert workers["w-1"]["pushes"] == 3 and workers["w-1"]["last_seq"] == 3 and workers["w-1"]["duplicates"] == 0
    assert workers["w-1"]["last_push_age_s"] >= 0 and workers["w-1"]["live"] is True
    # samples were taken before and after the pushes (and maybe by the sampler's thread between them)
    points = alpha["history"]
    assert any(x > 0 for x in points["steps_per_s"]) and any(x > 0 for x in points["bytes_in_per_s"])
    assert alpha["checkpoint"] is not None and alpha["shard"] is None
    assert alpha["errors"]["rejected_pushes"] == {}


def test_a_retried_push_counts_as_a_duplicate_of_its_worker(srv):
    with srv.client(token="admin-secret", timeout=60) as c:
        m = c.model("beta")
        m.worker("dup", session=5).push(G)
        # a second Worker of that id and session sends seq 1 again: answered from the round (a Worker
        # of another session would be a restarted process, whose seq 1 is a new push)
        m.worker("dup", session=5).push(G)
    workers = {w["id"]: w for w in report(srv)["models"][1]["workers"]}
    assert workers["dup"]["pushes"] == 2 and workers["dup"]["duplicates"] == 1


def test_the_page_shows_every_model_its_step_charts_and_workers(srv):
    code, headers, body = get(srv, "/status")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert re.fullmatch(r"report;dur=[0-9.]+, render;dur=[0-9.]+", headers["Server-Timing"]), headers
    text = body.decode()
    assert '<meta http-equiv="refresh" content="5">' in text
    row = re.search(r'<tr class="model" data-model="alpha">.*?<td class=step>(\d+)</td>', text)
    assert row and int(row.group(1)) == 4, text[:2000]
    assert 'data-model="beta"' in text
    assert '<table class="workers" data-model="alpha">' in text
    assert 'data-worker="&lt;w-2&gt;"' in text and "<w-2>" not in text  # escaped, never markup
    assert "<svg" in text and "<polyline" in text  # the charts of steps/s and bytes/s
    assert "<script" not in text  # rendered on the server: nothing for the browser to run
    assert "membership epoch 2" in text


def test_refresh_and_the_root_redirect(srv):
    assert "http-equiv" not in get(srv, "/status?refresh=0")[2].decode()
    assert 'content="30"' in get(srv, "/status?refresh=30")[2].decode()
    with socket.create_connection(("127.0.0.1", srv.status_port), timeout=30) as s:
        s.sendall(b"GET /?refresh=9 HTTP/1.0\r\nAuthorization: Bearer admin-secret\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.0 302") and "Location: /status?refresh=9" in reply
    assert get(srv, "/nothing-here")[0] == 404


@pytest.mark.parametrize("path", ["/status", "/status.json"])
def test_tokens_apply_as_to_the_rpcs(srv, path):
    code, headers, body = get(srv, path, token=None)
    assert code == 401 and b"missing bearer token" in body and headers["WWW-Authenticate"].startswith("Bearer")
    code, _, body = get(srv, path, token="wrong")
    assert code == 401 and b"invalid bearer token" in body
    code, _, body = get(srv, path, token="team-a-secret", header=False)  # ?token= for a browser
    assert code == 200 and b"alpha" in body and b"beta" not in body


def test_a_scoped_token_sees_only_its_models(srv):
    r = report(srv, token="team-a-secret")
    assert [m["name"] for m in r["models"]] == ["alpha"] and r["server"]["models"] == 1
    text = get(srv, "/status", token="team-a-secret", header=False)[2].decode()
    assert 'href="/status.json?token=team-a-secret"' in text  # its link keeps the token it came with


def test_the_checkpoint_and_its_age(srv):
    with srv.client(token="admin-secret", timeout=60) as c:
        step = c.model("alpha").save()
    checkpoint = report(srv)["models"][0]["checkpoint"]
    assert checkpoint["step"] == step and checkpoint["age_s"] >= 0 and checkpoint["error"] == ""
    samples = {(s.name, tuple(s.labels.items())): s.value for f in srv.metrics.registry.collect() for s in f.samples}
    assert samples[("optserve_last_checkpoint_step", (("model", "alpha"),))] == step
    assert samples[("optserve_last_checkpoint_timestamp_seconds", (("model", "alpha"),))] == checkpoint["unix"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_and_metrics_share_one_port():
    port = free_port()
    with Server(port=0, metrics_port=port, status_port=port) as s:
        assert s.status_port == s.metrics.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            assert b"optserve_models" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=30) as r:
            assert json.loads(r.read())["models"] == []


def test_a_sharded_model_shows_its_shard_map():
    shard = {"index": 1, "shards": 2, "model_id": "abc", "version": 1, "split_leaves": 1}
    shard["map"] = [
        {"index": 0, "target": "host0:8470", "leaves": 3, "bytes": 4096},
        {"index": 1, "target": "host1:8470", "leaves": 2, "bytes": 2048},
    ]
    model = {
        "name": "m",
        "step": 1,
        "mode": "async",
        "rates": dict.fromkeys(("steps_per_s", "pushes_per_s", "pulls_per_s", "bytes_in_per_s", "bytes_out_per_s"), 0),
        "pushes": 0,
        "counters": dict.fromkeys(("pushes_applied", "pulls", "bytes_in", "bytes_out", "duplicates"), 0),
        "pending_contributions": 0,
        "param_bytes": 1,
        "state_bytes": 1,
        "leaves": 1,
        "spec": {},
        "settings": {},
        "checkpoint": None,
        "errors": {
            "stale_rejected": 0,
            "nonfinite_rejected": 0,
            "sync_timeouts": 0,
            "rejected_pushes": {},
            "rejected_pulls": {"not_found": 2},
            "checkpoint_error": "disk full",
        },
        "membership": {"epoch": 7, "live": {"a": True}},
        "workers": [
            {
                "id": "a",
                "live": True,
                "last_seq": 1,
                "last_base_step": 0,
                "pushes": 1,
                "duplicates": 0,
                "last_push_age_s": 1.0,
                "staleness": 0,
            }
        ],
        "shard": shard,
        "history": {"interval_s": 5.0, "steps_per_s": [], "bytes_in_per_s": [], "bytes_out_per_s": []},
    }
    server = {
        "version": "v",
        "incarnation": "i",
        "uptime_s": 1.0,
        "now_unix": 0.0,
        "models": 1,
        "model_bytes": 2,
        "process_rss_bytes": None,
        "devices": [],
    }
    text = render.page({"server": server, "models": [model]}, refresh=0, json_href="/status.json")
    assert '<table class="shard-map">' in text and "host1:8470 (this server)" in text
    assert "membership epoch 7" in text and '<span class="ok">live</span>' in text
    assert "pull not_found 2" in text and "last save failed: disk full" in text


def test_the_history_is_bounded_and_rates_never_go_negative(srv):
    model = srv.store.get("alpha")
    history = History(lambda: [model], interval=1.0, chart_every=2, chart_points=3)
    for t in range(20):
        history.sample(now=float(t))
    series = history.series(model)
    assert len(series) == 3 and history.point_seconds == 2.0  # the newest 3 points kept, of 2 samples each
    assert all(p.steps == 0 and p.bytes_in == 0 for p in series)


def test_worker_tallies_are_bounded():
    activity = WorkerActivity(max_workers=3)
    for i in range(5):
        activity.pushed(f"w{i}", duplicate=False, staleness=0, now=float(i))
    activity.pushed("", duplicate=False, staleness=None)  # anonymous: only the total
    assert sorted(activity.workers()) == ["w2", "w3", "w4"] and activity.total_pushes() == 6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "8471", "--status-port", "8471"], "--status-port 8471: the same as --port"),
        (
            ["--metrics-port", "9481", "--status-port", "9481", "--status-host", "0.0.0.0"],
            "--status-host 0.0.0.0: the status page shares --metrics-port 9481",
        ),
    ],
)
def test_status_flags_that_cannot_work_are_one_line(flags, message, capsys):
    from optserve.server import cli

    assert cli.main(["serve", "--checkpoint-dir", "", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_shard_reports_the_shard_map():
    """A model over two servers: each shard's report has the map (leaves and bytes per shard)."""
    from optserve.client import Client

    with Server(port=0, status_port=0) as first, Server(port=0) as second:
        params = {"big": np.zeros((64, 8), np.float32), "a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}
        with Client([first.address, second.address], timeout=60) as c:
            c.create_model("split", params, optim.sgd(0.1), split_bytes=1024)
        with urllib.request.urlopen(f"http://127.0.0.1:{first.status_port}/status.json", timeout=30) as r:
            (model,) = json.loads(r.read())["models"]
        shard = model["shard"]
        assert shard["index"] == 0 and shard["shards"] == 2 and shard["split_leaves"] == 1, shard
        assert [p["target"] for p in shard["map"]] == [first.address, second.address]
        assert sum(p["bytes"] for p in shard["map"]) == 64 * 8 * 4 + 4 * 4 + 3 * 4, shard
        with urllib.request.urlopen(f"http://127.0.0.1:{first.status_port}/status", timeout=30) as r:
            assert '<table class="shard-map">' in r.read().decode()


def test_membership_shows_live_and_expired_workers(srv, monkeypatch):
    """The report and the page show the membership epoch and each worker's live/expired
    (Model.membership_info; a worker that is no member any more is expired)."""
    model = srv.store.get("alpha")
    monkeypatch.setattr(model, "membership_info", lambda: (3, [("w-1", None, 1.0)]))
    alpha = report(srv)["models"][0]
    assert alpha["membership"] == {"epoch": 3, "live": {"w-1": True}}
    assert {w["id"]: w["live"] for w in alpha["workers"]} == {"w-1": True, "<w-2>": False}
    text = get(srv, "/status")[2].decode()
    assert "membership epoch 3" in text and '<span class="bad">expired</span>' in text
