"""The Node.js example (examples/node), which knows only the .proto, works against a live server."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

NODE_DIR = os.path.join(ROOT, "examples", "node")


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed on this machine")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@grpc", "grpc-js")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300,
                       capture_output=True)  # fmt: skip
    return NODE_DIR


def test_node_client_creates_pushes_and_pulls(server, client, node_modules):
    result = subprocess.run(
        ["node", "client.js", server.address, "from-node"], cwd=node_modules, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["push_step"] == 1
    # The Python client sees what the Node client did.
    model = client.model("from-node")
    assert model.info()["step"] == 1
    assert model.pull()["w"].tolist() == pytest.approx([0.9, 1.9, 2.9, 3.9])
