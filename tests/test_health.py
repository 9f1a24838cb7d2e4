"""The standard gRPC health service through a server's life (start, restore, serving, shutdown), and
server reflection, against `optserve serve` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from optserve.client import Client, optim
from tests.conftest import start_server_process

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "optserve.v1.Optserve")


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _events(log_path: str) -> list[dict]:
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def test_health_through_serving_shutdown_and_restore(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    log1 = tmp_path / "first.log"
    with open(log1, "w") as err:
        proc, address = start_server_process("--checkpoint-dir", ckpt, "--shutdown-grace", "2", "--log-format", "json")
    try:
        with grpc.insecure_channel(address) as ch:
            assert [_check(ch, s) for s in SERVICES] == [SERVING, SERVING]
            # Reflection lists the service (and health) without any token or stub code.
            services = ProtoReflectionDescriptorDatabase(ch).get_services()
            assert "optserve.v1.Optserve" in services and "grpc.health.v1.Health" in services
            with Client(address, timeout=30) as c:
                m = c.create_model("kept", {"w": np.zeros(4, np.float32)}, optim.sgd(0.5))
                for _ in range(3):
                    m.push({"w": np.ones(4, np.float32)})
            # Watch the status while the server shuts down.
            watched: list[int] = []
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

            def follow() -> None:
                try:
                    for r in watch:
                        watched.append(r.status)
                except grpc.RpcError:
                    pass

            t = threading.Thread(target=follow)
            t.start()
            deadline = time.monotonic() + 60
            while not watched and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watched == [SERVING]  # the watch is established before the stop it must see
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 120
            while NOT_SERVING not in watched and time.monotonic() < deadline:
                time.sleep(0.02)
            watch.cancel()
            t.join(10)
            assert watched[0] == SERVING and NOT_SERVING in watched
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)

    # Restart on a known port and ask from the very start: no SERVING before the restore is done.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log2 = tmp_path / "second.log"
    with open(log2, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "optserve.server.cli",
                "serve",
                "--port",
                str(port),
                "--checkpoint-dir",
                ckpt,
                "--log-format",
                "json",
                "--shutdown-grace",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ},
        )
    try:
        seen = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, Client(f"127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    status = _check(ch)
                except grpc.RpcError as e:
                    status = e.code().name  # not listening yet
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == SERVING:
                    # The first SERVING answer already finds the model restored.
                    assert [(x["name"], x["step"]) for x in c.list_models()] == [("kept", 3)]
                    break
                time.sleep(0.005)
            assert seen[-1] == SERVING, seen
            assert all(s != SERVING for s in seen[:-1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The server's own account: NOT_SERVING, then the restore, then SERVING; NOT_SERVING at stop.
    events = _events(str(log2))
    order = [
        e.get("status") or ("restored" if "restored from" in e["message"] else e.get("event"))
        for e in events
        if e.get("event") in ("health", "stopped") or "restored from" in e["message"]
    ]
    assert order == ["NOT_SERVING", "restored", "SERVING", "NOT_SERVING", "stopped"], order
