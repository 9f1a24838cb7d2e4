"""The Node.js example (examples/node), which knows only the .proto, works against a live server,
run with the two commands its README gives."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

NODE_DIR = os.path.join(ROOT, "examples", "node")


def readme_commands() -> tuple[list[str], list[str]]:
    """The README's `npm ...` and `node client.js ...` commands (the last sh block), as argv lists."""
    with open(os.path.join(NODE_DIR, "README.md")) as f:
        blocks = re.findall(r"```sh\n(.*?)```", f.read(), re.S)
    assert blocks, "examples/node/README.md has no sh block"
    lines = [shlex.split(line.split("#", 1)[0]) for line in blocks[-1].splitlines() if line.strip()]
    assert [argv[0] for argv in lines] == ["npm", "node"], lines
    return lines[0], lines[1]


def test_readme_gives_the_two_commands():
    npm, node = readme_commands()
    assert npm == ["npm", "ci"]
    assert node[:2] == ["node", "client.js"] and re.fullmatch(r"[\w.-]+:\d+", node[2]), node


@pytest.fixture(scope="module")
def node_modules():
    # An environment-bound skip, reported by -ra: the example needs a Node.js toolchain, which the
    # Python package does not (the contract itself is covered by the Python tests).
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed on this machine")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@grpc", "grpc-js")):
        npm, _ = readme_commands()
        subprocess.run([*npm, "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300, capture_output=True)
    return NODE_DIR


def test_node_client_creates_pushes_and_pulls(server, client, node_modules):
    _, node = readme_commands()
    result = subprocess.run(
        [*node[:2], server.address, "from-node"], cwd=node_modules, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["push_step"] == 1
    # The Python client sees what the Node client did.
    model = client.model("from-node")
    assert model.info()["step"] == 1
    assert model.pull()["w"].tolist() == pytest.approx([0.9, 1.9, 2.9, 3.9])
