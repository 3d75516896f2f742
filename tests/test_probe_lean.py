"""Probe requests on the h11 pool (ProbeClient.lean): what they send, what they keep, and
which requests stay on httpx. A real HTTP server on 127.0.0.1 records the raw requests."""

from __future__ import annotations

import gzip
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from daemon import __version__
from daemon.core.settings import ProbeConfig
from daemon.probing.context import (
    RAW_ENCODING_HEADER,
    ProbeClient,
    ProbeContext,
    _lean_fits,
    make_http_client,
)
from daemon.probing.replies import UpstreamError


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingServer:
    """Answers every request on a connection with ``response`` (raw bytes), keeping the
    connection open; records each request head and counts the connections accepted."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.heads: list[bytes] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                conn.sendall(self.response)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server_with() -> Iterator[list[RecordingServer]]:
    made: list[RecordingServer] = []
    yield made
    for server in made:
        server.close()


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}",
             "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request_headers(head: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    return out


@pytest.mark.anyio
async def test_plain_http_requests_use_the_pool_with_the_probe_headers_and_keep_alive(
    server_with: list[RecordingServer],
) -> None:
    server = RecordingServer(response(b'{"data": []}', "Set-Cookie: a=1", "Set-Cookie: b=2"))
    server_with.append(server)
    async with make_http_client(ProbeConfig()) as client:
        assert isinstance(client, ProbeClient) and client.lean is not None
        for _ in range(2):
            ctx = ProbeContext(client, timeout=2.0)
            reply = await ctx.get_json(f"{server.url}/v1/models",
                                       headers={"Authorization": "Bearer k-123"})
            assert reply.status == 200 and reply.json() == {"data": []}
            assert reply.headers["set-cookie"] == "a=1, b=2"  # joined, as httpx gives them
        assert client.lean.idle_connections == 1  # went through the pool, kept alive
    assert server.connections == 1 and len(server.heads) == 2
    for head in server.heads:
        assert head.startswith(b"GET /v1/models HTTP/1.1")
        sent = request_headers(head)
        assert sent["user-agent"] == [f"modeld/{__version__} "
                                      f"(pid {os.getpid()})"]
        assert sent["accept-encoding"] == ["identity"]
        assert sent["accept"] == ["application/json"]
        assert sent["authorization"] == ["Bearer k-123"]
        assert "cookie" not in sent


@pytest.mark.anyio
async def test_a_compressed_body_is_decoded_by_the_context_and_capped_once_decoded(
    server_with: list[RecordingServer],
) -> None:
    small = RecordingServer(response(gzip.compress(b'{"ok": true}'), "Content-Encoding: gzip"))
    bomb = RecordingServer(response(gzip.compress(b"0" * 2_000_000), "Content-Encoding: gzip"))
    server_with.extend([small, bomb])
    async with make_http_client(ProbeConfig()) as client:
        reply = await ProbeContext(client, timeout=2.0).get_json(f"{small.url}/health")
        assert reply.json() == {"ok": True}
        assert reply.headers[RAW_ENCODING_HEADER] == "gzip"
        assert "content-encoding" not in reply.headers
        ctx = ProbeContext(client, timeout=2.0, max_response_bytes=65536)
        with pytest.raises(UpstreamError, match=r"too large \(> 65536 bytes once decoded"):
            await ctx.get_json(f"{bomb.url}/health")
        # the answer arrived whole (only its decoding was too big): its connection is kept
        assert client.lean is not None and client.lean.idle_connections == 2


@pytest.mark.anyio
async def test_a_broken_answer_is_a_one_line_reason(
    server_with: list[RecordingServer],
) -> None:
    server = RecordingServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"da")
    server_with.append(server)
    async with make_http_client(ProbeConfig()) as client:
        ctx = ProbeContext(client, timeout=0.5)
        with pytest.raises(UpstreamError) as caught:
            await ctx.get_json(f"{server.url}/v1/models")
    assert caught.value.reason == "timed out after 0.5s"  # the body never completes


def test_only_plain_bodiless_requests_without_pool_owned_headers_take_the_pool() -> None:
    assert _lean_fits("GET", "http://h:1/v1/models", None, {"Accept": "x"})
    assert _lean_fits("HEAD", "http://h/", None, None)
    assert not _lean_fits("GET", "https://h/v1/models", None, None)  # TLS: httpx
    assert not _lean_fits("POST", "http://h/v1/chat", {"a": 1}, None)  # bodies: httpx
    assert not _lean_fits("GET", "http://u:p@h/v1/models", None, None)  # user info: httpx
    assert not _lean_fits("GET", "http://h/", None, {"User-Agent": "mine"})
    assert not _lean_fits("GET", "http://h/", None, {"host": "other"})
