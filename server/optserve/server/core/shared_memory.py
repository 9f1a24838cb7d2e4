"""The shared-memory regions clients registered: sessions, their mapped regions, bounds-checked spans
(docs/design.md, "Shared memory").

A session is one side socket connection (server/optserve/server/shared_memory_socket.py). Its key
is random (128 bits) and known only to the client that opened it; a data call names a region by
(session key, region id), so one client can never name another's region. A region is mapped once,
when it is registered, after its fd was checked (a memfd of the declared size, sealed against
shrinking and growing, fully allocated); the fd it came with is closed at once (Python's mmap keeps
its own duplicate, closed when the region is unmapped). The session's regions are unmapped when its
connection closes (the client exited or was killed); a call still reading one keeps its mapping
alive until it returns (the views it holds), never a dangling pointer.
"""

from __future__ import annotations

import contextlib
import mmap
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np

from optserve.server.core.errors import InvalidArgument, PermissionDenied
from optserve.wire.errors import WireError
from optserve.wire.shared_memory import check_region_fd

MAX_REGIONS_PER_SESSION = 8


@dataclass
class Region:
    """One mapped region: its mmap and a flat uint8 view of it."""

    size: int
    map: mmap.mmap
    array: np.ndarray


@dataclass
class Session:
    key: str
    uid: int
    regions: dict[int, Region] = field(default_factory=dict)
    next_id: int = 1


class SharedRegions:
    """The sessions of one server, by key; thread safe."""

    def __init__(self, max_region_bytes: int):
        self.max_region_bytes = max_region_bytes
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closing = 0  # sessions gone from the table whose regions are still being unmapped
        self.spans_used = 0  # requests that named a span (tests tell the paths apart by it)

    def open_session(self, uid: int) -> Session:
        s = Session(secrets.token_hex(16), uid)
        with self._lock:
            self._sessions[s.key] = s
            self._changed.notify_all()
        return s

    def register(self, session: Session, fd: int, size: int) -> int:
        """Maps `fd` (the caller still owns and closes it) as a new region of `session`; its id.
        WireError when the fd is not a region the server may map."""
        if not isinstance(size, int) or not 0 < size <= self.max_region_bytes:
            raise WireError(f"region size {size!r}: must be 1 to {self.max_region_bytes} bytes")
        if len(session.regions) >= MAX_REGIONS_PER_SESSION:
            raise WireError(f"a session may hold {MAX_REGIONS_PER_SESSION} regions; release one first")
        check_region_fd(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        region = Region(size, m, np.frombuffer(m, dtype=np.uint8))
        with self._lock:
            rid = session.next_id
            session.next_id += 1
            session.regions[rid] = region
        return rid

    def release(self, session: Session, rid: int) -> bool:
        with self._lock:
            region = session.regions.pop(rid, None)
        if region is not None:
            _unmap(region)
        return region is not None

    def close_session(self, session: Session) -> None:
        """Forgets the session and unmaps its regions (its side connection closed)."""
        with self._lock:
            self._sessions.pop(session.key, None)
            regions = list(session.regions.values())
            session.regions.clear()
            self._closing += 1
        for region in regions:
            _unmap(region)
        with self._lock:
            self._closing -= 1
            self._changed.notify_all()

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            self.close_session(s)

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def wait_sessions(self, count: int, timeout: float) -> bool:
        """Waits (bounded) until exactly `count` sessions are open: what tests wait for after they
        kill a client, instead of sleeping), their regions unmapped."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._sessions) == count and not self._closing, timeout)

    def wait_closed(self, key: str, timeout: float) -> bool:
        """Waits (bounded) until session `key` is closed and its regions unmapped."""
        with self._changed:
            return self._changed.wait_for(lambda: key not in self._sessions and not self._closing, timeout)

    def span(self, key: str, rid: int, offset: int, length: int, model: str) -> np.ndarray:
        """The flat uint8 view of a request's span: PERMISSION_DENIED for a session key or region that
        is not this caller's, INVALID_ARGUMENT for a range outside the region."""
        with self._lock:
            session = self._sessions.get(key)
            region = None if session is None else session.regions.get(rid)
            self.spans_used += 1
        if session is None:
            raise PermissionDenied(
                f"model {model!r}: shared memory: unknown session key (its side connection closed, or it is "
                "another's); register again or use the byte stream"
            )
        if region is None:
            raise PermissionDenied(f"model {model!r}: shared memory: region {rid} is not one of this session's")
        if offset < 0 or length < 0 or offset + length > region.size:
            raise InvalidArgument(
                f"model {model!r}: shared memory span [{offset}, {offset + length}) is outside region {rid}'s "
                f"{region.size} bytes"
            )
        return region.array[offset : offset + length]


def _unmap(region: Region) -> None:
    """Unmaps now unless a call still holds a view (then when the last view goes)."""
    region.array = np.empty(0, dtype=np.uint8)
    with contextlib.suppress(BufferError):  # views remain: the mapping ends with the last of them
        region.map.close()
