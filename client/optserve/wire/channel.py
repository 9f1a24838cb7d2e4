"""The gRPC settings the client and the server share, so both sides agree on caps and keepalive.

Plain data (option names and values, the service's name): grpc itself is imported by the code that
opens the channel or the server."""

from __future__ import annotations

SERVICE = "optserve.v1.Optserve"

# Every bulky message is a stream of chunks (4 MiB by default), so a per-message cap well above the
# chunk size but far below protobuf's 2 GiB limit is safe; model size is bounded only by memory.
MAX_MESSAGE_BYTES = 64 << 20

# The largest message every gRPC implementation (grpc-js, grpc-go, grpc-java, grpcio, ...) receives
# with default options. Every message the server sends in reply to a request with default fields
# fits in it (the contract, "Message sizes"), so clients in other languages need no options.
DEFAULT_RECEIVE_LIMIT = 4 << 20

KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE,
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # grpc sets SO_REUSEPORT by default: a second server on the same port would start and take half
    # of the first one's connections, and a server asking for port 0 could be given a port another
    # server holds (two shards of one model answering for each other). One port, one server.
    ("grpc.so_reuseport", 0),
    *KEEPALIVE,
]

# grpc makes a `unix:` target's authority its percent-encoded path, which no certificate names; over
# a Unix socket, TLS checks the server's certificate against this name instead (a certificate for a
# host lists it; `grpc.ssl_target_name_override` in a client's options chooses another).
UNIX_TLS_NAME = "localhost"


def tls_options(target: str) -> list[tuple[str, str]]:
    """The channel options a TLS channel to `target` needs before the caller's own."""
    return [("grpc.ssl_target_name_override", UNIX_TLS_NAME)] if target.startswith("unix:") else []


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"
