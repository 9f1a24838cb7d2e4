"""Hostile input against a live `optserve serve` subprocess: thousands of random and malformed
requests (random bytes as chunks, huge declared shapes, out-of-range and overlapping offsets, dtype
`object`, NaN and Inf gradients, odd unicode leaf names, a million tiny leaves in one create,
abandoned streams), through the streaming RPCs, their unary twins (PushOne, PullOne, PushPullOne)
and Upload (state files with any manifest field missing, of the wrong type or out of range,
truncated, or with a damaged header). Each gets an error status, the server never crashes, its
memory stays bounded, no model is created, and every model's parameters, step and hyperparameters
are unchanged afterwards."""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from optserve.client import Client, optim
from optserve.server.state import safetensors_io
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages
from optserve.wire.framing import frame, parse_message, varint
from tests.conftest import start_server_process, stop_server_process

VICTIMS = {
    "victim-f32": (
        {"layer": {"w": np.arange(32, dtype=np.float32).reshape(8, 4) / 7, "b": np.ones(4, np.float32)}},
        optim.adam(0.01),
    ),
    "victim-mixed": (
        {"emb": np.linspace(-1, 1, 16).astype(ml_dtypes.bfloat16), "count": np.arange(3, dtype=np.int32)},
        optim.sgd(0.1),
    ),
}
MAIN_REQUESTS = 2000
RSS_GROWTH_LIMIT = 150 << 20  # bytes; warm-up first, so this is growth, not start-up cost


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def live():
    proc, address = start_server_process("--checkpoint-dir", "", "--max-workers", "16", "--log-level", "WARNING")
    client = Client(address, timeout=60)
    for name, (params, opt) in VICTIMS.items():
        m = client.create_model(name, params, opt)
        if name == "victim-f32":
            m.push({"layer": {"w": np.ones((8, 4), np.float32), "b": np.ones(4, np.float32)}})
    yield proc, client
    client.close()
    stop_server_process(proc)


def snapshot(client: Client) -> dict:
    out = {}
    for name in VICTIMS:
        m = client.model(name)
        info = m.info()
        flat = {leaf["path"] for leaf in info["schema"]}
        params = m.pull()
        out[name] = (info["step"], info["hyperparams"], repr(sorted(flat)), repr(params))
    return out


def download(model) -> bytes:
    """A victim's state file (Download), for the upload kinds to corrupt."""
    chunks = []
    for raw in model.client.stream(model.client._download, pb.DownloadRequest(model=model.name)):
        chunks.append(bytes(parse_message(raw, pb.FileChunk)[1]))
    return b"".join(chunks)


# -- request builders ------------------------------------------------------------------------------


def sl(path, dtype, shape, offset, length) -> pb.TensorSlice:
    return pb.TensorSlice(path=path, dtype=dtype, shape=shape, offset=offset, length=length)


def msg(message: pb.PushRequest | pb.CreateModelRequest, payload: bytes = b"") -> bytes:
    return frame(message.SerializeToString(), [payload] if payload else [])


def push_header(model="victim-f32", **kw) -> pb.PushHeader:
    return pb.PushHeader(model=model, **kw)


def valid_push_leaves(fill=1.0) -> list[tuple[str, np.ndarray]]:
    return [("layer/b", np.full(4, fill, np.float32)), ("layer/w", np.full((8, 4), fill, np.float32))]


def create_header(name, schema, spec='{"sgd": {"learning_rate": 0.1}}') -> pb.CreateModelHeader:
    return pb.CreateModelHeader(name=name, optimizer_json=spec, schema=schema)


FULLWIDTH_W = "layer/ｗ"  # noqa: RUF001 - a full-width w on purpose: a look-alike of layer/w, a different leaf
ODD_NAMES = [
    "\u202eevil",
    "w\x00",
    "a\u2028b",
    "\ufeffw",
    "\U000e0041",
    "\ue000",
    "\u0378",
    "layer/\x7fw",
    "layer/w\n",
    "x" * 5000,
    "",
    FULLWIDTH_W,
    "layer/w ",
    "🙂/ẘ",
    "../../etc/passwd",
    "layer//w",
]


def utf8_bad_string_message(field_number: int, raw: bytes) -> bytes:
    """A length-delimited field carrying invalid UTF-8 (protobuf writers refuse to produce one)."""
    return varint((field_number << 3) | 2) + varint(len(raw)) + raw


def _deep_spec(n: int) -> dict:
    spec: dict = {"sgd": {"learning_rate": 0.1}}
    for _ in range(n):
        spec = {"chain": [spec]}
    return spec


def _bad_worker(**kw) -> dict:
    return {"w": {"last_seq": 1, "last_base_step": 0, "replies": [], **kw}}


# Values no manifest field may hold (each refused whatever the other fields say). "model" is only
# read when the upload names no model, so its cases are sent without a name.
BAD_MANIFEST_VALUES = {
    "format": [None, 5, "safetensors", []],
    "format_version": [2, "1", True, 1.0, None],
    "model": [7, None, "../victim", "", "a" * 300, ["victim"]],
    "step": [-1, 2**53, 2**64, 1.5, "3", True, None],
    "schema": [
        [],
        {},
        "layer/w",
        None,
        [{"path": "layer/w", "dtype": "object", "shape": [8, 4]}],
        [{"path": "layer/\x00w", "dtype": "float32", "shape": [8, 4]}],
        [{"path": "w", "dtype": "float64", "shape": [3]}],
        [{"path": "w", "dtype": "float32", "shape": [0, 2**63 - 1]}],
        [{"path": "w", "dtype": "float32", "shape": "3"}],
    ],
    "spec": [12, None, "no-such-rule", {"sgd": {}}, _deep_spec(400), [{"adam": {}}]],
    "settings": [
        [],
        "async",
        None,
        {"mode": "banana"},
        {"mode": "sync", "workers": 0},
        {"max_staleness": -1},
        {"mode": "sync", "workers": 1, "sync_timeout": float("nan")},
        {"mode": "sync", "workers": 2, "quorum": 3},
        {"mode": "sync", "workers": 1, "sync_timeout": -1.0},
        {"turbo": True},
        {"workers": "2"},
    ],
    "hyperparams": [[], "x", None, {"learning_rate": "x"}, {"learning_rate": float("inf")}],
    "workers": [
        [],
        "w",
        None,
        {"w": 3},
        _bad_worker(last_seq="abc"),
        _bad_worker(last_seq=-1),
        _bad_worker(last_base_step=10**6),
        _bad_worker(replies=[{"seq": 1, "reply": {"proto": "PullRequest", "b64": ""}}]),
        _bad_worker(replies=[{"seq": 1, "reply": {"proto": "PushResponse", "b64": "////"}}]),
        {"": {"last_seq": 1, "last_base_step": 0, "replies": []}},
    ],
    "opt_keys": [None, "count", [], ["count", "count"], 5],
    "ema_keys": [["count"], 3, "x", {}],
}


class Hostile:
    """Builds one malformed request of a kind; yields (rpc, request or message list, label).

    `upload_base`: a valid state file (a download of a victim) that the upload kinds corrupt."""

    def __init__(self, rng: np.random.Generator, upload_base: bytes = b""):
        self.rng = rng
        self.upload_base = upload_base

    def upload_messages(self, data: bytes, name: str, total: int | None = None) -> list[bytes]:
        total = len(data) if total is None else total
        msgs = [pb.UploadRequest(header=pb.UploadHeader(name=name, total_bytes=total)).SerializeToString()]
        step = int(self.rng.integers(1 << 10, 1 << 16))
        msgs += [
            frame(pb.UploadRequest(offset=o).SerializeToString(), [data[o : o + step]])
            for o in range(0, len(data), step)
        ]
        return msgs

    def corrupt_upload(self) -> tuple[bytes, str]:
        """The base file with one manifest field missing or bad (bytes, the name to upload as)."""
        r = self.rng
        tensors, meta = safetensors_io.parse_safetensors(self.upload_base, "base")
        meta = dict(meta)
        key = str(r.choice(list(BAD_MANIFEST_VALUES)))
        if r.integers(4) == 0:
            del meta[key]
        else:
            values = BAD_MANIFEST_VALUES[key]
            meta[key] = json.dumps(values[int(r.integers(len(values)))])
        data = safetensors.numpy.save({k: v.copy() for k, v in tensors.items()}, metadata=meta)
        return data, "" if key == "model" else f"up-{r.integers(1 << 30)}"

    def rand_bytes(self, lo=0, hi=4096) -> bytes:
        return self.rng.bytes(int(self.rng.integers(lo, hi)))

    def one(self, kind: str):
        r = self.rng
        ok_leaves = valid_push_leaves()
        if kind == "random_push_bytes":
            return "Push", [self.rand_bytes()]
        if kind == "random_bytes_after_header":
            return "Push", [msg(pb.PushRequest(header=push_header())), self.rand_bytes(1)]
        if kind == "random_pushpull_bytes":
            return "PushPull", [self.rand_bytes() for _ in range(int(r.integers(1, 4)))]
        if kind == "random_create_bytes":
            return "CreateModel", [self.rand_bytes()]
        if kind == "random_unary":
            return str(
                r.choice(["GetModel", "DeleteModel", "SetHyperparams", "Pull", "SaveCheckpoint"])
            ), self.rand_bytes(1)
        if kind == "huge_push_shape":
            shape = [int(x) for x in r.integers(1, 1 << 40, size=int(r.integers(1, 4)))]
            return "Push", [
                msg(pb.PushRequest(header=push_header(), slices=[sl("layer/w", "float32", shape, 0, 16)]), b"\0" * 16)
            ]
        if kind == "huge_create_shape":
            shape = [int(x) for x in r.integers(1 << 20, 1 << 62, size=int(r.integers(1, 3)))]
            h = create_header(f"huge-{r.integers(1 << 30)}", [pb.LeafSpec(path="w", dtype="float32", shape=shape)])
            return "CreateModel", [
                msg(pb.CreateModelRequest(header=h, slices=[sl("w", "float32", shape, 0, 8)]), b"\0" * 8)
            ]
        if kind == "absurd_empty_shape":  # no array can have it, even empty (int64 strides overflow)
            shape = [[0, 2**63 - 1], [2**32, 2**32, 0, 7], [0, 2**62], [2**40, 0, 2**30]][int(r.integers(4))]
            h = create_header(f"absurd-{r.integers(1 << 30)}", [pb.LeafSpec(path="w", dtype="float32", shape=shape)])
            return "CreateModel", [msg(pb.CreateModelRequest(header=h, slices=[sl("w", "float32", shape, 0, 0)]))]
        if kind == "bad_offsets":
            choice = int(r.integers(0, 4))
            off = [2**64 - 1, 2**63, 128 - 4, 120][choice]
            length = [8, 8, 8, 16][choice]
            return "Push", [
                msg(
                    pb.PushRequest(header=push_header(), slices=[sl("layer/w", "float32", [8, 4], off, length)]),
                    b"\1" * length,
                )
            ]
        if kind == "overlapping_offsets":
            a = int(r.integers(0, 64)) * 2
            s = [
                sl("layer/w", "float32", [8, 4], 0, 128),
                sl("layer/w", "float32", [8, 4], a, 8),
                sl("layer/b", "float32", [4], 0, 16),
            ]
            return "Push", [msg(pb.PushRequest(header=push_header(), slices=s), b"\0" * (128 + 8 + 16))]
        if kind == "length_mismatch":
            extra = int(r.integers(1, 64))
            msgs = list(chunk_messages(pb.PushRequest(header=push_header()), ok_leaves, 1 << 20))
            return "Push", [msgs[0] + frame(b"", [b"\0" * extra])] if r.integers(2) else [msgs[0][:-extra]]
        if kind == "bad_dtype":
            dt = str(r.choice(["object", "O", "|O", "float128", "<f4", "", "complex64", "str", "V8", "float32\0"]))
            return "Push", [
                msg(pb.PushRequest(header=push_header(), slices=[sl("layer/w", dt, [8, 4], 0, 128)]), b"\0" * 128)
            ]
        if kind == "create_bad_dtype":
            dt = str(r.choice(["object", "O", "float128", "complex128", "U8", ""]))
            h = create_header(f"dt-{r.integers(1 << 30)}", [pb.LeafSpec(path="w", dtype=dt, shape=[2])])
            return "CreateModel", [msg(pb.CreateModelRequest(header=h, slices=[sl("w", dt, [2], 0, 16)]), b"\0" * 16)]
        if kind == "nonfinite":
            leaves = valid_push_leaves()
            bad = leaves[int(r.integers(0, 2))][1]
            bad.reshape(-1)[int(r.integers(0, bad.size))] = r.choice([np.nan, np.inf, -np.inf])
            rpc = str(r.choice(["Push", "PushPull"]))
            return rpc, list(chunk_messages(pb.PushRequest(header=push_header()), leaves, int(r.integers(16, 256))))
        if kind == "nonfinite_bf16":
            emb = np.linspace(-1, 1, 16).astype(ml_dtypes.bfloat16)
            emb[3] = np.nan
            leaves = [("count", np.zeros(3, np.int32)), ("emb", emb)]
            return "Push", list(chunk_messages(pb.PushRequest(header=push_header("victim-mixed")), leaves, 1 << 20))
        if kind == "odd_leaf_name_push":
            name = ODD_NAMES[int(r.integers(len(ODD_NAMES)))]
            leaves = [(name, np.ones(4, np.float32))] + (
                [valid_push_leaves()[1]] if r.integers(2) else valid_push_leaves()
            )
            return "Push", list(chunk_messages(pb.PushRequest(header=push_header()), leaves, 1 << 20))
        if kind == "odd_leaf_name_create":
            name = [n for n in ODD_NAMES if n not in (FULLWIDTH_W, "layer/w ", "🙂/ẘ", "../../etc/passwd", "layer//w")]
            path = name[int(r.integers(len(name)))]
            h = create_header(f"odd-{r.integers(1 << 30)}", [pb.LeafSpec(path=path, dtype="float32", shape=[1])])
            return "CreateModel", [
                msg(pb.CreateModelRequest(header=h, slices=[sl(path, "float32", [1], 0, 4)]), b"\0" * 4)
            ]
        if kind == "invalid_utf8":
            raw = bytes(r.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"w\x80"]))
            header = utf8_bad_string_message(1, raw)  # PushHeader.model
            return "Push", [utf8_bad_string_message(1, header)]
        if kind == "odd_model_name":
            name = str(
                r.choice(["../victim-f32", "victim-f32/../x", ".hidden", "-rf", "\u202evictim", "a" * 300, "", " "])
            )
            h = create_header(name, [pb.LeafSpec(path="w", dtype="float32", shape=[1])])
            return "CreateModel", [
                msg(pb.CreateModelRequest(header=h, slices=[sl("w", "float32", [1], 0, 4)]), b"\0" * 4)
            ]
        if kind == "bad_spec":
            spec = str(
                r.choice(
                    [
                        "[" * 100_000,
                        "{",
                        '"no-such-rule"',
                        '{"adam": {"b1": "x"}}',
                        "null",
                        "1e999",
                        '{"chain": [' + "{}," * 50 + "{}]}",
                        '{"adam": {"learning_rate": NaN}}',
                        json.dumps({"adam": {"learning_rate": 1e-3, "b1": [1] * 10}}),
                    ]
                )
            )
            h = create_header(f"spec-{r.integers(1 << 30)}", [pb.LeafSpec(path="w", dtype="float32", shape=[2])], spec)
            return "CreateModel", [
                msg(pb.CreateModelRequest(header=h, slices=[sl("w", "float32", [2], 0, 8)]), b"\0" * 8)
            ]
        if kind == "missing_or_extra_leaf":
            leaves = valid_push_leaves()
            leaves = leaves[:1] if r.integers(2) else [*leaves, ("layer/extra", np.ones(2, np.float32))]
            return "Push", list(chunk_messages(pb.PushRequest(header=push_header()), leaves, 1 << 20))
        if kind == "duplicate_leaf":
            leaves = [*valid_push_leaves(), valid_push_leaves()[0]]
            return "Push", list(chunk_messages(pb.PushRequest(header=push_header()), leaves, 1 << 20))
        if kind == "header_twice":
            msgs = list(chunk_messages(pb.PushRequest(header=push_header()), valid_push_leaves(), 64))
            msgs.insert(1, msg(pb.PushRequest(header=push_header())))
            return "Push", msgs
        if kind == "empty_stream":
            return str(r.choice(["Push", "PushPull", "CreateModel"])), []
        if kind == "bad_steps":
            h = push_header(base_step=int(r.choice([10**9, -5, 2**62])))
            if r.integers(2):
                h = push_header(worker_id="w", seq=0)
            return "Push", list(chunk_messages(pb.PushRequest(header=h), valid_push_leaves(), 1 << 20))
        if kind == "unknown_model":
            name = str(r.choice(["nope", "VICTIM-F32", "victim-f32 ", "victim-f32\u200b"]))
            return "Push", list(chunk_messages(pb.PushRequest(header=push_header(name)), valid_push_leaves(), 1 << 20))
        if kind == "bad_pull":
            req = str(r.choice(["wire_dtype", "timeout", "ema", "unknown", "min_step"]))
            p = pb.PullRequest(model="victim-f32")
            if req == "wire_dtype":
                p.wire_dtype = str(r.choice(["object", "int8", "float128", "x"]))
            elif req == "timeout":
                p.min_step, p.timeout_seconds = 10**9, float(r.choice([np.nan, -1.0, np.inf]))
            elif req == "ema":
                p.ema = True
            elif req == "unknown":
                p.model = "ghost"
            else:
                p.min_step, p.timeout_seconds = 10**9, 0.01
            return "Pull", p.SerializeToString()
        if kind == "random_twin_bytes":
            return str(r.choice(["PushOne", "PullOne", "PushPullOne"])), self.rand_bytes(1)
        if kind == "twin_malformed_push":
            rpc = str(r.choice(["PushOne", "PushPullOne"]))
            choice = int(r.integers(0, 5))
            if choice == 0:  # an offset beyond the leaf
                return rpc, msg(
                    pb.PushRequest(header=push_header(), slices=[sl("layer/w", "float32", [8, 4], 2**63, 8)]), b"\1" * 8
                )
            if choice == 1:  # a leaf missing
                return rpc, next(chunk_messages(pb.PushRequest(header=push_header()), valid_push_leaves()[:1], 1 << 20))
            if choice == 2:  # NaN
                leaves = valid_push_leaves()
                leaves[1][1][3, 2] = np.nan
                return rpc, next(chunk_messages(pb.PushRequest(header=push_header()), leaves, 1 << 20))
            if choice == 3:  # payload shorter than its slices
                whole = next(chunk_messages(pb.PushRequest(header=push_header()), valid_push_leaves(), 1 << 20))
                return rpc, whole[:-7]
            return rpc, msg(
                pb.PushRequest(header=push_header(), slices=[sl("layer/w", "object", [8, 4], 0, 128)]), b"\0" * 128
            )
        if kind == "twin_bad_pull":
            p = pb.PullRequest(model="victim-f32")
            choice = int(r.integers(0, 3))
            if choice == 0:
                p.wire_dtype = str(r.choice(["object", "int8", "x"]))
            elif choice == 1:
                p.min_step, p.timeout_seconds = 10**9, float(r.choice([np.nan, -1.0, np.inf]))
            else:
                p.model = str(r.choice(["ghost", "../victim-f32", ""]))
            return "PullOne", p.SerializeToString()
        if kind == "upload_corrupt_manifest":
            data, name = self.corrupt_upload()
            return "Upload", self.upload_messages(data, name)
        if kind == "upload_damaged_file":
            data = bytearray(self.upload_base)
            name = f"up-{r.integers(1 << 30)}"
            choice = int(r.integers(0, 4))
            if choice == 0:  # truncated (the header says so)
                data = data[: int(r.integers(0, len(data)))]
            elif choice == 1:  # the header length lies
                data[:8] = struct.pack("<Q", int(r.choice([2**63, len(data), 0, 7])))
            elif choice == 2:  # random bytes inside the JSON header
                (n,) = struct.unpack("<Q", data[:8])
                at = int(r.integers(8, 8 + n - 8))
                data[at : at + 8] = r.bytes(8).replace(b'"', b"\x00")
            else:  # fewer bytes than total_bytes declares
                return "Upload", self.upload_messages(bytes(data), name, total=len(data) + int(r.integers(1, 1 << 20)))
            return "Upload", self.upload_messages(bytes(data), name)
        if kind == "bad_hyperparams":
            value = float(r.choice([np.nan, np.inf, -np.inf]))
            name = str(r.choice(["learning_rate", "no_such_thing", "", "b1"]))
            if name == "learning_rate" and np.isfinite(value):
                value = np.nan
            req = pb.SetHyperparamsRequest(
                model=str(r.choice(["victim-f32", "victim-mixed"])), values=[pb.Hyperparam(name=name, value=value)]
            )
            return "SetHyperparams", req.SerializeToString()
        raise ValueError(kind)


KINDS = [
    "random_push_bytes",
    "random_bytes_after_header",
    "random_pushpull_bytes",
    "random_create_bytes",
    "random_unary",
    "huge_push_shape",
    "huge_create_shape",
    "absurd_empty_shape",
    "bad_offsets",
    "overlapping_offsets",
    "length_mismatch",
    "bad_dtype",
    "create_bad_dtype",
    "nonfinite",
    "nonfinite_bf16",
    "odd_leaf_name_push",
    "odd_leaf_name_create",
    "invalid_utf8",
    "odd_model_name",
    "bad_spec",
    "missing_or_extra_leaf",
    "duplicate_leaf",
    "header_twice",
    "empty_stream",
    "bad_steps",
    "unknown_model",
    "bad_pull",
    "bad_hyperparams",
    "random_twin_bytes",
    "twin_malformed_push",
    "twin_bad_pull",
    "upload_corrupt_manifest",
    "upload_damaged_file",
]
EXPECTED = {
    "nonfinite": "INVALID_ARGUMENT",
    "nonfinite_bf16": "INVALID_ARGUMENT",
    "bad_offsets": "INVALID_ARGUMENT",
    "overlapping_offsets": "INVALID_ARGUMENT",
    "bad_dtype": "INVALID_ARGUMENT",
    "create_bad_dtype": "INVALID_ARGUMENT",
    "odd_leaf_name_push": "INVALID_ARGUMENT",
    "odd_leaf_name_create": "INVALID_ARGUMENT",
    "invalid_utf8": "INVALID_ARGUMENT",
    "odd_model_name": "INVALID_ARGUMENT",
    "bad_spec": "INVALID_ARGUMENT",
    "missing_or_extra_leaf": "INVALID_ARGUMENT",
    "duplicate_leaf": "INVALID_ARGUMENT",
    "header_twice": "INVALID_ARGUMENT",
    "empty_stream": "INVALID_ARGUMENT",
    "length_mismatch": "INVALID_ARGUMENT",
    "huge_push_shape": "INVALID_ARGUMENT",
    "huge_create_shape": "RESOURCE_EXHAUSTED",
    "unknown_model": "NOT_FOUND",
    "bad_steps": "INVALID_ARGUMENT",
    "absurd_empty_shape": "INVALID_ARGUMENT",
    "twin_malformed_push": "INVALID_ARGUMENT",
    "upload_corrupt_manifest": "INVALID_ARGUMENT",
    "upload_damaged_file": "INVALID_ARGUMENT",
}
STREAMING = {"Push", "PushPull", "CreateModel", "Upload"}
RESPONSE_STREAMING = {"Pull", "PushPull"}


def call(channel: grpc.Channel, rpc: str, request, timeout: float = 30.0) -> grpc.StatusCode:
    """Sends raw bytes to an optserve RPC; returns the final status code."""
    method = f"/optserve.v1.Optserve/{rpc}"

    def ident(raw: bytes) -> bytes:
        return raw

    factory = {
        (True, True): channel.stream_stream,
        (True, False): channel.stream_unary,
        (False, True): channel.unary_stream,
        (False, False): channel.unary_unary,
    }[(rpc in STREAMING, rpc in RESPONSE_STREAMING)]
    fn = factory(method, request_serializer=ident, response_deserializer=ident)
    try:
        arg = iter(request) if rpc in STREAMING else request
        if rpc in RESPONSE_STREAMING:
            for _ in fn(arg, timeout=timeout):
                pass
        else:
            fn(arg, timeout=timeout)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@functools.cache
def million_leaves() -> bytes:
    h = create_header("million", [pb.LeafSpec(path=f"p{i}", dtype="float32", shape=[1]) for i in range(1_000_000)])
    return pb.CreateModelRequest(header=h).SerializeToString()


def abandon(channel: grpc.Channel, rpc: str, first: bytes) -> grpc.StatusCode:
    """Starts a stream, sends one message, and walks away (cancels) while the server waits for more."""
    gate = threading.Event()

    def requests() -> Iterator[bytes]:
        yield first
        gate.wait(30)  # never set: the stream stays open until cancelled

    fn = channel.stream_unary(
        f"/optserve.v1.Optserve/{rpc}", request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    future = fn.future(requests(), timeout=30)
    try:
        future.result(timeout=0.3)
    except grpc.FutureTimeoutError:
        future.cancel()
    except grpc.RpcError:
        pass
    gate.set()
    return future.code() if future.done() else grpc.StatusCode.UNKNOWN


KILLED_CLIENT = """
import sys, time, grpc
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.framing import frame
ch = grpc.insecure_channel(sys.argv[1])
fn = ch.stream_unary("/optserve.v1.Optserve/CreateModel", request_serializer=lambda x: x,
                     response_deserializer=lambda x: x)
h = pb.CreateModelHeader(name="abandoned-by-a-dead-client", optimizer_json='{"sgd": {"learning_rate": 0.1}}',
                         schema=[pb.LeafSpec(path="w", dtype="float32", shape=[1 << 20])])
first = frame(pb.CreateModelRequest(header=h, slices=[pb.TensorSlice(path="w", dtype="float32", shape=[1 << 20],
              offset=0, length=4096)]).SerializeToString(), [b"\\0" * 4096])
def gen():
    yield first
    time.sleep(600)
call = fn.future(gen())
grpc.channel_ready_future(ch).result(timeout=60)
print("sent", flush=True)  # the first message is on its way (the test waits until the server holds the name)
time.sleep(600)
"""


def until_status(
    channel: grpc.Channel, header: pb.CreateModelHeader, want: grpc.StatusCode, timeout: float = 60
) -> bool:
    """Repeats a header-only CreateModel until it gets `want` (bounded); True if it did."""
    deadline = time.monotonic() + timeout
    while call(channel, "CreateModel", [msg(pb.CreateModelRequest(header=header))]) != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_hostile_requests_get_errors_and_change_nothing(live):
    proc, client = live
    before = snapshot(client)
    rng = np.random.default_rng(20261121)
    hostile = Hostile(rng, upload_base=download(client.model("victim-f32")))
    statuses: Counter = Counter()
    ok: list[str] = []

    def run(n: int, channel: grpc.Channel) -> None:
        for i in range(n):
            kind = KINDS[i % len(KINDS)] if i < len(KINDS) else KINDS[int(rng.integers(len(KINDS)))]
            rpc, request = hostile.one(kind)
            code = call(channel, rpc, request)
            statuses[(kind, code.name)] += 1
            if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                ok.append(f"{kind} via {rpc}: {code.name}")

    with grpc.insecure_channel(client.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        # Warm-up: every kind a few times, and the million-leaf create once, before measuring memory.
        run(4 * len(KINDS), ch)
        assert call(ch, "CreateModel", [million_leaves()], timeout=60) == grpc.StatusCode.INVALID_ARGUMENT
        rss_warm = rss_bytes(proc.pid)

        run(MAIN_REQUESTS, ch)
        # A million tiny leaves in one create request: refused, in bounded time (the call's deadline).
        assert call(ch, "CreateModel", [million_leaves()], timeout=60) == grpc.StatusCode.INVALID_ARGUMENT
        # Abandoned streams: a create (name reserved) and a push, mid-stream; the client cancels.
        big = [pb.LeafSpec(path="w", dtype="float32", shape=[1 << 16])]
        first_create = msg(
            pb.CreateModelRequest(
                header=create_header("abandoned", big), slices=[sl("w", "float32", [1 << 16], 0, 1024)]
            ),
            b"\0" * 1024,
        )
        first_push = msg(
            pb.PushRequest(header=push_header(), slices=[sl("layer/w", "float32", [8, 4], 0, 64)]), b"\0" * 64
        )
        for _ in range(5):
            assert abandon(ch, "CreateModel", first_create) == grpc.StatusCode.CANCELLED
            assert abandon(ch, "Push", first_push) == grpc.StatusCode.CANCELLED
        # A client process killed mid-create.
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, client.target], stdout=subprocess.PIPE, text=True
        )
        doomed = create_header("abandoned-by-a-dead-client", big, '"no-such-rule"')
        try:
            assert select.select([child.stdout], [], [], 120)[0], "the doomed client did not start"
            assert child.stdout.readline().strip() == "sent"
            # Killed only once the server holds its name (a probe with a bad spec: nothing is created).
            assert until_status(ch, doomed, grpc.StatusCode.ALREADY_EXISTS), "the doomed create never arrived"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        rss_after = rss_bytes(proc.pid)

        # Names reserved by abandoned creates were released: the same names are free again (a bad
        # spec is reported, not ALREADY_EXISTS).
        for name in ("abandoned", "abandoned-by-a-dead-client"):
            # the dead client's stream ends when the server notices (bounded wait)
            assert until_status(ch, create_header(name, big, '"no-such-rule"'), grpc.StatusCode.INVALID_ARGUMENT), name

    total = sum(statuses.values())
    assert total >= MAIN_REQUESTS + 4 * len(KINDS)
    assert not ok, sorted(set(ok))  # every one an error status, and never INTERNAL/UNKNOWN
    assert {k for k, _ in statuses} == set(KINDS)
    by_kind: dict[str, set[str]] = {}
    for (kind, code), _ in statuses.items():
        by_kind.setdefault(kind, set()).add(code)
    # The kinds whose answer is fixed got exactly that answer (so they reached the check they aim at).
    for kind, code in EXPECTED.items():
        assert by_kind[kind] == {code}, (kind, by_kind[kind])
    assert proc.poll() is None, "the server died"
    growth = rss_after - rss_warm
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth >> 20} MiB over {total} hostile requests"
    # Nothing changed, no model was created, and the server still serves.
    assert snapshot(client) == before
    assert sorted(m["name"] for m in client.list_models()) == sorted(VICTIMS)
    m = client.model("victim-f32")
    # The leaves the hostile pushes were built on are the model's own: the same push, valid, applies.
    assert (
        call(
            client._channel, "Push", list(chunk_messages(pb.PushRequest(header=push_header()), valid_push_leaves(), 64))
        )
        == grpc.StatusCode.OK
    )
    assert m.step == before["victim-f32"][0] + 1
    print(
        f"\n{total} hostile requests; RSS {rss_warm >> 20} -> {rss_after >> 20} MiB; statuses:",
        dict(Counter(code for (_, code), n in statuses.items() for _ in range(n))),
    )
    assert os.path.exists(f"/proc/{proc.pid}")
