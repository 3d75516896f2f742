"""Prober and ProbeContext: isolation from probe bugs, deadlines, caps, single flight."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest
import structlog
from fakes_fixtures import running_prober, spec

from daemon import __version__
from daemon.core.model import ModelSpec, ProbeResult, ProbeStatus
from daemon.core.settings import ProbeConfig
from daemon.probing.context import Probe, ProbeContext, SingleFlight, make_http_client
from daemon.probing.prober import Prober
from daemon.probing.replies import Reply, UpstreamError
from daemon.testing.fakes import FakeOpenAI


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


class FixedProbe:
    def __init__(self, result: Any) -> None:
        self.result = result

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> Any:
        return self.result


class RaisingProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        raise ValueError("bad upstream name\nsecond line")


class HangingProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class SlowProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        await anyio.sleep(0.05)
        return ProbeResult.healthy()


def prober_with(probes: dict[str, Any], timeout: float = 0.3) -> Prober:
    config = ProbeConfig(timeout=timeout)
    return Prober(probes, httpx.AsyncClient(), config)


async def test_unknown_provider_fails_naming_it_and_the_known_ones() -> None:
    result = await prober_with({"openai": FixedProbe(ProbeResult.healthy())}).run(
        spec(provider="vllm-special")
    )
    assert result.status is ProbeStatus.FAILED
    assert result.reason == 'no probe plugin registered for provider "vllm-special" ' \
                            "(known: openai)"


async def test_a_probe_that_raises_becomes_a_one_line_failure() -> None:
    with structlog.testing.capture_logs() as logs:
        result = await prober_with({"p": RaisingProbe()}).run(spec(provider="p"))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "probe raised ValueError: bad upstream name second line"
    assert result.latency_ms is not None
    assert [e["event"] for e in logs] == ["probe_raised"]
    assert logs[0]["model_id"] == "m" and logs[0]["provider"] == "p"


async def test_a_probe_that_hangs_times_out_on_the_deadline() -> None:
    started = time.perf_counter()
    result = await prober_with({"p": HangingProbe()}, timeout=0.2).run(spec(provider="p"))
    took = time.perf_counter() - started
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "timed out after 0.2s"
    assert 0.2 <= took < 0.5
    assert result.latency_ms is not None and result.latency_ms >= 200


async def test_a_hanging_probe_does_not_disturb_the_others() -> None:
    prober = prober_with({"hang": HangingProbe(), "ok": SlowProbe()}, timeout=0.3)
    results: dict[str, ProbeResult] = {}

    async def run(model_id: str, provider: str) -> None:
        results[model_id] = await prober.run(spec(model_id, provider=provider))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "h", "hang")
        tg.start_soon(run, "o", "ok")
        tg.start_soon(run, "u", "unknown")
    assert results["o"].status is ProbeStatus.OK
    assert results["h"].reason == "timed out after 0.3s"
    assert results["u"].status is ProbeStatus.FAILED
    assert time.perf_counter() - started < 0.6


@pytest.mark.parametrize(("value", "name"), [(None, "NoneType"), ({"ok": True}, "dict")])
async def test_a_wrong_return_type_fails_naming_the_type(value: Any, name: str) -> None:
    result = await prober_with({"p": FixedProbe(value)}).run(spec(provider="p"))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == f"probe returned {name}, not ProbeResult"


async def test_latency_is_filled_in_only_when_the_probe_left_it_empty() -> None:
    prober = prober_with({"slow": SlowProbe(), "fixed": FixedProbe(ProbeResult.healthy(7.0))})
    slow = await prober.run(spec(provider="slow"))
    fixed = await prober.run(spec(provider="fixed"))
    assert slow.latency_ms is not None and slow.latency_ms >= 50
    assert fixed.latency_ms == 7.0


async def test_cancellation_propagates_out_of_run() -> None:
    prober = prober_with({"p": HangingProbe()}, timeout=10)
    with anyio.move_on_after(0.1) as scope:
        await prober.run(spec(provider="p"))
        raise AssertionError("run returned under cancellation")
    assert scope.cancelled_caught


async def test_deep_defaults_to_the_spec_and_can_be_forced() -> None:
    seen: list[bool] = []

    class Recorder:
        async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
            seen.append(ctx.deep)
            return ProbeResult.healthy()

    prober = prober_with({"p": Recorder()})
    await prober.run(spec(provider="p", deep=True))
    await prober.run(spec(provider="p", deep=True), deep=False)
    await prober.run(spec(provider="p"), deep=True)
    assert seen == [True, False, True]


async def test_probes_mapping_can_be_swapped_on_reload() -> None:
    prober = prober_with({"a": FixedProbe(ProbeResult.healthy())})
    assert (await prober.run(spec(provider="b"))).status is ProbeStatus.FAILED
    prober.probes = {"b": FixedProbe(ProbeResult.healthy())}
    assert (await prober.run(spec(provider="b"))).status is ProbeStatus.OK


async def test_an_echoed_api_key_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_FOR_TEST", "sk-echo-123456")
    echo = FixedProbe(
        ProbeResult.failure("server said sk-echo-123456 is bad", note="sk-echo-123456")
    )
    result = await prober_with({"p": echo}).run(spec(provider="p", api_key_env="KEY_FOR_TEST"))
    assert result.reason == "server said *** is bad"
    assert result.facts["note"] == "***"


def test_probe_protocol_matches_the_builtins() -> None:
    from plugins.local_file import LocalFileProbe
    from plugins.ollama import OllamaProbe
    from plugins.openai import OpenAIProbe

    for probe in (OpenAIProbe(), OllamaProbe(), LocalFileProbe()):
        assert isinstance(probe, Probe)


# ----------------------------------------------------------------------------- the client


async def test_http_client_is_configured_for_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would break every request
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    config = ProbeConfig(timeout=2.5, max_concurrent=7)
    async with make_http_client(config) as client, FakeOpenAI(["m"]) as fake:
        assert client.follow_redirects is False
        assert client.timeout == httpx.Timeout(2.5)
        assert client.headers["user-agent"] == f"modeld/{__version__} (pid {os.getpid()})"
        fake.set_mode("redirect")
        response = await client.get(fake.url + "/v1/models")
        assert response.status_code == 302  # not followed
        fake.set_mode("normal")
        assert (await client.get(fake.url + "/v1/models")).status_code == 200  # no proxy


async def test_403_from_a_mock_transport_is_unauthorized() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k3y-value"
        return httpx.Response(403, json={"error": {"message": "forbidden"}})

    config = ProbeConfig(timeout=1)
    client = make_http_client(config, transport=httpx.MockTransport(handler))
    from fakes_fixtures import builtin_probes

    async with client:
        prober = Prober(builtin_probes(), client, config)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("K_ENV", "k3y-value")
            result = await prober.run(spec(endpoint="http://upstream.test", api_key_env="K_ENV"))
    assert result.reason == "unauthorized (check api_key_env)"
    assert result.facts["http_status"] == 403


# ----------------------------------------------------------------------------- the context


async def test_declared_content_length_over_the_cap_fails_before_reading() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 2048, headers={"content-type": "text/plain"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        ctx = ProbeContext(client, timeout=1.0, max_response_bytes=1024)
        with pytest.raises(UpstreamError) as caught:
            await ctx.get_json("http://upstream.test/x")
    assert caught.value.reason == "response too large (> 1024 bytes)"


async def test_reply_parses_json_once_and_reports_what_is_wrong() -> None:
    bodies = {
        "/ok": (200, b'{"a": 1}', "application/json"),
        "/empty": (200, b"", "application/json"),
        "/html": (502, b"<html><body>Bad Gateway</body></html>", "text/html"),
        "/bad": (200, b"{nope", "application/json"),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        status, body, kind = bodies[request.url.path]
        return httpx.Response(status, content=body, headers={"content-type": kind})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        ctx = ProbeContext(client, timeout=1.0)
        ok, empty, html, bad = [await ctx.get_json(f"http://u.test{p}") for p in bodies]
    assert ok.json() == {"a": 1} and ok.ok
    assert empty.json_error == "empty body"
    assert html.json_error == "HTML page instead of JSON" and html.is_html
    assert bad.json_error is not None and bad.json_error.startswith("invalid JSON: ")
    with pytest.raises(UpstreamError, match="invalid JSON"):
        bad.json()


async def test_concurrent_identical_requests_share_one_exchange() -> None:
    async with FakeOpenAI(["m"], latency=0.05) as fake, httpx.AsyncClient() as client:
        flights = SingleFlight()
        replies: list[Reply] = []

        async def get(headers: dict[str, str] | None) -> None:
            ctx = ProbeContext(client, timeout=2.0, flights=flights)
            replies.append(await ctx.get_json(fake.url + "/v1/models", headers=headers))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(get, None)
            for _ in range(5):
                tg.start_soon(get, {"Authorization": "Bearer other"})
        assert fake.count("GET", "/v1/models") == 2  # one per distinct header set
        assert len({id(r) for r in replies}) == 2
        assert len(flights) == 0


async def test_followers_carry_on_when_the_leader_is_cancelled() -> None:
    async with FakeOpenAI(["m"], latency=0.2) as fake, httpx.AsyncClient() as client:
        flights = SingleFlight()
        results: list[Reply] = []

        async def leader() -> None:
            ctx = ProbeContext(client, timeout=0.1, flights=flights)  # gives up first
            with pytest.raises(UpstreamError, match=r"timed out after 0\.1s"):
                await ctx.get_json(fake.url + "/v1/models")

        async def follower() -> None:
            await anyio.sleep(0.01)
            ctx = ProbeContext(client, timeout=2.0, flights=flights)
            results.append(await ctx.get_json(fake.url + "/v1/models"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            tg.start_soon(follower)
            tg.start_soon(follower)
    assert [r.status for r in results] == [200, 200]
    assert fake.count("GET", "/v1/models") == 2  # the cancelled flight and one retry


async def test_failures_are_shared_too() -> None:
    async with FakeOpenAI(["m"]) as fake, httpx.AsyncClient() as client:
        await fake.aset_mode("down")
        flights = SingleFlight()
        reasons: list[str] = []

        async def get() -> None:
            ctx = ProbeContext(client, timeout=1.0, flights=flights)
            try:
                await ctx.get_json(fake.url + "/v1/models")
            except UpstreamError as exc:
                reasons.append(exc.reason)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(get)
    assert reasons == ["connection refused"] * 5


async def test_a_dripping_body_is_cut_at_the_deadline_not_per_read() -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober(timeout=0.4) as prober:
        fake.drip_interval = 0.02  # each read is quick: only an overall deadline stops it
        fake.set_mode("drip")
        started = time.perf_counter()
        result = await prober.run(spec(endpoint=fake.url))
    assert result.reason == "timed out after 0.4s"
    assert time.perf_counter() - started < 0.8


async def test_exactly_the_cap_is_allowed() -> None:
    body = b'{"object":"list","data":[]}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        ctx = ProbeContext(client, timeout=1.0, max_response_bytes=len(body))
        reply = await ctx.get_json("http://u.test/v1/models")
        assert reply.json() == {"object": "list", "data": []}
        ctx = ProbeContext(client, timeout=1.0, max_response_bytes=len(body) - 1)
        with pytest.raises(UpstreamError, match="too large"):
            await ctx.get_json("http://u.test/v1/models")


def test_probes_type_is_the_protocol() -> None:
    probe: Probe = FixedProbe(ProbeResult.healthy())
    assert isinstance(probe, Probe)


async def test_requests_in_flight_are_bounded_by_max_concurrent() -> None:
    async with (
        FakeOpenAI(["m"], latency=0.1) as a,
        FakeOpenAI(["m"], latency=0.1) as b,
        FakeOpenAI(["m"], latency=0.1) as c,
        FakeOpenAI(["m"], latency=0.1) as d,
        running_prober(max_concurrent=2, timeout=2.0) as prober,
    ):
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for fake in (a, b, c, d):
                for _ in range(5):  # followers of a flight do not take a slot
                    tg.start_soon(prober.run, spec(endpoint=fake.url))
        took = time.perf_counter() - started
    assert 0.2 <= took < 0.6  # two rounds of two requests
    assert [fake.count("GET", "/v1/models") for fake in (a, b, c, d)] == [1, 1, 1, 1]


async def test_context_requests_are_bounded_by_the_deadline_even_while_bytes_trickle() -> None:
    async with FakeOpenAI(["m"]) as fake, httpx.AsyncClient() as client:
        fake.drip_interval = 0.02  # httpx's per-read timeout alone would never fire
        fake.set_mode("drip")
        ctx = ProbeContext(client, timeout=0.3)
        started = time.perf_counter()
        with pytest.raises(UpstreamError) as shared:
            await ctx.get_json(fake.url + "/v1/models")
        ctx = ProbeContext(client, timeout=0.3)
        with pytest.raises(UpstreamError) as unshared:
            await ctx.request("POST", fake.url + "/v1/chat/completions",
                              json={"model": "m", "messages": []})
    assert shared.value.reason == unshared.value.reason == "timed out after 0.3s"
    assert time.perf_counter() - started < 0.9


@pytest.mark.parametrize(("built", "status", "reason"), [
    (ProbeResult("ok", 1.0), ProbeStatus.OK, ""),  # type: ignore[arg-type]
    (ProbeResult("bogus", 1.0), ProbeStatus.FAILED, "invalid status"),  # type: ignore[arg-type]
    (ProbeResult(ProbeStatus.OK, "fast"), ProbeStatus.OK, ""),  # type: ignore[arg-type]
    (ProbeResult(ProbeStatus.OK, float("nan")), ProbeStatus.OK, ""),
    (ProbeResult(ProbeStatus.FAILED, -3.0, None), ProbeStatus.FAILED, "None"),  # type: ignore
    (ProbeResult(ProbeStatus.OK, 1.0, "x\ny", None), ProbeStatus.OK, "x y"),  # type: ignore
])
async def test_a_malformed_probe_result_is_normalised_never_passed_on(
        built: ProbeResult, status: ProbeStatus, reason: str) -> None:
    # each of these crashed the daemon further down (metrics, masking, the state encoder)
    result = await prober_with({"p": FixedProbe(built)}).run(spec(provider="p"))
    assert result.status is status
    assert reason in result.reason and "\n" not in result.reason
    assert isinstance(result.latency_ms, float) and result.latency_ms >= 0
    assert isinstance(result.facts, Mapping)


async def test_facts_are_made_json_safe() -> None:
    built = ProbeResult.healthy(1.0, inf=float("inf"), obj=object(), items=(1, "a"), n=None)
    result = await prober_with({"p": FixedProbe(built)}).run(spec(provider="p"))
    assert result.facts["inf"] == "inf" and result.facts["items"] == [1, "a"]
    assert isinstance(result.facts["obj"], str) and result.facts["n"] is None
    json.dumps(dict(result.facts), allow_nan=False)


class SecretRaisingProbe:
    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        raise RuntimeError(f"upstream rejected key {os.environ['KEY_FOR_TEST']!r}")


@pytest.mark.parametrize("key", ["sk-SECRET-1234", "sk-SECRET-abcdef\n", "sk-SECRET-x\r\n"])
async def test_a_key_echoed_in_an_exception_is_masked_in_the_log_and_the_reason(
        monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("KEY_FOR_TEST", key)
    with structlog.testing.capture_logs() as logs:
        result = await prober_with({"p": SecretRaisingProbe()}).run(
            spec(provider="p", api_key_env="KEY_FOR_TEST"))
    assert "SECRET" not in result.reason and "***" in result.reason
    assert "SECRET" not in json.dumps(logs, default=str)


async def test_get_json_many_shares_each_request_and_answers_in_order() -> None:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        await anyio.sleep(0.05)
        if request.url.path == "/down":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"path": request.url.path})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        flights = SingleFlight()
        answers: list[list[Reply | UpstreamError]] = []

        async def sweep_member() -> None:
            ctx = ProbeContext(client, timeout=1.0, flights=flights)
            answers.append(await ctx.get_json_many(
                ["http://u.test/v1/models", "http://u.test/health", "http://u.test/down"]))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(sweep_member)
    assert sorted(seen) == ["/down", "/health", "/v1/models"]  # one each for all ten
    for listing, health, down in answers:
        assert isinstance(listing, Reply) and listing.json() == {"path": "/v1/models"}
        assert isinstance(health, Reply) and health.json() == {"path": "/health"}
        assert isinstance(down, UpstreamError) and down.reason == "connection refused"
    assert len(flights) == 0
