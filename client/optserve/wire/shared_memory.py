"""Shared-memory tensors: what the client and the server both need (docs/design.md, "Shared memory").

A same-host client registers anonymous memfd regions with the server over a side Unix socket
(SCM_RIGHTS); a push or pull then carries a `SharedMemorySpan` instead of payload bytes. This module
holds the parts both sides share: the side socket's messages, the seals a region must have, the
host's identity, and laying leaves one after the other into a span (the client's pushes, the
server's pulls).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.wire.chunks import Cast, Slice, WireLeaf, as_bytes
from optserve.wire.dtypes import dtype_name
from optserve.wire.errors import WireError

# A region must be sealed against shrinking (the server would fault with SIGBUS reading pages that
# are gone) and against growing (its size is what the server checked).
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MAX_SIDE_MESSAGE_BYTES = 4096  # a side socket message is a small JSON object
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def host_id() -> str:
    """This host's running kernel's identity ('' when unknown: shared memory is then never used)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def abstract_address(name: str) -> str:
    """The bind/connect address of "@name" (Linux's abstract namespace: no file, nothing to leak)."""
    if not name.startswith("@"):
        raise ValueError(f"shared-memory socket {name!r}: expected an abstract address '@NAME'")
    return "\0" + name[1:]


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_SIDE_MESSAGE_BYTES:
        raise ValueError("side socket message too large")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def receive_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (None at end of connection) and the fds that came with it. The caller owns the fds
    (closes them) whatever the message says; a malformed message is a WireError after they are closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_SIDE_MESSAGE_BYTES, max(max_fds, 1))
    if not data:
        close_all(fds)
        return None, []
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not an object")
    except ValueError as e:
        close_all(fds)
        raise WireError(f"malformed side socket message ({e})") from None
    if len(fds) > max_fds:
        close_all(fds)
        raise WireError(f"side socket message {message.get('op')!r} came with {len(fds)} fds, expected {max_fds}")
    return message, fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_region_fd(fd: int, size: int) -> None:
    """Raises WireError unless `fd` is a memfd of exactly `size` bytes, sealed against shrinking and
    growing and with all its pages allocated (a hole the server wrote into could fail for want of
    memory with SIGBUS instead of an error)."""
    st = os.fstat(fd)
    if st.st_size != size:
        raise WireError(f"region is {st.st_size} bytes, declared {size}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise WireError("region is not a memfd (it cannot be sealed)") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise WireError("region is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)")
    if st.st_blocks * 512 < size:
        raise WireError("region has pages not allocated (posix_fallocate it before registering)")


def leaf_bytes(leaf: WireLeaf) -> int:
    _path, a = leaf
    if isinstance(a, Cast):
        return a.array.size * a.dtype.itemsize
    return a.nbytes


def write_leaves(leaves: Sequence[WireLeaf], span: np.ndarray, what: str) -> list[Slice]:
    """Writes `leaves` one after the other into `span` (flat uint8), each converted to its wire dtype
    on the way (one pass, no converted copy); returns their slices (offsets within each leaf, 0).
    A leaf whose bytes already lie where it goes (a client's region-backed gradient) is not copied.
    A leaf that does not fit is a WireError naming `what` and the leaf, before anything is written."""
    total = 0
    for path, a in leaves:
        total += leaf_bytes((path, a))
        if total > len(span):
            raise WireError(
                f"{what}: leaf {path!r} does not fit in the shared-memory span: the tensors need {total} bytes "
                f"up to it, the span has {len(span)}"
            )
    slices = []
    pos = 0
    for path, a in leaves:
        n = leaf_bytes((path, a))
        if isinstance(a, Cast):
            np.copyto(span[pos : pos + n].view(a.dtype), a.array, casting="unsafe")
            slices.append(Slice(path, dtype_name(a.dtype), tuple(a.shape), 0, n))
        else:
            source = np.frombuffer(as_bytes(a), dtype=np.uint8)
            if n and _address(source) != _address(span) + pos:  # a leaf already in place is not copied
                span[pos : pos + n] = source
            slices.append(Slice(path, dtype_name(a.dtype), tuple(a.shape), 0, n))
        pos += n
    return slices


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def slices_fit(slices: Sequence[Any], length: int, what: str) -> None:
    """WireError naming the first slice whose bytes would lie past `length` bytes of a span."""
    pos = 0
    for s in slices:
        pos += int(s.length)
        if pos > length:
            raise WireError(
                f"{what}: leaf {s.path!r}: its bytes end at {pos}, past the {length} bytes of the shared-memory span"
            )
