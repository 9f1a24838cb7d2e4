"""The suite cannot silently skip its own tests: a missing part is an error, never a skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

TESTS = os.path.join(ROOT, "tests")
# Skips that depend on the machine, not on the code under test (each says why where it skips).
ALLOWED_SKIPS = {
    "test_node_example.py": 1,  # no Node.js toolchain: the example cannot run
    "test_shared_memory.py": 1,  # not root: no peer of another uid can be started to be refused
    "test_status_browser.py": 1,  # no chromium on PATH (.ci/run installs it where it can)
}


def test_conformance_fails_when_the_server_cannot_be_imported():
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "optserve.server" or name.startswith("optserve.server."):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import pytest
        sys.exit(pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider",
                              {os.path.join(TESTS, "test_conformance.py")!r}]))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    # a collection error interrupts the session (a skipped module would give NO_TESTS_COLLECTED)
    assert r.returncode == pytest.ExitCode.INTERRUPTED, r.stdout + r.stderr
    assert "skipped" not in r.stdout and "blocked in this test" in r.stdout, r.stdout


def test_no_module_skips_itself_or_skips_on_a_missing_import():
    found = {}
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py") and name != os.path.basename(__file__):
            with open(os.path.join(TESTS, name)) as f:
                n = len(re.findall(r"pytest\.skip\(|importorskip|mark\.skip|skipif|allow_module_level", f.read()))
            if n:
                found[name] = n
    assert found == ALLOWED_SKIPS
