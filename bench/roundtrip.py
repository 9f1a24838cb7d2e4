"""push_pull round trips: a 10M-parameter model against raw push + raw pull + an in-process step,
and a 1K-parameter model's p50 latency against a raw grpcio unary echo of the same bytes, with the
pull alone, the push alone and a call that does no work, to show where the small round trip goes;
then the small round trip over a Unix domain socket, as the byte stream and through shared memory,
against the raw echo over the same socket (issue 15, scope 5).

    python bench/roundtrip.py
"""

from __future__ import annotations

import os
import tempfile

import grpc
import numpy as np
import optax
from apply import optax_step
from common import interleaved_medians, machine, optserve_server, raw_server, stop, table
from transport import raw_pull_fn, raw_push_fn

from optserve.client import Client, optim
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.channel import CHANNEL_OPTIONS


def measure(n_large: int = 10_000_000, n_small: int = 1000, chunk: int = 4 << 20) -> list[dict]:
    raw_proc, raw_addr = raw_server()
    srv_proc, srv_addr = optserve_server()
    rows = []
    try:
        channel = grpc.insecure_channel(raw_addr, options=CHANNEL_OPTIONS)
        client = Client(srv_addr, timeout=600)
        params = {"w": np.zeros(n_large, np.float32)}
        grads = {"w": np.full(n_large, 1e-3, np.float32)}
        model = client.create_model("roundtrip", params, optim.adam(1e-3))
        ours, raw_push, raw_pull, step = interleaved_medians(
            (
                lambda: model.push_pull(grads),
                raw_push_fn(channel, grads["w"], chunk),
                raw_pull_fn(channel, 4 * n_large, chunk),
                optax_step(optax.adam(1e-3), params, grads),
            ),
            9,
        )
        base = raw_push + raw_pull + step
        rows.append(
            {
                "measure": f"push_pull {n_large / 1e6:g}M float32 (adam)",
                "optserve": f"{ours * 1e3:.1f} ms",
                "baseline": f"{base * 1e3:.1f} ms (raw push {raw_push * 1e3:.0f} + raw pull "
                f"{raw_pull * 1e3:.0f} + optax step {step * 1e3:.0f})",
                "ratio": f"{ours / base:.2f}x",
                "target": "<= 1.3x",
            }
        )
        client.delete_model("roundtrip")

        small = {"w": np.zeros(n_small, np.float32)}
        g_small = {"w": np.full(n_small, 1e-3, np.float32)}
        m2 = client.create_model("small", small, optim.adam(1e-3))
        echo = channel.unary_unary("/raw/Echo", lambda x: x, lambda x: x)
        payload = g_small["w"].tobytes()
        info_req = pb.GetServerInfoRequest()
        ours_small, raw_echo, pull, push, info = interleaved_medians(
            (
                lambda: m2.push_pull(g_small),
                lambda: echo(payload),
                lambda: m2.pull(),
                lambda: m2.push(g_small),
                lambda: client._stub.GetServerInfo(info_req),
            ),
            500,
            warmup=20,
        )
        rows.append(
            {
                "measure": f"push_pull p50, {n_small} float32 params (adam)",
                "optserve": f"{ours_small * 1e3:.2f} ms",
                "baseline": f"{raw_echo * 1e3:.2f} ms (raw unary echo of {len(payload)} bytes)",
                "ratio": f"{ours_small / raw_echo:.2f}x",
                "target": "<= 1.5x",
            }
        )
        # Where the small round trip's time goes: the same calls without the update, without the
        # pull, and a call that does no work at all on optserve's server.
        for what, t in (
            ("pull p50 (no update)", pull),
            ("push p50 (update, no parameters back)", push),
            ("GetServerInfo p50 (no work: the server's own floor)", info),
        ):
            rows.append(
                {
                    "measure": f"{what}, {n_small} params",
                    "optserve": f"{t * 1e3:.2f} ms",
                    "baseline": f"{raw_echo * 1e3:.2f} ms (raw unary echo)",
                    "ratio": f"{t / raw_echo:.2f}x",
                    "target": "",
                }
            )
        client.close()
        channel.close()
    finally:
        stop(srv_proc)
        stop(raw_proc)
    return rows


def measure_unix(n_small: int = 1000) -> list[dict]:
    """The 1K push_pull p50 over a Unix socket, through the byte stream and through shared memory
    (forced below its 256 KiB threshold), each against bench/raw_grpc.py's echo over a Unix socket,
    interleaved with the same two over TCP."""
    with tempfile.TemporaryDirectory() as tmp:
        raw_sock, our_sock = os.path.join(tmp, "raw.sock"), os.path.join(tmp, "optserve.sock")
        raw_proc, raw_addr = raw_server(raw_sock)
        srv_proc, srv_addr = optserve_server("--unix-socket", our_sock, "--shared-memory")
        try:
            tcp_channel = grpc.insecure_channel(raw_addr, options=CHANNEL_OPTIONS)
            unix_channel = grpc.insecure_channel(f"unix://{raw_sock}", options=CHANNEL_OPTIONS)
            clients = {
                "tcp": Client(srv_addr, timeout=600, shared_memory=False),
                "unix": Client(f"unix://{our_sock}", timeout=600, shared_memory=False),
                "unix + shared memory": Client(f"unix://{our_sock}", timeout=600, shared_memory_min_bytes=0),
            }
            g = {"w": np.full(n_small, 1e-3, np.float32)}
            clients["tcp"].create_model("small", {"w": np.zeros(n_small, np.float32)}, optim.adam(1e-3))
            models = {k: c.model("small") for k, c in clients.items()}
            payload = g["w"].tobytes()
            echoes = {
                "tcp": tcp_channel.unary_unary("/raw/Echo", lambda x: x, lambda x: x),
                "unix": unix_channel.unary_unary("/raw/Echo", lambda x: x, lambda x: x),
            }
            names = list(models)
            times = interleaved_medians(
                tuple(lambda m=models[k]: m.push_pull(g) for k in names)
                + tuple(lambda e=e: e(payload) for e in echoes.values()),
                500,
                warmup=20,
            )
            shm = clients["unix + shared memory"].shared_memory
            if shm is None or shm.unavailable:
                raise SystemExit(f"shared memory not used: {shm and shm.unavailable}")
            ours, echo = (
                dict(zip(names, times[: len(names)], strict=True)),
                dict(zip(echoes, times[len(names) :], strict=True)),
            )
            rows = []
            for k in names:
                over = "tcp" if k == "tcp" else "unix"
                rows.append(
                    {
                        "measure": f"push_pull p50 over {k}, {n_small} float32 params (adam)",
                        "optserve": f"{ours[k] * 1e3:.2f} ms",
                        "baseline": f"{echo[over] * 1e3:.2f} ms (raw unary echo over {over})",
                        "ratio": f"{ours[k] / echo[over]:.2f}x",
                        "target": "<= 1.5x",
                    }
                )
            for c in clients.values():
                c.close()
            tcp_channel.close()
            unix_channel.close()
        finally:
            stop(srv_proc)
            stop(raw_proc)
    return rows


COLUMNS = ["measure", "optserve", "baseline", "ratio", "target"]

if __name__ == "__main__":
    print(f"# roundtrip: {machine()}")
    print(table(measure() + measure_unix(), COLUMNS))
