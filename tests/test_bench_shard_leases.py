"""bench/shard_leases.py keeps running: a tiny run prints its row (fixed against leases over two
shards). Its figures are not checked: a benchmark's timings belong in BENCHMARKS.md, never in an
assertion."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_tiny_run_prints_its_row():
    env = {k: v for k, v in os.environ.items() if k != "OPTSERVE_BENCH_PIN"}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "shard_leases.py"), "--floats", "100", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 100 |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("x |"), r.stdout
