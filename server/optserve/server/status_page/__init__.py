"""The status page (`--status-port`): a live view of a server for people, and its JSON.

    history.py   rates and the last minutes of each model, sampled once a second (bounded)
    report.py    the report: one JSON-ready dict built from what the server keeps
    render.py    the report as one HTML page (inline SVG charts, no JavaScript)
    endpoint.py  the HTTP listener: /status, /status.json, tokens; the metrics when they share its port
    page.py      `StatusPage`: the history and the listener of one `Server` (server.py)

This package's `__init__` imports nothing, so that `optserve top` (top.py), which reads the JSON over
HTTP, can use render.py's formatting without loading jax.
"""
