"""`optserve top`: a running server's status in the terminal, refreshed in place like `top`.

    optserve top [--url http://127.0.0.1:9480] [--token-file F] [--interval 2] [--model NAME] [--once]

It reads the server's status report (`/status.json`, status_page/report.py: the server needs
`--status-port`) and shows the page's headlines: the server (version, devices, uptime, memory), one
row per model (step, steps/s, pushes/s, pulls/s, bytes in and out per second, workers, checkpoint
and its age, errors) and the workers of one model (`--model`, else the first). `--once` prints one
frame and exits (scripts, pipes, tests). It needs no jax and no gRPC: an HTTP GET and rich.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from optserve.server.status_page.render import error_summary, human_bytes, human_seconds, rate

MAX_WORKER_ROWS = 20


class TopError(Exception):
    """The report could not be had (one line for the user)."""


def fetch(url: str, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    base = url.rstrip("/")
    if not base.endswith("/status.json"):
        base += "/status.json"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base, headers=headers), timeout=timeout) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        hint = "; give --token-file" if e.code == 401 else ""
        raise TopError(f"{base}: HTTP {e.code}: {e.read().decode(errors='replace').strip()}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TopError(f"{base}: cannot reach it ({reason}); is the server started with --status-port?") from None
    except json.JSONDecodeError as e:
        raise TopError(f"{base}: not a status report ({e})") from None


def frame(report: dict[str, Any], model: str | None = None) -> Group:
    """One screen: the server's line, the models' table, one model's workers."""
    s = report["server"]
    devices = ", ".join(f"{d['name']} {human_bytes(d['model_bytes'])}" for d in s["devices"])
    header = Text.assemble(
        ("optserve ", "bold"),
        f"{s['version']}  up {human_seconds(s['uptime_s'])}  {s['models']} models  "
        f"memory {human_bytes(s['process_rss_bytes'])}  devices: {devices}",
    )
    models = Table(title="models", title_justify="left", expand=False)
    for col in ("model", "mode", "step", "steps/s", "pushes/s", "pulls/s", "in/s", "out/s", "workers", "checkpoint"):
        models.add_column(col, justify="left" if col in ("model", "mode", "checkpoint") else "right")
    models.add_column("errors", justify="left")
    for m in report["models"]:
        r, c = m["rates"], m["checkpoint"]
        checkpoint = "-" if c is None or not c["step"] else f"step {c['step']}, {human_seconds(c['age_s'])} ago"
        count, errors = error_summary(m)
        models.add_row(
            m["name"],
            m["mode"],
            str(m["step"]),
            rate(r["steps_per_s"]),
            rate(r["pushes_per_s"]),
            rate(r["pulls_per_s"]),
            human_bytes(r["bytes_in_per_s"]),
            human_bytes(r["bytes_out_per_s"]),
            str(len(m["workers"])),
            checkpoint,
            Text(errors or "-", style="bold red" if count else ""),
        )
    parts: list[Any] = [header, models]
    chosen = next((m for m in report["models"] if model in (None, m["name"])), None)
    if chosen is not None:
        membership = chosen["membership"]
        epoch = f", membership epoch {membership.get('epoch')}" if membership else ""
        workers = Table(title=f"workers of {chosen['name']}{epoch}", title_justify="left")
        for col in ("worker", "live", "last push", "staleness", "pushes", "duplicates", "last seq"):
            workers.add_column(col, justify="left" if col in ("worker", "live") else "right")
        rows = sorted(chosen["workers"], key=lambda w: -(w["last_push_age_s"] or 0.0))
        for w in rows[:MAX_WORKER_ROWS]:
            live = "-" if w["live"] is None else ("live" if w["live"] else "expired")
            age = "-" if w["last_push_age_s"] is None else f"{human_seconds(w['last_push_age_s'])} ago"
            staleness = "-" if w["staleness"] is None else str(w["staleness"])
            workers.add_row(w["id"], live, age, staleness, str(w["pushes"]), str(w["duplicates"]), str(w["last_seq"]))
        if len(rows) > MAX_WORKER_ROWS:
            workers.caption = f"and {len(rows) - MAX_WORKER_ROWS} more"
        parts.append(workers)
    elif model is not None:
        parts.append(Text(f"no model {model!r} (or this token may not see it)", style="yellow"))
    return Group(*parts)


def _token(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as f:
        return next((line.split()[0] for line in f if line.strip() and not line.startswith("#")), None)


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """Exit status 0; 1 when the report cannot be had (one line on stderr)."""
    console = console or Console()
    token = _token(args.token_file)
    try:
        if args.once:
            console.print(frame(fetch(args.url, token), args.model))
            return 0
        with Live(frame(fetch(args.url, token), args.model), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(max(args.interval, 0.1))
                live.update(frame(fetch(args.url, token), args.model), refresh=True)
    except TopError as e:
        print(f"optserve top: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
