"""`optserve serve` at first contact: a mistake in a flag is one line on stderr naming the flag and
the fix, exit status 2, never a traceback; `--help` documents every flag with its default; a start
logs nothing that reads like a failure; a failed final checkpoint makes the exit status 1."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from optserve.server import cli
from tests.conftest import start_server_process
from tests.test_security import pki  # noqa: F401 - the CA and certificates made for the TLS tests

SERVE = [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--checkpoint-dir", ""]


def _absent_gpu() -> str:
    """A --device naming a GPU this machine does not have (all of them, or one past the last)."""
    import jax

    try:
        return f"gpu:{len(jax.devices('gpu'))}"
    except RuntimeError:
        return "gpu"


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, pki) -> dict[str, tuple[list[str], str, str]]:  # noqa: F811 - the fixture imported above
    """{case: (extra serve args, the flag the message must name, a word of the fix)}, run as processes."""
    d = tmp_path_factory.mktemp("mistakes")
    (d / "empty-tokens").write_text("# only a comment\n\n")
    (d / "a-file").write_text("not a directory")
    (d / "ckpt-with-cache-file").mkdir()
    (d / "ckpt-with-cache-file" / ".compile-cache").write_text("not a directory")
    busy = socket.socket()  # a port in use: listening, and kept open for the module
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    yield {
        "missing token file": (["--token-file", str(d / "no-such-file")], "--token-file", "TOKEN [MODEL"),
        "empty token file": (["--token-file", str(d / "empty-tokens")], "--token-file", "TOKEN [MODEL"),
        "device without a GPU": (["--device", _absent_gpu()], "--device", "use"),
        "missing TLS key file": (
            ["--tls-cert", pki["server_cert"], "--tls-key", str(d / "no-such-key")],
            "--tls-key",
            "readable",
        ),
        "TLS key of another cert": (
            ["--tls-cert", pki["rogue_cert"], "--tls-key", pki["server_key"]],
            "--tls-key",
            "own private key",
        ),
        "port in use": (["--port", port], "--port", "another port"),
        "metrics port in use": (["--metrics-port", port], "--metrics-port", "another port"),
        "port out of range": (["--port", "70000"], "--port", "65535"),
        "negative keep": (["--keep", "-1"], "--keep", ">= 1"),
        "keep not a number": (["--keep", "three"], "--keep", "whole number"),
        "bad log level": (["--log-level", "loud"], "--log-level", "WARNING"),
        "NaN checkpoint seconds": (["--checkpoint-every-seconds", "nan"], "--checkpoint-every-seconds", ">= 0"),
        "checkpoint dir is a file": (["--checkpoint-dir", str(d / "a-file")], "--checkpoint-dir", "writable directory"),
        "checkpoint dir under a file": (
            ["--checkpoint-dir", str(d / "a-file" / "sub")],
            "--checkpoint-dir",
            "writable directory",
        ),
        "host not on this machine": (["--host", "192.0.2.1"], "--host", "address of this machine"),
        "compile cache is a file": (["--compile-cache", str(d / "a-file")], "--compile-cache", "writable directory"),
        "compile cache under a file": (
            ["--compile-cache", str(d / "a-file" / "sub")],
            "--compile-cache",
            "or '' for none",
        ),
        "default compile cache is a file": (
            ["--checkpoint-dir", str(d / "ckpt-with-cache-file")],
            "--compile-cache (default, in --checkpoint-dir)",
            "writable directory",
        ),
        "no TCP and no Unix socket": (["--no-tcp"], "--no-tcp", "--unix-socket PATH"),
        "Unix socket in a missing directory": (
            ["--unix-socket", str(d / "no-such-dir" / "s.sock")],
            "--unix-socket",
            "create it",
        ),
        "Unix socket path too long": (["--unix-socket", str(d / ("x" * 120))], "--unix-socket", "shorter path"),
        "Unix socket is a directory": (
            ["--unix-socket", str(d / "ckpt-with-cache-file")],
            "--unix-socket",
            "remove it",
        ),
    }
    busy.close()


@pytest.fixture(scope="module")
def outcomes(mistakes) -> dict[str, subprocess.CompletedProcess]:
    """Every mistake run as `optserve serve`, all at once (each is a Python start-up)."""
    procs = {
        case: subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, (args, _, _) in mistakes.items()
    }
    done = {}
    try:
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            done[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    return done


CASES = [
    "missing token file",
    "empty token file",
    "device without a GPU",
    "missing TLS key file",
    "TLS key of another cert",
    "port in use",
    "metrics port in use",
    "port out of range",
    "negative keep",
    "keep not a number",
    "bad log level",
    "NaN checkpoint seconds",
    "checkpoint dir is a file",
    "checkpoint dir under a file",
    "host not on this machine",
    "compile cache is a file",
    "compile cache under a file",
    "default compile cache is a file",
    "no TCP and no Unix socket",
    "Unix socket in a missing directory",
    "Unix socket path too long",
    "Unix socket is a directory",
]


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_naming_the_flag_and_the_fix(case, mistakes, outcomes):
    _, flag, fix = mistakes[case]
    r = outcomes[case]
    assert r.returncode == 2, (r.returncode, r.stderr)
    _assert_one_line(r.stderr, flag, fix)
    assert "listening" not in r.stdout


def _assert_one_line(stderr: str, flag: str, fix: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("optserve serve: error: "), lines
    assert flag in lines[0] and fix in lines[0], lines[0]


def test_every_case_is_checked(mistakes):
    assert sorted(CASES) == sorted(mistakes)


# The same parser and checks, in this process: the other values each flag refuses.
PARSER_MISTAKES = [
    (["--checkpoint-every-steps", "-2"], "--checkpoint-every-steps", ">= 0"),
    (["--checkpoint-every-seconds", "-1"], "--checkpoint-every-seconds", ">= 0"),
    (["--shutdown-grace", "inf"], "--shutdown-grace", ">= 0"),
    (["--max-workers", "0"], "--max-workers", ">= 1"),
    (["--chunk-bytes", "0"], "--chunk-bytes", ">= 1"),
    (["--max-models", "0"], "--max-models", ">= 1"),
    (["--max-model-bytes", "-5"], "--max-model-bytes", ">= 1"),
    (["--max-total-bytes", "1e9"], "--max-total-bytes", "whole number"),
    (["--metrics-port", "-1"], "--metrics-port", "65535"),
    (["--log-format", "xml"], "--log-format", "text"),
]


@pytest.mark.parametrize("args, flag, fix", PARSER_MISTAKES, ids=[a[0] for a, _, _ in PARSER_MISTAKES])
def test_the_parser_refuses_in_one_line(args, flag, fix, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *args])
    assert e.value.code == 2
    _assert_one_line(capsys.readouterr().err, flag, fix)


@pytest.mark.parametrize("device, fix", [("banana", "use cpu"), ("cpu:x", "cpu:0"), ("cpu:7", "cpu:0")])
def test_a_device_that_cannot_be_had_names_the_flag(device, fix):
    from optserve.server.core.errors import ConfigError
    from optserve.server.server import resolve_device

    with pytest.raises(ConfigError, match=rf"^--device {device}: .*{fix}"):
        resolve_device(device)


def test_tls_mistakes_name_the_flag(pki, tmp_path):  # noqa: F811 - the fixture imported above
    import argparse

    from optserve.server.api import auth as security
    from optserve.server.core.errors import ConfigError

    (tmp_path / "not-pem").write_text("hello\n")
    (tmp_path / "encrypted").write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    cert, key = pki["server_cert"], pki["server_key"]
    cases = [
        ({"tls_cert": cert}, "--tls-cert needs --tls-key"),
        ({"tls_key": key}, "--tls-key needs --tls-cert"),
        ({"tls_client_ca": pki["ca"]}, "--tls-client-ca needs --tls-cert"),
        ({"tls_cert": str(tmp_path / "not-pem"), "tls_key": key}, "--tls-cert .*not a PEM certificate"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "not-pem")}, "--tls-key .*not a PEM private key"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "encrypted")}, "--tls-key .*encrypted"),
        ({"tls_cert": cert, "tls_key": key, "tls_client_ca": str(tmp_path / "not-pem")}, "--tls-client-ca .*not a PEM"),
        (
            {"tls_cert": cert, "tls_key": key, "tls_client_ca": str(tmp_path / "missing")},
            "--tls-client-ca .*cannot read",
        ),
    ]
    for given, message in cases:
        args = argparse.Namespace(
            **{"token_file": None, "tls_cert": None, "tls_key": None, "tls_client_ca": None, **given}
        )
        with pytest.raises(ConfigError, match=message):
            security.server_options(args)


def _help_entries(text: str) -> dict[str, str]:
    """{flag: its help} from argparse's options section (an entry's help may wrap over lines)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-[-\w]+)(?:[ ,]\S+)*(?:\s{2,}(.*))?$", line)
        if m and line.startswith("  -"):
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_help_gives_every_flag_a_help_text_and_its_default():
    text = subprocess.run([*SERVE[:4], "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    entries = _help_entries(text)
    parser_flags = {f for a in _serve_parser()._actions for f in a.option_strings if f.startswith("--")}
    assert set(entries) - {"-h"} == parser_flags - {"--help"}
    for flag, help_text in entries.items():
        if flag == "-h":
            continue
        assert len(help_text) > 20, (flag, help_text)
        assert re.search(r"\(default: [^)]+\)$", help_text), (flag, help_text)
    for cadence in ("--checkpoint-every-steps", "--checkpoint-every-seconds"):
        assert "0: off" in entries[cadence] and "(default: 0" in entries[cadence], entries[cadence]


def _serve_parser():
    import argparse

    sub = argparse.ArgumentParser(prog="optserve").add_subparsers(dest="command")
    cli.serve.add_parser(sub)
    return sub.choices["serve"]


def test_a_start_logs_nothing_that_reads_like_a_failure():
    proc, _ = start_server_process("--checkpoint-dir", "")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "libtpu" not in err and "Unable to initialize backend" not in err, err
    assert "optserve listening on" in err  # the server's own lines are still there
    assert not [line for line in err.splitlines() if " ERROR " in line or " WARNING " in line], err


@pytest.mark.parametrize("failures, status", [([], 0), (["model 'm': final checkpoint failed"], 1)])
def test_exit_status_says_whether_the_final_checkpoints_failed(monkeypatch, capsys, failures, status):
    """Server.stop returns the final checkpoints that failed: exit 1 when any did."""
    from optserve.server import server as server_module

    class StoppedAtOnce:
        """Stands in for Server: asks the serve loop to stop (as SIGTERM does), then reports `failures`."""

        def __init__(self, *args, **kwargs):
            self.port = 1
            self.shared_memory = None  # not asked for (--shared-memory)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by serve's handler: the loop ends

        def stop(self, grace: float):
            return failures

    monkeypatch.setattr(server_module, "Server", StoppedAtOnce)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert cli.main(["serve", "--port", "0", "--checkpoint-dir", ""]) == status
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert all(f in err for f in failures or []), err
