"""Run the real daemon as a subprocess and talk to it over its real Unix socket.

One implementation for the integration and reliability tests, the benchmarks and
``modeld demo``. Readiness is learnt the way systemd learns it: the harness binds a datagram
socket, passes it as ``NOTIFY_SOCKET`` and waits for ``READY=1``. Standard library only, so
it adds nothing to what it measures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix stream socket (for tests; modelctl reads raw sockets)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("modeld", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonError(Exception):
    """The daemon did not start, or stopped unexpectedly; the message holds its log tail."""


@contextlib.contextmanager
def short_tempdir(prefix: str = "md-") -> Iterator[Path]:
    """A new directory under /tmp, removed afterwards. Under /tmp rather than $TMPDIR
    because a Unix socket's path must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def request(socket_path: str, method: str, path: str, body: Any = None,
            timeout: float = 10.0) -> tuple[int, Any]:
    """One request on a fresh connection: (status, parsed JSON or text)."""
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    if ctype.startswith("application/json"):
        return resp.status, json.loads(raw)
    return resp.status, raw.decode()


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, KeyError, ValueError, AssertionError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def daemon_config(workdir: str | os.PathLike[str], models: list[dict[str, Any]], **sections:
                  dict[str, Any]) -> dict[str, Any]:
    """A config dict for a daemon living in ``workdir``: state, socket and plugin dir there,
    JSON logs, and fast timings suitable for tests (override per section)."""
    work = Path(workdir)
    config: dict[str, Any] = {
        "daemon": {
            "state_file": str(work / "state" / "model_registry.json"),
            "socket": str(work / "run" / "control.sock"),
            "plugin_dirs": [],
            "log_format": "json",
            "state_flush_interval": "200ms",
        },
        "probe": {"interval": "1s", "timeout": "1s", "recheck_interval": "100ms"},
        "policy": {"interval": "1h"},
        "models": models,
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


class DaemonProcess:
    """The real ``modeld run`` in a subprocess, in its own working directory."""

    def __init__(self, workdir: str | os.PathLike[str], config: Mapping[str, Any] | None = None,
                 *, env: Mapping[str, str] | None = None, config_path: str | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = Path(config_path) if config_path else self.workdir / "modeld.toml"
        if config is not None:
            self.write_config(config)
        self.config: dict[str, Any] = dict(config or {})
        self.env = dict(os.environ if env is None else env)
        self.env.update(extra_env or {})
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "daemon.log"
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None
        self._notify_path = ""
        self._notify_own_dir = False

    # ------------------------------------------------------------------ config

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config`` as TOML (directories of state and socket created)."""
        import tomli_w

        self.config = dict(config)
        daemon = config.get("daemon", {})
        for key in ("state_file", "socket"):
            if key in daemon:
                Path(daemon[key]).parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(dict(config)))
        os.replace(tmp, self.config_path)

    @property
    def socket_path(self) -> str:
        return str(self.config.get("daemon", {}).get("socket", "/run/modeld/control.sock"))

    @property
    def state_path(self) -> Path:
        return Path(self.config.get("daemon", {}).get(
            "state_file", "/var/lib/modeld/model_registry.json"))

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True, timeout: float = 20.0,
              pass_fds: tuple[int, ...] = (), args: tuple[str, ...] = ()) -> DaemonProcess:
        """Start the daemon; with ``wait``, return once it sent READY=1."""
        self._open_notify_socket()
        seen = len(self.read_notifications())  # a restart waits for its own READY=1
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = self._notify_path
        cmd = [sys.executable, "-m", "daemon", "run", "--config", str(self.config_path), *args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, pass_fds=pass_fds,
                                         start_new_session=True)
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout, after=seen)
        return self

    def _open_notify_socket(self) -> None:
        if self._notify is not None:
            return
        # in the work directory, so cleaning it up cleans this up too; elsewhere only when
        # that path is too long for AF_UNIX (108 bytes)
        inside = self.workdir / f"notify-{os.getpid()}-{id(self)}.sock"
        if len(str(inside)) < 100:
            with contextlib.suppress(FileNotFoundError):
                inside.unlink()
            self._notify_path = str(inside)
            self._notify_own_dir = False
        else:
            directory = tempfile.mkdtemp(prefix="modeld-notify-")
            self._notify_path = os.path.join(directory, "n.sock")
            self._notify_own_dir = True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self._notify_path)
        sock.setblocking(False)
        self._notify = sock

    def read_notifications(self) -> list[str]:
        """Drain sd_notify datagrams received so far; returns all seen, in order."""
        if self._notify is None:
            return self.notifications
        while True:
            try:
                data = self._notify.recv(4096)
            except BlockingIOError:
                break
            self.notifications.extend(data.decode().splitlines())
        return self.notifications

    def wait_notification(self, line: str, timeout: float = 10.0, after: int = 0) -> int:
        """Wait for a notification line (exact, or prefix ending in '='); returns its index."""
        def seen() -> int | None:
            self._check_alive()
            for i, got in enumerate(self.read_notifications()[after:], start=after):
                if got == line or (line.endswith("=") and got.startswith(line)):
                    return i + 1
            return None

        found = wait_for(seen, timeout, what=f"sd_notify {line}")
        assert found is not None
        return found - 1

    def wait_ready(self, timeout: float = 20.0, after: int = 0) -> None:
        """Wait for READY=1 (the first one from index ``after``); raises DaemonError with the
        log tail if the daemon exits first."""
        try:
            self.wait_notification("READY=1", timeout, after=after)
        except TimeoutError:
            raise DaemonError(f"daemon not ready after {timeout}s\n{self.log_tail()}") from None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(f"daemon exited with {self.proc.returncode}\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DaemonError(
                f"daemon did not stop within {timeout}s\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def run_to_exit(self, timeout: float = 20.0) -> int:
        """Start a daemon expected to refuse to start; its exit status (it is reaped)."""
        try:
            self.start(wait=False)
            return self.wait_exit(timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the daemon (SIGKILL if it will not stop) and release the notify socket."""
        try:
            if self.running():
                with contextlib.suppress(DaemonError):
                    self.stop()
        finally:
            self.kill()
            if self._notify is not None:
                self._notify.close()
                self._notify = None
                with contextlib.suppress(OSError):
                    os.unlink(self._notify_path)
                    if self._notify_own_dir:
                        os.rmdir(os.path.dirname(self._notify_path))

    def __enter__(self) -> DaemonProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ talking to it

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        return request(self.socket_path, method, path, body, timeout)

    def get(self, path: str) -> Any:
        """GET a route that must answer 200; returns the JSON."""
        status, data = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path} → {status}: {data}")
        return data

    def post(self, path: str, body: Any = None) -> Any:
        status, data = self.request("POST", path, body if body is not None else {})
        if status != 200:
            raise AssertionError(f"POST {path} → {status}: {data}")
        return data

    def model(self, model_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/api/v1/models/{model_id}")
        return result

    def wait_health(self, model_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until a model has the given health status; returns its view."""
        return wait_for(lambda: (m := self.model(model_id))["health_status"] == status and m,
                        timeout, what=f"{model_id} {status}")

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.state_path.read_text())
        return result

    # ------------------------------------------------------------------ logs

    def log_lines(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far (non-JSON lines are skipped)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        out.append(entry)
        return out

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.log_lines() if entry.get("event") == event]

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


@contextlib.contextmanager
def running_daemon(workdir: str | os.PathLike[str], config: Mapping[str, Any],
                   **kwargs: Any) -> Iterator[DaemonProcess]:
    """A started daemon, stopped (and reaped) on exit."""
    proc = DaemonProcess(workdir, config, **kwargs)
    try:
        proc.start()
        yield proc
    finally:
        proc.close()
