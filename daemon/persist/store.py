"""The state file: versioned JSON, written atomically, never lost, never half-written.

Writing follows atomicwrites / pip's ``adjacent_tmp_file``: a temp file in the same
directory, write, flush, fsync, set the mode, ``os.replace``, fsync the directory; the temp
file is removed on any error, so the old state stays intact. Loading keeps a corrupt file
aside as ``<name>.corrupt-<UTC time>`` and starts fresh — a file that is not JSON the daemon
could write back (NaN, ``1e999``), anything but a regular file at the path (a FIFO is never
read, so it cannot hang the start), a file over ``MAX_STATE_BYTES``; the codec does the same
for a value it cannot use. A file from a newer schema is refused, never overwritten. An
exclusive ``flock`` on ``<name>.lock`` allows one daemon per state file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATE_MODE = 0o640
#: The largest state file read (far above 10,000 models with every string at its bound);
#: anything larger is set aside, not read into memory.
MAX_STATE_BYTES = 64 * 1024 * 1024
#: Longest integer literal in a state (times, counters and sequence numbers have far fewer).
MAX_STATE_INT_DIGITS = 20

#: Upgrades from an older schema: version → function turning that version's data into the next.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class StateError(Exception):
    """The state file cannot be used; the message says why and what to do."""


class StateLocked(StateError):
    """Another process holds the state lock."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


@dataclass(frozen=True, slots=True)
class Loaded:
    """What loading found: the data (None for a fresh start) and what happened on the way."""

    data: dict[str, Any] | None
    corrupt_copy: str | None = None  # where a corrupt file was kept aside
    problem: str = ""  # why it was corrupt
    migrated_from: int | None = None


class StateStore:
    """The state file at ``path`` and its lock file beside it."""

    def __init__(self, path: str | os.PathLike[str], *, mode: int = STATE_MODE) -> None:
        self.path = Path(path)
        self.mode = mode
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------- lock

    def lock(self) -> None:
        """Take the exclusive lock; raises StateLocked naming the holder's pid."""
        try:
            fd = os.open(self.lock_path,
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, 0o640)
        except OSError as exc:
            raise StateError(f"cannot create lock file {self.lock_path}: "
                             f"{exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            kind = _kind_of(os.fstat(fd).st_mode)
            os.close(fd)
            raise StateError(f"lock file {self.lock_path} is {kind}, not a regular file; "
                             "remove it (the daemon creates it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise StateLocked(f"state file {self.path} is in use by another modeld ({who}); "
                              "stop it first, or give this one another state_file",
                              holder) from None
        # write before truncating, so a competitor reading now sees a whole pid, not nothing
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:  # a full disk: the lock file exists but cannot hold the pid
            os.close(fd)
            raise StateError(f"cannot write lock file {self.lock_path}: "
                             f"{exc.strerror or exc}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (the lock file stays; it is harmless and reused)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------- checks

    def check_writable(self) -> None:
        """Raise StateError when the state directory is missing or not writable."""
        directory = self.path.parent
        if not directory.is_dir():
            raise StateError(f"state directory {directory} does not exist; create it "
                             "(systemd: StateDirectory=modeld) or set daemon.state_file")
        if _read_only_fs(directory):
            raise StateError(f"state directory {directory} is not writable: it is on a "
                             "read-only file system; remount it read-write or set "
                             "daemon.state_file (systemd: StateDirectory=modeld)")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StateError(f"state directory {directory} is not writable by uid "
                             f"{os.getuid()}; fix its permissions or set daemon.state_file")
        probe = directory / f".{self.path.name}.probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            # a starting lock holder may already have swept it away (remove_stale_temps)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        except OSError as exc:
            raise StateError(f"state directory {directory} is not writable: "
                             f"{exc.strerror or exc}") from None

    def remove_stale_temps(self) -> list[str]:
        """Delete temp and probe files left by a daemon killed mid-write; returns their names.

        Call it with the lock held: only the lock holder writes them, so none is live.
        """
        prefixes = (f".{self.path.name}.tmp-", f".{self.path.name}.probe-")
        removed = []
        with os.scandir(self.path.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefixes) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(entry.name)
        if removed:
            _fsync_dir(self.path.parent)
        return sorted(removed)

    # ------------------------------------------------------------------- load

    def load(self) -> Loaded:
        """The saved state; a missing file → fresh; a corrupt one is kept aside → fresh.

        Raises StateError for a file written by a newer modeld, or one that cannot be read.
        """
        try:
            raw = self._read()
        except FileNotFoundError:
            return Loaded(None)
        except _NotUsable as exc:
            return self._set_aside(str(exc))
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror or exc}") from None
        try:
            data = loads_strict(raw)
        except RecursionError:
            return self._set_aside("not usable JSON: nested too deeply")
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a bad number
            return self._set_aside(f"not valid JSON: {exc}")
        version = data.get("schema_version") if isinstance(data, dict) else None
        # bool is an int subclass: a JSON `true` is not a schema version
        if not isinstance(version, int) or isinstance(version, bool):
            return self._set_aside("not a modeld state (no integer schema_version)")
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} has schema_version {version}, newer than this "
                f"modeld understands ({SCHEMA_VERSION}); upgrade modeld or move the file "
                "away (it is left untouched)")
        migrated_from = None
        if version < SCHEMA_VERSION:
            migrated_from = version
            while version < SCHEMA_VERSION:
                step = MIGRATIONS.get(version)
                if step is None:
                    return self._set_aside(f"no migration from schema_version {version}")
                try:
                    data = step(data)
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                    # a migration meets the old file's values as they are: one it cannot
                    # read makes the file unusable, not the start impossible
                    return self._set_aside(f"migration from schema_version {version} "
                                           f"failed: {type(exc).__name__}: {exc}")
                version += 1
            data["schema_version"] = SCHEMA_VERSION
        return Loaded(data, migrated_from=migrated_from)

    def _read(self) -> bytes:
        """The file's bytes. Opened non-blocking and checked to be a regular file first, so
        a FIFO or a device at the path is set aside instead of hanging the start; at most
        ``MAX_STATE_BYTES`` are read."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotUsable(f"{self.path} is {_kind_of(st.st_mode)}, not a regular file")
            if st.st_size > MAX_STATE_BYTES:
                raise _NotUsable(f"{st.st_size} bytes, more than a state can be "
                                 f"({MAX_STATE_BYTES})")
            chunks = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
                if size > MAX_STATE_BYTES:  # growing while read: not ours
                    raise _NotUsable(f"more than {MAX_STATE_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def set_aside(self, problem: str) -> Loaded:
        """Keep the current file aside as corrupt (for data that parsed but made no sense)."""
        return self._set_aside(problem)

    def _set_aside(self, problem: str) -> Loaded:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        _fsync_dir(self.path.parent)
        return Loaded(None, corrupt_copy=str(target), problem=problem)

    # ------------------------------------------------------------------- write

    def encode(self, data: dict[str, Any], now: float | None = None) -> bytes:
        """The file's bytes for ``data``: schema_version stamped, keys sorted."""
        payload = dict(data)
        payload["schema_version"] = SCHEMA_VERSION
        payload["saved_at"] = time.time() if now is None else now
        # the payload is fresh data from to_state(): no cycles to look for
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False,
                          check_circular=False).encode() + b"\n"

    def write_bytes(self, content: bytes) -> None:
        """Replace the state file with ``content`` atomically and durably.

        On any error the old file is intact, the temp file is gone and OSError is raised.
        """
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        try:
            try:
                view = memoryview(content)
                while view:
                    written = os.write(fd, view)
                    if written <= 0:  # pragma: no cover - os.write raises rather than return 0
                        raise OSError(errno.EIO, "short write")
                    view = view[written:]
                os.fchmod(fd, self.mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    def write(self, data: dict[str, Any], now: float | None = None) -> int:
        """Encode and write ``data``; returns the size in bytes."""
        content = self.encode(data, now)
        self.write_bytes(content)
        return len(content)


class _NotUsable(Exception):
    """What is at the state path cannot be a state (the message says why)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (not a finite double)")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_STATE_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (a state holds finite numbers only)")


def loads_strict(raw: bytes) -> Any:
    """``raw`` parsed as JSON the daemon can write back: no NaN, no Infinity, no number out
    of range (``1e999``), no integer of more than ``MAX_STATE_INT_DIGITS`` digits. Raises
    ValueError (or RecursionError for absurd nesting)."""
    return json.loads(raw, parse_float=_finite_float, parse_int=_bounded_int,
                      parse_constant=_no_constant)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
