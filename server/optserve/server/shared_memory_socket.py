"""The shared-memory side socket: where same-host clients register memfd regions (docs/design.md,
"Shared memory").

grpcio cannot pass file descriptors on its own sockets, so the server listens on a second Unix
socket, SOCK_SEQPACKET (one JSON message per packet, fds with SCM_RIGHTS), in Linux's abstract
namespace: it has no file, so nothing is left behind when the server is killed. Anyone on the host
may connect to an abstract socket; the server accepts only peers whose uid (SO_PEERCRED, from the
kernel) is its own, and, when it has tokens, a `hello` with one of them. One thread per connection
(at most MAX_SESSIONS); when the connection closes, for whatever reason, its regions are unmapped.

Messages (client -> server, each answered with {"ok": true, ...} or {"ok": false, "error": ...}):
  {"op": "hello", "token": "..."}            -> {"session": KEY}   (first, once)
  {"op": "register", "size": N} + one fd     -> {"region": ID}
  {"op": "release", "region": ID}            -> {}
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Sequence

from optserve.server.api.auth import Token, match_token
from optserve.server.core.shared_memory import Session, SharedRegions
from optserve.wire.errors import WireError
from optserve.wire.shared_memory import abstract_address, close_all, receive_message, send_message

log = logging.getLogger("optserve.server")

MAX_SESSIONS = 64
DEFAULT_MAX_REGION_BYTES = 64 << 30


class SharedMemorySocket:
    """Listens on "@optserve-shm-<random>" and serves sessions until `stop`."""

    def __init__(self, tokens: Sequence[Token] | None, max_region_bytes: int = DEFAULT_MAX_REGION_BYTES):
        self.regions = SharedRegions(max_region_bytes)
        self.name = f"@optserve-shm-{os.getpid()}-{secrets.token_hex(8)}"
        self._tokens = tokens
        self._uid = os.getuid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind(abstract_address(self.name))
        self._sock.listen(16)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="optserve-shm-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._stopped or len(self._conns) >= MAX_SESSIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="optserve-shm-session", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session: Session | None = None
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != self._uid:
                log.warning("shared memory: refused pid %d of uid %d (not the server's uid)", pid, uid)
                _, fds = receive_message(conn)  # its hello, read so that the refusal is not lost to a reset
                close_all(fds)
                send_message(conn, {"ok": False, "error": f"uid {uid} is not the server's uid"})
                return
            session = self._hello(conn)
            if session is None:
                return
            while self._handle(conn, session):
                pass
        except (OSError, WireError):
            pass  # the client went away, or sent what is not a message
        finally:  # the connection first: once its session is gone, nothing of it is left open
            conn.close()
            with self._lock:
                self._conns.discard(conn)
            if session is not None:
                self.regions.close_session(session)

    def _hello(self, conn: socket.socket) -> Session | None:
        try:
            message, fds = receive_message(conn)
        except WireError as e:
            send_message(conn, {"ok": False, "error": str(e)})
            return None
        close_all(fds)  # a hello carries none
        if message is None:
            return None
        if message.get("op") != "hello":
            send_message(conn, {"ok": False, "error": "the first message must be hello"})
            return None
        token = message.get("token") or ""
        if self._tokens is not None and (
            not isinstance(token, str) or match_token(self._tokens, token.encode()) is None
        ):
            send_message(conn, {"ok": False, "error": "unknown token"})
            return None
        session = self.regions.open_session(self._uid)
        send_message(conn, {"ok": True, "session": session.key})
        return session

    def _handle(self, conn: socket.socket, session: Session) -> bool:
        """Answers one message; False at the end of the connection."""
        try:
            message, fds = receive_message(conn, max_fds=1)
        except WireError as e:
            send_message(conn, {"ok": False, "error": str(e)})
            return True
        if message is None:
            return False
        op = message.get("op")
        try:
            if op == "register":
                if len(fds) != 1:
                    raise WireError("register needs exactly one fd")
                rid = self.regions.register(session, fds[0], message.get("size"))  # type: ignore[arg-type]
                send_message(conn, {"ok": True, "region": rid})
            elif op == "release":
                self.regions.release(session, int(message.get("region", 0)))
                send_message(conn, {"ok": True})
            else:
                raise WireError(f"unknown op {op!r}")
        except (WireError, OSError, ValueError, TypeError) as e:
            send_message(conn, {"ok": False, "error": str(e)})
        finally:
            close_all(fds)  # a mapped region needs no fd
        return True

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def stop(self) -> None:
        """Stops listening, closes every session and unmaps its regions."""
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):  # close() alone does not wake a thread in accept(); shutdown does
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.regions.close_all()
