"""`optserve download | upload | restore | reshard` from the command line: one result line on stdout;
a progress bar on stderr when it is a terminal (a pseudo-terminal here), nothing on it in a pipe."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import numpy as np
import pytest

from optserve.client import Client
from tests.conftest import assert_same_tree, in_process_servers

CLI = [sys.executable, "-m", "optserve.server.cli"]
PARAMS = {"w": np.arange(300_000, dtype=np.float32).reshape(600, 500), "b": np.ones(7, np.float32)}
SPEC = {"adam": {"learning_rate": 0.01}}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three in-process servers with checkpoint directories: one for whole models, two as shards."""
    root = tmp_path_factory.mktemp("transfer")
    with in_process_servers([str(root / f"s{i}") for i in range(3)]) as srvs:
        yield [s.address for s in srvs], [str(root / f"s{i}") for i in range(3)]


def _trained(target: str, name: str) -> dict:
    model = Client(target, timeout=60).create_model(name, PARAMS, SPEC, ema=0.9)
    for k in range(3):
        model.push({"w": np.full((600, 500), k + 1.0, np.float32), "b": np.ones(7, np.float32)})
    return model.pull()


def _piped(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, what the command wrote to stderr, a pseudo-terminal)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while True:  # until the command closes the terminal (EOF, or EIO on Linux), each read bounded
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, f"no output from {args} for 120 s"
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            seen += data
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return proc.returncode, out.decode(), seen.decode(errors="replace")


def test_download_and_upload_in_pipes_print_one_line_and_nothing_on_stderr(servers, tmp_path):
    (whole, *_), _ = servers
    want = _trained(whole, "piped")
    path = tmp_path / "piped.safetensors"
    r = _piped("download", "piped", str(path), "--target", whole)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == f"downloaded piped ({path.stat().st_size} bytes) to {path}\n"
    r = _piped("upload", str(path), "--model", "piped-copy", "--target", whole)
    assert (r.returncode, r.stdout, r.stderr) == (0, "uploaded piped-copy at step 3\n", "")
    copy = Client(whole).model("piped-copy")
    assert_same_tree(copy.pull(), want)
    assert_same_tree(copy.pull(ema=True), Client(whole).model("piped").pull(ema=True))


def test_on_a_terminal_download_upload_and_restore_draw_a_bar(servers, tmp_path):
    (whole, *_), _ = servers
    want = _trained(whole, "shown")
    path = tmp_path / "shown.safetensors"
    rc, out, bar = _on_a_terminal("download", "shown", str(path), "--target", whole)
    assert rc == 0 and out.startswith("downloaded shown ("), bar
    assert "downloading shown" in bar and "100%" in bar and "MB" in bar
    rc, out, bar = _on_a_terminal("upload", str(path), "--model", "shown-copy", "--target", whole)
    assert (rc, out) == (0, "uploaded shown-copy at step 3\n"), bar
    assert "uploading shown.safetensors" in bar and "100%" in bar
    assert_same_tree(Client(whole).model("shown-copy").pull(), want)
    assert Client(whole).model("shown").save() == 3
    rc, out, bar = _on_a_terminal("restore", "shown", "--target", whole)
    assert (rc, out) == (0, "restored shown to step 3\n"), bar
    assert "restoring shown" in bar


def test_upload_over_two_servers_and_download_the_sharded_model_back(servers, tmp_path):
    whole, first, second = servers[0]
    want = _trained(whole, "spread")
    path = tmp_path / "spread.safetensors"
    assert _piped("download", "spread", str(path), "--target", whole).returncode == 0
    r = _piped("upload", str(path), "--targets", f"{first},{second}", "--split-bytes", "65536")
    assert (r.returncode, r.stdout, r.stderr) == (0, "uploaded spread at step 3 over 2 shards\n", "")
    sharded = Client(second).model("spread")  # found from either shard
    assert len(sharded.info()["shards"]) == 2
    assert_same_tree(sharded.pull(), want)
    back = tmp_path / "back.safetensors"
    rc, out, bar = _on_a_terminal("download", "spread", str(back), "--target", second)
    assert rc == 0 and out.startswith("downloaded spread (") and "100%" in bar, bar
    r = _piped("upload", str(back), "--model", "spread-whole", "--target", whole)
    assert r.returncode == 0, r.stderr
    assert_same_tree(Client(whole).model("spread-whole").pull(), want)


def test_reshard_draws_a_bar_of_checkpoints_on_a_terminal(servers, tmp_path):
    (whole, *_), roots = servers
    _trained(whole, "moved")
    assert Client(whole).model("moved").save() == 3
    dests = [str(tmp_path / "a"), str(tmp_path / "b")]
    rc, out, bar = _on_a_terminal(
        "reshard", "--model", "moved", "--from", roots[0], "--to", *dests, "--targets", "127.0.0.1:1,127.0.0.1:2"
    )
    assert rc == 0 and out.startswith("model 'moved' step 3:"), bar
    assert "resharding moved" in bar and "3/3" in bar and "checkpoints" in bar


def test_bad_files_and_flags_are_one_line(servers, tmp_path):
    (whole, *_), _ = servers
    r = _piped("upload", str(tmp_path / "missing.safetensors"), "--target", whole)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    r = _piped("download", "m", str(tmp_path / "nowhere" / "m.safetensors"), "--target", whole)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "directory does not exist" in r.stderr
    r = _piped("download", "no-such-model", str(tmp_path / "x.safetensors"), "--target", whole)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no-such-model" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    not_a_state = tmp_path / "junk.safetensors"
    not_a_state.write_bytes(b"not a safetensors file")
    r = _piped("upload", str(not_a_state), "--target", whole)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "junk.safetensors" in r.stderr
    r = _piped("upload", str(not_a_state), "--split-bytes", "10", "--target", whole)
    assert r.returncode == 2 and "--split-bytes" in r.stderr
