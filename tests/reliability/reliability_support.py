"""Helpers shared by the reliability tests: restarts, /proc readings, state checks, mounts.

Not a test module (no ``test_`` prefix); the tests import it by name, as tests/ imports
``fakes_fixtures``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from daemon.persist.codec import check_state_shape
from daemon.persist.store import SCHEMA_VERSION
from daemon.testing.harness import DaemonProcess

#: The name pattern of the state store's temp files: ``.<name>.tmp-<pid>-<monotonic ns>``.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-\d+$")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without anything that would steer the daemon."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DAENA_OFFLINE_MODE", "MODELD_CONFIG", "MODELD_SOCKET", "NOTIFY_SOCKET",
                        "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra)
    return env


def start_and_wait_ready(daemon: DaemonProcess, timeout: float = 20.0) -> None:
    """(Re)start the daemon and wait for *this* run's READY=1.

    ``DaemonProcess.start(wait=True)`` looks for READY=1 from the first notification on, so on
    a restart of the same object it returns at once on the previous run's READY=1; here the
    notifications already seen (and any still queued from the killed run) are skipped.
    """
    daemon.read_notifications()
    seen = len(daemon.notifications)
    daemon.start(wait=False)
    daemon.wait_notification("READY=1", timeout=timeout, after=seen)


def proc_status_kb(pid: int, field: str = "VmRSS") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS by default)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def temp_files(state_path: Path) -> list[tuple[str, int]]:
    """The state store's temp files beside ``state_path``: (file name, writer pid)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(state_path.parent):
            match = TEMP_RE.match(entry)
            if match and match["name"] == state_path.name:
                found.append((entry, int(match["pid"])))
    return sorted(found)


def corrupt_copies(state_path: Path) -> list[str]:
    """Files the daemon set aside as corrupt (``<name>.corrupt-*``)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(e for e in os.listdir(state_path.parent)
                      if e.startswith(state_path.name + ".corrupt-"))
    return []


def read_valid_state(state_path: Path) -> dict[str, Any]:
    """The state file, parsed and checked against its schema; AssertionError naming why not."""
    raw = state_path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise AssertionError(f"{state_path} is not JSON ({exc}); {len(raw)} bytes, "
                             f"starts {raw[:80]!r}") from None
    problems = check_state_shape(data)
    if problems:
        raise AssertionError(f"{state_path} does not match the schema: {problems}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise AssertionError(f"{state_path} has schema_version {data['schema_version']}, "
                             f"expected {SCHEMA_VERSION}")
    return dict(data)


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric in a Prometheus text exposition: label string → value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key == name or key.startswith(name + "{"):
                out[key[len(name):]] = float(value)
    return out


# ----------------------------------------------------------------------------- mounts


def mount_tmpfs(target: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``target``; None on success, else why it failed."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(target)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount: {exc}"
    if done.returncode != 0:
        return f"mount exited {done.returncode}: {done.stderr.strip()}"
    return None


def remount(target: Path, options: str) -> None:
    """``mount -o remount,<options>`` (raises CalledProcessError with stderr on failure)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True,
                   capture_output=True, text=True, timeout=10)


def unmount(target: Path) -> None:
    """Unmount, lazily if still busy (a killed daemon's files are closed by then)."""
    done = subprocess.run(["umount", str(target)], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, text=True,
                       timeout=10)


@contextlib.contextmanager
def tmpfs(target: Path, size: str) -> Iterator[str | None]:
    """A tmpfs at ``target`` for the block; yields None when mounted, else why not."""
    why = mount_tmpfs(target, size)
    try:
        yield why
    finally:
        if why is None:
            unmount(target)


def fill_disk(directory: Path) -> Path:
    """Write a filler file in ``directory`` until the file system is full; returns it."""
    filler = directory / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as out:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    out.write(block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


# ----------------------------------------------------------------------------- injection

#: A ``sitecustomize`` for the daemon subprocess: while the file named by
#: MODELD_TEST_FAULT_FILE exists and holds an errno name (ENOSPC, EIO, EROFS), writes and
#: creations under the state directory fail with that errno. It replaces the ``os`` that
#: ``daemon.persist.store`` sees by a proxy, so the daemon's real error paths (temp file cleanup,
#: ``state_write_failed``, exit 73) run unmodified.
SITECUSTOMIZE = '''
import errno, os, sys, types

_FLAG = os.environ.get("MODELD_TEST_FAULT_FILE", "")
_DIR = os.environ.get("MODELD_TEST_FAULT_DIR", "")


def _fault():
    try:
        with open(_FLAG) as f:
            name = f.read().strip()
    except OSError:
        return None
    return getattr(errno, name, errno.EIO) if name else None


def _under(path):
    try:
        return os.path.abspath(os.fsdecode(path)).startswith(_DIR.rstrip("/") + "/")
    except TypeError:
        return False


class _FaultyOs(types.ModuleType):
    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, *args, **kwargs):
        code = _fault()
        creating = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if code == errno.EROFS and creating and _under(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return os.open(path, flags, mode, *args, **kwargs)

    def write(self, fd, data):
        code = _fault()
        if code is not None and code != errno.EROFS:
            raise OSError(code, os.strerror(code))
        return os.write(fd, data)

    def pwrite(self, fd, data, offset):
        code = _fault()
        if code is not None and code != errno.EROFS:
            raise OSError(code, os.strerror(code))
        return os.pwrite(fd, data, offset)


def _install():
    import daemon.persist.store as state
    state.os = _FaultyOs("os")
    sys.stderr.write("modeld-test: state fault injection armed\\n")


if _FLAG:
    _install()
'''


def fault_injection_env(work: Path, state_dir: Path) -> tuple[dict[str, str], Path]:
    """Environment that arms the injected state faults, and the flag file that triggers them.

    Write an errno name (``ENOSPC``) into the flag file to start failing; delete it to stop.
    """
    site = work / "inject"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = work / "fault"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = clean_env(PYTHONPATH=path, MODELD_TEST_FAULT_FILE=str(flag),
                    MODELD_TEST_FAULT_DIR=str(state_dir))
    return env, flag


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; returns its value or the last falsy one on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def roles_primaries(state: Mapping[str, Any]) -> dict[str, str | None]:
    """Role → primary of a saved state."""
    return {name: role.get("primary") for name, role in state["roles"].items()}


def wait_health(daemon: DaemonProcess, model_id: str, status: str,
                timeout: float = 10.0) -> dict[str, Any]:
    """Like ``DaemonProcess.wait_health``, but fails at once, saying so, if the daemon exits."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] | None = None
    while True:
        if not daemon.running():
            code = daemon.proc.returncode if daemon.proc is not None else None
            raise AssertionError(f"the daemon exited ({code}) while waiting for {model_id} to "
                                 f"be {status}; last log line: {daemon.log_tail(1)[:300]}")
        with contextlib.suppress(OSError):
            view = daemon.model(model_id)
            if view["health_status"] == status:
                return view
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{model_id} not {status} after {timeout}s: {view}")
        time.sleep(0.05)
