"""The gRPC service: a thin layer that validates requests and calls the model store.

Bulky RPCs are registered with identity (de)serializers so that chunk payloads are framed and
sliced by `optserve.wire` without protobuf copies; the others use the generated messages. Every handler
gets a `CallContext` (api/call_context.py) built by its wrapper, turns errors into gRPC statuses
through api/status.py, and never changes state before a request has been validated completely.
The data RPCs (Push, Pull, PushPull and their unary twins) live in api/data_plane.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from optserve.server.api import messages, status, transfer
from optserve.server.api import requests as requests_
from optserve.server.api.auth import Token
from optserve.server.api.call_context import CallContext, allowed_models
from optserve.server.api.data_plane import DataPlane
from optserve.server.api.metrics import ServerMetrics
from optserve.server.checkpoint.manager import CheckpointManager
from optserve.server.core import admission, initializers, sharding
from optserve.server.core.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from optserve.server.core.model import Model
from optserve.server.core.sharding import Shard
from optserve.server.core.shared_memory import SharedRegions
from optserve.server.core.store import ModelStore, check_model_name
from optserve.server.spec import SpecError, list_rules
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.assembler import TensorAssembler
from optserve.wire.channel import SERVICE
from optserve.wire.chunks import DEFAULT_CHUNK_BYTES
from optserve.wire.shared_memory import host_id

log = logging.getLogger("optserve.service")
VERSION = "0.1.0"


def _identity(x: bytes) -> bytes:
    return x


class _Malformed:
    """What `_parse` hands the handler instead of a request protobuf could not parse."""

    def __init__(self, message_type: type[Message], error: Exception):
        self.message = f"{message_type.__name__}: malformed message ({error})"


def _parse(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc would answer INTERNAL for a deserializer's
    exception, but a malformed request is the client's fault (INVALID_ARGUMENT, see the wrappers)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:  # protobuf's DecodeError and friends
            return _Malformed(message_type, e)

    return parse


def _handler(fn: Callable) -> Callable:
    """Wraps a unary-response handler: builds its CallContext, maps its exceptions to statuses."""
    rpc = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: OptserveService, request: Any, context: grpc.ServicerContext) -> Any:
        call = self._call_context(rpc, context)
        try:
            self._check_ready()
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            return fn(self, request, call)
        except Exception as e:  # every failure becomes a status
            self.metrics.failed(rpc, e, model=call.model, pushed=call.pushed)
            if isinstance(e, grpc.RpcError) or (context.is_active() is False and not isinstance(e, ServiceError)):
                raise
            status.abort(context, e, rpc, call.model)

    return wrapper


def _stream_handler(fn: Callable) -> Callable:
    """The same for handlers that return a response iterator."""
    rpc = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: OptserveService, request: Any, context: grpc.ServicerContext) -> Iterator:
        call = self._call_context(rpc, context)
        try:
            self._check_ready()
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            yield from fn(self, request, call)
        except GeneratorExit:
            raise
        except Exception as e:
            self.metrics.failed(rpc, e, model=call.model, pushed=call.pushed)
            if isinstance(e, grpc.RpcError):
                raise
            status.abort(context, e, rpc, call.model)

    return wrapper


def _spec_of(name: str, optimizer_json: str) -> Any:
    """The optimizer spec of a request (JSON text); INVALID_ARGUMENT naming the model if there is none
    or it is not JSON."""
    if not optimizer_json:
        raise InvalidArgument(f"model {name!r}: optimizer_json: an optimizer spec is required")
    try:
        return json.loads(optimizer_json)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: hostile nesting depth
        raise InvalidArgument(f"model {name!r}: optimizer_json is not valid JSON: {e}") from None


def _only(messages: Iterator[bytes]) -> bytes:
    """The one message of a reply stream built for a unary twin."""
    (message,) = list(messages)
    return message


class OptserveService:
    """Implements optserve.v1.Optserve over a ModelStore."""

    def __init__(
        self,
        store: ModelStore,
        *,
        metrics: ServerMetrics,
        checkpoints: CheckpointManager | None = None,
        tokens: Sequence[Token] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_workers: int = 64,
        ready: bool = True,
        shared: SharedRegions | None = None,
        shared_memory_socket: str = "",
    ):
        """checkpoints: the CheckpointManager (None: no checkpoints); tokens: the bearer-token table
        (None: no authentication), from which each call's allowed models are resolved; max_workers:
        the server's RPC threads (bounds the calls that wait for a step, api/data_plane.py); ready:
        False while the server restores checkpoints (every call is UNAVAILABLE until `ready.set()`);
        shared, shared_memory_socket: the regions and address of the shared-memory side socket
        (server/optserve/server/shared_memory_socket.py; None and "": the server offers none)."""
        self.store = store
        self.metrics = metrics
        self.checkpoints = checkpoints
        self.tokens = None if tokens is None else list(tokens)
        self.chunk_bytes = chunk_bytes
        self.incarnation = uuid.uuid4().hex
        self.started_unix = time.time()
        self.accepting = threading.Event()
        self.accepting.set()
        # Until set, a model may still be missing (checkpoints being restored), so every call is
        # UNAVAILABLE (clients retry), never a misleading NOT_FOUND.
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.data = DataPlane(
            store,
            metrics,
            incarnation=self.incarnation,
            chunk_bytes=chunk_bytes,
            max_workers=max_workers,
            accepting=self.accepting,
            shared=shared,
        )
        self.shared_memory_socket = shared_memory_socket
        self.host_id = host_id() if shared_memory_socket else ""
        self.waiting = self.data.waiting

    def _call_context(self, rpc: str, context: grpc.ServicerContext) -> CallContext:
        allowed = None if self.tokens is None else allowed_models(self.tokens, context.invocation_metadata())
        return CallContext(rpc, context, allowed)

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise Unavailable("server is starting: restoring checkpoints; retry shortly")

    def _check_accepting(self) -> None:
        if not self.accepting.is_set():
            raise Unavailable("server is shutting down; retry against its replacement")

    # -- registration -----------------------------------------------------------------------------

    def handlers(self) -> grpc.GenericRpcHandler:
        raw, P = _identity, pb
        h = grpc
        table = {
            "CreateModel": h.stream_unary_rpc_method_handler(self.CreateModel, raw, P.ModelInfo.SerializeToString),
            "GetModel": h.unary_unary_rpc_method_handler(
                self.GetModel, _parse(P.GetModelRequest), P.ModelInfo.SerializeToString
            ),
            "ListModels": h.unary_unary_rpc_method_handler(
                self.ListModels, _parse(P.ListModelsRequest), P.ListModelsResponse.SerializeToString
            ),
            "DeleteModel": h.unary_unary_rpc_method_handler(
                self.DeleteModel, _parse(P.DeleteModelRequest), P.DeleteModelResponse.SerializeToString
            ),
            "SetHyperparams": h.unary_unary_rpc_method_handler(
                self.SetHyperparams, _parse(P.SetHyperparamsRequest), P.ModelInfo.SerializeToString
            ),
            "Push": h.stream_unary_rpc_method_handler(self.Push, raw, P.PushResponse.SerializeToString),
            "Pull": h.unary_stream_rpc_method_handler(self.Pull, _parse(P.PullRequest), raw),
            "PushPull": h.stream_stream_rpc_method_handler(self.PushPull, raw, raw),
            "PushOne": h.unary_unary_rpc_method_handler(self.PushOne, raw, P.PushResponse.SerializeToString),
            "PullOne": h.unary_unary_rpc_method_handler(self.PullOne, _parse(P.PullRequest), raw),
            "PushPullOne": h.unary_unary_rpc_method_handler(self.PushPullOne, raw, raw),
            "SaveCheckpoint": h.unary_unary_rpc_method_handler(
                self.SaveCheckpoint, _parse(P.SaveCheckpointRequest), P.CheckpointInfo.SerializeToString
            ),
            "ListCheckpoints": h.unary_unary_rpc_method_handler(
                self.ListCheckpoints, _parse(P.ListCheckpointsRequest), P.ListCheckpointsResponse.SerializeToString
            ),
            "RestoreCheckpoint": h.unary_unary_rpc_method_handler(
                self.RestoreCheckpoint, _parse(P.RestoreCheckpointRequest), P.ModelInfo.SerializeToString
            ),
            "Download": h.unary_stream_rpc_method_handler(self.Download, _parse(P.DownloadRequest), raw),
            "Upload": h.stream_unary_rpc_method_handler(self.Upload, raw, P.ModelInfo.SerializeToString),
            "ListRules": h.unary_unary_rpc_method_handler(
                self.ListRules, _parse(P.ListRulesRequest), P.ListRulesResponse.SerializeToString
            ),
            "GetServerInfo": h.unary_unary_rpc_method_handler(
                self.GetServerInfo, _parse(P.GetServerInfoRequest), P.ServerInfo.SerializeToString
            ),
            "PlanShards": h.unary_unary_rpc_method_handler(
                self.PlanShards, _parse(P.PlanShardsRequest), P.ShardMap.SerializeToString
            ),
            "DecideRound": h.unary_unary_rpc_method_handler(
                self.DecideRound, _parse(P.RoundDecision), P.RoundOutcome.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, table)

    # -- models -----------------------------------------------------------------------------------

    def model_info(self, model: Model) -> pb.ModelInfo:
        checkpoints = None if self.checkpoints is None else self.checkpoints.describe(model.name)
        return messages.model_info(model, self.incarnation, checkpoints)

    @_handler
    def CreateModel(self, requests: Iterator[bytes], call: CallContext) -> pb.ModelInfo:
        self._check_accepting()
        first, payload = requests_.first_message(requests, pb.CreateModelRequest, "header")
        h = first.header
        name = call.authorize(h.name)
        settings = messages.settings_from_proto(h.settings, name)
        spec = _spec_of(name, h.optimizer_json)
        schema = messages.schema_from_proto(name, h.schema)
        shard = None
        if h.HasField("shard"):
            shard = Shard(messages.shard_map_from_proto(name, h.shard.map), h.shard.index)
        inits = initializers.check_inits(name, schema, (messages.leaf_init_from_proto(i) for i in h.init))
        with admission.admit(self.store, name, schema, spec, settings, shard=shard) as admitted:
            assembler = TensorAssembler(
                {leaf.path: leaf for leaf in admitted.schema if leaf.path not in inits},
                what=f"model {name!r}",
                max_bytes=admitted.param_bytes,
            )
            params = requests_.receive_tensors(first, payload, requests, pb.CreateModelRequest, assembler)
            starts = {} if shard is None else {leaf.spec.path: p.start for leaf, p in shard.map.pieces_of(shard.index)}
            params.update(initializers.materialize_all(inits, admitted.schema, starts))
            model = admitted.create(params)
        if self.checkpoints is not None:  # checkpoints left under its name are not its own
            self.checkpoints.adopt(model)
        log.info(
            "created model %r: %d leaves, %d bytes, optimizer %s, mode %s",
            name,
            len(schema),
            admitted.param_bytes,
            json.dumps(model.compiled.spec),
            model.settings.mode,
        )
        return self.model_info(model)

    @_handler
    def PlanShards(self, request: pb.PlanShardsRequest, call: CallContext) -> pb.ShardMap:
        name = call.authorize(request.name)
        check_model_name(name)
        settings = messages.settings_from_proto(request.settings, name)
        spec = _spec_of(name, request.optimizer_json)
        schema = messages.schema_from_proto(name, request.schema)
        compiled = admission.compile_for(name, spec, schema)
        shard_map = sharding.plan(name, compiled, settings, schema, list(request.targets), request.split_bytes)
        return messages.shard_map_to_proto(shard_map)

    @_handler
    def DecideRound(self, request: pb.RoundDecision, call: CallContext) -> pb.RoundOutcome:
        model = self.store.get(call.authorize(request.model))
        timeout = request.timeout_seconds
        if not (math.isfinite(timeout) and timeout >= 0):
            raise InvalidArgument(f"{model.label}: timeout_seconds must be finite and >= 0, got {timeout}")
        limit = timeout or call.time_remaining()
        contributors = [(c.worker_id, c.seq) for c in request.contributors]
        norm_sq = request.global_norm_sq if request.HasField("global_norm_sq") else None
        # a decision may wait (for shard 0's close, or for a contribution): it holds a waiting slot
        with self.data.waiting_slot(model, f"this DecideRound may wait for the round of step {request.step}"):
            closed_by = messages.ROUND_CLOSED_BY.get(request.closed_by, "")  # an unknown value: not told
            decision = model.decide_round(request.step, contributors, norm_sq, limit, closed_by)
        return messages.round_outcome(model.name, decision)

    @_handler
    def GetModel(self, request: pb.GetModelRequest, call: CallContext) -> pb.ModelInfo:
        return self.model_info(self.store.get(call.authorize(request.model)))

    @_handler
    def ListModels(self, request: pb.ListModelsRequest, call: CallContext) -> pb.ListModelsResponse:
        models = {m.name: m for m in self.store.models()}
        return pb.ListModelsResponse(models=[messages.model_summary(models[n]) for n in call.visible(models)])

    @_handler
    def DeleteModel(self, request: pb.DeleteModelRequest, call: CallContext) -> pb.DeleteModelResponse:
        name = call.authorize(request.model)
        if self.checkpoints is None:
            self.store.delete(name)
        else:  # all or nothing: its checkpoints (removed, or archived for recovery) go first, then the model
            self.checkpoints.delete_model(self.store, name, delete_checkpoints=request.delete_checkpoints)
        log.info("deleted model %r", name)
        return pb.DeleteModelResponse()

    @_handler
    def SetHyperparams(self, request: pb.SetHyperparamsRequest, call: CallContext) -> pb.ModelInfo:
        model = self.store.get(call.authorize(request.model))
        values = {v.name: v.value for v in request.values}
        try:
            model.set_hyperparams(values)
        except SpecError as e:
            raise InvalidArgument(f"model {model.name!r}: {e}") from None
        return self.model_info(model)

    # -- data path (api/data_plane.py) ------------------------------------------------------------

    @_handler
    def Push(self, requests: Iterator[bytes], call: CallContext) -> pb.PushResponse:
        return self.data.receive_push(requests, call).response

    @_stream_handler
    def Pull(self, request: pb.PullRequest, call: CallContext) -> Iterator[bytes]:
        yield from self.data.pull_stream(self.store.get(call.authorize(request.model)), request, call)

    @_stream_handler
    def PushPull(self, requests: Iterator[bytes], call: CallContext) -> Iterator[bytes]:
        yield from self.data.push_pull(requests, call, single=False)

    # -- unary twins for small models: one message each way (grpcio streams cost ~3x a unary call) --

    @_handler
    def PushOne(self, request: bytes, call: CallContext) -> pb.PushResponse:
        return self.data.receive_push(iter((request,)), call).response

    @_handler
    def PullOne(self, request: pb.PullRequest, call: CallContext) -> bytes:
        model = self.store.get(call.authorize(request.model))
        return _only(self.data.pull_stream(model, request, call, single=True))

    @_handler
    def PushPullOne(self, request: bytes, call: CallContext) -> bytes:
        return _only(self.data.push_pull(iter((request,)), call, single=True))

    # -- checkpoints (checkpoint/manager.py) ------------------------------------------------------

    def _manager(self, model: str, call: CallContext) -> CheckpointManager:
        check_model_name(model)  # names become paths: INVALID_ARGUMENT before anything else
        self.store.get(call.authorize(model))
        if self.checkpoints is None:
            raise FailedPrecondition(f"model {model!r}: this server has no checkpoint directory (--checkpoint-dir)")
        return self.checkpoints

    @_handler
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, call: CallContext) -> pb.CheckpointInfo:
        manager, model = self._manager(request.model, call), self.store.get(request.model)
        if not (math.isfinite(request.timeout_seconds) and request.timeout_seconds >= 0):
            raise InvalidArgument(f"model {request.model!r}: timeout_seconds must be a finite number >= 0")
        at_step = request.step if request.HasField("step") else None
        info = manager.save_now(model, at_step, request.timeout_seconds or 60.0)
        return messages.checkpoint_info(info)

    @_handler
    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, call: CallContext) -> pb.ListCheckpointsResponse:
        infos = self._manager(request.model, call).list(request.model)
        return pb.ListCheckpointsResponse(checkpoints=[messages.checkpoint_info(i) for i in infos])

    @_handler
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest, call: CallContext) -> pb.ModelInfo:
        model = self._manager(request.model, call).restore(self.store, request.model, request.step, request.tag)
        return self.model_info(model)

    @_stream_handler
    def Download(self, request: pb.DownloadRequest, call: CallContext) -> Iterator[bytes]:
        # FILE_CHUNK_BYTES: each FileChunk fits in the 4 MiB that gRPC clients receive by default
        chunk_bytes = min(self.chunk_bytes, requests_.FILE_CHUNK_BYTES)
        yield from transfer.download(self.store.get(call.authorize(request.model)), chunk_bytes)

    @_handler
    def Upload(self, requests: Iterator[bytes], call: CallContext) -> pb.ModelInfo:
        self._check_accepting()
        model = transfer.upload(self.store, requests, authorize=call.authorize)
        if self.checkpoints is not None:  # checkpoints left under its name are not its own
            self.checkpoints.adopt(model)
        return self.model_info(model)

    # -- discovery --------------------------------------------------------------------------------

    @_handler
    def ListRules(self, request: pb.ListRulesRequest, call: CallContext) -> pb.ListRulesResponse:
        return pb.ListRulesResponse(rules=[messages.rule_info(r) for r in list_rules()])

    @_handler
    def GetServerInfo(self, request: pb.GetServerInfoRequest, call: CallContext) -> pb.ServerInfo:
        d = self.store.device
        return pb.ServerInfo(
            version=VERSION,
            incarnation=self.incarnation,
            device=f"{d.platform}:{d}",
            models=len(call.visible(self.store.names())),
            started_unix=self.started_unix,
            devices=[f"{x.platform}:{x.id}" for x in self.store.placement.devices],
            device_bytes=self.store.device_bytes(),
            shared_memory_socket=self.shared_memory_socket,
            host_id=self.host_id,
            uid=os.getuid() if self.shared_memory_socket else 0,
        )
