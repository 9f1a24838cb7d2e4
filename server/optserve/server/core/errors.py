"""Domain errors of the server's core, state and checkpoint layers.

Each names the status it becomes (`status`, a gRPC status code's name); the API layer maps the
names to gRPC codes in one table (api/status.py), so nothing below it imports grpc. Messages name
the model and the leaf or field at fault; raising one never leaves a model half-changed.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    status = "NOT_FOUND"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"


class PermissionDenied(ServiceError):
    status = "PERMISSION_DENIED"


class NonFiniteUpdate(FailedPrecondition):
    """An update refused by settings.reject_nonfinite_updates: the model's state is unchanged."""


class ConfigError(ValueError):
    """A server option that cannot work (a bad token file, device, TLS file, port...). Not a gRPC
    status: `optserve serve` prints the message, which names the flag at fault and the fix, as one
    line and exits with status 2."""
