"""The gRPC service: a thin layer that validates requests and calls the model store.

Bulky RPCs are registered with identity (de)serializers so that chunk payloads are framed and
sliced by `optserve.wire` without protobuf copies; the others use the generated messages. Every handler
turns ServiceError into its gRPC status with the error's message, and never changes state before a
request has been validated completely.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from optserve.wire.assembler import TensorAssembler
from optserve.wire.channel import SERVICE
from optserve.wire.chunks import DEFAULT_CHUNK_BYTES, chunk_messages
from optserve.wire.errors import WireError
from optserve.server.core import datapath
from optserve.server.core.errors import (
    ResourceExhausted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)
from optserve.server.api.metrics import MODEL_ATTR, ServerMetrics
from optserve.server.api.auth import ALLOWED_MODELS
from optserve.server.core.model import Model
from optserve.server.core.settings import ModelSettings
from optserve.server.spec import SpecError, list_rules
from optserve.server.core.store import ModelStore, check_model_name, compile_for, state_bytes_for
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.service")
VERSION = "0.1.0"
WAIT_SLICE_SECONDS = 0.25  # how often a waiting pull checks whether its client is still there


def waiting_call_limit(max_workers: int) -> int:
    """How many calls may wait for a step at once on a server with `max_workers` RPC threads.

    A waiting call holds its thread (grpcio's synchronous server has no other way to wait), so
    waiters that took every thread would starve every other call, health checks included. A reserve
    of an eighth of the threads (at least 2: a health check and one more call) stays for the rest;
    at least one call may always wait.
    """
    return max(1, max_workers - max(2, max_workers // 8))


class WaitingSlots:
    """A non-blocking counter of the calls waiting for a step, bounded by `limit`."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.waiting = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    def try_take(self) -> bool:
        with self._lock:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            if self._on_change is not None:
                self._on_change(self.waiting)
            return True

    def give_back(self) -> None:
        with self._lock:
            self.waiting -= 1
            if self._on_change is not None:
                self._on_change(self.waiting)


def _identity(x: bytes) -> bytes:
    return x


def _fail(context: grpc.ServicerContext, e: Exception, rpc: str) -> None:
    fields = {"event": "rejected", "rpc": rpc, "model": getattr(context, MODEL_ATTR, "")}
    if isinstance(e, ServiceError):
        log.info("rejected %s: %s: %s", rpc, e.code.name, e.message, extra={**fields, "code": e.code.name})
        context.abort(e.code, e.message)
    if isinstance(e, (SpecError, WireError)):
        log.info("rejected %s: INVALID_ARGUMENT: %s", rpc, e, extra={**fields, "code": "INVALID_ARGUMENT"})
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    log.exception("internal error in %s", rpc, extra={**fields, "event": "internal_error", "code": "INTERNAL"})
    context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error: {type(e).__name__}: {e}")


class _Malformed:
    """What `_parse` hands the handler instead of a request protobuf could not parse."""

    def __init__(self, message_type: type, error: Exception):
        self.message = f"{message_type.__name__}: malformed message ({error})"


def _parse(message_type: type) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc would answer INTERNAL for a deserializer's
    exception, but a malformed request is the client's fault (INVALID_ARGUMENT, see the wrappers)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Malformed(message_type, e)

    return parse


def _handler(fn: Callable) -> Callable:
    """Maps exceptions of a unary-response handler to statuses."""

    @functools.wraps(fn)
    def wrapper(self: OptserveService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self._check_ready()
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            self.metrics.failed(fn.__name__, context, e)
            if isinstance(e, grpc.RpcError) or context.is_active() is False and not isinstance(e, ServiceError):
                raise
            _fail(context, e, fn.__name__)

    return wrapper


def _stream_handler(fn: Callable) -> Callable:
    """The same for handlers that return a response iterator."""

    @functools.wraps(fn)
    def wrapper(self: OptserveService, request: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            self._check_ready()
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            yield from fn(self, request, context)
        except GeneratorExit:
            raise
        except Exception as e:  # noqa: BLE001
            self.metrics.failed(fn.__name__, context, e)
            if isinstance(e, grpc.RpcError):
                raise
            _fail(context, e, fn.__name__)

    return wrapper


def _only(messages: Iterator[bytes]) -> bytes:
    """The one message of a reply stream built for a unary twin."""
    (message,) = list(messages)
    return message


def authorize(context: grpc.ServicerContext, model: str) -> str:
    """Returns `model`; PERMISSION_DENIED when the caller's token is limited to other models."""
    setattr(context, MODEL_ATTR, model)
    allowed = getattr(context, ALLOWED_MODELS, None)
    if allowed is not None and model not in allowed:
        raise PermissionDenied(f"model {model!r}: this token may not access it")
    return model


class OptserveService:
    """Implements optserve.v1.Optserve over a ModelStore."""

    def __init__(self, store: ModelStore, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, checkpoints: Any = None,
                 metrics: ServerMetrics | None = None, max_workers: int = 64):  # fmt: skip
        """max_workers: the server's RPC threads; calls that wait for a step are bounded by
        `waiting_call_limit(max_workers)` so that they never hold every thread."""
        self.store = store
        self.metrics = metrics or ServerMetrics(store)
        self.chunk_bytes = chunk_bytes
        self.max_workers = max_workers
        self.waiting = WaitingSlots(waiting_call_limit(max_workers), on_change=self.metrics.waiting_calls.set)
        self.metrics.waiting_limit.set(self.waiting.limit)
        self.checkpoints = checkpoints  # CheckpointManager or None
        self.incarnation = uuid.uuid4().hex
        self.started_unix = time.time()
        self.accepting = threading.Event()
        self.accepting.set()
        # Cleared by Server while it restores checkpoints: until then a model may still be missing,
        # so every call is UNAVAILABLE (clients retry), never a misleading NOT_FOUND.
        self.ready = threading.Event()
        self.ready.set()
        self._pull_headers: weakref.WeakKeyDictionary[Model, bytes] = weakref.WeakKeyDictionary()
        # per model and wire dtype: the bound of a one-message pull reply's slices and payload
        self._single_reply_bytes: weakref.WeakKeyDictionary[Model, dict[str, int]] = weakref.WeakKeyDictionary()

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
            "GetModel": h.unary_unary_rpc_method_handler(self.GetModel, _parse(P.GetModelRequest), P.ModelInfo.SerializeToString),
            "ListModels": h.unary_unary_rpc_method_handler(self.ListModels, _parse(P.ListModelsRequest), P.ListModelsResponse.SerializeToString),
            "DeleteModel": h.unary_unary_rpc_method_handler(self.DeleteModel, _parse(P.DeleteModelRequest), P.DeleteModelResponse.SerializeToString),
            "SetHyperparams": h.unary_unary_rpc_method_handler(self.SetHyperparams, _parse(P.SetHyperparamsRequest), P.ModelInfo.SerializeToString),
            "Push": h.stream_unary_rpc_method_handler(self.Push, raw, P.PushResponse.SerializeToString),
            "Pull": h.unary_stream_rpc_method_handler(self.Pull, _parse(P.PullRequest), raw),
            "PushPull": h.stream_stream_rpc_method_handler(self.PushPull, raw, raw),
            "PushOne": h.unary_unary_rpc_method_handler(self.PushOne, raw, P.PushResponse.SerializeToString),
            "PullOne": h.unary_unary_rpc_method_handler(self.PullOne, _parse(P.PullRequest), raw),
            "PushPullOne": h.unary_unary_rpc_method_handler(self.PushPullOne, raw, raw),
            "SaveCheckpoint": h.unary_unary_rpc_method_handler(self.SaveCheckpoint, _parse(P.SaveCheckpointRequest), P.CheckpointInfo.SerializeToString),
            "ListCheckpoints": h.unary_unary_rpc_method_handler(self.ListCheckpoints, _parse(P.ListCheckpointsRequest), P.ListCheckpointsResponse.SerializeToString),
            "RestoreCheckpoint": h.unary_unary_rpc_method_handler(self.RestoreCheckpoint, _parse(P.RestoreCheckpointRequest), P.ModelInfo.SerializeToString),
            "Download": h.unary_stream_rpc_method_handler(self.Download, _parse(P.DownloadRequest), raw),
            "Upload": h.stream_unary_rpc_method_handler(self.Upload, raw, P.ModelInfo.SerializeToString),
            "ListRules": h.unary_unary_rpc_method_handler(self.ListRules, _parse(P.ListRulesRequest), P.ListRulesResponse.SerializeToString),
            "GetServerInfo": h.unary_unary_rpc_method_handler(self.GetServerInfo, _parse(P.GetServerInfoRequest), P.ServerInfo.SerializeToString),
        }  # fmt: skip
        return grpc.method_handlers_generic_handler(SERVICE, table)

    # -- models -----------------------------------------------------------------------------------

    def model_info(self, model: Model) -> pb.ModelInfo:
        c = model.counters
        info = pb.ModelInfo(
            name=model.name,
            step=model.step,
            schema=datapath.schema_to_proto(model.schema),
            optimizer_json=json.dumps(model.compiled.spec),
            settings=model.settings.to_proto(),
            hyperparams=[pb.Hyperparam(name=k, value=v) for k, v in model.hyperparams().items()],
            workers=[
                pb.WorkerState(worker_id=w, last_seq=seq, last_base_step=base)
                for w, seq, base in model.worker_states()
            ],
            pending_contributions=model.pending_contributions(),
            counters=pb.ModelCounters(**vars(c)),
            param_bytes=model.param_bytes,
            state_bytes=model.state_bytes,
            incarnation=self.incarnation,
        )
        if self.checkpoints is not None:
            status = self.checkpoints.describe(model.name)
            info.last_checkpoint_step, info.last_checkpoint_error = status.last_step, status.last_error
        return info

    @_handler
    def CreateModel(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ModelInfo:
        self._check_accepting()
        first, payload = datapath.first_message(requests, pb.CreateModelRequest, "header")
        h = first.header
        name = authorize(context, h.name)
        settings = ModelSettings.from_proto(h.settings, name)
        if not h.optimizer_json:
            raise InvalidArgument(f"model {name!r}: optimizer_json: an optimizer spec is required")
        try:
            spec = json.loads(h.optimizer_json)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: hostile nesting depth
            raise InvalidArgument(f"model {name!r}: optimizer_json is not valid JSON: {e}") from None
        schema = datapath.schema_from_proto(name, h.schema)
        declared = datapath.schema_bytes(schema)
        self.store.check_can_create(name, declared)  # cheap checks first: limits before compiling
        compiled = compile_for(name, spec, schema)  # reject a bad spec before receiving any bytes
        self.store.reserve(name, declared + state_bytes_for(compiled, schema))
        try:
            assembler = TensorAssembler(
                {l.path: l for l in schema}, what=f"model {name!r}", max_bytes=declared
            )
            params = datapath.receive_tensors(first, payload, requests, pb.CreateModelRequest, assembler)
            model = Model(name, schema, params, compiled, settings, self.store.device)
            self.store.add(model)
        finally:
            self.store.release(name)
        if self.checkpoints is not None:  # checkpoints left under its name are not its own
            self.checkpoints.adopt(model)
        log.info("created model %r: %d leaves, %d bytes, optimizer %s, mode %s", name, len(schema), declared,
                 json.dumps(compiled.spec), settings.mode)  # fmt: skip
        return self.model_info(model)

    @_handler
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return self.model_info(self.store.get(authorize(context, request.model)))

    @staticmethod
    def _visible(context: grpc.ServicerContext, names: Iterable[str]) -> list[str]:
        """The names a caller may see: all, or those its token is limited to."""
        allowed = getattr(context, ALLOWED_MODELS, None)
        return [n for n in names if allowed is None or n in allowed]

    @_handler
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        models = {m.name: m for m in self.store.models()}
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(name=m.name, step=m.step, mode=m.settings.mode, leaves=len(m.schema), param_bytes=m.param_bytes)
                for m in (models[n] for n in self._visible(context, models))
            ]
        )

    @_handler
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> pb.DeleteModelResponse:
        name = authorize(context, request.model)
        if self.checkpoints is None:
            self.store.delete(name)
        else:  # all or nothing: its checkpoints (removed, or archived for recovery) go first, then the model
            self.checkpoints.delete_model(self.store, name, delete_checkpoints=request.delete_checkpoints)
        log.info("deleted model %r", name)
        return pb.DeleteModelResponse()

    @_handler
    def SetHyperparams(self, request: pb.SetHyperparamsRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        model = self.store.get(authorize(context, request.model))
        values = {v.name: v.value for v in request.values}
        try:
            model.set_hyperparams(values)
        except SpecError as e:
            raise InvalidArgument(f"model {model.name!r}: {e}") from None
        return self.model_info(model)

    # -- data path --------------------------------------------------------------------------------

    def _receive_push(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                      prepare: Callable[[Model, pb.PushHeader, Any], None] | None = None,
                      ) -> tuple[Model, pb.PushHeader, pb.PushResponse]:  # fmt: skip
        """Reads a whole push stream, validates it and applies it (or hands it to the sync round).

        prepare(model, header, receiver): more checks of the header (PushPull's pull), called before
        any gradient byte is read and so before anything is applied.
        """
        self._check_accepting()
        first, payload = datapath.first_message(requests, pb.PushRequest, "header")
        h = first.header
        model = self.store.get(authorize(context, h.model))
        base_step = h.base_step if h.HasField("base_step") else None
        if h.worker_id and h.seq < 1:
            raise InvalidArgument(f"model {model.name!r}: worker {h.worker_id!r}: seq must be >= 1")
        receiver = model.open_push(base_step=base_step, worker_id=h.worker_id, seq=h.seq, weight=h.weight)
        try:
            if prepare is not None:
                prepare(model, h, receiver)
            grads = datapath.receive_tensors(first, payload, requests, pb.PushRequest, receiver.assembler)
        except BaseException:
            receiver.abort()
            raise
        received = receiver.assembler.received_bytes
        model.counters.bytes_in += received

        def reply(step: int, applied: bool = True) -> pb.PushResponse:
            return pb.PushResponse(model=model.name, step=step, applied=applied, incarnation=self.incarnation)

        started = time.perf_counter()
        step_before = model.step
        response, duplicate = receiver.commit(grads, reply)
        setattr(context, "optserve_pushed", True)  # a later failure of PushPull is its pull's
        outcome = "duplicate" if duplicate else "applied" if response.applied else "accepted"
        staleness = None if base_step is None else max(step_before - base_step, 0)
        self.metrics.pushed(model.name, outcome, received, time.perf_counter() - started, staleness)
        if duplicate:  # a retry: the original reply, marked as such
            original, response = response, pb.PushResponse()
            response.CopyFrom(original)
            response.duplicate = True
            response.incarnation = self.incarnation  # the original may come from a checkpoint of an earlier start
        return model, h, response

    @_handler
    def Push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        return self._receive_push(requests, context)[2]

    def _check_pull(self, model: Model, req: pb.PullRequest, single: bool) -> None:
        """Validates a pull's fields before it waits, streams or (PushPull) before its push is applied."""
        if not math.isfinite(req.timeout_seconds) or req.timeout_seconds < 0:
            raise InvalidArgument(f"model {model.name!r}: timeout_seconds must be a finite number >= 0, got {req.timeout_seconds}")
        datapath.check_wire_dtype(req.wire_dtype, model.name)
        if req.ema and model.settings.ema_decay is None:
            raise FailedPrecondition(f"model {model.name!r} keeps no parameter EMA (create it with ema=<decay>)")
        if single:
            datapath.check_single_reply(model.name, self._single_reply_bound(model, req.wire_dtype),
                                        datapath.pull_message_bytes(req.max_message_bytes))  # fmt: skip

    def _single_reply_bound(self, model: Model, wire_dtype: str) -> int:
        """Upper bound of a one-message pull reply of `model`: header (with a push reply) and tensors."""
        bounds = self._single_reply_bytes.get(model)
        if bounds is None:
            bounds = self._single_reply_bytes[model] = {}
        bound = bounds.get(wire_dtype)
        if bound is None:
            # header (cached, without step) + its step, not_modified and a PushResponse (name, step,
            # flags, incarnation), each well within 64 bytes besides the name
            header = len(self._first_pull_response(model).SerializeToString()) + len(model.name.encode()) + 128
            bound = bounds[wire_dtype] = datapath.single_reply_bytes(model.schema, wire_dtype, header)
        return bound

    @contextmanager
    def _waiting_slot(self, model: Model, what: str) -> Iterator[None]:
        """Holds one of the bounded slots for calls that wait for a step, or refuses the call."""
        if not self.waiting.try_take():
            raise ResourceExhausted(self._too_many_waiting(model, what))
        try:
            yield
        finally:
            self.waiting.give_back()

    def _too_many_waiting(self, model: Model, what: str) -> str:
        return (
            f"model {model.name!r}: {what}, but {self.waiting.limit} calls are already waiting for a step, the most "
            f"this server lets wait (its {self.max_workers} RPC threads less a reserve for other calls; "
            "--max-workers raises it); nothing was applied: retry later"
        )

    def _pull_stream(self, model: Model, req: pb.PullRequest, context: grpc.ServicerContext,
                     push: pb.PushResponse | None = None, single: bool = False,
                     round_dropped: Callable[[], str] | None = None, slot_held: bool = False) -> Iterator[bytes]:  # fmt: skip
        """The PullResponse messages; `single`: exactly one message (the unary twins), or refused.

        round_dropped: for a sync PushPull, why the round its push joined was dropped ("" while it
        was not); slot_held: the caller already holds a waiting slot (PushPull takes it before its push).
        """
        self._check_pull(model, req, single)
        if req.HasField("min_step") and model.step < req.min_step:
            if slot_held:
                self._wait_for_step(model, req, context, round_dropped)
            else:
                with self._waiting_slot(model, f"this pull would wait for step {req.min_step}"):
                    self._wait_for_step(model, req, context, round_dropped)
        max_message = datapath.pull_message_bytes(req.max_message_bytes)
        if single:  # _check_pull made sure that everything fits in one message
            chunk_bytes, bound = max_message, None
        else:
            chunk_bytes, bound = datapath.pull_chunk_bytes(req.chunk_bytes, self.chunk_bytes), max_message
        first = self._first_pull_response(model)
        if push is not None:
            first.push.CopyFrom(push)
        if req.HasField("if_newer_than") and model.step <= req.if_newer_than:
            first.header.step, first.header.not_modified = model.step, True
            self._mark_applied(first, push)
            yield from chunk_messages(first, [], chunk_bytes, bound)
            self.metrics.pulled(model.name, "not_modified", 0)
            return
        with model.snapshot(ema=req.ema) as snap:
            first.header.step = snap.step
            self._mark_applied(first, push)
            leaves = datapath.host_leaves(model.schema, snap.arrays, req.wire_dtype, model.name)
            sent = 0
            for raw in chunk_messages(first, leaves, chunk_bytes, bound):
                model.counters.bytes_out += len(raw)
                sent += len(raw)
                yield raw
        self.metrics.pulled(model.name, "ok", sent)

    @staticmethod
    def _mark_applied(first: pb.PullResponse, push: pb.PushResponse | None) -> None:
        """A PushPull's reply goes with parameters at or after the step its push joined: by then that
        step is applied, whatever the push's reply said when it was made (sync: applied false)."""
        if push is not None and not push.applied and first.header.step >= push.step:
            first.push.applied = True

    def _first_pull_response(self, model: Model) -> pb.PullResponse:
        """A pull's first message with the header's constant part (name, schema, incarnation) filled
        in: parsed from a serialization cached per model, so a pull of a many-leaf model does not
        rebuild the schema's messages in Python (protobuf's C parser does it in microseconds)."""
        cached = self._pull_headers.get(model)
        if cached is None:
            header = pb.PullHeader(model=model.name, schema=datapath.schema_to_proto(model.schema),
                                   incarnation=self.incarnation)  # fmt: skip
            cached = self._pull_headers[model] = pb.PullResponse(header=header).SerializeToString()
        return pb.PullResponse.FromString(cached)

    def _wait_for_step(self, model: Model, req: pb.PullRequest, context: grpc.ServicerContext,
                       round_dropped: Callable[[], str] | None = None) -> None:  # fmt: skip
        """Waits for req.min_step, bounded by timeout_seconds (0: the call's deadline).

        Waits in short slices so that a waiter whose client went away, whose model was deleted or
        whose server is shutting down lets go of its thread at once instead of at the deadline.
        In sync mode a round refused by reject_nonfinite_updates ends the wait with FAILED_PRECONDITION:
        `round_dropped()` says why for a PushPull whose own round it was; a plain pull ends when any
        round is dropped while its step is still ahead (its contributors must push again).
        """
        agg = model.aggregator
        dropped_why = round_dropped
        if dropped_why is None and agg is not None:
            seen = agg.dropped_rounds

            def dropped_why() -> str:
                return agg.last_drop if agg.dropped_rounds != seen and model.step < req.min_step else ""

        limit = req.timeout_seconds or context.time_remaining()  # None: no deadline
        started = time.monotonic()
        while True:
            reached = model.wait_for_step(
                req.min_step,
                WAIT_SLICE_SECONDS if limit is None else min(WAIT_SLICE_SECONDS, max(limit - (time.monotonic() - started), 0.0)),
                give_up=None if dropped_why is None else lambda: bool(dropped_why()),
            )  # fmt: skip
            dropped = dropped_why() if dropped_why is not None else ""
            if dropped:
                raise FailedPrecondition(f"model {model.name!r}: waiting for step {req.min_step}: {dropped}")
            if reached:
                break
            if model.deleted:
                raise NotFound(f"model {model.name!r} was deleted while waiting for step {req.min_step}")
            self._check_accepting()
            if not context.is_active():
                raise Unavailable(f"model {model.name!r}: the client went away while waiting for step {req.min_step}")
            if limit is not None and time.monotonic() - started >= limit:
                raise DeadlineExceeded(
                    f"model {model.name!r}: step {req.min_step} not reached within {limit:.3g}s (current step {model.step})"
                )
        self.metrics.waited(model.name, time.monotonic() - started)

    @_stream_handler
    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._pull_stream(self.store.get(authorize(context, request.model)), request, context)

    def _push_pull(self, requests: Iterator[bytes], context: grpc.ServicerContext, single: bool) -> Iterator[bytes]:
        """A push, then a pull as its header's `pull` says; the pull is validated (and, in sync mode,
        a waiting slot taken) before the push is applied, so a refused call applies nothing."""
        slot: list[bool] = []  # [True] while this call holds a waiting slot
        round_of: list[Any] = []  # the sync receiver, whose round says whether it was dropped

        def prepare(model: Model, header: pb.PushHeader, receiver: Any) -> None:
            if header.pull.model and header.pull.model != model.name:
                raise InvalidArgument(
                    f"model {model.name!r}: pull.model {header.pull.model!r} names another model; a PushPull pulls "
                    "the model it pushes to (leave pull.model empty)"
                )
            self._check_pull(model, header.pull, single)
            sync = model.aggregator is not None
            if sync:
                round_of.append(receiver)
            if sync or header.pull.HasField("min_step"):  # the reply may wait: take a slot first
                what = "this PushPull would wait for its sync round" if sync else "this PushPull may wait for its min_step"
                if self.waiting.try_take():
                    slot.append(True)
                elif sync:  # a push that completes its round does not wait: that one may go on
                    receiver.must_complete = self._too_many_waiting(model, what)
                else:
                    raise ResourceExhausted(self._too_many_waiting(model, what))

        try:
            model, header, response = self._receive_push(requests, context, prepare)
            pull = pb.PullRequest()
            pull.CopyFrom(header.pull)
            round_dropped = None
            if not response.applied:  # sync: return once the step this gradient joined is applied
                pull.min_step = response.step
                joined = round_of[0].round if round_of else None  # None for a retry (duplicate)
                if joined is not None:
                    round_dropped = lambda: joined.dropped  # noqa: E731
            yield from self._pull_stream(model, pull, context, push=response, single=single,
                                         round_dropped=round_dropped, slot_held=bool(slot))  # fmt: skip
        finally:
            if slot:
                self.waiting.give_back()

    @_stream_handler
    def PushPull(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._push_pull(requests, context, single=False)

    # -- unary twins for small models: one message each way (grpcio streams cost ~3x a unary call) --

    @_handler
    def PushOne(self, request: bytes, context: grpc.ServicerContext) -> pb.PushResponse:
        return self._receive_push(iter((request,)), context)[2]

    @_handler
    def PullOne(self, request: pb.PullRequest, context: grpc.ServicerContext) -> bytes:
        model = self.store.get(authorize(context, request.model))
        return _only(self._pull_stream(model, request, context, single=True))

    @_handler
    def PushPullOne(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return _only(self._push_pull(iter((request,)), context, single=True))

    # -- checkpoints (see checkpoint/manager.py) --------------------------------------------------

    def _manager(self, model: str, context: grpc.ServicerContext) -> Any:
        check_model_name(model)  # names become paths: INVALID_ARGUMENT before anything else
        self.store.get(authorize(context, model))
        if self.checkpoints is None:
            raise FailedPrecondition(f"model {model!r}: this server has no checkpoint directory (--checkpoint-dir)")
        return self.checkpoints

    @_handler
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointInfo:
        info = self._manager(request.model, context).save_now(self.store.get(request.model))
        return pb.CheckpointInfo(**vars(info))

    @_handler
    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext) -> pb.ListCheckpointsResponse:
        infos = self._manager(request.model, context).list(request.model)
        return pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointInfo(**vars(i)) for i in infos])

    @_handler
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        model = self._manager(request.model, context).restore(self.store, request.model, request.step)
        return self.model_info(model)

    @_stream_handler
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        from optserve.server.api import transfer

        # FILE_CHUNK_BYTES: each FileChunk fits in the 4 MiB that gRPC clients receive by default
        chunk_bytes = min(self.chunk_bytes, datapath.FILE_CHUNK_BYTES)
        yield from transfer.download(self.store.get(authorize(context, request.model)), chunk_bytes)

    @_handler
    def Upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ModelInfo:
        from optserve.server.api import transfer

        self._check_accepting()
        model = transfer.upload(self.store, requests, authorize=lambda name: authorize(context, name))
        if self.checkpoints is not None:  # checkpoints left under its name are not its own
            self.checkpoints.adopt(model)
        return self.model_info(model)

    # -- discovery --------------------------------------------------------------------------------

    @_handler
    def ListRules(self, request: pb.ListRulesRequest, context: grpc.ServicerContext) -> pb.ListRulesResponse:
        rules = []
        for r in list_rules():
            rules.append(
                pb.RuleInfo(
                    name=r["name"], kind=r.get("kind", ""), library=r.get("library", ""), doc=r.get("doc", ""),
                    hyperparams=[
                        pb.HyperparamInfo(name=h["name"], default_json=json.dumps(h.get("default")),
                                          required=bool(h.get("required")), doc=h.get("doc", ""),
                                          type=h.get("type", ""), tunable=bool(h.get("tunable")))
                        for h in r.get("hyperparams", [])
                    ],
                )  # fmt: skip
            )
        return pb.ListRulesResponse(rules=rules)

    @_handler
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        d = self.store.device
        return pb.ServerInfo(version=VERSION, incarnation=self.incarnation, device=f"{d.platform}:{d}",
                             models=len(self._visible(context, self.store.names())),
                             started_unix=self.started_unix)  # fmt: skip
