"""A connection's shared-memory session with a server on this host (docs/design.md, "Shared memory").

Negotiated on a connection's first push or pull of at least `min_bytes`: the server's GetServerInfo
names its side socket, its host and its uid; the client uses it only on the same host
(/proc/sys/kernel/random/boot_id) with the same uid, registers one anonymous memfd region (sized to
the largest call so far, allocated up front and sealed against shrinking and growing), and from then
on a push writes its gradient into the region and a pull has the server write the parameters there.
Anything that stands in the way (another host, another uid, too little shared memory, a refusal) is
said once in the log and the connection keeps the byte stream. The region is used by one call at a
time; a call that finds it busy uses the byte stream.

No names: the memfd has none and the side socket is abstract, so a killed client or server leaves
nothing behind. When the server goes away (its side connection hangs up) the region is unmapped and
the session negotiated again on the next call.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from optserve.client.errors import OptserveError, PermissionDeniedError
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import WireLeaf
from optserve.wire.dtypes import DTYPES, FLOAT_DTYPES, LeafSpec, leaf_nbytes
from optserve.wire.errors import WireError
from optserve.wire.shared_memory import (
    REQUIRED_SEALS,
    abstract_address,
    host_id,
    leaf_bytes,
    receive_message,
    send_message,
    write_leaves,
)

log = logging.getLogger("optserve.client")
T = TypeVar("T")

DEFAULT_MIN_BYTES = 256 << 10  # smaller calls gain nothing from shared memory: one message is as fast
GROWTH_GRANULE = 1 << 20  # region sizes are whole MiB, so that slightly larger calls reuse a region
SIDE_TIMEOUT_S = 10.0  # bound of every side socket exchange


def align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def pull_bytes(schema: Iterable[LeafSpec], wire_dtype: str | None) -> int:
    """The bytes a pull's tensors take in `wire_dtype` (None: the parameters' dtypes)."""
    total = 0
    for leaf in schema:
        dtype = wire_dtype if wire_dtype and leaf.dtype in FLOAT_DTYPES else leaf.dtype
        total += leaf_nbytes(DTYPES[dtype], leaf.shape)
    return total


def wire_bytes(leaves: Sequence[WireLeaf]) -> int:
    return sum(leaf_bytes(leaf) for leaf in leaves)


def push_message(header: pb.PushHeader, leaves: Sequence[WireLeaf], region: Region, what: str) -> bytes:
    """The one PushRequest of a push whose gradient is written into the start of `region` (converted
    to its wire dtypes on the way); sets header.shared_memory (the caller clears it after the call,
    so that a byte-stream retry of the same header carries none)."""
    slices = write_leaves(leaves, region.array, what)
    n = sum(s.length for s in slices)
    header.shared_memory.CopyFrom(pb.SharedMemorySpan(session=region.session, region=region.id, offset=0, length=n))
    msg = pb.PushRequest(header=header)
    msg.slices.extend(
        pb.TensorSlice(path=s.path, dtype=s.dtype, shape=s.shape, offset=s.offset, length=s.length) for s in slices
    )
    return msg.SerializeToString()


def pull_span(req: pb.PullRequest, region: Region, offset: int, length: int) -> None:
    """Names [offset, offset + length) of `region` in `req` (PullRequest.shared_memory). The caller
    takes the view of it (`Region.view`) only once the reply is there: a failed call's traceback,
    which callers may keep, then holds no view that would keep the region mapped."""
    req.shared_memory.CopyFrom(
        pb.SharedMemorySpan(session=region.session, region=region.id, offset=offset, length=length)
    )


# -- the calls (`Model` hands them its connection; each returns "not used" when the region is not
# available, and the caller goes on with the byte stream) ------------------------------------------


def push(conn: Any, header: pb.PushHeader, leaves: Sequence[WireLeaf], what: str, timeout: float | None) -> Any:
    """PushOne through `conn`'s region (a `transport.Connection`); None when not used."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or shm.unavailable:
        return None
    with shm.region(wire_bytes(leaves)) as region:
        if region is None:
            return None
        try:
            return conn.call(conn._push_one, push_message(header, leaves, region, what), timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e)
            return None
        finally:  # a retry of the same header over the byte stream must carry no span
            header.ClearField("shared_memory")


def pull(
    conn: Any, req: pb.PullRequest, size: int, timeout: float | None, read: Callable[[bytes, np.ndarray], T]
) -> tuple[bool, T | None]:
    """PullOne into `conn`'s region, `size` bytes of tensors; (used, read(reply, view)). The reply is
    read while the region is still this call's."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or not size:
        return False, None
    with shm.region(size) as region:
        if region is None:
            return False, None
        pull_span(req, region, 0, size)
        try:
            reply = conn.call(conn._pull_one, req, timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e)
            req.ClearField("shared_memory")
            return False, None
        return True, read(reply, region.view(0, size))


def push_pull(
    conn: Any,
    header: pb.PushHeader,
    leaves: Sequence[WireLeaf],
    size: int,
    what: str,
    timeout: float | None,
    read: Callable[[bytes, np.ndarray], T],
) -> tuple[bool, T | None]:
    """PushPullOne: the gradient at the start of the region, the parameters (`size` bytes) after it."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or not size:
        return False, None
    at = align(wire_bytes(leaves))
    with shm.region(at + size) as region:
        if region is None:
            return False, None
        try:
            pull_span(header.pull, region, at, size)
            reply = conn.call(conn._push_pull_one, push_message(header, leaves, region, what), timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e)
            return False, None
        finally:
            header.ClearField("shared_memory")
            header.pull.ClearField("shared_memory")
        return True, read(reply, region.view(at, size))


class Region:
    """One registered region: its id, size and a flat uint8 view of this process's mapping."""

    def __init__(self, session: str, rid: int, size: int, mapping: mmap.mmap):
        self.session = session
        self.id = rid
        self.size = size
        self._map = mapping
        self.array = np.frombuffer(mapping, dtype=np.uint8)

    def view(self, offset: int, length: int) -> np.ndarray:
        return self.array[offset : offset + length]

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):  # a view is still held: the mapping ends with it
            self._map.close()


class SharedMemory:
    """The shared-memory session of one `Connection` (thread safe).

    server_info: GetServerInfo of the connection (raises OptserveError). token: the connection's.
    min_bytes: calls smaller than this use the byte stream.
    """

    def __init__(
        self, target: str, server_info: Callable[[], Any], token: str | None, min_bytes: int = DEFAULT_MIN_BYTES
    ):
        self.target = target
        self.min_bytes = min_bytes
        self._server_info = server_info
        self._token = token or ""
        self._lock = threading.Lock()  # one call at a time uses the region
        self._sock: socket.socket | None = None
        self._session = ""
        self._region: Region | None = None
        self.unavailable = ""  # why not, once decided for good (logged once)
        self._said: set[str] = set()

    @contextmanager
    def region(self, nbytes: int) -> Iterator[Region | None]:
        """The region, at least `nbytes` large, for the duration of one call; None: use the byte stream."""
        if nbytes < self.min_bytes or self.unavailable or not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self._ensure(nbytes)
        finally:
            self._lock.release()

    def _why_not(self, why: str, *, final: bool) -> None:
        if why not in self._said:
            self._said.add(why)
            log.info("optserve: %s: shared memory not used (%s); tensors go over the byte stream", self.target, why)
        if final:
            self.unavailable = why

    def _ensure(self, nbytes: int) -> Region | None:
        if self._sock is not None and not self._alive():
            self._drop()  # the server went away: negotiate again (its replacement may offer it)
        if self._sock is None and not self._connect():
            return None
        region = self._region
        if region is None or region.size < nbytes:
            if region is not None:
                self._release(region)
            self._region = region = self._register(align(nbytes, GROWTH_GRANULE))
        return region

    def _alive(self) -> bool:
        """The server never speaks first: anything readable on the side socket is its hang-up."""
        assert self._sock is not None
        p = select.poll()
        p.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not p.poll(0)

    def _connect(self) -> bool:
        try:
            info = self._server_info()
        except OptserveError:
            return False  # the call itself will say what is wrong
        if not info.shared_memory_socket:
            self._why_not("the server offers none: optserve serve --shared-memory", final=True)
            return False
        mine = host_id()
        if not mine or info.host_id != mine:
            self._why_not("the server is on another host", final=True)
            return False
        if info.uid != os.getuid():
            self._why_not(f"the server runs as uid {info.uid}, this process as {os.getuid()}", final=True)
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(SIDE_TIMEOUT_S)
        try:
            sock.connect(abstract_address(info.shared_memory_socket))
            send_message(sock, {"op": "hello", "token": self._token})
            answer, _ = receive_message(sock)
        except (OSError, WireError, ValueError) as e:
            sock.close()
            self._why_not(f"its side socket refused: {e}", final=False)
            return False
        if not answer or not answer.get("ok"):
            sock.close()
            self._why_not(f"refused: {(answer or {}).get('error', 'connection closed')}", final=True)
            return False
        self._sock, self._session = sock, str(answer["session"])
        return True

    def _register(self, size: int) -> Region | None:
        assert self._sock is not None
        fd = os.memfd_create("optserve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            try:  # every page now, so that a short /dev/shm or cgroup fails here, not with SIGBUS later
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                self._why_not(f"no room for a {size}-byte region: {e.strerror}", final=False)
                return None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                send_message(self._sock, {"op": "register", "size": size}, [fd])
                answer, _ = receive_message(self._sock)
            except (OSError, WireError) as e:
                mapping.close()
                self._drop()
                self._why_not(f"the side socket failed: {e}", final=False)
                return None
            if not answer or not answer.get("ok"):
                mapping.close()
                self._why_not(f"region refused: {(answer or {}).get('error', 'connection closed')}", final=True)
                return None
            return Region(self._session, int(answer["region"]), size, mapping)
        finally:
            os.close(fd)  # the mappings keep the memory (each with the duplicate fd Python's mmap holds)

    def _release(self, region: Region) -> None:
        self._region = None
        region.close()
        try:
            assert self._sock is not None
            send_message(self._sock, {"op": "release", "region": region.id})
            receive_message(self._sock)
        except (OSError, WireError):
            self._drop()

    def _drop(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._session = ""

    def forget(self, error: PermissionDeniedError) -> None:
        """After a call the server refused: a session it no longer knows (it restarted between this
        client's check of the side socket and the call) is dropped, so that the caller resends over
        the byte stream (the span is resolved before anything is applied, so nothing was) and the
        next call negotiates again; any other refusal (the token's models) is the caller's."""
        if "shared memory:" not in str(error):
            raise error
        self._drop()

    def close(self) -> None:
        with self._lock:
            self._drop()
