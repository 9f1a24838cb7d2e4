"""bench/shards.py keeps running: a tiny run (1k parameters, 1 and 2 shards, 2 worker processes)
prints a row for each shard count and the fan-out table. Its figures are not checked: a benchmark's
timings belong in BENCHMARKS.md, never in an assertion."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_tiny_run_prints_every_shard_count_and_the_fanout_row():
    env = {k: v for k, v in os.environ.items() if k != "OPTSERVE_BENCH_PIN"}
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "shards.py"),
            *("--params", "1k", "--shards", "1,2", "--workers", "2", "--rounds", "2", "--warmup", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 1k (")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"], r.stdout
    assert any(line.startswith("| 1k |") for line in r.stdout.splitlines()), r.stdout  # the fan-out row
