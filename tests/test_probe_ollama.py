"""The ollama probe against a fake Ollama server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import pytest
from fakes_fixtures import TIMEOUT, running_prober, spec

from daemon.core.model import ModelSpec, ProbeResult, ProbeStatus
from daemon.testing.fakes import FakeOllama, FakeResponse


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


def ollama(model_id: str, **fields: object) -> ModelSpec:
    return spec(model_id, provider="ollama", **fields)


async def test_loaded_model_is_healthy_with_vram_and_expiry() -> None:
    async with FakeOllama(["llama3:8b"], loaded=["llama3:8b"]) as fake, \
            running_prober() as prober:
        result = await prober.run(ollama("llama3:8b", endpoint=fake.url))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["loaded"] is True
    assert isinstance(result.facts["size_vram"], int) and result.facts["size_vram"] > 0
    assert "T" in result.facts["expires_at"]
    assert result.facts["quantization_level"] == "Q4_0"


async def test_present_but_not_loaded_is_healthy_with_loaded_false() -> None:
    async with FakeOllama(["llama3:8b"]) as fake, running_prober() as prober:
        result = await prober.run(ollama("llama3:8b", endpoint=fake.url))
    assert result.status is ProbeStatus.OK
    assert result.facts["loaded"] is False
    assert "size_vram" not in result.facts


@pytest.mark.parametrize(
    ("served", "configured"),
    [("llama3", "llama3"), ("llama3", "llama3:latest"), ("llama3:latest", "llama3"),
     ("library/qwen2:7b", "library/qwen2:7b")],
)
async def test_names_match_with_or_without_latest(served: str, configured: str) -> None:
    async with FakeOllama([served], loaded=[served]) as fake, running_prober() as prober:
        result = await prober.run(ollama("x", model=configured, endpoint=fake.url))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["loaded"] is True


async def test_a_missing_model_fails_naming_it() -> None:
    async with FakeOllama(["llama3:8b", "qwen2:7b"]) as fake, running_prober() as prober:
        result = await prober.run(ollama("mistral", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "model 'mistral' not found on the server (2 models pulled)"


async def test_fifty_models_on_one_server_cost_one_tags_and_one_ps_request() -> None:
    names = [f"model-{i}:7b" for i in range(50)]
    async with FakeOllama(names, loaded=names[:10], latency=0.05) as fake, \
            running_prober() as prober:
        results: dict[str, ProbeResult] = {}

        async def probe(name: str) -> None:
            results[name] = await prober.run(ollama(name, endpoint=fake.url))

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(probe, name)
    assert fake.count("GET", "/api/tags") == 1
    assert fake.count("GET", "/api/ps") == 1
    assert fake.total_requests == 2
    assert all(r.status is ProbeStatus.OK for r in results.values())
    assert sum(1 for r in results.values() if r.facts["loaded"]) == 10
    # nothing is cached after the flight: the next sweep asks again
    async with FakeOllama(names) as fake2, running_prober() as prober:
        await prober.run(ollama(names[0], endpoint=fake2.url))
        await prober.run(ollama(names[1], endpoint=fake2.url))
    assert fake2.count("GET", "/api/tags") == 2


async def test_deep_probe_generates_one_token_and_loads_the_model() -> None:
    async with FakeOllama(["llama3:8b"]) as fake, running_prober() as prober:
        result = await prober.run(ollama("llama3:8b", endpoint=fake.url), deep=True)
        after = await prober.run(ollama("llama3:8b", endpoint=fake.url))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["deep"] is True and result.facts["eval_count"] == 1
    body = fake.last_json("POST", "/api/generate")
    assert body["stream"] is False and body["options"] == {"num_predict": 1}
    assert body["model"] == "llama3:8b"
    assert after.facts["loaded"] is True


async def test_deep_probe_of_an_unknown_model_fails_with_ollamas_message() -> None:
    async with FakeOllama(["llama3:8b"]) as fake, running_prober() as prober:
        result = await prober.run(ollama("phi3", endpoint=fake.url, deep=True))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "model 'phi3' not found"
    assert result.facts["http_status"] == 404


async def test_removed_and_unloaded_models_are_seen_on_the_next_probe() -> None:
    async with FakeOllama(["a", "b"], loaded=["a"]) as fake, running_prober() as prober:
        fake.unload("a")
        fake.remove_model("b")
        a = await prober.run(ollama("a", endpoint=fake.url))
        b = await prober.run(ollama("b", endpoint=fake.url))
    assert a.ok and a.facts["loaded"] is False
    assert not b.ok


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("error500", ProbeStatus.FAILED,
         "GET /api/tags: HTTP 500: llama runner process has terminated: signal: killed"),
        ("loading", ProbeStatus.FAILED, "GET /api/tags: HTTP 503: server busy"),
        ("ratelimited", ProbeStatus.DEGRADED, "rate limited (HTTP 429)"),
        ("unauthorized", ProbeStatus.FAILED, "unauthorized (check api_key_env)"),
        ("html", ProbeStatus.FAILED, "GET /api/tags: HTTP 500 with an HTML page"),
        ("badjson", ProbeStatus.FAILED, "invalid JSON: "),
        ("redirect", ProbeStatus.FAILED, "redirected (HTTP 302) to /api/tags"),
        ("huge", ProbeStatus.FAILED, "response too large (> 1048576 bytes)"),
        ("reset", ProbeStatus.FAILED, "connection reset by peer"),
        ("down", ProbeStatus.FAILED, "connection refused"),
        ("hang", ProbeStatus.FAILED, f"timed out after {TIMEOUT:g}s"),
        ("drip", ProbeStatus.FAILED, f"timed out after {TIMEOUT:g}s"),
    ],
)
async def test_broken_servers_give_reasons(mode: str, status: ProbeStatus, reason: str) -> None:
    async with FakeOllama(["llama3"]) as fake, running_prober() as prober:
        fake.drip_interval = 0.05
        await fake.aset_mode(mode)
        result = await prober.run(ollama("llama3", endpoint=fake.url))
    assert result.status is status
    assert result.reason.startswith(reason), result.reason


async def test_a_server_without_api_ps_is_healthy_with_loaded_unknown() -> None:
    class OldOllama(FakeOllama):
        def route(
            self, method: str, path: str, headers: Mapping[str, str], body: bytes
        ) -> FakeResponse:
            if path == "/api/ps":
                return super().route(method, "/no-such-route", headers, body)  # 404
            return super().route(method, path, headers, body)

    async with OldOllama(["llama3"]) as fake, running_prober() as prober:
        result = await prober.run(ollama("llama3", endpoint=fake.url))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["loaded"] is None
