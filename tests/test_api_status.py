"""api/status.py and api/call_context.py without a server: every domain error has its gRPC status,
and a call's allowed models come from its own metadata."""

from __future__ import annotations

import grpc
import pytest

from optserve.server.api import status
from optserve.server.api.auth import Token
from optserve.server.api.call_context import CallContext, allowed_models
from optserve.server.core import errors
from optserve.server.core.errors import PermissionDenied, ServiceError
from optserve.server.spec import SpecError
from optserve.wire.errors import WireError


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for c in cls.__subclasses__() for s in _subclasses(c)]


def test_every_domain_error_names_a_status_the_table_maps_to_the_grpc_code_of_that_name():
    found = _subclasses(ServiceError)
    assert {c.__name__ for c in found} >= {
        n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, ServiceError)
    }
    for cls in found:
        assert status.code_of(cls("x")) == grpc.StatusCode[cls.status], cls
    assert status.code_of(errors.NonFiniteUpdate("x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_client_mistakes_from_the_spec_and_the_wire_are_invalid_argument_and_the_rest_internal():
    assert status.code_of(SpecError("chain[0]", "bad spec")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status.code_of(WireError("bad chunk")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status.code_of(KeyError("bug")) == grpc.StatusCode.INTERNAL
    assert status.status_name(errors.NotFound("x")) == "not_found"


def test_a_calls_allowed_models_come_from_its_bearer_token():
    tokens = [Token(b"admin", None), Token(b"team", frozenset({"a"}))]
    assert allowed_models(None, ()) is None  # no token table: every model
    assert allowed_models(tokens, [("authorization", "Bearer admin")]) is None
    assert allowed_models(tokens, [("authorization", "Bearer team")]) == frozenset({"a"})
    assert allowed_models(tokens, [("authorization", "Bearer nope")]) == frozenset()
    assert allowed_models(tokens, []) == frozenset()

    call = CallContext("GetModel", None, frozenset({"a"}))  # type: ignore[arg-type]
    assert call.authorize("a") == "a" and call.model == "a"
    with pytest.raises(PermissionDenied, match="'b'"):
        call.authorize("b")
    assert call.model == "b"  # named in the metrics and logs of the refused call
    assert call.visible(["a", "b", "c"]) == ["a"]
