"""A shortened `optserve demo` runs end to end and learns (accuracy well above the 10% of chance)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_short_demo_learns():
    result = subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "demo", "--workers", "2", "--steps", "60", "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(r"done: test accuracy ([0-9.]+) after (\d+) steps", result.stdout)
    assert m, result.stdout
    assert float(m.group(1)) > 0.5 and int(m.group(2)) > 0, result.stdout
    assert "MB moved" in result.stdout and "steps/s" in result.stdout
