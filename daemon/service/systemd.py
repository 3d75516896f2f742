"""The systemd service protocol: sd_notify, the watchdog and socket activation.

No libsystemd binding is needed: a notification is one datagram of newline-separated
``KEY=value`` lines sent to ``$NOTIFY_SOCKET`` (a path, or a Linux abstract-namespace name
when it starts with ``@``), and socket activation is a handful of environment variables
naming inherited file descriptors (sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3)).

Everything here is safe to call when the daemon is not run by systemd: the notifier is then a
no-op, ``watchdog_interval()`` is None and ``listen_fds()`` is empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import anyio
import structlog

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "listen_fds_with_names",
    "status_line",
    "watchdog_interval",
]

log = structlog.get_logger(__name__)

#: How long READY=1, RELOADING=1 and STOPPING=1 are retried while the queue is full (seconds).
RETRY_WITHIN = 2.0

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes for socket activation."""

_STATUS_ORDER = ("healthy", "degraded", "unavailable")


def _socket_address(value: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None when it is not usable."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of "@", no terminating NUL.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # Relative paths are not part of the protocol; "vsock:" addresses (systemd ≥ 254, for VMs)
    # are not supported by this implementation.
    return None


class Notifier:
    """Sends state notifications to the service manager; a no-op without NOTIFY_SOCKET."""

    def __init__(self, notify_socket: str | None) -> None:
        self.notify_socket = notify_socket or None
        self._address = _socket_address(notify_socket) if notify_socket else None
        self._sock: socket.socket | None = None
        self._failure_logged = False
        if self.notify_socket and self._address is None:
            log.warning("sd_notify_unsupported_address", notify_socket=self.notify_socket)
            self._failure_logged = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for $NOTIFY_SOCKET of the environment (os.environ by default)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Whether the datagram with these KEY=value lines was handed to the service manager.

        Never blocks and never raises for socket errors: a vanished or full notify socket is
        logged once and otherwise ignored, so the daemon keeps running. A line without "=" or
        with a newline is a programming error and raises ValueError.
        """
        return self._send(lines) is None

    async def notify_reliably(self, *lines: str, within: float = RETRY_WITHIN) -> bool:
        """``notify``, retried for up to ``within`` seconds while the manager's queue is full.

        For the state changes systemd acts on (READY=1, RELOADING=1, STOPPING=1): a dropped
        READY=1 gets a Type=notify service killed at its start timeout. The retry sleeps on
        the event loop, never blocking it. WATCHDOG=1 and STATUS= use ``notify``: the next
        one says the same.
        """
        if self._address is None:
            self._send(lines)  # checks the lines
            return False
        deadline = time.monotonic() + within
        while True:
            error = self._send(lines, log_failure=False)
            if error is None:
                return True
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS) or (
                time.monotonic() >= deadline
            ):
                self._log_failure(error, lines)
                return False
            await anyio.sleep(0.01)

    def _send(self, lines: tuple[str, ...], log_failure: bool = True) -> OSError | None:
        """Send one datagram without blocking: None when it was handed over, else why not."""
        for line in lines:
            if "=" not in line or "\n" in line:
                raise ValueError(f"sd_notify line must be one KEY=value line, got {line!r}")
        if self._address is None or not lines:
            return OSError(errno.ENOTCONN, "no notify socket")
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            sent = self._sock.sendto(payload, self._address)
            if sent != len(payload):
                raise OSError(errno.EMSGSIZE, "short write to the notify socket")
        except OSError as exc:
            if log_failure:
                self._log_failure(exc, lines)
            return exc
        return None

    def _log_failure(self, exc: OSError, lines: tuple[str, ...]) -> None:
        if not self._failure_logged:
            self._failure_logged = True
            log.warning(
                "sd_notify_failed",
                notify_socket=self.notify_socket,
                error=exc.strerror or str(exc),
                lines=[line.split("=", 1)[0] for line in lines],
            )

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager start-up (or a reload) is complete: READY=1."""
        return self.notify("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Tell the manager a reload began: RELOADING=1 with MONOTONIC_USEC (systemd ≥ 253)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell the manager shutdown began: STOPPING=1."""
        return self.notify("STOPPING=1", *self._status(status))

    async def ready_reliably(self, status: str | None = None, *,
                             within: float = RETRY_WITHIN) -> bool:
        """``ready``, retried for a moment while the manager's queue is full."""
        return await self.notify_reliably("READY=1", *self._status(status), within=within)

    async def reloading_reliably(self, status: str | None = None, *,
                                 within: float = RETRY_WITHIN) -> bool:
        """``reloading``, retried for a moment while the manager's queue is full."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.notify_reliably("RELOADING=1", f"MONOTONIC_USEC={now_usec}",
                                          *self._status(status), within=within)

    async def stopping_reliably(self, status: str | None = None, *,
                                within: float = RETRY_WITHIN) -> bool:
        """``stopping``, retried for a moment while the manager's queue is full."""
        return await self.notify_reliably("STOPPING=1", *self._status(status), within=within)

    def watchdog(self) -> bool:
        """Feed the watchdog: WATCHDOG=1."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by `systemctl status`: STATUS=text."""
        return self.notify(*self._status(text))

    def close(self) -> None:
        """Close the sending socket; a later notify() opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.split()),)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    WATCHDOG_PID, when set, must name this process (``pid``, default os.getpid()): the
    variables may have been inherited from a parent that is the one being watched.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            watched = int(raw_pid)
        except ValueError:
            log.warning("watchdog_env_invalid", WATCHDOG_PID=raw_pid)
            return None
        if watched != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("watchdog_env_invalid", WATCHDOG_USEC=raw_usec)
        return None
    return usec / 2 / 1_000_000


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    unset_environment: bool = True,
) -> list[tuple[int, str]]:
    """The sockets passed by systemd socket activation, as (fd, name) pairs, fds from 3 up.

    Empty unless LISTEN_PID names this process. The descriptors get FD_CLOEXEC so they do not
    leak into child processes, and LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from
    the environment afterwards (as sd_listen_fds(1) does), so they are taken exactly once.
    A name missing from LISTEN_FDNAMES is "unknown", as in sd_listen_fds_with_names(3).
    Raises ValueError when LISTEN_FDS is malformed and OSError when a named fd is not open.
    """
    env = os.environ if environ is None else environ
    try:
        raw_pid = env.get("LISTEN_PID", "")
        raw_count = env.get("LISTEN_FDS", "")
        raw_names = env.get("LISTEN_FDNAMES")
        if not raw_pid or not raw_count:
            return []
        try:
            listen_pid = int(raw_pid)
        except ValueError:
            raise ValueError(f"LISTEN_PID={raw_pid!r} is not a process id") from None
        if listen_pid != (os.getpid() if pid is None else pid):
            return []
        try:
            count = int(raw_count)
        except ValueError:
            count = -1
        if count < 0:
            raise ValueError(f"LISTEN_FDS={raw_count!r} is not a count of file descriptors")
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
        for fd in fds:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        names = raw_names.split(":") if raw_names is not None else []
        names += ["unknown"] * (count - len(names))
        return list(zip(fds, names[:count], strict=True))
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(name, None)


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    unset_environment: bool = True,
) -> list[int]:
    """The file descriptors passed by systemd socket activation (see listen_fds_with_names)."""
    return [fd for fd, _name in listen_fds_with_names(environ, pid, unset_environment)]


def status_line(counts: Mapping[str, int], offline: bool) -> str:
    """The one-line STATUS= summary: "12 models: 10 healthy, 1 degraded, 1 unavailable; ...".

    healthy, degraded and unavailable are always shown; unknown (and any other status) only
    when non-zero, so a fresh start reads "3 models: 0 healthy, ..., 3 unknown".
    """
    total = sum(counts.values())
    parts = [f"{counts.get(name, 0)} {name}" for name in _STATUS_ORDER]
    extra = sorted(str(name) for name, n in counts.items() if n and name not in _STATUS_ORDER)
    extra.sort(key=lambda name: name != "unknown")
    parts += [f"{counts[name]} {name}" for name in extra]
    noun = "model" if total == 1 else "models"
    return f"{total} {noun}: {', '.join(parts)}; offline={'yes' if offline else 'no'}"
