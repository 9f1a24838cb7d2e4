"""deploy/grafana-dashboard.json loads as is and uses only metrics the server exports: every metric name
in its queries is a series of a live server's registry (a renamed metric fails here, not on a
dashboard nobody looks at until the night it is needed)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from optserve.client import optim
from optserve.server import Server

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "grafana-dashboard.json"
)
# Grafana's own variables, and PromQL's words that may be followed by "(" but are not metrics
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")  # a metric with a label matcher
PREFIXED = re.compile(r"\b((?:optserve|process)_[a-zA-Z0-9_]*)")  # every name of ours, matcher or not


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def exported_series(tmp_path) -> set[str]:
    """The sample names a server's registry can produce: each family's samples by its type (a labelled
    family without children yet still has a type, so nothing depends on what happened to be counted)."""
    with Server(port=0, checkpoint_dir=str(tmp_path)) as srv, srv.client(timeout=60) as c:
        m = c.create_model("dash", {"w": np.zeros(4, np.float32)}, optim.sgd(0.1))
        m.push({"w": np.ones(4, np.float32)})
        m.pull()
        m.save()
        names = set()
        for family in srv.metrics.registry.collect():
            names |= {s.name for s in family.samples}
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", ""),
            }.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
        return names


def test_every_metric_the_dashboard_queries_is_exported(dashboard, tmp_path):
    exported = exported_series(tmp_path)
    used = set()
    for expr in queries(dashboard):
        used |= set(SELECTOR.findall(expr)) | set(PREFIXED.findall(expr))
    assert used, "no metric found in the dashboard's queries: the check would pass vacuously"
    for wanted in ("optserve_model_step", "optserve_apply_seconds_bucket", "optserve_received_bytes_total",
                   "optserve_push_staleness_steps_bucket", "optserve_last_checkpoint_timestamp_seconds",
                   "optserve_requests_rejected_total"):  # fmt: skip
        assert wanted in used, f"the dashboard has no panel on {wanted} (issue 18: steps/s, latency, bytes, ...)"
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics the server does not export: {unknown}"


def test_the_dashboard_loads_as_is(dashboard):
    """No import-time placeholders (${DS_...} of an exported dashboard): the data source is a variable
    of its own, every panel and query names it, and every $variable a query uses is defined."""
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["refId"], panel["title"]
    for expr in queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in variables or name in GRAFANA_BUILTINS, f"{expr}: ${name} is not a variable"
