"""Connection hogs: one local user holding the control socket's connections locks nobody out.

A hog process runs as another uid (``setpriv --reuid=65534``, the tests run as root) and opens
1,030 connections, more than the daemon's 1,024: keep-alive connections that each send a
request every few seconds, or ``GET /api/v1/events?follow=1`` streams that sit idle. While it
holds them, legitimate ``modelctl resolve`` calls, from root (an admin: the reserve) and from
a third uid (a peer with its own share), must all succeed. Also pinned: an idle keep-alive
connection is closed after ``[control] idle_timeout``.

The figures (legitimate calls that succeeded, connections the hog got) are printed; before
the per-peer shares the daemon gave the hog all 1,024 connections and 0 legitimate calls
succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import clean_env

from daemon.core.settings import ControlConfig
from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config, request, short_tempdir

SETPRIV = shutil.which("setpriv")
HOG_UID = 65534  # nobody
SECOND_HOG_UID = 65532
OTHER_UID = 65533  # another local user, not an admin
HOG_CONNECTIONS = 1030
SHIPPED = ControlConfig()  # the tests run the shipped defaults unless they say otherwise
PER_PEER = SHIPPED.max_connections_per_peer
FOLLOWERS_PER_PEER = SHIPPED.max_followers_per_peer
LEGIT_RAW = 40  # in-process resolve requests as root, on fresh connections
LEGIT_CTL = 3  # modelctl resolve runs, per legitimate uid

#: The hog: opens N connections, then holds them; "keepalive" sends a request on each every
#: few seconds (2 s, or argv[4]), "follow" opens an event stream on each. Prints how many it
#: holds, then waits for stdin to close.
HOG = textwrap.dedent('''
    import selectors, socket, sys, time
    path, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    every = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0
    req = (b"GET /api/v1/events?follow=1 HTTP/1.1\\r\\nHost: m\\r\\n\\r\\n" if kind == "follow"
           else b"GET /api/v1/status HTTP/1.1\\r\\nHost: m\\r\\n\\r\\n")
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            s.sendall(req)
        except OSError:
            s.close()
            continue
        socks.append(s)
    # a connection is held when its answer is a 200 (a refusal is a 429 or 503, then close)
    held = []
    for s in socks:
        try:
            head = s.recv(65536)
        except OSError:
            head = b""
        if head.startswith(b"HTTP/1.1 200"):
            s.setblocking(False)
            held.append(s)
        else:
            s.close()
    print(len(held), flush=True)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        if sel.select(timeout=every):
            break
        if kind == "keepalive":
            for s in held:
                try:
                    while s.recv(65536):
                        pass
                except BlockingIOError:
                    pass
                except OSError:
                    continue
                try:
                    s.sendall(req)
                except OSError:
                    pass
''')


@contextlib.contextmanager
def hogged_daemon(max_connections: int = 1024,
                  **control: Any) -> Iterator[DaemonProcess]:
    """A daemon any local user may connect to; [control] as shipped unless overridden."""
    assert SETPRIV, "setpriv is required (util-linux; CI installs it)"
    assert os.geteuid() == 0, "the hog runs as another uid: these tests need root"
    with short_tempdir("md-hog-") as work:
        models = [{"id": "f", "provider": "local_file", "role": "default", "primary": True,
                   "local_path": str(write_gguf(work / "f.gguf"))}]
        # no [control] table at all when nothing is overridden: the same test then runs on
        # a daemon that predates the table, for the before figures
        config = daemon_config(work, models, **({"control": control} if control else {}))
        config["daemon"]["max_connections"] = max_connections
        config["daemon"]["socket_mode"] = "0666"  # any local user may connect (and read)
        config["daemon"]["admin_group"] = ""
        (work / "hog.py").write_text(HOG)
        with DaemonProcess(work, config, env=clean_env()) as proc:
            os.chmod(work, 0o755)
            os.chmod(Path(proc.socket_path).parent, 0o755)
            proc.wait_health("f", "healthy")
            yield proc


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """The shipped defaults: 1,024 connections, the [control] shares as shipped."""
    with hogged_daemon() as proc:
        yield proc


def as_uid(uid: int, cmd: list[str]) -> list[str]:
    assert SETPRIV
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]


def start_hog(daemon: DaemonProcess, kind: str, uid: int = HOG_UID,
              every: float = 2.0) -> tuple[subprocess.Popen[str], int]:
    script = str(daemon.workdir / "hog.py")
    hog = subprocess.Popen(as_uid(uid, [sys.executable, script, daemon.socket_path, kind,
                                        str(HOG_CONNECTIONS), str(every)]),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None
    line = hog.stdout.readline()
    assert line.strip().isdigit(), f"the hog did not report: {line!r}"
    return hog, int(line)


def stop_hog(hog: subprocess.Popen[str]) -> None:
    assert hog.stdin is not None
    hog.stdin.close()
    try:
        hog.wait(10)
    except subprocess.TimeoutExpired:
        hog.kill()
        hog.wait()


def modelctl_resolve(daemon: DaemonProcess, uid: int | None) -> bool:
    cmd = [sys.executable, "-m", "daemon.control.ctl", "--socket", daemon.socket_path,
           "resolve", "--first"]
    if uid is not None:
        cmd = as_uid(uid, cmd)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                         cwd=str(Path(__file__).resolve().parents[2]))
    return run.returncode == 0 and run.stdout.strip() == "f"


def legit_calls(daemon: DaemonProcess) -> dict[str, tuple[int, int]]:
    """Legitimate calls while the hog holds its connections: name → (succeeded, tried)."""
    raw_ok = 0
    for _ in range(LEGIT_RAW):
        try:
            status, body = request(daemon.socket_path, "GET", "/api/v1/resolve?role=default",
                                   timeout=5.0)
        except OSError:
            continue
        raw_ok += status == 200 and body["model_id"] == "f"
    root_ok = sum(modelctl_resolve(daemon, None) for _ in range(LEGIT_CTL))
    other_ok = sum(modelctl_resolve(daemon, OTHER_UID) for _ in range(LEGIT_CTL))
    return {"resolve as root": (raw_ok, LEGIT_RAW),
            "modelctl resolve as root": (root_ok, LEGIT_CTL),
            f"modelctl resolve as uid {OTHER_UID}": (other_ok, LEGIT_CTL)}


def report(kind: str, held: int, calls: dict[str, tuple[int, int]]) -> str:
    parts = ", ".join(f"{name}: {ok}/{tried}" for name, (ok, tried) in calls.items())
    return (f"[hogs] {HOG_CONNECTIONS} {kind} connections from uid {HOG_UID}: the hog holds "
            f"{held}; legitimate calls succeeded: {parts}")


@pytest.mark.parametrize("kind", ["keepalive", "follow"])
def test_legitimate_calls_succeed_while_another_uid_holds_1030_connections(
    daemon: DaemonProcess, kind: str, record_property: Any,
) -> None:
    hog, held = start_hog(daemon, kind)
    try:
        calls = legit_calls(daemon)
    finally:
        stop_hog(hog)
    summary = report(kind, held, calls)
    print("\n" + summary)
    record_property("hogs", summary)
    assert all(ok == tried for ok, tried in calls.values()), summary
    limit = FOLLOWERS_PER_PEER if kind == "follow" else PER_PEER
    assert held == limit, summary
    # refusals of the hog are logged, naming the peer and the limit
    refused = [e for e in daemon.log_events("http_connection_refused")
               if e.get("uid") == HOG_UID]
    assert refused, daemon.log_tail()


def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout() -> None:
    with (hogged_daemon(idle_timeout="1s") as daemon,
          socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock):
        sock.settimeout(5.0)
        sock.connect(daemon.socket_path)
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: m\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        t0 = time.monotonic()
        rest = b""
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except TimeoutError:
            pytest.fail("an idle keep-alive connection was still open after 5 s "
                        "(idle_timeout is 1 s)")
        waited = time.monotonic() - t0
    assert 0.5 <= waited <= 3.0, f"closed after {waited:.2f}s, idle_timeout is 1 s"


def test_when_hogs_of_several_uids_fill_the_shared_connections_everyone_still_gets_in() -> None:
    """Two uids take every connection open to all (80 - 8 reserved): root still gets answers
    from the reserve, and a third uid gets in too: an idle connection of the uid holding the
    most is closed to make room. The two hogs end up sharing the 72 connections."""
    with hogged_daemon(80, admin_reserve=8, max_connections_per_peer=64) as daemon:
        first, held_first = start_hog(daemon, "keepalive")
        second, _ = start_hog(daemon, "keepalive", uid=SECOND_HOG_UID)
        try:
            by_uid = daemon.get("/api/v1/status")["connections"]["by_uid"]
            root_ok = sum(modelctl_resolve(daemon, None) for _ in range(LEGIT_CTL))
            raw = [request(daemon.socket_path, "GET", "/api/v1/resolve?role=default")[0]
                   for _ in range(10)]
            other_ok = sum(modelctl_resolve(daemon, OTHER_UID) for _ in range(LEGIT_CTL))
        finally:
            stop_hog(first)
            stop_hog(second)
        hogs = {uid: by_uid.get(str(uid), 0) for uid in (HOG_UID, SECOND_HOG_UID)}
        summary = (f"[hogs] two uids hog 80 connections (8 reserved): they hold {hogs}; "
                   f"modelctl resolve as root {root_ok}/{LEGIT_CTL}, resolve as root "
                   f"{raw.count(200)}/10, modelctl resolve as uid {OTHER_UID} "
                   f"{other_ok}/{LEGIT_CTL}")
        print("\n" + summary)
        assert held_first == 64, summary
        assert sum(hogs.values()) <= 80 - 8, summary
        assert hogs[SECOND_HOG_UID] >= 80 - 8 - 64, summary
        assert max(hogs.values()) <= 64, summary
        assert root_ok == LEGIT_CTL and raw.count(200) == 10, summary
        assert other_ok == LEGIT_CTL, summary
        assert daemon.log_events("http_connection_evicted"), daemon.log_tail()


@pytest.mark.long
@pytest.mark.parametrize("kind", ["keepalive", "follow"])
def test_long_66_modelctl_calls_over_40_s_while_1030_connections_are_held(
    daemon: DaemonProcess, kind: str,
) -> None:
    """The issue's figure: 66 ``modelctl resolve`` calls (0 succeeded before) over a hold
    longer than the idle timeout, the keep-alive hog sending a request every 5 s."""
    hog, held = start_hog(daemon, kind, every=5.0)
    ok = 0
    try:
        deadline = time.monotonic() + 40.0
        for i in range(66):
            ok += modelctl_resolve(daemon, None if i % 2 else OTHER_UID)
            time.sleep(max(0.0, (deadline - time.monotonic()) / (66 - i) - 0.3))
    finally:
        stop_hog(hog)
    summary = f"[hogs, long] {kind}: hog holds {held}; modelctl resolve succeeded {ok}/66"
    print("\n" + summary)
    assert ok == 66, summary
