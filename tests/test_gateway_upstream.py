"""The front door's upstream client (daemon/gateway/upstream.py) on its own."""

from __future__ import annotations

import json

import anyio
import pytest

from daemon.gateway.upstream import TransportError, UpstreamPool
from daemon.testing.chat_fakes import ChatOpenAI

pytestmark = pytest.mark.anyio

BODY = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
HEADERS = [(b"content-type", b"application/json")]


async def _read(pool: UpstreamPool, url: str) -> tuple[int, bytes]:
    response = await pool.request("POST", url, HEADERS, BODY)
    body = b""
    try:
        while (chunk := await response.next_chunk(1.0)) is not None:
            body += chunk
    finally:
        await response.aclose()
    return response.status, body


async def test_connections_are_kept_alive_and_reused():
    async with ChatOpenAI(["m"], flavor="vllm") as fake, UpstreamPool() as pool:
        url = f"{fake.url}/v1/chat/completions"
        for _ in range(3):
            status, body = await _read(pool, url)
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert pool.idle_connections == 1


async def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error():
    async with ChatOpenAI(["m"], flavor="vllm") as fake, UpstreamPool() as pool:
        url = f"{fake.url}/v1/chat/completions"
        await _read(pool, url)
        await fake.aset_mode("down")  # drops every open connection: the pooled one is dead
        await fake.aset_mode("normal")
        status, _ = await _read(pool, url)
    assert status == 200


async def test_an_answer_not_read_to_its_end_closes_its_connection():
    async with ChatOpenAI(["m"], flavor="vllm", tokens=50, chunk_interval=0.01) as fake, \
            UpstreamPool() as pool:
        response = await pool.request("POST", f"{fake.url}/v1/chat/completions", HEADERS, BODY)
        assert await response.next_chunk() is not None
        await response.aclose()
        assert pool.idle_connections == 0
        with anyio.fail_after(1):
            while fake.streams_closed_by_client == 0:
                await anyio.sleep(0.01)


async def test_refused_and_cut_connections_are_transport_errors_with_a_reason():
    async with ChatOpenAI(["m"], flavor="vllm", tokens=8) as fake, UpstreamPool() as pool:
        url = f"{fake.url}/v1/chat/completions"
        fake.set_chat_fault("die_midstream")
        with pytest.raises(TransportError) as cut:
            await _read(pool, url)
        await fake.aset_mode("down")
        with pytest.raises(TransportError) as refused:
            await pool.request("POST", url, HEADERS, BODY)
    assert refused.value.reason == "connection refused"
    assert cut.value.reason in ("connection reset by peer",
                                "server closed the connection before the reply was complete")
