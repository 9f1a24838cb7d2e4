"""Errors -> gRPC statuses: the one place where the domain errors of the layers below meet grpc.

Domain errors (core/errors.py) name their status; spec and wire errors are the client's mistakes
(INVALID_ARGUMENT); a grpc.RpcError raised inside a handler means the client went away
(CANCELLED); anything else is a bug of ours (INTERNAL, logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from optserve.server.core.errors import ServiceError
from optserve.server.spec import SpecError
from optserve.wire.errors import WireError

log = logging.getLogger("optserve.service")

# ServiceError.status -> the gRPC code it becomes.
CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
# Errors of the layers below that are the client's mistakes, though not ServiceErrors.
CLIENT_MISTAKES = (SpecError, WireError)


def code_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception becomes."""
    if isinstance(error, ServiceError):
        return CODES[error.status]
    if isinstance(error, CLIENT_MISTAKES):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, grpc.RpcError):  # the client went away mid-stream
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def status_name(error: BaseException) -> str:
    """The gRPC status an exception becomes, in lower case (metrics labels)."""
    return code_of(error).name.lower()


def abort(context: grpc.ServicerContext, error: Exception, rpc: str, model: str) -> NoReturn:
    """Ends the call with the status `error` maps to, logged; `model`: the model the request named."""
    fields = {"event": "rejected", "rpc": rpc, "model": model}
    code = code_of(error)
    if isinstance(error, (ServiceError, *CLIENT_MISTAKES)):
        message = error.message if isinstance(error, ServiceError) else str(error)
        log.info("rejected %s: %s: %s", rpc, code.name, message, extra={**fields, "code": code.name})
        _end_call(context, code, message)
    # exc_info=error: the traceback of `error` itself, whether or not this runs inside its except block.
    log.error(
        "internal error in %s", rpc, exc_info=error, extra={**fields, "event": "internal_error", "code": "INTERNAL"}
    )
    _end_call(context, grpc.StatusCode.INTERNAL, f"{rpc}: internal error: {type(error).__name__}: {error}")


def _end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)  # raises: grpc ends the call with the exception it raises
    # Never reached; says so to the type checker, which sees grpc (untyped) as Any.
    raise AssertionError(f"grpc's ServicerContext.abort returned instead of raising ({code.name}: {message})")
