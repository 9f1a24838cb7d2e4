"""Errors the service turns into gRPC statuses (docs/design.md, "Errors"). Messages name the model and the
leaf or field at fault; raising one never leaves a model half-changed."""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NonFiniteUpdate(FailedPrecondition):
    """An update refused by settings.reject_nonfinite_updates: the model's state is unchanged."""


class ConfigError(ValueError):
    """A server option that cannot work (a bad token file, device, TLS file, port...). Not a gRPC
    status: `optserve serve` prints the message, which names the flag at fault and the fix, as one
    line and exits with status 2."""
