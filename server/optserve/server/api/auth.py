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
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from optserve.server.core.errors import ConfigError

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Token:
    secret: bytes
    models: frozenset[str] | None  # None: every model


TOKEN_FILE_FORMAT = "one token per line, optionally followed by the models it may touch: TOKEN [MODEL ...]"


def load_tokens(path: str) -> list[Token]:
    """The tokens of a token file; a file that cannot be read or holds no token is a ConfigError
    naming --token-file (a server must never start open by accident)."""
    tokens = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if words:
                    tokens.append(Token(words[0].encode(), frozenset(words[1:]) or None))
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(
            f"--token-file {path}: cannot read it ({reason}); give a text file with {TOKEN_FILE_FORMAT}"
        ) from None
    if not tokens:
        raise ConfigError(f"--token-file {path}: no tokens in it; add {TOKEN_FILE_FORMAT}")
    return tokens


def match_token(tokens: Sequence[Token], presented: bytes) -> Token | None:
    """Constant time per token; every token is compared, so timing does not reveal which matched."""
    found = None
    for token in tokens:
        if hmac.compare_digest(token.secret, presented):
            found = token
    return found


def bearer_token(metadata: Any) -> str:
    """The token of a call's `authorization: Bearer <token>` metadata ('' when it has none)."""
    header = dict(metadata or ()).get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every optserve call without a known `authorization: Bearer <token>` (UNAUTHENTICATED).

    Whether a token may touch a model is checked by the service (api/call_context.py), which knows
    the model a request names and resolves the token's models from the call's metadata itself.
    """

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        presented = bearer_token(details.invocation_metadata)
        token = match_token(self.tokens, presented.encode()) if presented else None
        if token is None:
            reason = "missing bearer token" if not presented else "invalid bearer token"
            return _deny(continuation(details), grpc.StatusCode.UNAUTHENTICATED, f"{details.method}: {reason}")
        return continuation(details)


# grpc builds a handler with a different function for each (request streaming, response streaming).
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _factory(handler: grpc.RpcMethodHandler) -> Callable:
    return _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]


def _deny(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    # Keep the method's arity so grpc treats the call correctly, and skip deserializing bytes.
    return _factory(handler)(abort)


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when client_ca is given (clients without a valid certificate are refused).

    The files are checked here, each mistake a ConfigError naming its flag: grpc itself would only
    fail at the first handshake, long after the server said it was listening.
    """
    pem = {"--tls-cert": _read(cert, "--tls-cert"), "--tls-key": _read(key, "--tls-key")}
    if client_ca:
        pem["--tls-client-ca"] = _read(client_ca, "--tls-client-ca")
    expected = {
        "--tls-cert": (cert, b"-----BEGIN CERTIFICATE-----", "a PEM certificate"),
        "--tls-key": (key, b"PRIVATE KEY-----", "a PEM private key"),
        "--tls-client-ca": (client_ca, b"-----BEGIN CERTIFICATE-----", "a PEM CA certificate"),
    }
    for flag, (path, marker, what) in expected.items():
        if flag in pem and marker not in pem[flag]:
            raise ConfigError(f"{flag} {path}: not {what}; give {what} file")
    if b"ENCRYPTED" in pem["--tls-key"]:
        raise ConfigError(
            f"--tls-key {key}: the key is encrypted, which grpc cannot use; give it unencrypted "
            "(openssl pkey -in KEY -out PLAIN_KEY)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=b"")  # a password: never an interactive prompt
    except ssl.SSLError as e:
        raise ConfigError(
            f"--tls-key {key} does not go with --tls-cert {cert} ({e.reason or e}); "
            "give the certificate's own private key"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as e:
            raise ConfigError(f"--tls-client-ca {client_ca}: not a usable CA certificate ({e.reason or e})") from None
    return grpc.ssl_server_credentials(
        [(pem["--tls-key"], pem["--tls-cert"])],
        root_certificates=pem.get("--tls-client-ca"),
        require_client_auth=client_ca is not None,
    )


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            f"{flag} {path}: cannot read it ({e.strerror or e}); give the path of a readable PEM file"
        ) from None


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """Server(...) keyword arguments for the serve command's --token-file (`tokens`) and --tls-* flags.

    Raises ConfigError, naming the flag and the fix, for a flag that cannot work.
    """
    options: dict[str, Any] = {}
    if args.token_file is not None:
        options["tokens"] = load_tokens(args.token_file)
    if args.tls_cert and not args.tls_key:
        raise ConfigError("--tls-cert needs --tls-key: add --tls-key FILE, the certificate's private key")
    if args.tls_key and not args.tls_cert:
        raise ConfigError("--tls-key needs --tls-cert: add --tls-cert FILE, the certificate of that key")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS with client certificates")
    if args.tls_cert:
        options["server_credentials"] = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    return options
