"""The contract's generated modules are in sync with the .proto, and the client stays light."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import textwrap

import numpy as np

from optserve.client import optim
from tests.conftest import ROOT


def test_generated_modules_match_the_proto(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "proto", "generate.py"), "--out", str(tmp_path)], check=True)
    generated = tmp_path / "optserve" / "v1"
    committed = os.path.join(ROOT, "client", "optserve", "v1")
    names = sorted(p.name for p in generated.iterdir() if p.is_file())
    assert names == ["optserve_pb2.py", "optserve_pb2.pyi", "optserve_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated modules {mismatch + errors}: run `make proto`"


def test_client_works_where_jax_cannot_be_imported(server, client):
    client.create_model("light", {"w": np.zeros(3, np.float32)}, optim.sgd(1.0))
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "torch", "optax"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import jax
            raise SystemExit("jax imported despite the block")
        except ImportError:
            pass
        import numpy as np
        from optserve.client import Client
        with Client("{server.address}", timeout=30) as c:
            m = c.model("light")
            step = m.push({{"w": np.ones(3, np.float32)}})
            out = m.pull()
        assert step == 1 and out["w"].tolist() == [-1.0, -1.0, -1.0], (step, out)
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("jax", "torch", "optax"))
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_client_package_imports_neither_jax_nor_the_server():
    """`import optserve.client` loads the client, the wire and the generated modules only."""
    code = (
        "import sys, optserve.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'jaxlib', 'optax', 'torch') or m.startswith('optserve.server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_server_package_imports_lazily():
    """The CLI's --help and the demo's workers must not pay for importing jax."""
    code = "import sys, optserve.server, optserve.server.cli; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_license_is_an_spdx_string_that_the_build_backend_supports():
    """A license table makes setuptools >= 77 warn (twice) at every install; a string needs >= 77."""
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert pyproject["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, setuptools
