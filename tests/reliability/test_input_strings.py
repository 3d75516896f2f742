"""Unbounded upstream facts: every string a server can put in memory, the state or the API is
capped, by one mechanism (``daemon.probing.limits``) where a result leaves the prober.

Before: ``owned_by`` and Ollama's strings were kept whole — 30 servers each sending a 900 kB
``owned_by`` made a 27 MB state file, rewritten on every flush. Here the built-in probes run
against real loopback servers (OpenAI-style and Ollama-style) that send 900 kB strings, and a
plugin returns the worst facts it can build; the state of 30 such models stays small.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fakes_fixtures import builtin_probes, spec

from daemon.config import parse_config
from daemon.core.model import ModelSpec, ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.core.settings import ProbeConfig
from daemon.persist.codec import to_state
from daemon.persist.store import StateStore
from daemon.probing.context import ProbeContext, make_http_client
from daemon.probing.limits import (
    MAX_FACT_ITEMS,
    MAX_FACT_KEY_CHARS,
    MAX_FACT_TEXT_CHARS,
    MAX_FACTS,
    MAX_FACTS_CHARS,
    MAX_REASON_CHARS,
)
from daemon.probing.prober import Prober

pytestmark = pytest.mark.anyio

HUGE = "x" * 900_000


def hostile_upstream(request: httpx.Request) -> httpx.Response:
    """An upstream that is OpenAI- and Ollama-shaped at once, every string 900 kB."""
    path = request.url.path
    if path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [
            {"id": "m", "object": "model", "owned_by": HUGE, "max_model_len": HUGE}]})
    if path == "/api/tags":
        details = {"family": HUGE, "parameter_size": HUGE, "quantization_level": HUGE,
                   "format": HUGE, "families": [HUGE] * 50}
        return httpx.Response(200, json={"models": [
            {"name": "m:latest", "model": "m:latest", "size": 10**300, "details": details}]})
    if path == "/api/ps":
        return httpx.Response(200, json={"models": [
            {"name": "m:latest", "model": "m:latest", "size_vram": HUGE, "expires_at": HUGE}]})
    return httpx.Response(404, content=b'{"error": "no \\ud800 model ' + HUGE.encode() + b'"}',
                          headers={"content-type": "application/json"})


class WorstFacts:
    """A plugin that puts everything it can in a result."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        facts: dict[str, Any] = {"nested": {"a": {"b": [HUGE] * 10_000}},
                                 "list": [HUGE] * 10_000, "big_int": 10**4000,
                                 "y" * 10_000: 1}
        facts.update({f"k{i}": HUGE for i in range(1000)})
        return ProbeResult.degraded(HUGE, 1.0, **facts)


def assert_bounded(result: ProbeResult) -> None:
    assert len(result.reason) <= MAX_REASON_CHARS
    assert len(result.facts) <= MAX_FACTS + 1  # + facts_dropped
    for key, value in result.facts.items():
        assert len(key) <= MAX_FACT_KEY_CHARS
        items = value if isinstance(value, list) else [value]
        assert len(items) <= MAX_FACT_ITEMS, key
        for item in items:
            assert len(item if isinstance(item, str) else json.dumps(item)) <= (
                MAX_FACT_TEXT_CHARS), key
    assert len(json.dumps(dict(result.facts))) < 3_000


async def run_probe(provider: str, model: str) -> ProbeResult:
    config = ProbeConfig(timeout=5.0, max_response_bytes=16 * 1024 * 1024)
    async with make_http_client(config, transport=httpx.MockTransport(hostile_upstream)) as c:
        prober = Prober(builtin_probes(), c, config)
        return await prober.run(spec("m", provider, endpoint="http://up.test", model=model))


@pytest.mark.parametrize(("provider", "model"), [("openai", "m"), ("ollama", "m:latest")])
async def test_builtin_probe_results_are_bounded_whatever_the_server_sends(
        provider: str, model: str) -> None:
    result = await run_probe(provider, model)
    assert_bounded(result)


async def test_a_plugin_cannot_bypass_the_bounds() -> None:
    config = ProbeConfig(timeout=5.0)
    async with make_http_client(config) as client:
        result = await Prober({"worst": WorstFacts()}, client, config).run(spec("m", "worst"))
    assert_bounded(result)
    assert result.facts["facts_dropped"] > 0
    assert isinstance(result.facts["big_int"], str) and "digits" in result.facts["big_int"]


async def test_thirty_hostile_servers_make_a_small_state(tmp_path: Any) -> None:
    result = await run_probe("openai", "m")
    config = parse_config({"models": [
        {"id": f"m{i}", "provider": "openai", "endpoint": f"http://10.0.0.{i}:8000"}
        for i in range(30)]}, "test.toml")
    registry = ModelRegistry(config, 1_700_000_000.0)
    for i in range(30):
        registry.apply_probe(f"m{i}", result, 1_700_000_000.0 + i)
    size = StateStore(tmp_path / "s.json").write(to_state(registry))
    assert size < 200_000, f"state of {size} bytes for 30 models"


async def test_an_upstream_error_with_a_lone_surrogate_becomes_a_usable_reason() -> None:
    config = ProbeConfig(timeout=5.0)
    async with make_http_client(config, transport=httpx.MockTransport(hostile_upstream)) as c:
        result = await Prober(builtin_probes(), c, config).run(
            spec("m", "openai", endpoint="http://up.test/missing"))
    assert result.status.value == "failed"
    result.reason.encode("utf-8")  # a log line or a reply can hold it
    assert len(result.reason) <= MAX_REASON_CHARS


def test_ordinary_facts_are_kept_whole() -> None:
    from daemon.probing.limits import bounded_facts

    facts = {"http_status": 200, "listed": 3, "owned_by": "vllm", "max_model_len": 131072,
             "family": "llama", "families": ["llama"], "parameter_size": "8.0B",
             "quantization_level": "Q4_K_M", "loaded": True, "size_vram": 5_000_000_000,
             "expires_at": "2026-12-02T07:00:00.000000000Z", "server": "vllm 0.6.3"}
    assert bounded_facts(facts) == facts
    assert len(json.dumps(facts)) < MAX_FACTS_CHARS


def test_an_outcome_observed_by_the_front_door_is_bounded_too(tmp_path: Any) -> None:
    from daemon.service.lifecycle import Daemon

    config = parse_config({
        "daemon": {"state_file": str(tmp_path / "state.json"),
                   "socket": str(tmp_path / "s.sock")},
        "models": [{"id": "a", "provider": "openai", "endpoint": "http://127.0.0.1:9",
                    "primary": True}]})
    daemon = Daemon(config, environ={})
    daemon._load_state()
    daemon.scheduler.observe("a", ProbeResult.failure(
        "upstream said: \ud800 " + HUGE, owned_by=HUGE))
    record = daemon.registry.models["a"].last_probe
    assert record is not None
    assert len(record.reason) <= MAX_REASON_CHARS
    record.reason.encode("utf-8")
    assert len(record.facts["owned_by"]) <= MAX_FACT_TEXT_CHARS
