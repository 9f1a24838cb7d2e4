"""The client's exceptions: one subclass of OptserveError per gRPC status the server uses.

Each carries `.code` (a grpc.StatusCode) and `.message` (the server's text, which names the model
and the leaf or spec field at fault).
"""

from __future__ import annotations

import grpc


class OptserveError(Exception):
    """A failed call; `code` is the gRPC status, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class NotFoundError(OptserveError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(OptserveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgumentError(OptserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPreconditionError(OptserveError):
    """E.g. a stale push: the message gives the model's current step."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(OptserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(OptserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(OptserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(OptserveError):
    """The server is away, starting or shutting down: retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(OptserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(OptserveError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE = {
    cls.code: cls
    for cls in (
        NotFoundError,
        AlreadyExistsError,
        InvalidArgumentError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> OptserveError:
    """The OptserveError subclass for a grpc.RpcError raised by a call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return _BY_CODE.get(code, OptserveError)(details or code.name, code)
