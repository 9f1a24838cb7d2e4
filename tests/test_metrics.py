"""Prometheus metrics move with pushes, pulls, rejections, waits and checkpoints; each server has its
own registry; logs: one structured line per rejected request and none per push."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optserve.client import FailedPreconditionError, InvalidArgumentError, NotFoundError, optim
from optserve.server import Server, logs

W = {"w": np.zeros(8, np.float32)}
G = {"w": np.ones(8, np.float32)}


@pytest.fixture(scope="module")
def msrv(tmp_path_factory):
    srv = Server(port=0, metrics_port=0, checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")))
    yield srv
    srv.stop(grace=1.0)


def scrape(srv: Server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the server's HTTP endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_after_pushes_and_pulls(msrv):
    with msrv.client(timeout=30) as c:
        m = c.create_model("metered", W, optim.sgd(0.1), max_staleness=1)
        before = scrape(msrv)
        assert value(before, "optserve_models") == 1
        m.push(G)
        m.push(G, base_step=1)
        m.push(G, base_step=1)  # one step behind: staleness 1
        m.pull()
        with pytest.raises(InvalidArgumentError):
            m.push({"w": np.ones(3, np.float32)})
        with pytest.raises(FailedPreconditionError):
            m.push(G, base_step=0)  # three behind, max_staleness 1
        with pytest.raises(NotFoundError):
            c.model("no-such-model")
        after = scrape(msrv)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("optserve_pushes_total", model="metered", outcome="applied") == 3
    assert delta("optserve_pushes_total", model="metered", outcome="invalid_argument") == 1
    assert delta("optserve_pushes_total", model="metered", outcome="failed_precondition") == 1
    assert delta("optserve_pulls_total", model="metered", outcome="ok") == 1
    assert delta("optserve_received_bytes_total", model="metered") == 3 * 32
    assert delta("optserve_sent_bytes_total", model="metered") > 32
    assert delta("optserve_apply_seconds_count", model="metered") == 3
    assert delta("optserve_push_staleness_steps_count", model="metered") == 2  # the two with a base_step
    assert delta("optserve_push_staleness_steps_sum", model="metered") == 1
    assert (
        delta("optserve_requests_rejected_total", rpc="PushOne", code="invalid_argument") == 1
    )  # small: the unary twin
    assert delta("optserve_requests_rejected_total", rpc="GetModel", code="not_found") == 1
    assert value(after, "optserve_model_step", model="metered") == 3
    assert value(after, "optserve_model_bytes", model="metered", kind="params") == 32
    assert value(after, "process_resident_memory_bytes") > 0
    # Requests naming models that do not exist never become labels.
    assert not [k for k in after if ("model", "no-such-model") in k[1]]


def test_sync_wait_and_checkpoint_series(msrv):
    with msrv.client(timeout=60) as c:
        # Sync, two workers: a's push-pull waits at the barrier for step 1 until b pushes. The test
        # pushes b only once a's gradient is in (pending_contributions), so a's call surely waits.
        m = c.create_model("waiter", W, optim.sgd(0.1), mode="sync", workers=2)
        before = scrape(msrv)
        a = m.worker("a")
        t = threading.Thread(target=lambda: a.push_pull(G))
        t.start()
        deadline = time.monotonic() + 60
        while m.info()["pending_contributions"] != 1:
            assert time.monotonic() < deadline, "a's gradient never arrived"
            time.sleep(0.01)
        m.push(G, base_step=0)
        t.join(60)
        assert not t.is_alive() and a.base_step == 1
        assert m.save() == 1
        after = scrape(msrv)
    assert (
        value(after, "optserve_sync_wait_seconds_count", model="waiter")
        - value(before, "optserve_sync_wait_seconds_count", model="waiter")
        == 1
    )
    assert value(after, "optserve_checkpoint_seconds_count", model="waiter") == 1
    assert value(after, "optserve_checkpoint_bytes_sum", model="waiter") > 32


def test_each_server_has_its_own_registry(msrv):
    with Server(port=0) as other:  # no metrics port: the registry still exists and counts
        with other.client(timeout=30) as c:
            c.create_model("elsewhere", W, optim.sgd(0.1)).push(G)
        assert (
            other.metrics.registry.get_sample_value(
                "optserve_pushes_total", {"model": "elsewhere", "outcome": "applied"}
            )
            == 1
        )
        assert other.metrics.port is None
    assert value(scrape(msrv), "optserve_pushes_total", model="elsewhere", outcome="applied") == 0


def test_logs_one_json_line_per_rejection_none_per_push(msrv, capsys):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(level=logging.INFO)
    root = logging.getLogger("optserve")
    old_level = root.level
    root.addHandler(keep)
    root.setLevel(logging.INFO)
    try:
        with msrv.client(timeout=30) as c:
            m = c.create_model("quiet", W, optim.sgd(0.1))
            records.clear()
            for _ in range(5):
                m.push(G)
                m.pull()
            assert [r.getMessage() for r in records] == []  # nothing per push or pull at INFO
            with pytest.raises(InvalidArgumentError):
                m.push({"w": np.ones((2, 2), np.float32)})
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)
    assert len(records) == 1
    line = json.loads(logs.JsonFormatter().format(records[0]))
    assert line["event"] == "rejected" and line["rpc"] == "PushOne" and line["model"] == "quiet"
    assert line["code"] == "INVALID_ARGUMENT" and "'w'" in line["message"] and line["level"] == "info"


def test_membership_gauges_follow_joins(msrv):
    with msrv.client(timeout=30) as c:
        m = c.create_model("members", W, optim.sgd(0.1), heartbeat=30.0)
        assert value(scrape(msrv), "optserve_membership_epoch", model="members") == 0
        with m.worker("a") as a, m.worker("b") as b:
            a.pull()
            b.push(G)
            samples = scrape(msrv)
        assert value(samples, "optserve_membership_epoch", model="members") == 2
        assert value(samples, "optserve_live_workers", model="members") == 2
        c.delete_model("members")


def test_the_log_handler_writes_to_the_stderr_of_the_moment(monkeypatch):
    """`optserve serve` run in process sets logging up under pytest's captured stderr, closed after
    that test: records of later tests' server threads went to the closed stream ('--- Logging
    error ---' on the next test's stderr)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        at_setup = io.StringIO()
        monkeypatch.setattr(sys, "stderr", at_setup)
        logs.setup("INFO")
        at_setup.close()
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        logging.getLogger("optserve.test").info("still heard")
        assert now.getvalue().endswith("INFO optserve.test: still heard\n")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
