"""Listeners for the HTTP servers: the control socket (a Unix socket created with its final
mode, a live one refused, a stale one removed), one inherited from systemd, and TCP."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.stapled


class SocketInUseError(OSError):
    """A live socket, or something that is not a socket, is in the way."""


class UnixListener(anyio.abc.Listener[anyio.abc.SocketStream]):
    """An anyio socket listener on a Unix socket that removes its file when closed.

    The file is removed only if it is still the one this listener created (same device and
    inode): a successor that replaced it is left alone. Listeners from systemd socket
    activation never remove the file (systemd owns it).
    """

    def __init__(
        self, inner: anyio.abc.SocketListener, path: str, ident: tuple[int, int] | None
    ) -> None:
        self.inner = inner
        self.path = path
        self._ident = ident

    async def accept(self) -> anyio.abc.SocketStream:
        """The next connection."""
        # Not self.inner.accept(): anyio's asyncio UNIXSocketListener has the same
        # cancelled-waiter race as its receive() (see _receive), and shutdown cancels accept.
        raw: socket.socket = self.inner.extra(anyio.abc.SocketAttribute.raw_socket)
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                client, _ = raw.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                await anyio.wait_readable(raw)
                continue
            except OSError as exc:
                if raw.fileno() == -1:
                    raise anyio.ClosedResourceError from exc
                raise
            return await anyio.abc.UNIXSocketStream.from_socket(client)

    async def serve(
        self,
        handler: Callable[[anyio.abc.SocketStream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Accept forever, calling ``handler`` for each connection."""
        await self.inner.serve(handler, task_group)

    async def aclose(self) -> None:
        """Close the socket and remove its file if it is still ours."""
        await self.inner.aclose()
        if self._ident is None:
            return
        ident, self._ident = self._ident, None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == ident:
            with suppress(FileNotFoundError):
                os.unlink(self.path)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


def _clear_socket_path(path: str) -> None:
    """Make way for a new socket at ``path``: remove a stale socket, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(
            errno.EEXIST,
            f"{path} exists and is not a socket; refusing to replace it (move it away, or set "
            "[daemon].socket to another path)",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: a daemon that died without cleaning up. Safe to replace.
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        # The backlog is full: a live but very busy listener.
        pass
    except OSError as exc:
        raise SocketInUseError(
            exc.errno or errno.EEXIST, f"cannot check the existing socket {path}: {exc}"
        ) from exc
    finally:
        probe.close()
    raise SocketInUseError(
        errno.EADDRINUSE,
        f"another process is listening on {path} (is another modeld running?); refusing to start",
    )


def _bind_unix_socket(path: str, mode: int) -> socket.socket:
    """A Unix stream socket bound at ``path`` whose file has exactly ``mode``; not listening.

    Linux takes a socket file's mode from the socket inode, masked by the umask, at bind().
    So fchmod() before bind() under a umask that takes nothing from ``mode`` gives the file
    exactly ``mode`` from the moment it exists; the chmod() after bind() is a second guard.
    Nobody can connect before listen(). The umask is process-wide: this runs at start-up,
    before the daemon starts any thread that creates files.
    """
    _clear_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), mode)
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    return sock


async def create_unix_listener(path: str, mode: int = 0o660, backlog: int = 1024) -> UnixListener:
    """A listener on a new Unix socket at ``path`` with permissions ``mode`` (set before listen).

    Raises ``SocketInUseError`` if a live socket answers at ``path`` (another daemon runs) or
    ``path`` is not a socket; a stale socket file is removed.
    """
    sock = _bind_unix_socket(path, mode)
    try:
        st = os.lstat(path)
        sock.listen(backlog)
        inner = await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        with suppress(OSError):
            os.unlink(path)
        raise
    return UnixListener(inner, path, (st.st_dev, st.st_ino))


async def unix_listener_from_fd(fd: int) -> UnixListener:
    """A listener on an inherited, already listening Unix socket (systemd ``LISTEN_FDS``)."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"file descriptor {fd} is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError(f"the Unix socket on file descriptor {fd} is not listening")
    name = sock.getsockname()
    path = name if isinstance(name, str) else name.decode(errors="replace")
    inner = await anyio.abc.SocketListener.from_socket(sock)
    return UnixListener(inner, path, None)


async def create_tcp_listener(host: str, port: int) -> anyio.abc.Listener[Any]:
    """A TCP listener (for ``metrics_listen``); ``port`` 0 picks a free port."""
    return await anyio.create_tcp_listener(local_host=host, local_port=port)
