"""`optserve health | ls | info | save | restore | delete | rules` against a live `optserve serve` subprocess
that requires a token and TLS (and serves metrics on --metrics-port 0)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from optserve.client import Client, optim
from tests.conftest import stop_server_process
from tests.test_security import pki  # noqa: F401 - the CA and certificates made for the TLS tests


@pytest.fixture(scope="module")
def live(tmp_path_factory, pki):  # noqa: F811 - the fixture imported above
    d = tmp_path_factory.mktemp("admin")
    tokens = d / "tokens"
    tokens.write_text("# the admin token\nadmin-token\n")
    cmd = [
        sys.executable,
        "-m",
        "optserve.server.cli",
        "serve",
        "--port",
        "0",
        "--checkpoint-dir",
        str(d / "ckpt"),
        "--token-file",
        str(tokens),
        "--tls-cert",
        pki["server_cert"],
        "--tls-key",
        pki["server_key"],
        "--metrics-port",
        "0",
        "--shutdown-grace",
        "2",
    ]
    with open(d / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    found: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while "listening" not in found and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {(d / 'server.log').read_text()}")
        m = re.match(r"optserve (listening|metrics) on (\S+:\d+)", line)
        if m:
            found[m.group(1)] = m.group(2)
    assert set(found) == {"listening", "metrics"}
    yield {"target": found["listening"], "metrics": found["metrics"], "tokens": str(tokens), "ca": pki["ca"]}
    rc, err = stop_server_process(proc)
    assert rc == 0, err[-3000:]


def optserve(live, *args: str, auth: bool = True) -> subprocess.CompletedProcess:
    conn = ["--target", live["target"], "--tls-ca", live["ca"]] + (["--token-file", live["tokens"]] if auth else [])
    return subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", *args, *conn], capture_output=True, text=True, timeout=60
    )


def test_admin_commands_against_a_live_server(live):
    with Client(live["target"], token="admin-token", tls=live["ca"], timeout=30) as c:
        m = c.create_model("admin-m", {"w": np.zeros(4, np.float32)}, optim.sgd(0.5))
        m.push({"w": np.ones(4, np.float32)})
        m.push({"w": np.ones(4, np.float32)})

        r = optserve(live, "health", auth=False)  # what the container HEALTHCHECK runs; needs no token
        assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr

        r = optserve(live, "ls")
        assert r.returncode == 0, r.stderr
        assert re.search(r"^admin-m\s+step 2\s+async\s+1 leaves, 16 bytes$", r.stdout, re.M), r.stdout

        r = optserve(live, "info", "admin-m")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["step"] == 2 and info["spec"] == {"sgd": {"learning_rate": 0.5}}

        r = optserve(live, "save", "admin-m")
        assert (r.returncode, r.stdout.strip()) == (0, "saved admin-m at step 2"), r.stderr
        m.push({"w": np.ones(4, np.float32)})
        assert m.step == 3
        r = optserve(live, "restore", "admin-m", "--step", "2")
        assert (r.returncode, r.stdout.strip()) == (0, "restored admin-m to step 2"), r.stderr
        np.testing.assert_allclose(m.pull()["w"], np.full(4, -1.0, np.float32))

        r = optserve(live, "rules", "--json")
        assert r.returncode == 0, r.stderr
        assert {"adam", "sgd"} <= {rule["name"] for rule in json.loads(r.stdout)}

        # Without the token: a clear error and a non-zero exit; the model is untouched.
        r = optserve(live, "delete", "admin-m", auth=False)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = optserve(live, "info", "no-such-model")
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "no-such-model" in r.stderr

        r = optserve(live, "delete", "admin-m")
        assert (r.returncode, r.stdout.strip()) == (0, "deleted admin-m"), r.stderr
        assert optserve(live, "ls").stdout.strip() == ""
        assert c.list_models() == []

    with urllib.request.urlopen(f"http://{live['metrics']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert re.search(r'^optserve_pushes_total\{model="admin-m",outcome="applied"\} 3\.0$', text, re.M), text
    assert re.search(r'^optserve_checkpoint_seconds_count\{model="admin-m"\} 1\.0$', text, re.M), text


def test_health_is_a_light_probe_with_its_own_timeout(live):
    """What the Kubernetes TLS probes run: only grpc is loaded (the client's numpy/ml_dtypes take ~1 s
    on a loaded machine, which a probe's timeout must not pay), and --timeout bounds the wait."""
    code = (
        "import sys\n"
        "from optserve.server import cli\n"
        f"rc = cli.main(['health', '--target', {live['target']!r}, '--tls-ca', {live['ca']!r}, '--timeout', '3'])\n"
        "print(rc, sorted(m for m in ('ml_dtypes', 'jax', 'optserve.client') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[-2:] == ["0 []", ""] and r.stdout.startswith("SERVING"), r.stdout + r.stderr
    r = optserve(live, "health", "--timeout", "-1", auth=False)
    assert r.returncode == 2 and "--timeout" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
