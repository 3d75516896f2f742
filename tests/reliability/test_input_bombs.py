"""Decompression bombs from a probed server: probes ask for identity and cap *decoded* bytes.

A server may ignore ``Accept-Encoding: identity`` and send a body compressed once or twice
(``Content-Encoding: gzip, gzip``): a few kB on the wire that inflate to gigabytes. httpx
inflates each layer of each network chunk completely before the size cap is checked, so the
daemon's memory and event loop went with it. The probe context now decodes the raw stream
itself, layer by layer, in bounded pieces, and stops at ``max_response_bytes`` of decoded
bytes (and of intermediate bytes at every layer).

The bombs here decode to 32 MB (enough to show the difference: before the fix, tracemalloc's
peak was above 32 MB and the reply was accepted or failed only after inflating everything);
``tests/bench/bench_input_bombs.py`` measures RSS and event-loop block with a 1 GB bomb.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import tracemalloc
import zlib
from typing import Any

import anyio
import httpx
import pytest

from daemon.core.settings import ProbeConfig
from daemon.probing.context import ProbeContext, make_http_client
from daemon.probing.replies import UpstreamError

pytestmark = pytest.mark.anyio

DECODED = 32 * 1024 * 1024
CAP = 1024 * 1024
#: what a capped read may allocate: the cap, a few pieces of every layer, httpx's own buffers
PEAK_LIMIT = 6 * 1024 * 1024


def zeros_gzip(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed (streamed, so building a bomb costs no memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    parts.append(packer.flush())
    return b"".join(parts)


SINGLE = zeros_gzip(DECODED)
DOUBLE = gzip.compress(SINGLE, 9)


def bomb_client(body: bytes, encoding: str, seen: list[httpx.Request]) -> httpx.AsyncClient:
    async def chunks() -> Any:  # streamed like a socket's reads, not preloaded
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=chunks(), headers={
            "content-type": "application/json", "content-encoding": encoding})
    return make_http_client(ProbeConfig(), transport=httpx.MockTransport(handler))


async def peak_of_get(client: httpx.AsyncClient,
                      url: str = "http://upstream.test/v1/models") -> tuple[int, str]:
    """tracemalloc's peak while one capped GET runs, and the error it ended with."""
    ctx = ProbeContext(client, timeout=10.0, max_response_bytes=CAP)
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamError) as raised:
            await ctx.get_json(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, raised.value.reason


@pytest.mark.parametrize(("body", "encoding"), [(DOUBLE, "gzip, gzip"), (SINGLE, "gzip")],
                         ids=["double-gzip", "single-gzip"])
async def test_gzip_bomb_is_refused_before_it_inflates(body: bytes, encoding: str) -> None:
    seen: list[httpx.Request] = []
    async with bomb_client(body, encoding, seen) as client:
        peak, reason = await peak_of_get(client)
    assert "too large" in reason and str(CAP) in reason, reason
    assert peak < PEAK_LIMIT, f"{peak / 1e6:.1f} MB allocated for a {len(body)}-byte bomb"


async def test_probes_ask_for_identity_encoding() -> None:
    seen: list[httpx.Request] = []
    async with bomb_client(b"{}", "identity", seen) as client:
        ctx = ProbeContext(client, timeout=5.0)
        reply = await ctx.get_json("http://upstream.test/v1/models")
    assert reply.data == {}
    assert seen[0].headers["accept-encoding"] == "identity"


async def test_compressed_reply_within_the_cap_is_decoded() -> None:
    document = {"data": [{"id": f"m{i}", "owned_by": "vllm"} for i in range(2000)]}
    raw = json.dumps(document).encode()
    cases: list[tuple[bytes, str]] = [
        (gzip.compress(raw), "gzip"),
        (gzip.compress(gzip.compress(raw)), "gzip, gzip"),
        (zlib.compress(raw), "deflate"),
        (zlib.compress(raw)[2:-4], "deflate"),  # raw deflate, as some servers send it
    ]
    for body, encoding in cases:
        async with bomb_client(body, encoding, []) as client:
            reply = await ProbeContext(client, timeout=5.0).get_json("http://u.test/x")
        assert reply.data == document, encoding
        assert reply.body == raw


async def test_an_empty_body_with_a_content_encoding_is_empty() -> None:
    async with bomb_client(b"", "gzip", []) as client:
        reply = await ProbeContext(client, timeout=5.0).request("GET", "http://u.test/health")
    assert reply.status == 200 and reply.body == b""


async def test_unknown_content_encoding_is_a_clear_failure() -> None:
    async with bomb_client(b"\x28\xb5\x2f\xfd", "zstd", []) as client:
        with pytest.raises(UpstreamError, match=r"Content-Encoding.*zstd"):
            await ProbeContext(client, timeout=5.0).get_json("http://u.test/x")


async def test_corrupt_gzip_is_a_clear_failure() -> None:
    async with bomb_client(b"\x1f\x8b\x08\x00garbage", "gzip", []) as client:
        with pytest.raises(UpstreamError, match=r"gzip"):
            await ProbeContext(client, timeout=5.0).get_json("http://u.test/x")


async def bomb_server(received: list[bytes], *, task_status: Any) -> None:
    """A loopback server answering every request with the double-gzip bomb."""
    async def answer(stream: Any) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive(65536)
            received.append(request)
            head = (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    f"content-encoding: gzip, gzip\r\ncontent-length: {len(DOUBLE)}\r\n"
                    "connection: close\r\n\r\n").encode()
            await stream.send(head + DOUBLE)

    async def serve(stream: Any) -> None:
        # the client hangs up once it has read enough: that is the point
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await answer(stream)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(serve)


async def test_a_plugin_using_the_client_directly_never_inflates_a_bomb() -> None:
    """``ctx.client`` is part of the plugin API: httpx must not decode behind its back."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(bomb_server, [])
        async with make_http_client(ProbeConfig()) as client:
            tracemalloc.start()
            try:
                response = await client.get(f"http://127.0.0.1:{port}/v1/models")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        tg.cancel_scope.cancel()
    assert response.content == DOUBLE  # the bytes as sent, small
    assert response.headers["x-modeld-content-encoding"] == "gzip, gzip"
    assert peak < PEAK_LIMIT, f"{peak / 1e6:.1f} MB allocated"


async def test_double_gzip_bomb_over_a_real_socket_is_capped() -> None:
    """The same bomb from a real loopback server, as a probed vLLM would send it."""
    received: list[bytes] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(bomb_server, received)
        async with make_http_client(ProbeConfig()) as client:
            peak, reason = await peak_of_get(client, f"http://127.0.0.1:{port}/v1/models")
        tg.cancel_scope.cancel()
    assert "too large" in reason, reason
    assert peak < PEAK_LIMIT, f"{peak / 1e6:.1f} MB allocated"
    assert b"accept-encoding: identity" in received[0].lower()


def test_the_daemon_probing_a_bomb_stays_small_and_answers_promptly(workdir: Any) -> None:
    """The real daemon probes a server that answers every request with a 128 MB double-gzip
    bomb, every 200 ms; its RSS stays under 150 MB and ``resolve`` answers within 100 ms
    (before: each probe inflated the whole bomb, ~260 MB and ~1 s of blocked event loop)."""
    import http.server
    import threading
    import time

    from reliability_support import clean_env, proc_status_kb

    from daemon.testing.fakes import write_gguf
    from daemon.testing.harness import DaemonProcess, daemon_config

    bomb = gzip.compress(zeros_gzip(128 * 1024 * 1024), 9)

    class Bomb(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip, gzip")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bomb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gguf = write_gguf(workdir / "ok.gguf")
        config = daemon_config(workdir, [
            {"id": "ok", "provider": "local_file", "local_path": str(gguf), "role": "chat",
             "primary": True},
            {"id": "bomb", "provider": "openai", "role": "chat",
             "endpoint": f"http://127.0.0.1:{server.server_port}"},
        ], probe={"interval": "200ms", "recheck_interval": "100ms", "timeout": "3s"})
        with DaemonProcess(workdir, config, env=clean_env()) as daemon:
            daemon.wait_health("ok", "healthy")
            daemon.wait_health("bomb", "unavailable", timeout=15)
            worst, peak = 0.0, 0
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                t0 = time.perf_counter()
                assert daemon.get("/api/v1/resolve?role=chat")["model_id"] == "ok"
                worst = max(worst, time.perf_counter() - t0)
                peak = max(peak, proc_status_kb(daemon.pid))
                time.sleep(0.02)
            reason = daemon.model("bomb")["last_probe"]["reason"]
    finally:
        server.shutdown()
        server.server_close()
    assert "too large" in reason, reason
    assert peak < 150 * 1024, f"VmRSS reached {peak / 1024:.0f} MB"
    assert worst < 0.1, f"resolve took {worst * 1000:.0f} ms"
