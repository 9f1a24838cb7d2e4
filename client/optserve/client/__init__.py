"""optserve client: push gradients to and pull parameters from an optserve server.

Light on purpose: numpy, grpcio, protobuf and ml_dtypes only. jax or torch are imported only when
the caller hands us their arrays.
"""

from optserve.client import optim
from optserve.client.client import Client
from optserve.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from optserve.client.model import Model
from optserve.client.tables import Init, Rows

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Init",
    "InvalidArgumentError",
    "Model",
    "NotFoundError",
    "OptserveError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Rows",
    "UnauthenticatedError",
    "UnavailableError",
    "optim",
]
