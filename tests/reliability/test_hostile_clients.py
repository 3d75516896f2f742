"""Hostile clients on the real daemon's control socket: fuzz, slowloris, floods, big inputs.

One daemon (real subprocess, real socket) per module. Asserted:

- random bytes: the answer, if any, is an HTTP/1.1 response and never a 5xx (a 5xx would be
  the daemon failing, not the client); the daemon answers a normal request afterwards;
- random requests to the real routes (methods, paths, query strings, headers, JSON or junk
  bodies, including the mutating routes): only the statuses the API documents, never a 500;
- slowloris (a header byte every half second), half requests (headers with Content-Length,
  part of the body, silence) and silent connections are cut off (408 or closed) within the
  read timeout (10 s) plus slack, while the daemon keeps answering others promptly;
- 100 kB of headers and a 10 MB body (declared, and chunked) get 413;
- 500 simultaneous connections each get their answer;
- afterwards the daemon answers and the state file is valid (schema, schema_version).
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import clean_env, read_valid_state

from daemon.testing.fakes import FakeOpenAI, FakeServers, write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config

READ_TIMEOUT_S = 10.0  # daemon.control.server.Limits.read_timeout (not configurable)
CUT_OFF_SLACK_S = 4.0
MODEL_IDS = ("a", "b", "file")
#: statuses the control API documents; anything else (500 above all) is a daemon bug
DOCUMENTED = {200, 400, 403, 404, 405, 408, 409, 411, 413, 415, 422, 431, 501, 503, 505}

FUZZ_EXAMPLES = 50
FUZZ_EXAMPLES_LONG = 1500
ROUTE_EXAMPLES = 60
ROUTE_EXAMPLES_LONG = 2000


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="md-cl-", dir="/tmp"))
    try:
        with FakeServers() as servers:
            fake = servers.start(FakeOpenAI(["a", "b"], flavor="vllm"))
            models = [
                {"id": "a", "provider": "openai", "endpoint": fake.url, "primary": True},
                {"id": "b", "provider": "openai", "endpoint": fake.url},
                {"id": "file", "provider": "local_file",
                 "local_path": str(write_gguf(work / "f.gguf"))},
            ]
            with DaemonProcess(work, daemon_config(work, models), env=clean_env()) as proc:
                proc.wait_health("a", "healthy")
                yield proc
                assert proc.running(), proc.log_tail()
                final = read_valid_state(proc.state_path)
                assert set(final["models"]) == set(MODEL_IDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def exchange(path: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, and read until the daemon closes (or the timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        out = b""
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        return out


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


def assert_still_serving(daemon: DaemonProcess, within: float = 1.0) -> None:
    t0 = time.perf_counter()
    resolved = daemon.get("/api/v1/resolve?role=default")
    took = time.perf_counter() - t0
    assert resolved["model_id"] in MODEL_IDS
    assert took < within, f"resolve took {took:.3f}s"


# ----------------------------------------------------------------------------- random bytes

RANDOM_BYTES = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda tail: b"GET /api/v1/status HTTP/1.1\r\n" + tail, st.binary(max_size=1024)),
    st.builds(lambda a, b: b"POST /api/v1/models/promote HTTP/1.1\r\nHost: m\r\n" + a
              + b"\r\n\r\n" + b, st.binary(max_size=256), st.binary(max_size=256)),
)


def check_random_bytes(daemon: DaemonProcess, data: bytes) -> None:
    answer = exchange(daemon.socket_path, data)
    status = status_of(answer)
    assert answer == b"" or status is not None, answer[:120]
    assert status is None or status < 500 or status in (501, 503, 505), answer[:300]
    assert daemon.running(), daemon.log_tail()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=RANDOM_BYTES)
def test_random_bytes_on_the_control_socket_never_hurt_the_daemon(
    daemon: DaemonProcess, data: bytes
) -> None:
    check_random_bytes(daemon, data)
    assert_still_serving(daemon)


@pytest.mark.long
@settings(max_examples=FUZZ_EXAMPLES_LONG, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=RANDOM_BYTES)
def test_random_bytes_long(daemon: DaemonProcess, data: bytes) -> None:
    check_random_bytes(daemon, data)
    assert_still_serving(daemon)


# ----------------------------------------------------------------------------- random requests

PATHS = st.one_of(
    st.sampled_from([
        "/api/v1/models", "/api/v1/models/", "/api/v1/models/a", "/api/v1/models/zz",
        "/api/v1/models/a/evaluate", "/api/v1/models/promote", "/api/v1/models/rollback",
        "/api/v1/models/auto-upgrade/check", "/api/v1/models/auto-upgrade/execute",
        "/api/v1/models/offline-mode", "/api/v1/models/offline-mode/status",
        "/api/v1/resolve", "/api/v1/resolve?role=default&capability=code",
        "/api/v1/resolve?role=%00%ff", "/api/v1/events", "/api/v1/events?since=abc",
        "/api/v1/status", "/metrics", "/", "//", "/api/v1/models/a/../../status",
        "/api/v1/models/" + "x" * 3000, "*",
    ]),
    st.builds(lambda s: "/api/v1/" + s, st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"),
        max_size=60)),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(MODEL_IDS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["model_id", "force", "role", "reason", "enabled", "x"]) | st.text(
            max_size=8), inner, max_size=4),
    max_leaves=10,
)
BODIES = st.one_of(
    st.just(b""),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=512),
)
METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS",
                           "TRACE", "G\x7fT", "get"])
HEADERS = st.lists(st.tuples(
    st.sampled_from(["Content-Type", "Accept", "X-Junk", "Transfer-Encoding", "Expect",
                     "Connection", "Content-Encoding"]),
    st.sampled_from(["application/json", "text/plain", "chunked", "gzip", "close",
                     "100-continue", "", "\x01\x02"]),
), max_size=3)


def build_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: modeld"]
    lines += [f"{k}: {v}" for k, v in headers if k != "Transfer-Encoding"]
    chunked = any(k == "Transfer-Encoding" for k, _ in headers)
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else (
            b"0\r\n\r\n")
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + payload


def check_route_request(daemon: DaemonProcess, raw: bytes) -> None:
    answer = exchange(daemon.socket_path, raw, timeout=8.0)
    status = status_of(answer)
    assert status is not None, f"no HTTP answer to {raw[:200]!r}: {answer[:200]!r}"
    assert status in DOCUMENTED, f"{status} for {raw[:300]!r}: {answer[:400]!r}"
    assert daemon.running(), daemon.log_tail()


@settings(max_examples=ROUTE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(method=METHODS, path=PATHS, headers=HEADERS, body=BODIES)
def test_random_requests_to_real_routes_get_documented_statuses_never_500(
    daemon: DaemonProcess, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
) -> None:
    check_route_request(daemon, build_request(method, path, headers, body))


@pytest.mark.long
@settings(max_examples=ROUTE_EXAMPLES_LONG, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(method=METHODS, path=PATHS, headers=HEADERS, body=BODIES)
def test_random_requests_long(
    daemon: DaemonProcess, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
) -> None:
    check_route_request(daemon, build_request(method, path, headers, body))


# ----------------------------------------------------------------------------- slow and big


class SlowClient(threading.Thread):
    """A connection that misbehaves slowly; records when and how the daemon ended it."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.kind = kind
        self.started = time.monotonic()
        self.ended: float | None = None
        self.answer = b""

    def run(self) -> None:
        sock = self.sock
        try:
            if self.kind == "slowloris":
                request = b"GET /api/v1/status HTTP/1.1\r\nHost: m\r\nX-Slow: " + b"a" * 200
                for byte in request:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.5)
            elif self.kind == "half":
                sock.sendall(b"POST /api/v1/models/promote HTTP/1.1\r\nHost: m\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                             b'{"model_id"')
            sock.settimeout(READ_TIMEOUT_S + CUT_OFF_SLACK_S + 5)
            while chunk := sock.recv(65536):
                self.answer += chunk
        except OSError:
            pass  # reset or broken pipe: the daemon cut us off
        finally:
            self.ended = time.monotonic()
            sock.close()

    @property
    def lasted(self) -> float:
        return (self.ended or time.monotonic()) - self.started


def test_slowloris_half_requests_big_inputs_and_500_connections_leave_the_daemon_serving(
    daemon: DaemonProcess,
) -> None:
    path = daemon.socket_path
    slow = [SlowClient(path, kind) for kind in ("slowloris", "half", "silent") for _ in range(15)]
    for client in slow:
        client.start()
    t0 = time.monotonic()

    # while they hang on, everyone else is served
    for _ in range(5):
        assert_still_serving(daemon, within=0.5)

    # 100 kB of headers, a declared 10 MB body, a chunked 10 MB body: 413, daemon fine
    big_headers = (b"GET /api/v1/status HTTP/1.1\r\nHost: m\r\n"
                   + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(100)) + b"\r\n")
    assert status_of(exchange(path, big_headers)) == 413
    declared = (b"POST /api/v1/models/promote HTTP/1.1\r\nHost: m\r\n"
                b"Content-Length: 10485760\r\n\r\n")
    assert status_of(exchange(path, declared)) == 413
    assert status_of(send_chunked_10mb(path)) == 413
    assert_still_serving(daemon)

    statuses = five_hundred_at_once(path)
    assert len(statuses) == 500 and set(statuses) == {200}, _count(statuses)
    assert_still_serving(daemon)

    # the slow ones are cut off within the read timeout (plus slack), none earlier than it
    for client in slow:
        client.join(max(0.0, t0 + READ_TIMEOUT_S + CUT_OFF_SLACK_S - time.monotonic()))
    lingering = [c.kind for c in slow if c.is_alive()]
    assert not lingering, f"still connected after {READ_TIMEOUT_S + CUT_OFF_SLACK_S}s: " \
                          f"{_count(lingering)}"
    for client in slow:
        assert client.lasted >= READ_TIMEOUT_S - 1.0, (client.kind, client.lasted)
        status = status_of(client.answer)
        assert client.answer == b"" or status == 408, (client.kind, client.answer[:200])
    assert_still_serving(daemon)
    print(f"\n[hostile clients] {len(slow)} slow connections cut off after "
          f"{min(c.lasted for c in slow):.1f}–{max(c.lasted for c in slow):.1f}s; "
          f"500 simultaneous connections: {_count(statuses)}")
    read_valid_state(daemon.state_path)


def send_chunked_10mb(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"POST /api/v1/models/promote HTTP/1.1\r\nHost: m\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        try:
            for _ in range(160):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered 413 and closed before we finished
        out = b""
        try:
            while data := sock.recv(65536):
                out += data
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def five_hundred_at_once(path: str) -> list[int]:
    """Open 500 connections, then send a request on each, then read every answer."""
    socks = []
    try:
        for _ in range(500):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            socks.append(sock)
        request = b"GET /api/v1/status HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        for sock in socks:
            sock.sendall(request)
        selector = selectors.DefaultSelector()
        answers: dict[socket.socket, bytes] = {}
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            answers[sock] = b""
        deadline = time.monotonic() + 30
        open_count = len(socks)
        while open_count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if data:
                    answers[ready] += data
                else:
                    selector.unregister(ready)
                    open_count -= 1
        selector.close()
        return [status_of(a) or 0 for a in answers.values()]
    finally:
        for sock in socks:
            sock.close()


def _count(items: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
