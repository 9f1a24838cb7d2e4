"""examples/torch_digits.py and examples/flax_digits.py train real models with the drop-ins, with
worker processes through one server, and reach the accuracy the README promises on a short budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "script, mode, extra",
    [("torch_digits.py", "sync", "torch"), ("flax_digits.py", "async", "flax")],
)
def test_example_trains_to_095_test_accuracy(script, mode, extra):
    pytest.importorskip(extra)
    out = _run(script, "--workers", "2", "--steps", "150", "--mode", mode, "--log-every", "50")
    progress = re.findall(
        r"^step +(\d+)/150 +server step +(\d+) +loss [0-9.]+ +batch acc [0-9.]+ +[0-9.]+ steps/s", out, re.M
    )
    assert [int(s) for s, _ in progress] == [50, 100, 150], out
    m = re.search(r"^done: test accuracy ([0-9.]+) after (\d+) server steps \(2 workers x 150\)", out, re.M)
    assert m, out
    # sync: one server step per round of both workers; async: one per push
    assert int(m.group(2)) == (150 if mode == "sync" else 300), out
    assert float(m.group(1)) >= 0.95, out
