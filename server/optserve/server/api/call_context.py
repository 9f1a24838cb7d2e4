"""One call as the service's handlers see it, instead of attributes set on grpc's context.

The handler wrapper (api/service.py) builds a `CallContext` for every call: who the caller may act
on (the models its bearer token is limited to, resolved from the call's metadata with the server's
token table), and, as the call goes on, the model its request names and whether its push was
counted; the wrapper reads them back when the call fails (metrics labels, logs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import grpc

from optserve.server.api.auth import Token, bearer_token, match_token
from optserve.server.core.errors import PermissionDenied


def allowed_models(
    tokens: Sequence[Token] | None, metadata: Iterable[tuple[str, str | bytes]] | None
) -> frozenset[str] | None:
    """The models a call may touch: None for every model (no token table, or an unscoped token).
    A call without a known token is refused by the TokenAuth interceptor before it gets here; should
    one get here anyway, it may touch no model."""
    if tokens is None:
        return None
    presented = bearer_token(metadata)
    token = match_token(tokens, presented.encode()) if presented else None
    if token is None:
        return frozenset()
    return token.models


@dataclasses.dataclass
class CallContext:
    rpc: str
    grpc_context: grpc.ServicerContext
    allowed: frozenset[str] | None  # the models the caller's token may touch; None: every model
    model: str = ""  # the model the request names, once known (metrics label, logs)
    pushed: bool = False  # the call's push was counted: a later failure (of PushPull) is its pull's

    def authorize(self, model: str) -> str:
        """Returns `model`, noted as the call's model; PERMISSION_DENIED when the caller's token is
        limited to other models."""
        self.model = model
        if self.allowed is not None and model not in self.allowed:
            raise PermissionDenied(f"model {model!r}: this token may not access it")
        return model

    def visible(self, names: Iterable[str]) -> list[str]:
        """The names a caller may see: all, or those its token is limited to."""
        return [n for n in names if self.allowed is None or n in self.allowed]

    def is_active(self) -> bool:
        """False once the client has gone away (cancelled, disconnected, deadline passed)."""
        return bool(self.grpc_context.is_active())

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""
        return self.grpc_context.time_remaining()
