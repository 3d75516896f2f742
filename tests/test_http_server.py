"""The control socket's HTTP server: framing, keep-alive, streaming, limits, listeners, shutdown.

Every test talks to a real server over a real socket in tmp_path, through raw bytes parsed
with an h11 client, so what is asserted is what goes over the wire.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.control.listeners import (
    SocketInUseError,
    _bind_unix_socket,
    create_tcp_listener,
    create_unix_listener,
    unix_listener_from_fd,
)
from daemon.control.messages import HTTPError, Limits, Peer, Request, Response, StreamingResponse
from daemon.control.server import HTTPServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ----------------------------------------------------------------------------- test app


@dataclass
class App:
    """A small handler exercising every kind of answer the server supports."""

    release: anyio.Event = field(default_factory=anyio.Event)
    chunks_send: Any = None
    chunks_recv: Any = None
    stream_closed: anyio.Event = field(default_factory=anyio.Event)
    seen: list[Request] = field(default_factory=list)
    slow_done: int = 0

    flood_closed: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.chunks_send, self.chunks_recv = anyio.create_memory_object_stream[bytes](16)

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        self.seen.append(request)
        if request.path == "/echo":
            return Response.json(
                {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query,
                    "body": request.json(),
                    "peer": None if request.peer is None else list(_peer_tuple(request.peer)),
                }
            )
        if request.path == "/boom":
            raise RuntimeError("the handler broke")
        if request.path == "/refuse":
            raise HTTPError(409, "model_unavailable", "llama is down", reasons={"llama": "dead"})
        if request.path == "/hold":
            await self.release.wait()
            return Response.json({"held": True})
        if request.path == "/slow":
            await anyio.sleep(float(request.query_one("s", "0.3") or 0.3))
            self.slow_done += 1
            return Response.json({"slow": True})
        if request.path == "/stream":
            return StreamingResponse(self._stream())
        if request.path == "/flood":
            return StreamingResponse(self._flood())
        return Response.json({"ok": True})

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.chunks_recv:
                yield chunk
        finally:
            self.stream_closed.set()

    async def _flood(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            self.flood_closed.set()


def _peer_tuple(peer: Peer) -> tuple[int, int, int]:
    return (peer.pid, peer.uid, peer.gid)


@asynccontextmanager
async def running(
    tmp_path: Path, limits: Limits | None = None, app: App | None = None,
    is_admin: Any = None,
) -> AsyncIterator[tuple[HTTPServer, str, App]]:
    app = app or App()
    path = str(tmp_path / "control.sock")
    listener = await create_unix_listener(path, 0o660)
    server = HTTPServer(app, limits or Limits(), is_admin=is_admin)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)
        try:
            yield server, path, app
        finally:
            await server.shutdown(grace=1.0)


# ----------------------------------------------------------------------------- raw client


def request_bytes(
    method: str = "GET", target: str = "/", body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: modeld"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A client on one connection: raw bytes out, h11-parsed responses in."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        return cls(await anyio.connect_unix(path))

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            self.h11.receive_data(data)

    async def reply(self, request: bytes | None = None) -> Reply:
        if request is not None:
            # Keep the client state machine in step with what we sent raw.
            self.h11.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            self.h11.send(h11.EndOfMessage())
            await self.send(request)
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        headers = {k.decode(): v.decode() for k, v in head.headers}
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return Reply(head.status_code, headers, body)

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        data = b""
        with anyio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return data
                data += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get(path: str, target: str = "/", **kw: Any) -> Reply:
    client = await RawClient.connect(path)
    try:
        return await client.reply(request_bytes(target=target, **kw))
    finally:
        await client.aclose()


def parse_raw(data: bytes) -> Reply:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    head = conn.next_event()
    assert isinstance(head, h11.Response), head
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
    return Reply(head.status_code, {k.decode(): v.decode() for k, v in head.headers}, body)


# ----------------------------------------------------------------------------- framing


@pytest.mark.anyio
async def test_two_requests_share_one_keep_alive_connection(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, path, app):
        client = await RawClient.connect(path)
        first = await client.reply(request_bytes("POST", "/echo?a=1&a=2&b=", b'{"x": 1}'))
        second = await client.reply(request_bytes("GET", "/other/caf%C3%A9%20x?q=%2F"))
        assert server.connections == 1  # both answers came back on this one socket
        await client.aclose()
    assert first.status == 200 and second.status == 200
    assert first.headers["content-type"] == "application/json"
    assert "connection" not in first.headers
    assert first.json() == {
        "method": "POST",
        "path": "/echo",
        "query": {"a": ["1", "2"], "b": [""]},
        "body": {"x": 1},
        "peer": [os.getpid(), os.getuid(), os.getgid()],
    }
    assert app.seen[1].path == "/other/café x"  # percent-decoded, query split off
    assert app.seen[1].query == {"q": ["/"]}
    assert app.seen[1].target == "/other/caf%C3%A9%20x?q=%2F"


@pytest.mark.anyio
async def test_json_body_is_compact_utf8_and_errors_have_code_and_message(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, _app):
        refused = await get(path, "/refuse")
        bad = await get(path, "/echo", body=b"{not json")
    assert refused.status == 409
    assert refused.body == (
        b'{"error":{"code":"model_unavailable","message":"llama is down",'
        b'"reasons":{"llama":"dead"}}}\n'
    )
    assert bad.status == 400
    error = bad.json()["error"]
    assert error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"]


def test_request_json_of_empty_body_is_empty_object_and_non_utf8_is_400() -> None:
    assert Request("POST", "/", {}, [], b"").json() == {}
    with pytest.raises(HTTPError) as caught:
        Request("POST", "/", {}, [], b"\xff\xfe").json()
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
    assert Response.json({"é": 1}).body == '{"é":1}\n'.encode()


@pytest.mark.anyio
async def test_streaming_response_is_chunked_and_each_chunk_arrives_as_it_is_pushed(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (_, path, app):
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/stream"))
        client.h11.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.h11.send(h11.EndOfMessage())
        head = await client.next_event()
        assert head.status_code == 200
        headers = {k: v for k, v in head.headers}
        assert headers[b"transfer-encoding"] == b"chunked"
        assert headers[b"content-type"] == b"application/x-ndjson"
        for line in (b'{"seq":1}\n', b'{"seq":2}\n'):
            await app.chunks_send.send(line)
            with anyio.fail_after(1):
                event = await client.next_event()
            assert event.data == line  # delivered before the next one exists
        await app.chunks_send.aclose()  # the source ends: the body is terminated properly
        with anyio.fail_after(1):
            assert isinstance(await client.next_event(), h11.EndOfMessage)
        assert await client.read_until_closed() == b""
        await client.aclose()


@pytest.mark.anyio
async def test_stream_ends_when_the_client_leaves_even_if_no_chunk_comes(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, path, app):
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/stream"))
        await client.stream.receive()  # the head
        assert server.connections == 1
        await client.aclose()
        with anyio.fail_after(1):
            await app.stream_closed.wait()  # the generator's finally ran
        while server.connections:
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_shutdown_ends_open_streams_cleanly(tmp_path: Path) -> None:
    app = App()
    path = str(tmp_path / "s.sock")
    server = HTTPServer(app, Limits())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path, 0o600))
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/stream"))
        await app.chunks_send.send(b"one\n")
        head = await client.stream.receive()
        while not head.endswith(b"one\n\r\n"):
            head += await client.stream.receive()
        start = time.monotonic()
        await server.shutdown(grace=5.0)
        assert time.monotonic() - start < 1.0  # a stream does not hold the shutdown for grace
    data = await client.read_until_closed()
    assert data == b"0\r\n\r\n"  # the terminating chunk was sent
    assert app.stream_closed.is_set()


@pytest.mark.anyio
async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, Limits(write_timeout=0.3)) as (server, path, app):
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/flood"))  # and never read
        with anyio.fail_after(3):
            await app.flood_closed.wait()
            while server.connections:
                await anyio.sleep(0.01)
        assert (await get(path, "/")).status == 200
        await client.aclose()


# ----------------------------------------------------------------------------- limits


@pytest.mark.anyio
async def test_declared_10mb_body_gets_413_before_it_is_sent(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, app):
        client = await RawClient.connect(path)
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n"
        await client.send(head)
        data = await client.read_until_closed()
        assert await get(path, "/") is not None  # still serving
    reply = parse_raw(data)
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "body_too_large"
    assert "1048576" in reply.json()["error"]["message"]
    assert not any(r.path == "/echo" for r in app.seen)


@pytest.mark.anyio
async def test_10mb_chunked_body_gets_413_and_the_client_can_read_it(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, _app):
        client = await RawClient.connect(path)
        received = b""

        async def send_all() -> None:
            await client.send(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            try:
                for _ in range(160):  # 10 MiB
                    await client.send(chunk)
            except (anyio.BrokenResourceError, OSError):
                pass  # the server stopped reading: fine, its answer is already here

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            received = await client.read_until_closed()
        reply = parse_raw(received)
        assert reply.status == 413
        assert "body" in reply.json()["error"]["message"]
        assert (await get(path, "/")).status == 200


@pytest.mark.anyio
async def test_100kb_of_headers_gets_413_naming_the_headers(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, _app):
        client = await RawClient.connect(path)
        filler = "".join(f"X-Filler-{i}: {'y' * 90}\r\n" for i in range(1000))  # ~100 KB
        await client.send(f"GET / HTTP/1.1\r\nHost: x\r\n{filler}\r\n".encode())
        reply = parse_raw(await client.read_until_closed())
        assert reply.status == 413
        assert reply.json()["error"]["code"] == "headers_too_large"
        assert "headers" in reply.json()["error"]["message"]
        assert (await get(path, "/")).status == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ],
)
async def test_malformed_request_gets_400_and_is_closed(tmp_path: Path, garbage: bytes) -> None:
    async with running(tmp_path) as (_, path, _app):
        client = await RawClient.connect(path)
        await client.send(garbage)
        reply = parse_raw(await client.read_until_closed(timeout=2))
        assert reply.status in (400, 505)
        assert reply.json()["error"]["code"] == "bad_request"
        assert reply.headers["connection"] == "close"
        assert (await get(path, "/")).status == 200


@pytest.mark.anyio
async def test_half_a_request_then_stall_gets_408_within_the_read_timeout(tmp_path: Path) -> None:
    limits = Limits(read_timeout=0.3)
    async with running(tmp_path, limits) as (server, path, _app):
        client = await RawClient.connect(path)
        await client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow")
        start = time.monotonic()
        data = await client.read_until_closed(timeout=2)
        elapsed = time.monotonic() - start
        assert parse_raw(data).status == 408
        assert 0.25 < elapsed < 1.0
        with anyio.fail_after(1):
            while server.connections:
                await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_trickling_slowloris_is_cut_off_at_the_read_timeout(tmp_path: Path) -> None:
    limits = Limits(read_timeout=0.3)
    async with running(tmp_path, limits) as (_, path, _app):
        client = await RawClient.connect(path)
        start = time.monotonic()
        answer = b""

        async def trickle() -> None:
            try:
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"a" * 100:
                    await client.send(bytes([byte]))
                    await anyio.sleep(0.02)
            except (anyio.BrokenResourceError, OSError):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            answer = await client.read_until_closed(timeout=3)
            tg.cancel_scope.cancel()
        assert parse_raw(answer).status == 408
        assert time.monotonic() - start < 0.6  # each byte was on time; the request was not


@pytest.mark.anyio
async def test_silent_client_and_idle_keep_alive_are_closed(tmp_path: Path) -> None:
    limits = Limits(read_timeout=0.2, keepalive_timeout=0.3)
    async with running(tmp_path, limits) as (_, path, _app):
        silent = await RawClient.connect(path)
        start = time.monotonic()
        assert await silent.read_until_closed(timeout=2) == b""
        assert time.monotonic() - start < 0.6
        idle = await RawClient.connect(path)
        assert (await idle.reply(request_bytes())).status == 200
        start = time.monotonic()
        assert await idle.read_until_closed(timeout=2) == b""
        assert 0.25 < time.monotonic() - start < 0.8


@pytest.mark.anyio
async def test_500_connections_over_the_cap_get_503_and_the_server_still_answers(
    tmp_path: Path,
) -> None:
    cap = 50
    async with running(tmp_path, Limits(max_connections=cap)) as (server, path, app):
        clients = [await RawClient.connect(path) for _ in range(500)]
        for i, client in enumerate(clients):
            try:
                await client.send(request_bytes(target="/hold"))
            except anyio.BrokenResourceError:
                # a turned-away connection may be answered and closed before we send; its
                # 503 is still waiting to be read below
                assert i >= cap
        with anyio.fail_after(10):
            while len(app.seen) < cap:
                await anyio.sleep(0.01)
        # The first `cap` connections are held by the handler; the rest are turned away.
        turned_away: list[Reply] = []

        async def read_refusal(client: RawClient) -> None:
            turned_away.append(parse_raw(await client.read_until_closed()))

        async with anyio.create_task_group() as tg:
            for client in clients[cap:]:
                tg.start_soon(read_refusal, client)
        assert [r.status for r in turned_away] == [503] * (500 - cap)
        assert turned_away[0].json()["error"]["code"] == "too_many_connections"
        assert len(app.seen) == cap and server.connections == cap

        app.release.set()
        served: list[Reply] = []

        async def read_reply(client: RawClient) -> None:
            with anyio.fail_after(5):
                served.append(await client.reply())

        async with anyio.create_task_group() as tg:
            for client in clients[:cap]:
                tg.start_soon(read_reply, client)
        assert [r.status for r in served] == [200] * cap
        for client in clients:
            await client.aclose()
        assert (await get(path, "/")).status == 200


@pytest.mark.anyio
async def test_handler_exception_gives_500_json_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (_, path, _app):
        client = await RawClient.connect(path)
        broken = await client.reply(request_bytes(target="/boom"))
        after = await client.reply(request_bytes(target="/"))  # same connection, still fine
        await client.aclose()
    assert broken.status == 500
    assert broken.json()["error"]["code"] == "internal_error"
    assert "/boom" in broken.json()["error"]["message"]
    assert "the handler broke" not in broken.body.decode()  # details go to the log only
    assert after.status == 200


@pytest.mark.anyio
async def test_peer_credentials_are_the_connecting_process(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, _app):
        reply = await get(path, "/echo")
    assert reply.json()["peer"] == [os.getpid(), os.getuid(), os.getgid()]


@pytest.mark.anyio
async def test_tcp_listener_serves_the_same_handler_without_a_peer(tmp_path: Path) -> None:
    app = App()
    server = HTTPServer(app, Limits())
    listener = await create_tcp_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)
        client = RawClient(await anyio.connect_tcp("127.0.0.1", port))
        reply = await client.reply(request_bytes(target="/echo"))
        await client.aclose()
        await server.shutdown(grace=1)
    assert reply.status == 200
    assert reply.json()["peer"] is None


@pytest.mark.anyio
async def test_curl_over_the_unix_socket(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b"0," * (5 * 1024 * 1024) + b"0]")  # 10 MB
    small = tmp_path / "small.json"
    small.write_bytes(b'{"pad": "' + b"x" * 100_000 + b'"}')
    async with running(tmp_path) as (_, path, _app):

        async def curl(*args: str) -> tuple[int, str, float]:
            start = time.monotonic()
            result = await anyio.run_process(
                ["curl", "-sS", "--unix-socket", path, "-o", "-", "-w", "\n%{http_code}", *args],
                check=False,
            )
            out = result.stdout.decode()
            body, _, code = out.rpartition("\n")
            return int(code or 0), body, time.monotonic() - start

        code, body, _ = await curl("http://modeld/echo?x=1")
        assert code == 200 and json.loads(body)["query"] == {"x": ["1"]}
        # curl asks "Expect: 100-continue" for big bodies; the limit is enforced on the head.
        code, body, _ = await curl(
            "-H", "Content-Type: application/json", "--data-binary", f"@{big}", "http://modeld/echo"
        )
        assert code == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        # An accepted body after "Expect: 100-continue": the server says 100 at once (curl
        # would otherwise wait a second before sending).
        code, body, elapsed = await curl(
            "-H", "Expect: 100-continue", "--data-binary", f"@{small}", "http://modeld/echo"
        )
        assert code == 200 and len(json.loads(body)["body"]["pad"]) == 100_000
        assert elapsed < 0.9


# ----------------------------------------------------------------------------- shutdown


@pytest.mark.anyio
async def test_shutdown_lets_an_in_flight_request_finish_within_grace(tmp_path: Path) -> None:
    app = App()
    path = str(tmp_path / "s.sock")
    server = HTTPServer(app, Limits())
    replies: list[Reply] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path, 0o660))
        idle = await RawClient.connect(path)
        assert (await idle.reply(request_bytes())).status == 200

        async def slow() -> None:
            replies.append(await get(path, "/slow?s=0.3"))

        tg.start_soon(slow)
        with anyio.fail_after(1):
            while server.in_flight == 0:
                await anyio.sleep(0.01)
        start = time.monotonic()
        await server.shutdown(grace=2.0)
        elapsed = time.monotonic() - start
        assert not os.path.exists(path)  # stopped accepting, socket file removed
        assert await idle.read_until_closed(timeout=1) == b""  # idle keep-alive closed
    assert 0.15 < elapsed < 1.0
    assert app.slow_done == 1
    assert replies[0].status == 200
    assert replies[0].headers["connection"] == "close"


@pytest.mark.anyio
async def test_shutdown_cancels_requests_that_outlast_grace(tmp_path: Path) -> None:
    app = App()
    path = str(tmp_path / "s.sock")
    server = HTTPServer(app, Limits())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path, 0o660))
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/slow?s=30"))
        with anyio.fail_after(1):
            while server.in_flight == 0:
                await anyio.sleep(0.01)
        start = time.monotonic()
        await server.shutdown(grace=0.2)
        assert time.monotonic() - start < 0.8
        assert await client.read_until_closed(timeout=1) == b""
    assert app.slow_done == 0


# ----------------------------------------------------------------------------- listeners


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_socket_file_is_born_with_its_mode_before_listen(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    # Under umask 0 a plain bind() makes the file 0777; the socket's inode mode set before
    # bind() is what makes it 0660 from the moment it exists.
    with umask(0):
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.bind(str(tmp_path / "plain.sock"))
        plain.close()
        assert stat.S_IMODE(os.stat(tmp_path / "plain.sock").st_mode) == 0o777
        sock = _bind_unix_socket(path, 0o660)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0  # not listening yet
    finally:
        sock.close()


@pytest.mark.anyio
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
async def test_listener_socket_has_exactly_its_mode_whatever_the_umask(
    tmp_path: Path, mask: int
) -> None:
    path = str(tmp_path / "c.sock")
    with umask(mask):
        listener = await create_unix_listener(path, 0o660)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        await listener.aclose()
    assert not os.path.exists(path)


@pytest.mark.anyio
async def test_live_socket_at_the_path_refuses_to_start(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, path, _app):
        inode = os.stat(path).st_ino
        with pytest.raises(SocketInUseError, match="another process is listening"):
            await create_unix_listener(path, 0o660)
        assert os.stat(path).st_ino == inode  # the live one is untouched
        assert (await get(path, "/")).status == 200


@pytest.mark.anyio
async def test_stale_socket_is_removed_and_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays; nobody listens: stale
    app = App()
    server = HTTPServer(app)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path, 0o660))
        assert (await get(path, "/")).status == 200
        await server.shutdown(grace=1)


@pytest.mark.anyio
async def test_non_socket_file_at_the_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("precious")
    with pytest.raises(SocketInUseError, match="not a socket"):
        await create_unix_listener(str(path), 0o660)
    assert path.read_text() == "precious"


@pytest.mark.anyio
async def test_closing_leaves_a_socket_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    listener = await create_unix_listener(path, 0o660)
    os.unlink(path)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(path)
    try:
        await listener.aclose()
        assert stat.S_ISSOCK(os.stat(path).st_mode)  # the successor's file survives
    finally:
        successor.close()


@pytest.mark.anyio
async def test_listener_from_an_inherited_fd_serves_and_leaves_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    fd = sock.detach()
    server = HTTPServer(App())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await unix_listener_from_fd(fd))
        assert (await get(path, "/")).status == 200
        await server.shutdown(grace=1)
    assert os.path.exists(path)  # systemd owns it


# ----------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A server on its own event loop thread, so sync tests (and hypothesis) can poke it."""
    path = str(tmp_path_factory.mktemp("fuzz") / "f.sock")
    limits = Limits(read_timeout=0.5, keepalive_timeout=0.5)
    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(create_unix_listener, path, 0o660)
        server = HTTPServer(App(), limits)
        future, _ = portal.start_task(server.serve, listener)
        yield path, future
        portal.call(server.shutdown, 1.0)
        future.result(timeout=5)


def _sync_exchange(path: str, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda tail: b"GET / HTTP/1.1\r\n" + tail, st.binary(max_size=512)),
        st.builds(
            lambda a, b: b"POST /echo HTTP/1.1\r\nHost: x\r\n" + a + b"\r\n\r\n" + b,
            st.binary(max_size=128),
            st.binary(max_size=128),
        ),
    )
)
def test_random_bytes_never_crash_the_server(threaded_server: tuple[str, Any], data: bytes) -> None:
    path, future = threaded_server
    answer = _sync_exchange(path, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    assert not future.done()
    after = _sync_exchange(path, request_bytes())
    assert after.startswith(b"HTTP/1.1 200 "), after[:80]


def test_many_threads_hammering_with_garbage_and_requests(threaded_server: tuple[str, Any]) -> None:
    path, future = threaded_server
    results: list[bytes] = []

    def worker(i: int) -> None:
        payload = os.urandom(300) if i % 2 else request_bytes(target="/echo")
        results.append(_sync_exchange(path, payload))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.startswith(b"HTTP/1.1 200 ") for r in results) == 20
    assert not future.done()


# ----------------------------------------------------------------------------- per-peer shares


@pytest.mark.anyio
async def test_a_peer_over_its_connection_share_gets_429_and_an_admin_does_not(
    tmp_path: Path,
) -> None:
    admin = {"now": False}  # every test connection is this process's uid: toggle its role
    limits = Limits(max_connections=10, max_connections_per_peer=3, admin_reserve=2)
    async with running(tmp_path, limits, is_admin=lambda peer: admin["now"]) as (server, path,
                                                                                _app):
        held = [await RawClient.connect(path) for _ in range(3)]
        for client in held:
            assert (await client.reply(request_bytes())).status == 200  # now idle, kept alive
        refused = parse_raw(await (await RawClient.connect(path)).read_until_closed())
        assert refused.status == 429
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "too_many_connections"
        assert "max_connections_per_peer" in error["message"]
        assert server.connections_by_peer() == {os.getuid(): 3}
        admin["now"] = True  # an admin is held only to the total
        assert (await get(path)).status == 200
        for client in held:
            await client.aclose()


@pytest.mark.anyio
async def test_the_last_connections_are_kept_for_admins(tmp_path: Path) -> None:
    admin = {"now": True}
    limits = Limits(max_connections=4, max_connections_per_peer=10, admin_reserve=2)
    async with running(tmp_path, limits, is_admin=lambda peer: admin["now"]) as (_s, path,
                                                                                app):
        # two requests in flight (not idle: nothing to make room with) by non-admins
        admin["now"] = False
        busy = [await RawClient.connect(path) for _ in range(2)]
        for client in busy:
            await client.send(request_bytes(target="/hold"))
        with anyio.fail_after(5):
            while len(app.seen) < 2:
                await anyio.sleep(0.01)
        refused = parse_raw(await (await RawClient.connect(path)).read_until_closed())
        assert refused.status == 503
        assert "reserved for admins" in refused.json()["error"]["message"]
        admin["now"] = True
        assert (await get(path)).status == 200
        app.release.set()
        for client in busy:
            assert (await client.reply()).status == 200
            await client.aclose()


@pytest.mark.anyio
async def test_streams_per_peer_are_capped_with_429_and_admins_are_not(tmp_path: Path) -> None:
    admin = {"now": False}
    limits = Limits(max_streams_per_peer=2, max_connections_per_peer=10)
    async with running(tmp_path, limits, is_admin=lambda peer: admin["now"]) as (_s, path,
                                                                                _app):
        streams = []
        for _ in range(2):
            client = await RawClient.connect(path)
            await client.send(request_bytes(target="/stream"))
            head = await client.next_event()
            assert isinstance(head, h11.Response) and head.status_code == 200
            streams.append(client)
        third = await get(path, "/stream")
        assert third.status == 429
        assert third.json()["error"]["code"] == "too_many_streams"
        admin["now"] = True
        client = await RawClient.connect(path)
        await client.send(request_bytes(target="/stream"))
        head = await client.next_event()
        assert isinstance(head, h11.Response) and head.status_code == 200
        for open_stream in [*streams, client]:
            await open_stream.aclose()
