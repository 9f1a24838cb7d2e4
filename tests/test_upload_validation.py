"""Every way into a model's state is validated as CreateModel validates: Upload (each manifest field
missing, of the wrong type or out of range; truncated files and bad headers), declared upload sizes
that are never allocated, nesting depth, shapes, float64, the last reachable step, and the per-worker
window of retry replies (async, sync, and across a download/upload round trip).

A refused upload leaves no model behind, releases its name, and the server keeps serving; a server
with a checkpoint directory has no trace of it after a restart.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import safetensors.numpy

from optserve.client import Client, FailedPreconditionError, OptserveError, optim
from optserve.server import Server
from optserve.server.core.step import MAX_STEP
from optserve.server.core.workers import REPLY_WINDOW
from optserve.server.spec import MAX_SPEC_DEPTH
from optserve.server.state.safetensors_io import parse_safetensors
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.dtypes import DTYPES, leaf_nbytes
from optserve.wire.framing import frame
from tests.conftest import start_server_process, stop_server_process

SPEC = {"adam": {"learning_rate": 0.01, "tunable": ["learning_rate"]}}
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
GRADS = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, 0.25, np.float32)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(port=0, checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")))
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def base_file(client, tmp_path_factory) -> tuple[dict, dict]:
    """A valid downloaded state (tensors, metadata as JSON values) of a model with a worker record."""
    m = client.create_model("upload-base", PARAMS, optimizer=SPEC)
    w = m.worker("w1")
    for _ in range(3):
        w.push(GRADS)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    m.download(path)
    tensors, metadata = parse_safetensors(path.read_bytes(), str(path))
    return {k: v.copy() for k, v in tensors.items()}, {k: json.loads(v) for k, v in metadata.items()}


def _file(tensors: dict, metadata: dict, raw_metadata: dict | None = None) -> bytes:
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta.update(raw_metadata or {})
    return safetensors.numpy.save(tensors, metadata=meta)


def _upload_bytes(client: Client, data: bytes, name: str = "") -> grpc.StatusCode | pb.ModelInfo:
    messages = [pb.UploadRequest(header=pb.UploadHeader(name=name, total_bytes=len(data))).SerializeToString()]
    for offset in range(0, len(data), 1 << 16):
        messages.append(frame(pb.UploadRequest(offset=offset).SerializeToString(), [data[offset : offset + (1 << 16)]]))
    return client.call(client._upload, iter(messages))


def _names(client: Client) -> list[str]:
    return [m["name"] for m in client.list_models()]


# -- every manifest field: missing, wrong JSON type, out of range --------------------------------


def _set(key: str, value) -> Callable[[dict, dict], None]:
    def mutate(tensors: dict, meta: dict) -> None:
        meta[key] = value

    return mutate


def _drop(key: str) -> Callable[[dict, dict], None]:
    return lambda tensors, meta: meta.pop(key)


def _edit(key: str, fn: Callable) -> Callable[[dict, dict], None]:
    def mutate(tensors: dict, meta: dict) -> None:
        meta[key] = fn(json.loads(json.dumps(meta[key])))

    return mutate


def _with(d: dict, **kw) -> dict:
    return {**d, **kw}


def _worker(**kw) -> Callable[[dict], dict]:
    return lambda workers: {"w1": _with(workers["w1"], **kw)}


def _reply_b64(message) -> dict:
    return {"proto": type(message).__name__, "b64": base64.b64encode(message.SerializeToString()).decode()}


def _deep(n: int):
    spec = {"sgd": {"learning_rate": 0.1}}
    for _ in range(n):
        spec = {"chain": [spec]}
    return spec


def _leaf(**kw) -> Callable[[list], list]:
    return lambda schema: [_with(schema[0], **kw), *schema[1:]]


MANIFEST_KEYS = [
    "format",
    "format_version",
    "model",
    "step",
    "schema",
    "spec",
    "settings",
    "hyperparams",
    "workers",
    "opt_keys",
    "ema_keys",
]
WRONG_TYPE = {
    "format": 5,
    "format_version": "1",
    "model": 7,
    "step": "3",
    "schema": {"w": 1},
    "spec": 12,
    "settings": ["async"],
    "hyperparams": [0.1],
    "workers": ["w1"],
    "opt_keys": "count",
    "ema_keys": 3,
}

CASES: dict[str, tuple[Callable, str]] = {}  # id -> (mutation, a word the refusal names)
for key in MANIFEST_KEYS:
    CASES[f"{key}-missing"] = (_drop(key), key if key not in ("format", "format_version") else "format")
    CASES[f"{key}-wrong-type"] = (_set(key, WRONG_TYPE[key]), key if key != "format_version" else "format_version")
CASES.update(
    {
        # out of range, or wrong inside
        "format-other": (_set("format", "safetensors"), "format"),
        "format_version-2": (_set("format_version", 2), "format_version"),
        "format_version-bool": (_set("format_version", True), "format_version"),
        "model-path": (_set("model", "../../evil"), "evil"),
        "step-negative": (_set("step", -1), "step"),
        "step-2**53": (_set("step", 2**53), "step"),
        "step-float": (_set("step", 1.5), "step"),
        "step-bool": (_set("step", True), "step"),
        "settings-banana": (_edit("settings", lambda s: _with(s, mode="banana")), "settings.mode"),
        "settings-sync-0-workers": (_edit("settings", lambda s: _with(s, mode="sync", workers=0)), "settings.workers"),
        "settings-quorum>workers": (
            _edit("settings", lambda s: _with(s, mode="sync", workers=2, quorum=3)),
            "settings.quorum",
        ),
        "settings-timeout-nan": (
            _edit("settings", lambda s: _with(s, mode="sync", workers=2, quorum=2, sync_timeout=float("nan"))),
            "settings.sync_timeout",
        ),
        "settings-timeout-negative": (
            _edit("settings", lambda s: _with(s, mode="sync", workers=2, quorum=2, sync_timeout=-1.0)),
            "settings.sync_timeout",
        ),
        "settings-max_staleness-1": (_edit("settings", lambda s: _with(s, max_staleness=-1)), "settings.max_staleness"),
        "settings-max_staleness-str": (
            _edit("settings", lambda s: _with(s, max_staleness="3")),
            "settings.max_staleness",
        ),
        "settings-workers-2**40": (
            _edit("settings", lambda s: _with(s, mode="sync", workers=2**40)),
            "settings.workers",
        ),
        "settings-async-with-workers": (_edit("settings", lambda s: _with(s, workers=3)), "settings.mode"),
        "settings-scaling": (
            _edit("settings", lambda s: _with(s, staleness_scaling="square")),
            "settings.staleness_scaling",
        ),
        "settings-ema-1.5": (_edit("settings", lambda s: _with(s, ema_decay=1.5)), "settings.ema"),
        "settings-debias-str": (_edit("settings", lambda s: _with(s, ema_debias="yes")), "settings.ema_debias"),
        "settings-unknown": (_edit("settings", lambda s: _with(s, turbo=True)), "settings.turbo"),
        "schema-dtype-object": (_edit("schema", _leaf(dtype="object")), "object"),
        "schema-dtype-float64": (_edit("schema", _leaf(dtype="float64")), "float32"),
        "schema-path-nul": (_edit("schema", _leaf(path="b\x00")), "control"),
        "schema-path-empty": (_edit("schema", _leaf(path="")), "empty path"),
        "schema-path-twice": (_edit("schema", lambda s: [*s, s[0]]), "twice"),
        "schema-shape-negative": (_edit("schema", _leaf(shape=[-3])), "negative"),
        "schema-shape-float": (_edit("schema", _leaf(shape=[3.0])), "schema[0]"),
        "schema-shape-huge-zero": (_edit("schema", _leaf(shape=[0, 2**63 - 1])), "out of range"),
        "schema-shape-rank-65": (_edit("schema", _leaf(shape=[1] * 65)), "dimensions"),
        "schema-leaf-extra-key": (_edit("schema", _leaf(extra=1)), "schema[0]"),
        "schema-empty": (_set("schema", []), "no leaves"),
        "schema-disagrees-with-tensors": (_edit("schema", _leaf(shape=[4])), "'b'"),
        "spec-unknown-rule": (_set("spec", {"no-such-rule": {}}), "no-such-rule"),
        "spec-nested-400": (_set("spec", _deep(400)), "nested deeper"),
        "spec-nested-64-chains": (_set("spec", _deep(MAX_SPEC_DEPTH)), "nested deeper"),
        "spec-other-optimizer": (_set("spec", {"sgd": {"learning_rate": 0.1}}), "optimizer state"),
        "hyperparams-str": (_set("hyperparams", {"learning_rate": "fast"}), "hyperparams"),
        "hyperparams-nan": (_set("hyperparams", {"learning_rate": float("nan")}), "hyperparams"),
        "worker-last_seq-abc": (_edit("workers", _worker(last_seq="abc")), "last_seq"),
        "worker-last_seq-negative": (_edit("workers", _worker(last_seq=-1)), "last_seq"),
        "worker-last_seq-2**64": (_edit("workers", _worker(last_seq=2**64)), "last_seq"),
        "worker-last_seq-bool": (_edit("workers", _worker(last_seq=True)), "last_seq"),
        "worker-last_base_step-str": (_edit("workers", _worker(last_base_step="0")), "last_base_step"),
        "worker-last_base_step-ahead": (_edit("workers", _worker(last_base_step=99)), "last_base_step"),
        "worker-missing-key": (_edit("workers", lambda w: {"w1": {"last_seq": 3}}), "keys"),
        "worker-extra-key": (_edit("workers", _worker(colour="red")), "keys"),
        "worker-not-an-object": (_set("workers", {"w1": 3}), "w1"),
        "worker-empty-id": (_edit("workers", lambda w: {"": w["w1"]}), "worker id"),
        "worker-lone-surrogate-id": (
            _set("workers", {"\ud800": {"last_seq": 1, "last_base_step": 0, "replies": []}}),
            "worker id",
        ),
        "worker-replies-not-list": (_edit("workers", _worker(replies={"3": "x"})), "replies"),
        "worker-reply-seq-above-last": (
            _edit("workers", lambda w: {"w1": _with(w["w1"], replies=[_with(w["w1"]["replies"][-1], seq=99)])}),
            "seq",
        ),
        "worker-reply-not-pushresponse": (
            _edit(
                "workers",
                lambda w: {"w1": _with(w["w1"], replies=[{"seq": 3, "reply": _reply_b64(pb.PullRequest(model="x"))}])},
            ),
            "PushResponse",
        ),
        "worker-reply-garbage-bytes": (
            _edit(
                "workers",
                lambda w: {
                    "w1": _with(
                        w["w1"],
                        replies=[
                            {
                                "seq": 3,
                                "reply": {"proto": "PushResponse", "b64": base64.b64encode(b"\xff\xff\xff").decode()},
                            }
                        ],
                    )
                },
            ),
            "PushResponse",
        ),
        "worker-reply-bad-base64": (
            _edit(
                "workers",
                lambda w: {
                    "w1": _with(w["w1"], replies=[{"seq": 3, "reply": {"proto": "PushResponse", "b64": "!!!"}}])
                },
            ),
            "PushResponse",
        ),
        "worker-old-form-reply-not-pushresponse": (
            _set(
                "workers",
                {"w1": {"last_seq": 3, "last_base_step": 2, "last_reply": _reply_b64(pb.ModelInfo(name="x"))}},
            ),
            "PushResponse",
        ),
        "worker-reply-step-str": (
            _edit(
                "workers",
                lambda w: {"w1": _with(w["w1"], replies=[{"seq": 3, "reply": {"step": "3", "applied": True}}])},
            ),
            "step",
        ),
        "worker-reply-applied-int": (
            _edit(
                "workers", lambda w: {"w1": _with(w["w1"], replies=[{"seq": 3, "reply": {"step": 3, "applied": 1}}])}
            ),
            "applied",
        ),
        "worker-reply-extra-key": (
            _edit(
                "workers",
                lambda w: {
                    "w1": _with(
                        w["w1"], replies=[{"seq": 3, "reply": {"step": 3, "applied": True, "duplicate": False}}]
                    )
                },
            ),
            "applied",
        ),
        "worker-reply-step-negative": (
            _edit(
                "workers",
                lambda w: {"w1": _with(w["w1"], replies=[{"seq": 3, "reply": {"step": -1, "applied": True}}])},
            ),
            "reply step",
        ),
        "worker-old-form-reply-step-negative": (
            _edit(
                "workers",
                lambda w: {
                    "w1": _with(
                        w["w1"],
                        replies=[{"seq": 3, "reply": _reply_b64(pb.PushResponse(model="x", step=-5, applied=True))}],
                    )
                },
            ),
            "reply step",
        ),
        "worker-old-form-reply-truncated": (
            _edit(
                "workers",
                lambda w: {
                    "w1": _with(
                        w["w1"],
                        replies=[
                            {
                                "seq": 3,
                                "reply": {
                                    "proto": "PushResponse",
                                    "b64": base64.b64encode(
                                        pb.PushResponse(model="upload-base", step=3, applied=True).SerializeToString()[
                                            :-1
                                        ]
                                    ).decode(),
                                },
                            }
                        ],
                    )
                },
            ),
            "PushResponse",
        ),
        "opt_keys-wrong": (_edit("opt_keys", lambda k: k[:-1]), "opt_keys"),
        "opt_keys-duplicate": (_edit("opt_keys", lambda k: k + k[:1]), "opt_keys"),
        "ema_keys-without-ema": (_set("ema_keys", ["count"]), "ema_keys"),
    }
)


def _tensor_case(fn: Callable[[dict], None], word: str) -> tuple[Callable, str]:
    return (lambda tensors, meta: fn(tensors)), word


CASES.update(
    {
        "tensor-param-missing": _tensor_case(lambda t: t.pop("params/b"), "'b'"),
        "tensor-param-wrong-shape": _tensor_case(lambda t: t.update({"params/b": np.ones(4, np.float32)}), "'b'"),
        "tensor-param-float64": _tensor_case(lambda t: t.update({"params/b": np.ones(3, np.float64)}), "'b'"),
        "tensor-unknown-group": _tensor_case(lambda t: t.update({"extra/x": np.ones(1, np.float32)}), "extra/x"),
        "tensor-opt-wrong-shape": _tensor_case(
            lambda t: t.update(
                {k: np.zeros(7, np.float32) for k in [k for k in t if k.startswith("opt/") and k.endswith("/w")][:1]}
            ),
            "optimizer state",
        ),
        "tensor-hyperparam-nan": _tensor_case(
            lambda t: t.update({"opt/hyperparams/learning_rate": np.array(np.nan, np.float32)}), "not finite"
        ),
    }
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_manifest_field_is_refused_and_creates_nothing(client, base_file, case):
    mutate, word = CASES[case]
    tensors, meta = {k: v.copy() for k, v in base_file[0].items()}, json.loads(json.dumps(base_file[1]))
    mutate(tensors, meta)
    name = f"bad-{abs(hash(case)) % 10**8}"
    use_file_name = case.startswith("model-")  # a bad name in the file matters only when it is used
    with pytest.raises(OptserveError) as e:
        _upload_bytes(client, _file(tensors, meta), "" if use_file_name else name)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value)
    assert word in e.value.message, (case, e.value.message)
    assert name not in _names(client) and "../../evil" not in _names(client)


def test_refused_upload_after_the_name_is_reserved_releases_it(client, base_file):
    """The opt tensor check runs after the name and bytes are reserved: refused, then the same name
    takes a valid file."""
    tensors, meta = {k: v.copy() for k, v in base_file[0].items()}, base_file[1]
    key = next(k for k in tensors if k.startswith("opt/") and k.endswith("/w"))
    tensors[key] = np.zeros(7, np.float32)
    with pytest.raises(OptserveError) as e:
        _upload_bytes(client, _file(tensors, meta), "reserved-then-refused")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    info = _upload_bytes(client, _file(base_file[0], meta), "reserved-then-refused")
    assert info.name == "reserved-then-refused" and info.step == 3
    assert client.model("reserved-then-refused").push(GRADS) == 4


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "header-length-huge",
        "header-not-json",
        "header-a-list",
        "metadata-not-strings",
        "metadata-not-json",
        "tensor-offsets-float",
        "tensor-shape-huge-zero",
        "nested-json",
    ],
)
def test_damaged_file_is_refused(client, base_file, damage):
    data = _file(*base_file)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])

    def with_header(h) -> bytes:
        raw = json.dumps(h).encode() if not isinstance(h, bytes) else h
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    first = next(k for k in header if k != "__metadata__")
    bad = {
        "truncated": lambda: data[: len(data) // 2],
        "header-length-huge": lambda: struct.pack("<Q", 2**63) + data[8:],
        "header-not-json": lambda: with_header(b"{not json" + b" " * 10),
        "header-a-list": lambda: with_header([1, 2]),
        "metadata-not-strings": lambda: with_header(_with(header, __metadata__={"step": 3})),
        "metadata-not-json": lambda: with_header(_with(header, __metadata__=_with(header["__metadata__"], step="{"))),
        "tensor-offsets-float": lambda: with_header(
            _with(header, **{first: _with(header[first], data_offsets=[0.0, 4.5])})
        ),
        "tensor-shape-huge-zero": lambda: with_header(_with(header, **{first: _with(header[first], shape=[0, 2**62])})),
        "nested-json": lambda: with_header(
            _with(header, __metadata__=_with(header["__metadata__"], spec="[" * 100_000 + "]" * 100_000))
        ),
    }[damage]()
    before = _names(client)
    with pytest.raises(OptserveError) as e:
        _upload_bytes(client, bad, "damaged")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert _names(client) == before


def test_valid_upload_keeps_working(client, base_file):
    """The strict checks accept what Download writes (and the old single-reply worker form)."""
    tensors, meta = base_file
    old = json.loads(json.dumps(meta))
    record = old["workers"]["w1"]
    old["workers"]["w1"] = {
        "last_seq": record["last_seq"],
        "last_base_step": record["last_base_step"],
        "last_reply": record["replies"][-1]["reply"],
    }
    info = _upload_bytes(client, _file(tensors, old), "old-form")
    m = client.model("old-form")
    retry = m.push_raw(m._push_header(None, None, "w1", 3), m._grad_leaves(GRADS, None))
    assert info.step == 3 and retry.duplicate and retry.step == 3 and retry.model == "old-form"


def test_replies_written_as_serialized_push_responses_still_answer_retries(server, client, base_file, tmp_path):
    """Files written before replies were stored as {"step", "applied"} hold each one as a base64
    PushResponse (with the model name and incarnation of the server that wrote it): they still load,
    in the window form and in the older single-reply form, and a retry gets the reply they hold,
    named after the model it now belongs to and marked with this server's incarnation."""
    tensors, meta = base_file
    record = meta["workers"]["w1"]
    assert record["replies"][-1] == {"seq": 3, "reply": {"step": 3, "applied": True}}  # what servers write now

    def old(reply: dict) -> dict:  # what servers wrote before, for the same reply
        return _reply_b64(
            pb.PushResponse(
                model="upload-base", step=reply["step"], applied=reply["applied"], incarnation="an-earlier-start"
            )
        )

    window = json.loads(json.dumps(meta))
    window["workers"]["w1"]["replies"] = [{"seq": e["seq"], "reply": old(e["reply"])} for e in record["replies"]]
    single = json.loads(json.dumps(meta))
    single["workers"]["w1"] = {
        "last_seq": 3,
        "last_base_step": record["last_base_step"],
        "last_reply": old(record["replies"][-1]["reply"]),
    }
    for name, manifest in (("old-window", window), ("old-single", single)):
        info = _upload_bytes(client, _file(tensors, manifest), name)
        m = client.model(name)
        retry = m.push_raw(m._push_header(None, None, "w1", 3), m._grad_leaves(GRADS, None))
        assert info.step == 3 and retry.duplicate and retry.step == 3 and retry.applied, retry
        assert retry.model == name and retry.incarnation == server.service.incarnation
        assert m.info()["step"] == 3
        path = tmp_path / f"{name}.safetensors"
        m.download(path)  # written back in today's form
        workers = json.loads(parse_safetensors(path.read_bytes(), str(path))[1]["workers"])
        assert workers["w1"]["replies"][-1] == {"seq": 3, "reply": {"step": 3, "applied": True}}


# -- declared sizes are never allocated ----------------------------------------------------------


def _memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes so far) of a process."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"]


def test_upload_header_sizes_are_checked_and_never_allocated():
    """The issue's probe against a subprocess: four 4 GiB headers with no data, one with a little
    data then an early end, and 2**62: clear statuses, and RSS follows the bytes received."""
    proc, address = start_server_process("--checkpoint-dir", "", "--log-level", "WARNING")
    try:
        with grpc.insecure_channel(address) as ch:
            upload = ch.stream_unary(
                "/optserve.v1.Optserve/Upload", request_serializer=lambda x: x, response_deserializer=lambda x: x
            )

            def send(total: int, data: bytes = b"") -> grpc.StatusCode:
                msgs = [pb.UploadRequest(header=pb.UploadHeader(name="huge", total_bytes=total)).SerializeToString()]
                if data:
                    msgs.append(frame(pb.UploadRequest(offset=0).SerializeToString(), [data]))
                try:
                    upload(iter(msgs), timeout=60)
                except grpc.RpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            assert send(64, b"\0" * (1 << 20)) == grpc.StatusCode.INVALID_ARGUMENT  # warm-up: imports, buffers
            rss_before, peak_before = _memory(proc.pid)

            def grown() -> tuple[int, int]:
                rss, peak = _memory(proc.pid)
                return rss - rss_before, peak - peak_before

            for _ in range(4):
                # refused as incomplete (or, on a host with less than 4 GiB, as too large)
                assert send(4 << 30) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert max(grown()) < 256 << 20, grown()  # not even for a moment (peak)
            assert send(4 << 30, b"\0" * (1 << 20)) in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert send(2**62) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert send(2**64 - 1) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert max(grown()) < 256 << 20, grown()
            assert proc.poll() is None
    finally:
        stop_server_process(proc)


def test_refused_upload_leaves_nothing_across_a_restart(tmp_path):
    """Found #2: a worker record with "last_seq": "abc" half-created a model that survived restart."""
    ckpt = tmp_path / "ckpt"

    def serve():
        return start_server_process("--checkpoint-dir", str(ckpt), "--log-level", "WARNING")

    def stop(proc) -> None:
        rc, err = stop_server_process(proc)
        assert rc == 0, err[-3000:]

    proc, address = serve()
    try:
        with Client(address, timeout=60) as c:
            m = c.create_model("source", PARAMS, optimizer=SPEC)
            m.worker("w1").push(GRADS)
            m.download(tmp_path / "m.safetensors")
            tensors, meta = parse_safetensors((tmp_path / "m.safetensors").read_bytes(), "m")
            meta = {k: json.loads(v) for k, v in meta.items()}
            meta["workers"]["w1"]["last_seq"] = "abc"
            with pytest.raises(OptserveError) as e:
                _upload_bytes(c, _file({k: v.copy() for k, v in tensors.items()}, meta), "half")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "last_seq" in e.value.message
            assert sorted(_names(c)) == ["source"]
    finally:
        stop(proc)
    assert not os.path.exists(ckpt / "half")
    proc, address = serve()
    try:
        with Client(address, timeout=60) as c:
            assert sorted(_names(c)) == ["source"]
            c.upload(tmp_path / "m.safetensors", name="half")  # the name is free
    finally:
        stop(proc)


# -- CreateModel: depth, shapes, float64 ---------------------------------------------------------


def _raw_create(client: Client, name: str, leaf: pb.LeafSpec, spec: str = '{"sgd": {"learning_rate": 0.1}}') -> None:
    h = pb.CreateModelHeader(name=name, optimizer_json=spec, schema=[leaf])
    nbytes = leaf_nbytes(DTYPES[leaf.dtype], leaf.shape) if leaf.dtype in DTYPES else 0
    nbytes = nbytes if nbytes < 1 << 20 else 0
    s = pb.TensorSlice(path=leaf.path, dtype=leaf.dtype, shape=leaf.shape, offset=0, length=nbytes)
    client.call(
        client._create,
        iter(
            [frame(pb.CreateModelRequest(header=h, slices=[s]).SerializeToString(), [b"\0" * nbytes] if nbytes else [])]
        ),
    )


@pytest.mark.parametrize("depth", [400, 480, MAX_SPEC_DEPTH])
def test_deeply_nested_spec_is_invalid_argument_naming_the_model(client, depth):
    spec = '{"chain": [' * depth + '{"sgd": {"learning_rate": 0.1}}' + "]}" * depth
    with pytest.raises(OptserveError) as e:
        _raw_create(client, f"deep-{depth}", pb.LeafSpec(path="w", dtype="float32", shape=[2]), spec)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"deep-{depth}" in e.value.message and "nested deeper" in e.value.message


def test_spec_nested_within_the_limit_is_accepted(client):
    depth = (MAX_SPEC_DEPTH - 3) // 2  # each chain level is an object and an array; sgd adds two
    spec = '{"chain": [' * depth + '{"sgd": {"learning_rate": 0.1}}' + "]}" * depth
    _raw_create(client, "deep-ok", pb.LeafSpec(path="w", dtype="float32", shape=[2]), spec)
    assert client.model("deep-ok").push({"w": np.ones(2, np.float32)}) == 1


@pytest.mark.parametrize("shape", [[0, 2**63 - 1], [2**32, 2**32, 0, 7], [0, 2**62], [2**40, 0, 2**30]])
def test_zero_size_leaf_with_huge_dimensions_is_invalid_argument_naming_the_leaf(client, shape):
    with pytest.raises(OptserveError) as e:
        _raw_create(client, "zero-huge", pb.LeafSpec(path="enc/w", dtype="float32", shape=shape))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'zero-huge'" in e.value.message and "'enc/w'" in e.value.message
    assert "zero-huge" not in _names(client)


def test_zero_size_leaf_with_sane_dimensions_is_accepted(client):
    m = client.create_model(
        "zero-ok", {"e": np.zeros((0, 5), np.float32), "w": np.ones(2, np.float32)}, optimizer=optim.adam(0.1)
    )
    assert m.push({"e": np.zeros((0, 5), np.float32), "w": np.ones(2, np.float32)}) == 1


def test_float64_leaves_are_refused_with_the_reason(client):
    with pytest.raises(OptserveError) as e:
        client.create_model("f64", {"w": np.zeros(3), "b": np.ones(2, np.float32)}, optimizer=optim.sgd(0.1))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'f64'" in e.value.message and "'w'" in e.value.message and "float32" in e.value.message
    assert "f64" not in _names(client)


# -- the last reachable step ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_model_at_the_last_step_refuses_pushes_and_its_checkpoint_restores(client, base_file, mode):
    tensors, meta = base_file
    meta = _with(meta, step=MAX_STEP, workers={})
    if mode == "sync":
        meta["settings"] = _with(meta["settings"], mode="sync", workers=1, quorum=1)
    info = _upload_bytes(client, _file(tensors, meta), f"last-step-{mode}")
    assert info.step == MAX_STEP == 2**53 - 1
    m = client.model(f"last-step-{mode}")
    before = m.pull()
    with pytest.raises(FailedPreconditionError, match="last step"):
        m.push(GRADS)
    assert m.info()["step"] == MAX_STEP and m.info()["pending_contributions"] == 0
    np.testing.assert_array_equal(m.pull()["w"], before["w"])
    assert m.save() == MAX_STEP
    m.restore(MAX_STEP)
    assert m.info()["step"] == MAX_STEP


# -- retries: a window of replies per worker -----------------------------------------------------


def _push(m, seq: int) -> pb.PushResponse:
    return m.push_raw(m._push_header(None, None, "w", seq), m._grad_leaves(GRADS, None))


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_retry_of_any_recent_seq_gets_its_original_reply(client, tmp_path, mode):
    settings = {"mode": "sync", "workers": 1} if mode == "sync" else {}
    m = client.create_model(f"window-{mode}", PARAMS, optimizer=SPEC, **settings)
    n = REPLY_WINDOW + 4
    first = {seq: _push(m, seq) for seq in range(1, n + 1)}
    assert [first[s].step for s in range(1, n + 1)] == list(range(1, n + 1))
    params = m.pull()

    def check(model, name: str) -> None:
        for seq in range(n - REPLY_WINDOW + 1, n + 1):  # the window, oldest first and in any order
            again = _push(model, seq)
            assert again.duplicate and (again.step, again.applied, again.model) == (
                first[seq].step,
                first[seq].applied,
                name,
            )
        for seq in (1, n - REPLY_WINDOW):  # applied, but its reply is no longer kept
            with pytest.raises(FailedPreconditionError) as e:
                _push(model, seq)
            assert f"seq {seq}" in e.value.message and f"highest applied seq {n}" in e.value.message
        assert model.info()["step"] == n  # nothing applied twice
        for k in params:
            np.testing.assert_array_equal(model.pull()[k], params[k])

    check(m, f"window-{mode}")
    # the window travels with the state
    m.download(tmp_path / "w.safetensors")
    copy = client.upload(tmp_path / "w.safetensors", name=f"window-{mode}-copy")
    check(copy, f"window-{mode}-copy")
    new = _push(copy, n + 1)
    assert new.step == n + 1 and not new.duplicate and _push(copy, n + 1).duplicate


def test_sync_retry_of_an_applied_seq_while_a_newer_one_is_pending(client):
    # raw pushes, without heartbeats: a fixed membership, so that no lease expires between them
    m = client.create_model("window-pending", PARAMS, optimizer=SPEC, mode="sync", workers=2, heartbeat=0)
    leaves = m._grad_leaves(GRADS, None)
    first = _push(m, 1)  # worker w joins step 1; v completes it
    assert m.push_raw(m._push_header(None, None, "v", 1), leaves).applied
    pending = _push(m, 3)  # joins step 2, which waits for v
    assert (first.step, first.applied, pending.step, pending.applied) == (1, False, 2, False)
    for seq, original in ((1, first), (3, pending), (1, first)):
        again = _push(m, seq)
        assert again.duplicate and (again.step, again.applied) == (original.step, original.applied), seq
    with pytest.raises(FailedPreconditionError, match="seq 2 is older than its pending seq 3"):
        _push(m, 2)  # above its highest applied seq, below its pending one: never pushed
    info = m.info()
    assert info["step"] == 1 and info["pending_contributions"] == 1 and info["counters"]["pushes_applied"] == 1
