"""The openai probe knows the server it talks to (issue 13): a dead vLLM engine, a warming
SGLang, a loading llama.cpp and an unhealthy TGI are told apart from a healthy listing, against
fakes that answer as the real servers do, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from fakes_fixtures import running_prober, spec

from daemon.config import ConfigError, parse_config
from daemon.core.health import HealthState, apply_probe
from daemon.core.model import OPENAI_SERVERS, HealthStatus, ProbeResult, ProbeStatus
from daemon.core.settings import HealthConfig
from daemon.testing.fakes import FLAVORS, FakeOpenAI, FakeResponse
from plugins.openai import READINESS

pytestmark = pytest.mark.anyio

#: flavor of the fake → what ``auto`` must detect
DETECTED = {"openai": "openai", "vllm": "vllm", "sglang": "sglang", "llamacpp": "llamacpp",
            "llama-cpp-python": "llama-cpp-python", "tgi": "tgi"}


def test_every_server_the_config_accepts_is_one_the_probe_knows() -> None:
    assert set(OPENAI_SERVERS) == {"auto", *READINESS}
    assert set(DETECTED) == set(FLAVORS)


def test_server_is_checked_by_the_config_with_a_clear_error() -> None:
    models: list[dict[str, Any]] = [
        {"id": "a", "provider": "openai", "endpoint": "http://h:1", "server": "vllm"},
        {"id": "b", "provider": "openai", "endpoint": "http://h:1", "server": "vlm"},
        {"id": "c", "provider": "ollama", "endpoint": "http://h:2", "server": "vllm"},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": models}, "modeld.toml")
    assert caught.value.errors == [
        'modeld.toml: models[1] (id "b").server: must be one of auto, vllm, sglang, llamacpp, '
        "tgi, llama-cpp-python, openai",
        'modeld.toml: models[2] (id "c").server: applies to provider "openai" only (it names '
        'the OpenAI-compatible server behind the endpoint), not "ollama"',
    ]
    plain = {"id": "d", "provider": "openai", "endpoint": "http://h:1"}
    config = parse_config({"models": [models[0], plain]})
    assert [m.server for m in config.models] == ["vllm", "auto"]


async def probe_all(prober: Any, url: str, names: list[str], **fields: Any) -> list[ProbeResult]:
    """One sweep: every model of the endpoint probed together, as the scheduler does."""
    results: dict[str, ProbeResult] = {}

    async def one(name: str) -> None:
        results[name] = await prober.run(spec(name, endpoint=url, **fields))

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
    return [results[n] for n in names]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_auto_detects_each_server_once_and_asks_at_most_two_requests_a_sweep(
        flavor: str) -> None:
    names = ["m0"] if flavor == "tgi" else ["m0", "m1", "m2"]
    async with FakeOpenAI(names, flavor=flavor) as fake, running_prober() as prober:
        first = await probe_all(prober, fake.url, names)
        after_first = fake.total_requests
        second = await probe_all(prober, fake.url, names)
    assert all(r.status is ProbeStatus.OK for r in first + second), first + second
    assert {r.facts["server"] for r in first + second} == {DETECTED[flavor]}
    readiness = 1 if READINESS[DETECTED[flavor]] else 0
    assert after_first == 1 + readiness  # detected from the listing: no /version
    assert fake.total_requests - after_first == 1 + readiness
    assert fake.count("GET", "/health") == 2 * readiness
    if readiness:
        assert all("ready_ms" in r.facts for r in second)


async def test_a_dead_vllm_engine_is_unavailable_though_its_listing_answers() -> None:
    async with FakeOpenAI(["qwen"], flavor="vllm") as fake, running_prober() as prober:
        healthy = await prober.run(spec("qwen", endpoint=fake.url))
        fake.set_mode("dead")
        results = [await prober.run(spec("qwen", endpoint=fake.url)) for _ in range(3)]
    assert healthy.ok
    dead = results[0]
    assert dead.status is ProbeStatus.FAILED
    assert dead.reason == ("engine dead: GET /health: HTTP 503 (the server lists its models "
                           "but cannot serve them)")
    assert dead.facts["http_status"] == 200 and dead.facts["server"] == "vllm"
    state = HealthState()
    for result in [healthy, *results]:
        state = apply_probe(state, result, HealthConfig(), 0.0)
    assert state.status is HealthStatus.UNAVAILABLE


async def test_a_warming_sglang_is_degraded_starting_not_healthy() -> None:
    async with FakeOpenAI(["qwen"], flavor="sglang") as fake, running_prober() as prober:
        fake.set_mode("loading")
        warming = await prober.run(spec("qwen", endpoint=fake.url))
        fake.set_mode("normal")
        ready = await prober.run(spec("qwen", endpoint=fake.url))
    assert warming.status is ProbeStatus.DEGRADED and warming.reason == "starting"
    assert warming.facts["readiness"] == "GET /health: HTTP 503"
    assert ready.status is ProbeStatus.OK


async def test_a_stuck_sglang_scheduler_fails_on_its_readiness_deadline() -> None:
    async with FakeOpenAI(["qwen"], flavor="sglang") as fake, \
            running_prober(timeout=0.3) as prober:
        fake.set_mode("dead")
        result = await prober.run(spec("qwen", endpoint=fake.url, server="sglang"))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "GET /health: timed out after 0.3s"


async def test_a_loading_llamacpp_is_degraded_loading_from_its_health() -> None:
    async with FakeOpenAI(["llama"], flavor="llamacpp") as fake, running_prober() as prober:
        fake.set_mode("loading")
        loading = await prober.run(spec("llama", endpoint=fake.url))
    assert loading.status is ProbeStatus.DEGRADED and loading.reason == "loading"
    assert loading.facts["server"] == "llamacpp"
    assert fake.count("GET", "/health") == 1


async def test_an_unhealthy_tgi_fails_quoting_its_answer() -> None:
    async with FakeOpenAI(["org/m"], flavor="tgi") as fake, running_prober() as prober:
        fake.set_mode("dead")
        result = await prober.run(spec("m", model="org/m", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "unhealthy: GET /health: HTTP 503: unhealthy"


async def test_a_named_server_is_asked_beside_the_listing_from_the_first_probe() -> None:
    async with FakeOpenAI(["qwen"], flavor="vllm", latency=0.1) as fake, \
            running_prober() as prober:
        fake.set_mode("dead")
        started = anyio.current_time()
        result = await prober.run(spec("qwen", endpoint=fake.url, server="vllm"))
        took = anyio.current_time() - started
    assert result.reason.startswith("engine dead")
    assert took < 0.19  # both requests at once, not one after the other (0.1 s each)


async def test_server_openai_trusts_the_listing_alone() -> None:
    async with FakeOpenAI(["qwen"], flavor="vllm") as fake, running_prober() as prober:
        fake.set_mode("dead")
        result = await prober.run(spec("qwen", endpoint=fake.url, server="openai"))
    assert result.status is ProbeStatus.OK and fake.count("GET", "/health") == 0


async def test_a_readiness_route_the_server_lacks_leaves_the_listing_to_decide() -> None:
    async with FakeOpenAI(["m"], flavor="llama-cpp-python") as fake, running_prober() as prober:
        named = await prober.run(spec("m", endpoint=fake.url, server="vllm"))
    assert named.status is ProbeStatus.OK and "ready_ms" not in named.facts
    assert fake.count("GET", "/health") == 1  # 404 {"detail": "Not Found"}


class RenamedVLLM(FakeOpenAI):
    """A vLLM-like FastAPI server whose listing does not name it (a fork): only /version can
    tell."""

    def _entry(self, name: str, *, loading: bool = False) -> dict[str, Any]:
        return {**super()._entry(name, loading=loading), "owned_by": "acme"}


async def test_auto_asks_version_once_when_the_listing_cannot_tell() -> None:
    async with RenamedVLLM(["m"], flavor="vllm") as fake, running_prober() as prober:
        first = await prober.run(spec("m", endpoint=fake.url))
        fake.set_mode("dead")
        second = await prober.run(spec("m", endpoint=fake.url))
    assert first.ok and first.facts["server"] == "vllm"
    assert second.reason.startswith("engine dead")
    assert fake.count("GET", "/version") == 1


async def test_a_server_that_names_itself_anew_is_detected_anew() -> None:
    async with FakeOpenAI(["m"], flavor="llama-cpp-python") as fake, \
            running_prober() as prober:
        before = await prober.run(spec("m", endpoint=fake.url))
        fake.flavor = "sglang"  # another server on the port: its listing says owned_by sglang
        fake.set_mode("loading")
        after = await prober.run(spec("m", endpoint=fake.url))
    assert before.facts["server"] == "llama-cpp-python"
    assert after.facts["server"] == "sglang" and after.reason == "starting"


@pytest.mark.parametrize("reasoning", ["empty", "limit_error"])
async def test_a_deep_probe_cut_at_the_token_limit_is_a_success(reasoning: str) -> None:
    flavor = "vllm" if reasoning == "empty" else "openai"
    async with FakeOpenAI(["r1"], flavor=flavor, reasoning=reasoning) as fake, \
            running_prober() as prober:
        result = await prober.run(spec("r1", endpoint=fake.url, deep=True))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["cut_at_limit"] is True and result.facts["deep"] is True
    if reasoning == "empty":
        assert result.facts["empty_content"] is True


async def test_a_deep_probe_of_a_dead_vllm_engine_quotes_its_500() -> None:
    async with FakeOpenAI(["m"], flavor="vllm") as fake, running_prober() as prober:
        fake.set_mode("dead")
        result = await prober.run(spec("m", endpoint=fake.url, deep=True))
    assert result.status is ProbeStatus.FAILED
    assert result.reason.startswith("POST /v1/chat/completions: HTTP 500: EngineCore "
                                    "encountered an issue")


class StrictBudget(FakeOpenAI):
    """A server that refuses the 1-token budget outright (a 400 that is no cut reply)."""

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytes) -> FakeResponse:
        if path == "/v1/chat/completions":
            return self.error_response(400, "max_tokens must be at least 16, got 1.")
        return super().route(method, path, headers, body)


async def test_another_400_in_a_deep_probe_is_still_a_failure() -> None:
    async with StrictBudget(["m"]) as fake, running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url, deep=True))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == ("POST /v1/chat/completions: HTTP 400: max_tokens must be at "
                             "least 16, got 1.")
