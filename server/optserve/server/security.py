"""Bearer tokens and TLS for the server.

Token file: one token per line, optionally followed by the models it may touch:

    s3cret-admin                 # any model
    team-a-token  mlp  encoder   # only these models (and model-less calls such as ListRules)

Tokens are compared in constant time (hmac.compare_digest). A missing or unknown token gets
UNAUTHENTICATED; a known token used on another model gets PERMISSION_DENIED. The health and
reflection services stay open so that probes need no secret.
"""
from __future__ import annotations

import argparse
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from optserve.client.transport import SERVICE

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Token:
    secret: bytes
    models: frozenset[str] | None  # None: every model


def load_tokens(path: str) -> list[Token]:
    tokens = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            tokens.append(Token(words[0].encode(), frozenset(words[1:]) or None))
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def match_token(tokens: list[Token], presented: bytes) -> Token | None:
    """Constant time per token; every token is compared, so timing does not reveal which matched."""
    found = None
    for token in tokens:
        if hmac.compare_digest(token.secret, presented):
            found = token
    return found


class TokenAuth(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every optserve call.

    Whether a token may touch a model is checked by the service (`authorize`), which knows the
    model a request names; the interceptor stores the matched token for it in a context-local.
    """

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
        token = match_token(self.tokens, presented.encode()) if presented else None
        if token is None:
            reason = "missing bearer token" if not presented else "invalid bearer token"
            return _deny(continuation(details), grpc.StatusCode.UNAUTHENTICATED, f"{details.method}: {reason}")
        handler = continuation(details)
        if handler is None or token.models is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        return _scoped(handler, token.models)


# grpc builds a handler with a different function for each (request streaming, response streaming).
_HANDLER_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def _factory(handler: grpc.RpcMethodHandler) -> tuple[Callable, str]:
    return _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]


def _deny(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    # Keep the method's arity so grpc treats the call correctly, and skip deserializing bytes.
    return _factory(handler)[0](abort)


ALLOWED_MODELS = "optserve.allowed_models"


def _scoped(handler: grpc.RpcMethodHandler, models: frozenset[str]) -> grpc.RpcMethodHandler:
    """Wraps a handler so the service can check the model a request names against `models`."""
    make, attribute = _factory(handler)
    inner = getattr(handler, attribute)

    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        setattr(context, ALLOWED_MODELS, models)
        return inner(request, context)

    return make(behaviour, handler.request_deserializer, handler.response_serializer)


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when client_ca is given (clients without a valid certificate are refused)."""

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_server_credentials(
        [(read(key), read(cert))],
        root_certificates=read(client_ca) if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """Server(...) keyword arguments for the serve command's --token-file and --tls-* flags."""
    options: dict[str, Any] = {}
    if args.token_file:
        options["interceptors"] = [TokenAuth(load_tokens(args.token_file))]
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        options["server_credentials"] = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    return options
