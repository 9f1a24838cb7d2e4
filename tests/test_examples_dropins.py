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
    # the example stops its workers after --timeout seconds and says so: its output then shows where
    # they were (the suite shares 2 cores, and a loaded machine makes this take minutes)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args, "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=290,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# torch in sync mode (deterministic: each step the mean of both workers' gradients), flax in async
@pytest.mark.parametrize("script, mode", [("torch_digits.py", "sync"), ("flax_digits.py", "async")])
def test_example_trains_to_095_test_accuracy(script, mode):
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
