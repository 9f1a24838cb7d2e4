"""bench/peers.py runs in its own environment (.venv-bench: ray, torch; `make bench-peers`), never in
`make test`; this only checks that the script's command line works without them, so that its
imports of ray, torch and the server stay inside the functions that need them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "peers.py")


def test_help_needs_neither_ray_nor_torch():
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{SCRIPT!r}, '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('ray', 'torch', 'jax', 'optserve.client') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--targets" in r.stdout and "--workers" in r.stdout and "make bench-peers" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_a_bad_flag_is_one_line_naming_it():
    r = subprocess.run([sys.executable, SCRIPT, "--targets", "ray,mpi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--targets" in r.stderr.splitlines()[-1] and "mpi" in r.stderr
