"""daemon.service.systemd against real sockets: sd_notify datagrams, watchdog env, socket
activation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.core.model import HealthStatus
from daemon.service.systemd import (
    Notifier,
    listen_fds,
    listen_fds_with_names,
    status_line,
    watchdog_interval,
)

# ----------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket in tmp_path, as the service manager would have."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:  # sun_path limit; pytest's tmp_path is usually far shorter
        pytest.fail(f"tmp_path too long for an AF_UNIX socket: {path}")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    yield receiver, str(path)
    receiver.close()


@pytest.fixture
def notify_abstract() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in the Linux abstract namespace, NOTIFY_SOCKET-style "@name"."""
    name = f"modeld-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(2)
    yield receiver, "@" + name
    receiver.close()


def test_ready_with_status_arrives_as_one_datagram_on_a_path_socket(
    notify_path: tuple[socket.socket, str],
) -> None:
    receiver, path = notify_path
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("3 models: 3 healthy, 0 degraded, 0 unavailable; offline=no")
    assert receiver.recv(4096) == (
        b"READY=1\nSTATUS=3 models: 3 healthy, 0 degraded, 0 unavailable; offline=no"
    )
    notifier.close()


def test_from_env_reads_os_environ_by_default(
    notify_path: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, path = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier.from_env().watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_abstract_namespace_socket_receives_notifications(
    notify_abstract: tuple[socket.socket, str],
) -> None:
    receiver, address = notify_abstract
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.notify("READY=1")
    assert notifier.watchdog()
    assert notifier.stopping("shutting down")
    assert receiver.recv(4096) == b"READY=1"
    assert receiver.recv(4096) == b"WATCHDOG=1"
    assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"


def test_reloading_carries_the_current_monotonic_clock_in_microseconds(
    notify_path: tuple[socket.socket, str],
) -> None:
    receiver, path = notify_path
    notifier = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading /etc/modeld/modeld.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2:] == ["STATUS=reloading /etc/modeld/modeld.toml"]


def test_status_text_is_kept_to_one_line(notify_path: tuple[socket.socket, str]) -> None:
    receiver, path = notify_path
    assert Notifier(path).status("bad config:\n  models[0].id: required")
    assert receiver.recv(4096) == b"STATUS=bad config: models[0].id: required"


def test_a_line_that_could_inject_another_assignment_is_refused() -> None:
    notifier = Notifier(None)
    with pytest.raises(ValueError, match="one KEY=value line"):
        notifier.notify("STATUS=ok\nREADY=1")
    with pytest.raises(ValueError, match="one KEY=value line"):
        notifier.notify("READY")


def test_without_notify_socket_every_call_is_a_silent_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    with capture_logs() as logs:
        assert notifier.ready("x") is False
        assert notifier.reloading() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert logs == []


def test_notify_to_a_vanished_socket_does_not_raise_and_is_logged_once(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier(str(path))
    assert notifier.watchdog()
    receiver.close()
    path.unlink()
    with capture_logs() as logs:
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["notify_socket"] == str(path)


def test_notify_to_a_closed_abstract_socket_does_not_raise() -> None:
    notifier = Notifier(f"@modeld-test-nobody-{uuid.uuid4().hex}")
    with capture_logs() as logs:
        assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]


def test_a_full_notify_socket_never_blocks_the_sender(
    notify_path: tuple[socket.socket, str],
) -> None:
    receiver, path = notify_path
    notifier = Notifier(path)
    started = time.monotonic()
    with capture_logs():
        results = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - started < 2
    assert results[0] is True
    assert False in results  # the receiver's queue filled up; the send failed instead of waiting
    assert receiver.recv(4096) == b"WATCHDOG=1"


def _fill(notifier: Notifier) -> int:
    sent = 0
    while notifier.watchdog():
        sent += 1
    return sent


@pytest.mark.anyio
async def test_ready_on_a_full_queue_is_retried_until_the_manager_reads(
    notify_path: tuple[socket.socket, str],
) -> None:
    import threading

    receiver, path = notify_path
    notifier = Notifier(path)
    with capture_logs():
        assert _fill(notifier) > 0
        assert notifier.ready() is False  # the one-shot form drops it
        drain = threading.Timer(0.2, lambda: [receiver.recv(4096) for _ in range(3)])
        drain.start()
        started = time.monotonic()
        assert await notifier.ready_reliably("up") is True
        drain.join()
    assert 0.15 < time.monotonic() - started < 1.0
    got = []
    receiver.settimeout(0.2)
    try:
        while True:
            got.append(receiver.recv(4096))
    except TimeoutError:
        pass
    assert b"READY=1\nSTATUS=up" in got


@pytest.mark.anyio
async def test_a_queue_that_stays_full_gives_up_after_a_moment_and_logs_once(
    notify_path: tuple[socket.socket, str],
) -> None:
    _receiver, path = notify_path
    notifier = Notifier(path)
    with capture_logs() as logs:
        _fill(notifier)
        started = time.monotonic()
        assert await notifier.stopping_reliably(within=0.2) is False
        took = time.monotonic() - started
    assert 0.2 <= took < 0.6
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]


def test_an_unsupported_address_disables_the_notifier_with_a_warning() -> None:
    with capture_logs() as logs:
        notifier = Notifier("vsock:2:1234")
        assert notifier.ready() is False
    assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["sd_notify_unsupported_address"]


# ----------------------------------------------------------------------------- watchdog


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000"}) == 0.0005


def test_watchdog_interval_honours_watchdog_pid_of_this_process() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 15.0
    assert watchdog_interval(env, pid=os.getpid()) == 15.0


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(env) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=42) is None


def test_no_or_invalid_watchdog_env_means_no_watchdog() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": ""}) is None
    with capture_logs() as logs:
        assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "30s"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "me"}) is None
    assert {entry["event"] for entry in logs} == {"watchdog_env_invalid"}


def test_watchdog_interval_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0


# ----------------------------------------------------------------------------- socket activation

# The child is started the way systemd starts a service: a wrapper puts the listener at fd 3,
# sets LISTEN_PID to its own pid and exec()s the real program, which keeps that pid.
_WRAPPER = textwrap.dedent(
    """
    import os, sys
    passed = int(sys.argv[1])
    if passed != 3:
        os.dup2(passed, 3)
        os.close(passed)
    os.environ["LISTEN_PID"] = str(os.getpid() + int(sys.argv[2]))
    os.environ["LISTEN_FDS"] = "1"
    if sys.argv[4] != "-":
        os.environ["LISTEN_FDNAMES"] = sys.argv[4]
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
    """
)

_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket
    from daemon.service.systemd import listen_fds_with_names
    passed = listen_fds_with_names()
    report = {
        "passed": passed,
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd, _ in passed],
    }
    if passed:
        listener = socket.socket(fileno=passed[0][0])
        report["family"] = int(listener.family)
        report["type"] = int(listener.type)
    if passed and os.environ.get("MODELD_TEST_ACCEPT"):
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"hello from fd 3")
    print(json.dumps(report), flush=True)
    """
)


def _run_activated_child(
    listener: socket.socket,
    pid_offset: int,
    connect_to: str | None,
    fdnames: str | None = "control",
) -> dict[str, object]:
    """Run _CHILD with the listener passed as fd 3; connect to it when connect_to is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    if connect_to is not None:
        env["MODELD_TEST_ACCEPT"] = "1"
    argv = [str(listener.fileno()), str(pid_offset), _CHILD, "-" if fdnames is None else fdnames]
    child = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, *argv],
        pass_fds=[listener.fileno()],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        if connect_to is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(connect_to)
                assert client.recv(100) == b"hello from fd 3"
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err.decode()
    report: dict[str, object] = json.loads(out)
    return report


def test_listen_fds_takes_the_unix_listener_systemd_passed_as_fd_3(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        report = _run_activated_child(listener, pid_offset=0, connect_to=path)
    assert report["passed"] == [[3, "control"]]
    assert report["cloexec"] == [True]
    assert report["env_left"] == []  # LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES unset
    assert report["family"] == socket.AF_UNIX
    assert report["type"] == socket.SOCK_STREAM


def test_listen_fds_meant_for_another_pid_are_not_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "control.sock"))
        listener.listen()
        report = _run_activated_child(listener, pid_offset=1, connect_to=None)
    assert report["passed"] == []
    assert report["env_left"] == []


def test_listen_pid_mismatch_gives_nothing_and_clears_the_environment() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}
    assert listen_fds(env, pid=os.getpid()) == []
    assert env == {}


def test_no_listen_env_gives_nothing() -> None:
    assert listen_fds({}) == []
    assert listen_fds({"LISTEN_FDS": "1"}) == []


def test_unset_environment_false_leaves_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(env, pid=2, unset_environment=False) == []
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


def test_malformed_listen_env_names_the_variable() -> None:
    with pytest.raises(ValueError, match="LISTEN_FDS='two'"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    with pytest.raises(ValueError, match="LISTEN_PID='me'"):
        listen_fds({"LISTEN_PID": "me", "LISTEN_FDS": "1"})


def test_a_passed_fd_without_a_name_is_unknown(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "control.sock"))
        listener.listen()
        report = _run_activated_child(listener, pid_offset=0, connect_to=None, fdnames=None)
    assert report["passed"] == [[3, "unknown"]]


def test_zero_fds_is_a_valid_empty_answer() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_fds_with_names(env, pid=7) == []
    assert env == {}


# ----------------------------------------------------------------------------- status line


def test_status_line_summarises_counts_and_offline_mode() -> None:
    counts = {"healthy": 10, "degraded": 1, "unavailable": 1}
    assert status_line(counts, offline=False) == (
        "12 models: 10 healthy, 1 degraded, 1 unavailable; offline=no"
    )


def test_status_line_shows_unknown_only_when_non_zero() -> None:
    assert status_line({"healthy": 1, "unknown": 0}, offline=True) == (
        "1 model: 1 healthy, 0 degraded, 0 unavailable; offline=yes"
    )
    assert status_line({"unknown": 3}, offline=False) == (
        "3 models: 0 healthy, 0 degraded, 0 unavailable, 3 unknown; offline=no"
    )


def test_status_line_accepts_health_status_keys() -> None:
    counts = {HealthStatus.HEALTHY: 2, HealthStatus.UNKNOWN: 1, HealthStatus.DEGRADED: 0}
    assert status_line(counts, offline=False) == (
        "3 models: 2 healthy, 0 degraded, 0 unavailable, 1 unknown; offline=no"
    )


def test_status_line_with_no_models() -> None:
    assert status_line({}, offline=False) == (
        "0 models: 0 healthy, 0 degraded, 0 unavailable; offline=no"
    )
