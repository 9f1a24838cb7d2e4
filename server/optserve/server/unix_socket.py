"""The server's Unix domain socket (`optserve serve --unix-socket PATH`, `Server(unix_socket=PATH)`).

grpc listens on `unix:PATH` by itself, but two of its habits do not suit a server (grpcio 1.85,
checked in tests/test_unix_socket.py): before it binds, it unlinks whatever socket is at PATH, even
one another server is listening on, which then silently loses its clients; and it creates the
socket with the process's umask (0755 usually, 0777 under umask 0). So optserve

- refuses a PATH that is not a socket, or a socket another process is listening on (a connect
  succeeds), and removes a stale one (a connect is refused: its server was killed);
- has grpc bind in a private directory (0700, beside PATH, so nobody else can reach the socket
  while it is open wider), makes the socket owner-only (0600), and only then links it to PATH, with
  `link`, which never replaces a file that appeared meanwhile: there is no moment at which PATH is a
  socket others may connect to;
- removes PATH at stop if it is still this server's socket (same inode), never another's.

The umask is not touched: it is the process's, and other threads (jax's, a notebook's) create files.
docs/design.md, "Listeners", tells the whole story.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Callable

from optserve.server.core.errors import ConfigError

FLAG = "--unix-socket"
# sun_path holds 108 bytes on Linux (104 on macOS), the final NUL included.
MAX_PATH_BYTES = 107
# grpc binds first at DIR/.optserve-XXXXXXXX/s (tempfile.mkdtemp's 8 random characters).
PRIVATE_PREFIX = ".optserve-"
_BIND_NAME = "s"
_BIND_SUFFIX_BYTES = len(PRIVATE_PREFIX) + 8 + 1 + len(_BIND_NAME)


def target(path: str) -> str:
    """The client target of a socket path: `unix:///abs/path`."""
    return "unix://" + os.path.abspath(path)


def _is_live(path: str) -> bool:
    """Whether a process listens on the socket at `path` (a connect succeeds). A refused connect is
    a stale socket (its server is gone); any other failure (no permission: someone else's socket)
    is a ConfigError naming the flag."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)  # a live listener accepts into its backlog at once; this bounds a hung one
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as e:
            raise ConfigError(
                f"{FLAG} {path}: a socket that cannot be probed ({e.strerror or e}; another user's?); give another path"
            ) from None
    return True


def check(path: str) -> str:
    """The absolute path of a usable socket PATH; removes a stale socket there. ConfigError, naming
    the flag, for a directory that is missing, a path too long, a file that is not a socket, or a
    socket another server listens on."""
    if not path:
        raise ConfigError(f"{FLAG}: empty; give the path of the socket file to create, e.g. /run/optserve.sock")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigError(f"{FLAG} {path}: its directory {directory} does not exist; create it or give another path")
    size = len(os.fsencode(directory)) + 1 + _BIND_SUFFIX_BYTES
    if len(os.fsencode(path)) > MAX_PATH_BYTES or size > MAX_PATH_BYTES:
        raise ConfigError(
            f"{FLAG} {path}: too long for a Unix socket (at most {MAX_PATH_BYTES} bytes, and the server first "
            f"binds in {directory}/{PRIVATE_PREFIX}XXXXXXXX/{_BIND_NAME}, {size} bytes); give a shorter path"
        )
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise ConfigError(f"{FLAG} {path}: exists and is {kind}; remove it or give another path")
    if _is_live(path):
        raise ConfigError(f"{FLAG} {path}: another server is listening on it; stop that server or give another path")
    try:
        os.unlink(path)  # stale: left by a server that was killed
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(
            f"{FLAG} {path}: a stale socket that cannot be removed ({e.strerror}); remove it or give another path"
        ) from None
    return path


class UnixSocket:
    """One socket file the server listens on: checked and bound by `bind`, removed by `remove`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket this server linked

    @property
    def target(self) -> str:
        return target(self.path)

    def bind(self, add_port: Callable[[str], int]) -> None:
        """Has `add_port` (grpc's add_insecure_port or add_secure_port) listen on the socket, owner-only.

        grpc binds and listens inside add_port (start() only begins accepting), so the socket
        exists, private, when it returns."""
        check(self.path)
        directory = os.path.dirname(self.path)
        try:
            private = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=directory)  # 0700
        except OSError as e:
            raise ConfigError(
                f"{FLAG} {self.path}: cannot create a directory in {directory} ({e.strerror}); "
                "give a path in a directory this user can write"
            ) from None
        bound = os.path.join(private, _BIND_NAME)
        try:
            try:
                listening = add_port(f"unix:{bound}")
            except RuntimeError as e:  # grpc's "Failed to bind"
                raise ConfigError(f"{FLAG} {self.path}: grpc cannot listen there ({e}); give another path") from None
            if not listening:
                raise ConfigError(f"{FLAG} {self.path}: grpc cannot listen there; give another path")
            os.chmod(bound, 0o600)
            try:
                os.link(bound, self.path)
            except FileExistsError:
                raise ConfigError(
                    f"{FLAG} {self.path}: created by someone else while this server started; give another path"
                ) from None
            except OSError as e:
                raise ConfigError(
                    f"{FLAG} {self.path}: cannot create the socket there ({e.strerror}); give another path"
                ) from None
            info = os.lstat(self.path)
            self._inode = (info.st_dev, info.st_ino)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)
            os.rmdir(private)

    def remove(self) -> None:
        """Removes the socket file if it is still the one this server created (called again: nothing)."""
        if self._inode is None:
            return
        inode, self._inode = self._inode, None
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
