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

Besides that region, a connection may hold dedicated regions (`SharedMemory.dedicated`): each the
home of one model's region-backed gradient and parameter arrays (client/shared_arrays.py). A call
whose gradient lies there at its slots sends it where it is (no write), and one whose `out=` lies
there has the server write the parameters straight into it (no read); anything else goes through
the connection's region as above.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple, TypeVar

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
    to its wire dtypes on the way; a leaf already there, a region-backed gradient's, is not copied);
    sets header.shared_memory (the caller clears it after the call, so that a byte-stream retry of
    the same header carries none)."""
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


class Spans(NamedTuple):
    """Where one call's tensors go: the push's region (its gradient from byte 0) and the pull's region
    and offset; None for a part the call does not have."""

    push: Region | None
    pull: Region | None
    pull_at: int


# -- the calls (`Model` hands them its connection; each returns "not used" when no region is
# available, and the caller goes on with the byte stream) -------------------------------------------


def push(conn: Any, header: pb.PushHeader, leaves: Sequence[WireLeaf], what: str, timeout: float | None) -> Any:
    """PushOne through a region of `conn` (a `transport.Connection`); None when not used."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or shm.unavailable:
        return None
    with shm.spans(leaves) as spans:
        if spans is None or spans.push is None:
            return None
        try:
            return conn.call(conn._push_one, push_message(header, leaves, spans.push, what), timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e, spans)
            return None
        finally:  # a retry of the same header over the byte stream must carry no span
            header.ClearField("shared_memory")


def pull(
    conn: Any,
    req: pb.PullRequest,
    size: int,
    timeout: float | None,
    read: Callable[[bytes, np.ndarray], T],
    out: Any = None,
) -> tuple[bool, T | None]:
    """PullOne into a region of `conn`, `size` bytes of tensors (where `out` lies when it is a
    region-backed pytree of this request's layout); (used, read(reply, view)). The reply is read
    while the region is still this call's."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or not size:
        return False, None
    with shm.spans(None, size, out, req.packed) as spans:
        if spans is None or spans.pull is None:
            return False, None
        pull_span(req, spans.pull, spans.pull_at, size)
        try:
            reply = conn.call(conn._pull_one, req, timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e, spans)
            req.ClearField("shared_memory")
            return False, None
        return True, read(reply, spans.pull.view(spans.pull_at, size))


def push_pull(
    conn: Any,
    header: pb.PushHeader,
    leaves: Sequence[WireLeaf],
    size: int,
    what: str,
    timeout: float | None,
    read: Callable[[bytes, np.ndarray], T],
    out: Any = None,
) -> tuple[bool, T | None]:
    """PushPullOne: the gradient at the start of its region, the parameters (`size` bytes) after it,
    or each where a region-backed gradient and `out` lie."""
    shm: SharedMemory | None = conn.shared_memory
    if shm is None or not size:
        return False, None
    with shm.spans(leaves, size, out, header.pull.packed) as spans:
        if spans is None or spans.push is None or spans.pull is None:
            return False, None
        try:
            pull_span(header.pull, spans.pull, spans.pull_at, size)
            reply = conn.call(conn._push_pull_one, push_message(header, leaves, spans.push, what), timeout=timeout)
        except PermissionDeniedError as e:
            shm.forget(e, spans)
            return False, None
        finally:
            header.ClearField("shared_memory")
            header.pull.ClearField("shared_memory")
        return True, read(reply, spans.pull.view(spans.pull_at, size))


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


class Region:
    """One registered region: its id, size and a flat uint8 view of this process's mapping.

    A dedicated region (`SharedMemory.dedicated`) also keeps its fd (it is registered again with a
    server that restarted), a lock (one call at a time) and `slots`: where it holds what
    (client/shared_arrays.py, `Slots`)."""

    def __init__(self, session: str, rid: int, size: int, mapping: mmap.mmap, *, dedicated: bool = False):
        self.dedicated = dedicated
        self.session = session
        self.id = rid
        self.size = size
        self._map = mapping
        self.array = np.frombuffer(mapping, dtype=np.uint8)
        self.start = address(self.array)
        self.fd = -1
        self.lock = threading.Lock()
        self.slots: Any = None

    def view(self, offset: int, length: int) -> np.ndarray:
        return self.array[offset : offset + length]

    def holds(self, a: np.ndarray) -> bool:
        """Whether any byte of `a` lies in this region."""
        at = address(a)
        return at < self.start + self.size and at + max(a.nbytes, 1) > self.start

    def in_use(self) -> bool:
        """Whether an array of the caller's still views the region (each numpy view of it refers to
        `array`: only this attribute and getrefcount's own argument left means none)."""
        return sys.getrefcount(self.array) > 2

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):  # a view is still held: the mapping ends with it
            self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        self._lock = threading.Lock()  # one call at a time uses the connection's region
        self._side = threading.RLock()  # the side socket, the session and the registrations
        self._sock: socket.socket | None = None
        self._session = ""
        self._region: Region | None = None
        self._dedicated: list[Region] = []  # homes of region-backed arrays (client/shared_arrays.py)
        self.unavailable = ""  # why not, once decided for good (logged once)
        self._said: set[str] = set()

    @contextmanager
    def region(self, nbytes: int, *, small: bool = False) -> Iterator[Region | None]:
        """The connection's region, at least `nbytes` large, for the duration of one call; None: use
        the byte stream. small: also below `min_bytes` (the rest of the call is in a dedicated region)."""
        if (nbytes < self.min_bytes and not small) or self.unavailable or not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self._ensure(nbytes)
        finally:
            self._lock.release()

    @contextmanager
    def spans(
        self, leaves: Sequence[WireLeaf] | None, pull_size: int = 0, out: Any = None, packed: bool = False
    ) -> Iterator[Spans | None]:
        """The regions of one call: a gradient (`leaves`) that lies at its slots of a dedicated region
        is sent from there, an `out` that does receives the pull there (`pull_size` bytes, a packed
        pull or not), anything else goes through the connection's region; None: use the byte stream."""
        with ExitStack() as stack:
            push_in = pull_in = None
            if self._dedicated and not self.unavailable:
                dedicated = [r for r in self._dedicated if r.slots is not None]  # a copy: others may register
                if leaves is not None:
                    found = next((r for r in dedicated if r.slots.holds_gradient(leaves)), None)
                    push_in = self._claim(stack, found)
                if out is not None and pull_size:
                    found = next((r for r in dedicated if r.slots.holds_out(out, pull_size, packed)), None)
                    pull_in = found if found is not None and found is push_in else self._claim(stack, found)
            push_bytes = 0 if leaves is None or push_in is not None else align(wire_bytes(leaves))
            need = push_bytes + (0 if pull_in is not None else pull_size)
            general = None
            if need:
                general = stack.enter_context(self.region(need, small=push_in is not None or pull_in is not None))
                if general is None:
                    yield None
                    return
            pull = pull_in if pull_in is not None else general if pull_size else None
            pull_at = pull_in.slots.pull_at if pull_in is not None else push_bytes
            yield Spans(push_in if push_in is not None else general if leaves is not None else None, pull, pull_at)

    def _claim(self, stack: ExitStack, region: Region | None) -> Region | None:
        """`region` for this call (its lock held until the call ends), registered with the current
        session; None when it is busy or cannot be registered."""
        if region is None or not region.lock.acquire(blocking=False):
            return None
        stack.callback(region.lock.release)
        with self._side:
            if not self._session_ready():
                return None
            if region.session != self._session and not self._send_region(region, region.fd):
                return None
        return region

    def _why_not(self, why: str, *, final: bool) -> None:
        if why not in self._said:
            self._said.add(why)
            log.info("optserve: %s: shared memory not used (%s); tensors go over the byte stream", self.target, why)
        if final:
            self.unavailable = why

    def _session_ready(self) -> bool:
        """A live side connection (a new one if the server went away); under `_side`."""
        if self._sock is not None and not self._alive():
            self._drop_session()  # the server went away: negotiate again (its replacement may offer it)
        return self._sock is not None or self._connect()

    def _ensure(self, nbytes: int) -> Region | None:
        with self._side:
            ready = self._session_ready()
            region = self._region
            if region is not None and region.session != self._session:  # registered with a server gone
                self._region = None
                region.close()
                region = None
            if not ready:
                return None
            self._sweep()
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

    def _new_memfd(self, size: int) -> int | None:
        """A sealed memfd of `size` bytes, every page allocated (so that a short /dev/shm or cgroup
        fails here, not with SIGBUS later); None when there is no room."""
        fd = os.memfd_create("optserve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        except OSError as e:
            os.close(fd)
            self._why_not(f"no room for a {size}-byte region: {e.strerror}", final=False)
            return None
        return fd

    def _register(self, size: int, *, keep_fd: bool = False) -> Region | None:
        """A new region of `size` bytes registered with the session; under `_side`. keep_fd: the
        region keeps its fd (a dedicated one: registered again after a restart), else it is closed
        (the mapping keeps the memory, with the duplicate fd Python's mmap holds)."""
        fd = self._new_memfd(size)
        if fd is None:
            return None
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            region = Region(self._session, 0, size, mapping, dedicated=keep_fd)
            if not self._send_region(region, fd):
                region.close()
                return None
            if keep_fd:
                region.fd, fd = fd, -1
            return region
        finally:
            if fd >= 0:
                os.close(fd)

    def _send_region(self, region: Region, fd: int) -> bool:
        """Registers `region` (`fd`, its memfd) with the current session; under `_side`. A refusal
        ends shared memory for the connection, unless dedicated regions are involved (too many, too
        large: a dedicated region's arrays are then plain memory, and calls copy)."""
        assert self._sock is not None
        try:
            send_message(self._sock, {"op": "register", "size": region.size}, [fd])
            answer, _ = receive_message(self._sock)
        except (OSError, WireError) as e:
            self._drop_session()
            self._why_not(f"the side socket failed: {e}", final=False)
            return False
        if not answer or not answer.get("ok"):
            why = f"region refused: {(answer or {}).get('error', 'connection closed')}"
            # a dedicated region's refusal, or one while dedicated regions hold the session's places,
            # leaves the connection's shared memory to its other calls
            self._why_not(why, final=not region.dedicated and not self._dedicated)
            return False
        region.session, region.id = self._session, int(answer["region"])
        return True

    def dedicated(self, nbytes: int) -> Region | None:
        """A new region of its own (the home of region-backed arrays: client/shared_arrays.py), kept
        registered while any array views it and the connection is open; None when shared memory is
        not available (said once in the log). It comes with its lock held, so that no sweep releases
        it before the caller's views of it exist: the caller releases it."""
        if self.unavailable:
            return None
        with self._side:
            if not self._session_ready():
                return None
            self._sweep()
            region = self._register(align(max(nbytes, 1), GROWTH_GRANULE), keep_fd=True)
            if region is not None:
                region.lock.acquire()
                self._dedicated.append(region)
            return region

    def _sweep(self) -> None:
        """Releases the dedicated regions no array views any more; under `_side`."""
        for region in [r for r in self._dedicated if not r.in_use() and not r.lock.locked()]:
            self._dedicated.remove(region)
            self._release(region)

    def _release(self, region: Region) -> None:
        if region is self._region:
            self._region = None
        registered = region.session == self._session and self._sock is not None
        region.close()
        if not registered:
            return
        try:
            assert self._sock is not None
            send_message(self._sock, {"op": "release", "region": region.id})
            receive_message(self._sock)
        except (OSError, WireError):
            self._drop_session()

    def _drop_session(self) -> None:
        """Forgets the side connection and the session: the next call negotiates again, registering
        its regions anew (the connection's region is replaced then, the dedicated ones sent again)."""
        with self._side:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._session = ""

    def forget(self, error: PermissionDeniedError, spans: Spans) -> None:
        """After a call the server refused: a session it no longer knows (it restarted between this
        client's check of the side socket and the call) is dropped, so that the caller resends over
        the byte stream (the span is resolved before anything is applied, so nothing was) and the
        next call negotiates again; any other refusal (the token's models) is the caller's. The
        connection's region, when the call (`spans`) holds it, is unmapped at once."""
        if "shared memory:" not in str(error):
            raise error
        self._drop_session()
        region = self._region
        if region is not None and (region is spans.push or region is spans.pull):
            self._region = None
            region.close()

    def close(self) -> None:
        with self._lock, self._side:
            self._drop_session()
            for region in [self._region, *self._dedicated]:
                if region is not None:
                    region.close()
            self._region = None
            self._dedicated.clear()
