"""Tests of the example plugin ``http_health``, written as a plugin author would: no server,
the probe's requests answered by a handler through ``daemon.testing``."""

from __future__ import annotations

import httpx
from http_health import HttpHealthProbe

from daemon import ModelSpec, ProbeStatus
from daemon.testing import run_probe

SPEC = ModelSpec(id="qwen2.5-7b", provider="http_health", endpoint="http://127.0.0.1:8000")


async def test_200_is_healthy() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/health"
        return httpx.Response(200, json={"status": "ok"})

    result = await run_probe(HttpHealthProbe(), SPEC, handler)
    assert result.status is ProbeStatus.OK


async def test_a_loading_503_is_degraded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": 503, "message": "Loading model",
                                                   "type": "unavailable_error"}})

    result = await run_probe(HttpHealthProbe(), SPEC, handler)
    assert (result.status, result.reason) == (ProbeStatus.DEGRADED, "loading")


async def test_a_refused_connection_fails_with_its_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    result = await run_probe(HttpHealthProbe(), SPEC, handler)
    assert (result.status, result.reason) == (ProbeStatus.FAILED, "connection refused")
