"""The status page: the report (status_page/report.py) as one HTML document, rendered here.

No JavaScript, no build step, no external resource: CSS and the charts (inline SVG polylines) are in
the page, and it reloads itself with `<meta http-equiv="refresh">`, so any browser (or `curl`) shows
it as is. Every value from a model (names, worker ids, specs, error text) is escaped.

The DOM is stable for tests and scrapers: each model is a `tr.model[data-model]` in the summary
table, with `td.step`; its details are `section.model-detail[data-model]` holding `table.workers`
(a `tr.worker[data-worker]` per worker) and, for a shard, `table.shard-map`.
"""

from __future__ import annotations

import functools
import html
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

NONE = "-"  # no value
MAX_WORKER_ROWS = 200  # per model on the page; the JSON has them all
CHART_WIDTH, CHART_HEIGHT = 320, 56

STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#1d2430;background:#fafbfc}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}h3{font-size:13px;margin:10px 0 4px}
table{border-collapse:collapse;margin:4px 0 10px;background:#fff}
th,td{border:1px solid #d8dde4;padding:2px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f5}td.name,th.name,td.text{text-align:left}
.muted{color:#6b7480}.bad{color:#b3261e;font-weight:600}.ok{color:#1e7d32}
section.model-detail{border-top:2px solid #d8dde4;margin-top:14px}
.charts{display:flex;gap:16px;flex-wrap:wrap}.chart{font-size:11px}
svg{background:#fff;border:1px solid #d8dde4}
pre{background:#fff;border:1px solid #d8dde4;padding:6px;max-width:900px;overflow:auto;white-space:pre-wrap}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def human_bytes(n: float | None) -> str:
    if n is None:
        return NONE
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return NONE
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


@functools.lru_cache(maxsize=64)
def _x_prefixes(n: int) -> list[str]:
    """'x,' of each of n points spread over the chart's width."""
    step = CHART_WIDTH / (n - 1)
    return [f"{round(i * step)}," for i in range(n)]


def chart(title: str, series: Sequence[tuple[str, str, Sequence[float]]], unit: str = "") -> str:
    """An inline SVG line chart; series: (label, colour, values), oldest first, on one scale from 0."""
    values = [v for _, _, vs in series for v in vs]
    top = max(values, default=0.0) or 1.0
    lines = []
    scale = (CHART_HEIGHT - 4) / top
    for _, colour, vs in series:
        if not vs:
            continue
        if len(vs) == 1:  # one interval so far: a flat line across
            vs = [vs[0], vs[0]]
        # whole pixels, joined from cached x prefixes: a page of 100 models draws 300 lines quickly
        ys = map(str, (CHART_HEIGHT - 2 - round(v * scale) for v in vs))
        points = " ".join(map(str.__add__, _x_prefixes(len(vs)), ys))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
    legend = " ".join(f'<span style="color:{c}">&#9632; {esc(label)}</span>' for label, c, _ in series)
    peak = human_bytes(top) + "/s" if unit == "bytes" else f"{rate(top)}/s"
    return (
        f'<div class="chart"><div>{esc(title)} <span class="muted">(peak {peak})</span> {legend}</div>'
        f'<svg width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'role="img" aria-label="{esc(title)}">{"".join(lines)}</svg></div>'
    )


def error_summary(m: dict[str, Any]) -> tuple[int, str]:
    """(how many, what) of a model's errors, for the summary's cell."""
    e = m["errors"]
    parts = {
        "stale": e["stale_rejected"],
        "non-finite": e["nonfinite_rejected"],
        "sync timeouts": e["sync_timeouts"],
        **{f"push {k}": v for k, v in e["rejected_pushes"].items() if k != "failed_precondition"},
        **{f"pull {k}": v for k, v in e["rejected_pulls"].items()},
    }
    total = sum(parts.values()) + bool(e["checkpoint_error"])
    text = ", ".join(f"{k} {v}" for k, v in parts.items() if v)
    if e["checkpoint_error"]:
        text = ", ".join(x for x in (text, "checkpoint failing") if x)
    return total, text


def _checkpoint(m: dict[str, Any]) -> str:
    c = m["checkpoint"]
    if c is None:
        return '<span class="muted">no checkpoint dir</span>'
    if not c["step"]:
        return '<span class="muted">none yet</span>'
    return f"step {c['step']}, {human_seconds(c['age_s'])} ago"


def _summary(models: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th class=name>model</th><th>mode</th><th>step</th><th>steps/s</th><th>pushes/s</th>"
        "<th>pulls/s</th><th>in/s</th><th>out/s</th><th>workers</th><th>bytes</th><th>checkpoint</th>"
        "<th class=name>errors</th></tr>"
    )
    rows = []
    for m in models:
        r = m["rates"]
        count, text = error_summary(m)
        rows.append(
            f'<tr class="model" data-model="{esc(m["name"])}"><td class=name><a href="#model-{quote(m["name"])}">'
            f"{esc(m['name'])}</a></td><td>{esc(m['mode'])}</td><td class=step>{m['step']}</td>"
            f"<td>{rate(r['steps_per_s'])}</td><td>{rate(r['pushes_per_s'])}</td><td>{rate(r['pulls_per_s'])}</td>"
            f"<td>{human_bytes(r['bytes_in_per_s'])}/s</td><td>{human_bytes(r['bytes_out_per_s'])}/s</td>"
            f"<td>{len(m['workers'])}</td><td>{human_bytes(m['param_bytes'] + m['state_bytes'])}</td>"
            f'<td>{_checkpoint(m)}</td><td class="text{" bad" if count else ""}">{esc(text) or NONE}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td class="text muted" colspan=12>no models (or none this token may see)</td></tr>')
    return f'<table class="models">{head}{"".join(rows)}</table>'


def _workers(m: dict[str, Any]) -> str:
    workers = sorted(m["workers"], key=lambda w: -(w["last_push_age_s"] or 0.0))  # the quietest first
    membership = m["membership"]
    lease = (
        f"membership epoch {esc(membership.get('epoch'))}"
        if membership
        else "leases: not tracked by this server (issue 18, scope 1)"
    )
    head = (
        "<tr><th class=name>worker</th><th>live</th><th>last push</th><th>staleness</th><th>pushes</th>"
        "<th>duplicates</th><th>last seq</th><th>last base step</th></tr>"
    )
    rows = []
    for w in workers[:MAX_WORKER_ROWS]:
        live = (
            NONE
            if w["live"] is None
            else ('<span class="ok">live</span>' if w["live"] else '<span class="bad">expired</span>')
        )
        staleness = NONE if w["staleness"] is None else w["staleness"]
        age = NONE if w["last_push_age_s"] is None else f"{human_seconds(w['last_push_age_s'])} ago"
        rows.append(
            f'<tr class="worker" data-worker="{esc(w["id"])}"><td class=name>{esc(w["id"])}</td><td>{live}</td>'
            f"<td>{age}</td><td>{staleness}</td><td>{w['pushes']}</td><td>{w['duplicates']}</td>"
            f"<td>{w['last_seq']}</td><td>{w['last_base_step']}</td></tr>"
        )
    more = len(workers) - MAX_WORKER_ROWS
    if more > 0:
        rows.append(f'<tr><td class="text muted" colspan=8>and {more} more (all of them: status.json)</td></tr>')
    if not rows:
        rows.append('<tr><td class="text muted" colspan=8>no worker has pushed with a worker id</td></tr>')
    return (
        f'<h3>workers <span class="muted">({len(workers)}; {lease})</span></h3>'
        f'<table class="workers" data-model="{esc(m["name"])}">{head}{"".join(rows)}</table>'
    )


def _shard(m: dict[str, Any]) -> str:
    s = m["shard"]
    if s is None:
        return ""
    rows = "".join(
        f"<tr{' class=this-shard' if p['index'] == s['index'] else ''}><td>{p['index']}</td>"
        f"<td class=name>{esc(p['target'])}{' (this server)' if p['index'] == s['index'] else ''}</td>"
        f"<td>{p['leaves']}</td><td>{human_bytes(p['bytes'])}</td></tr>"
        for p in s["map"]
    )
    return (
        f"<h3>shard map <span class=muted>(shard {s['index']} of {s['shards']}, map {esc(s['model_id'])} "
        f"v{s['version']}, {s['split_leaves']} leaves split by rows)</span></h3>"
        f'<table class="shard-map"><tr><th>shard</th><th class=name>target</th><th>leaves</th><th>bytes</th></tr>'
        f"{rows}</table>"
    )


def _detail(m: dict[str, Any]) -> str:
    h = m["history"]
    charts = (
        chart("steps/s", [("steps", "#2456c4", h["steps_per_s"])])
        + chart("bytes/s", [("in", "#c4561f", h["bytes_in_per_s"]), ("out", "#1e7d32", h["bytes_out_per_s"])], "bytes")
        if h["steps_per_s"]
        else '<p class="muted">charts appear once the server has sampled the model for a few seconds</p>'
    )
    span = human_seconds(len(h["steps_per_s"]) * h["interval_s"])
    settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items() if v not in (None, 0, 0.0, "none", False))
    c = m["counters"]
    _, errors = error_summary(m)
    checkpoint_error = m["errors"]["checkpoint_error"]
    return (
        f'<section class="model-detail" id="model-{esc(quote(m["name"]))}" data-model="{esc(m["name"])}">'
        f"<h2>{esc(m['name'])} <span class=muted>step {m['step']}, {esc(m['mode'])}, {m['leaves']} leaves, "
        f"{human_bytes(m['param_bytes'])} params + {human_bytes(m['state_bytes'])} state</span></h2>"
        f'<div class="charts">{charts}</div><div class="muted">the last {span}</div>'
        f"<div>settings: {esc(settings) or 'defaults'}; pending contributions {m['pending_contributions']}</div>"
        f"<div>totals: {m['pushes']} pushes, {c['pushes_applied']} updates, {c['pulls']} pulls, "
        f"{human_bytes(c['bytes_in'])} in, {human_bytes(c['bytes_out'])} out, {c['duplicates']} duplicates</div>"
        f"<div>checkpoint: {_checkpoint(m)}"
        + (f' <span class="bad">last save failed: {esc(checkpoint_error)}</span>' if checkpoint_error else "")
        + f"</div><div>errors: {esc(errors) or 'none'}</div>"
        f"<details><summary>optimizer spec</summary><pre>{esc(json.dumps(m['spec'], indent=1))}</pre></details>"
        f"{_workers(m)}{_shard(m)}</section>"
    )


def page(report: dict[str, Any], *, refresh: int, json_href: str) -> str:
    """The whole document; refresh: seconds between reloads (0: none); json_href: the JSON's link."""
    s = report["server"]
    devices = "; ".join(
        f"{esc(d['name'])} ({esc(d['kind'])}): {human_bytes(d['model_bytes'])} of models"
        + (f", {human_bytes(d['in_use_bytes'])} in use" if d["in_use_bytes"] is not None else "")
        + (f" of {human_bytes(d['limit_bytes'])}" if d["limit_bytes"] is not None else "")
        for d in s["devices"]
    )
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    reloads = f"reloads every {refresh} s" if refresh else "does not reload (?refresh=S to)"
    models = report["models"]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["now_unix"]))
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'{meta}<link rel="icon" href="data:,"><title>optserve status</title><style>{STYLE}</style></head><body>'
        f'<h1>optserve <span class="muted">{esc(s["version"])}</span></h1>'
        f'<div class="server">up {human_seconds(s["uptime_s"])}, incarnation {esc(s["incarnation"][:12])}, '
        f"{s['models']} models, {human_bytes(s['model_bytes'])} of models, process memory "
        f"{human_bytes(s['process_rss_bytes'])}</div><div>devices: {devices}</div>"
        f'<div class="muted">{when}; {reloads}; <a href="{esc(json_href)}">status.json</a></div>'
        f"<h2>models</h2>{_summary(models)}{''.join(_detail(m) for m in models)}</body></html>"
    )
