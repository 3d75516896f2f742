"""The openai probe against fake OpenAI-compatible servers on 127.0.0.1, quirks included."""

from __future__ import annotations

import time

import anyio
import pytest
import structlog
from fakes_fixtures import TIMEOUT, running_prober, spec

from daemon.core.model import ProbeStatus
from daemon.testing.fakes import FLAVORS, FakeOpenAI


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_listed_model_is_healthy_on_every_flavor(flavor: str) -> None:
    async with FakeOpenAI(["qwen2.5-7b", "llama3-8b"][: 1 if flavor == "tgi" else 2],
                          flavor=flavor) as fake, running_prober() as prober:
        result = await prober.run(spec("qwen2.5-7b", endpoint=fake.url))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["http_status"] == 200
    assert result.latency_ms is not None and result.latency_ms >= 0
    assert fake.count("GET", "/v1/models") == 1


async def test_vllm_extra_fields_become_facts() -> None:
    async with FakeOpenAI(["m"], flavor="vllm") as fake, running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.OK
    assert result.facts["max_model_len"] == 8192
    assert result.facts["owned_by"] == "vllm"


async def test_endpoint_given_with_v1_suffix_is_not_doubled() -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url + "/v1/"))
    assert result.ok, result.reason
    assert fake.count("GET", "/v1/models") == 1


async def test_tgi_single_model_answers_to_its_id_and_to_tgi() -> None:
    async with FakeOpenAI(["HuggingFaceH4/zephyr-7b-beta"], flavor="tgi") as fake, \
            running_prober() as prober:
        by_id = await prober.run(spec("z", model="HuggingFaceH4/zephyr-7b-beta",
                                      endpoint=fake.url))
        by_alias = await prober.run(spec("tgi", endpoint=fake.url))
        other = await prober.run(spec("other", endpoint=fake.url))
    assert by_id.ok and by_id.facts["owned_by"] == "HuggingFaceH4/zephyr-7b-beta"
    assert by_alias.ok
    assert not other.ok and 'lists HuggingFaceH4/zephyr-7b-beta' in other.reason


async def test_unlisted_model_fails_naming_what_is_listed() -> None:
    async with FakeOpenAI(["a", "b"], flavor="vllm") as fake, running_prober() as prober:
        result = await prober.run(spec("c", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == 'model "c" not listed by the server (it lists a, b)'


async def test_data_null_from_an_empty_server_means_not_listed() -> None:
    async with FakeOpenAI([], null_when_empty=True) as fake, running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url))
    assert fake.last_body("GET", "/v1/models") is None  # a GET: nothing sent
    assert result.status is ProbeStatus.FAILED
    assert result.reason == 'model "m" not listed by the server (it lists no models)'


async def test_llamacpp_meta_null_while_loading_is_degraded_loading() -> None:
    async with FakeOpenAI(["llama-3.1-8b"], flavor="llamacpp") as fake, \
            running_prober() as prober:
        fake.set_mode("loading")
        loading = await prober.run(spec("llama-3.1-8b", endpoint=fake.url))
        fake.set_mode("normal")
        ready = await prober.run(spec("llama-3.1-8b", endpoint=fake.url))
    assert loading.status is ProbeStatus.DEGRADED
    assert loading.reason == "loading"
    assert ready.status is ProbeStatus.OK


@pytest.mark.parametrize("flavor", ["openai", "llama-cpp-python", "vllm"])
async def test_503_loading_model_is_degraded_loading(flavor: str) -> None:
    async with FakeOpenAI(["m"], flavor=flavor) as fake, running_prober() as prober:
        fake.set_mode("loading")
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.DEGRADED
    assert result.reason == "loading"
    assert result.facts["http_status"] == 503


async def test_bearer_token_from_api_key_env_is_sent_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("FAKE_OPENAI_KEY", secret)
    async with FakeOpenAI(["m"], api_key=secret) as fake, running_prober() as prober:
        with structlog.testing.capture_logs() as logs:
            good = await prober.run(spec("m", endpoint=fake.url, api_key_env="FAKE_OPENAI_KEY"))
            monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-wrong-key-000")
            bad = await prober.run(spec("m", endpoint=fake.url, api_key_env="FAKE_OPENAI_KEY"))
            fake.set_mode("hang")
            hung = await prober.run(spec("m", endpoint=fake.url, api_key_env="FAKE_OPENAI_KEY"))
    assert good.status is ProbeStatus.OK, good.reason
    assert bad.status is ProbeStatus.FAILED
    assert bad.reason == "unauthorized (check api_key_env)"
    assert bad.facts["http_status"] == 401
    assert hung.status is ProbeStatus.FAILED
    for text in [repr(good), repr(bad), repr(hung), repr(logs)]:
        assert secret not in text and "sk-wrong-key-000" not in text


async def test_missing_api_key_env_fails_without_a_request() -> None:
    async with FakeOpenAI(["m"], api_key="k") as fake, running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url, api_key_env="NO_SUCH_VAR_X1"))
    assert result.status is ProbeStatus.FAILED
    assert "NO_SUCH_VAR_X1" in result.reason and "not set" in result.reason
    assert fake.total_requests == 0


@pytest.mark.parametrize("flavor", ["openai", "vllm", "llamacpp"])
async def test_401_is_unauthorized(flavor: str) -> None:
    async with FakeOpenAI(["m"], flavor=flavor) as fake, running_prober() as prober:
        fake.set_mode("unauthorized")
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "unauthorized (check api_key_env)"


async def test_429_is_degraded_with_retry_after() -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        fake.set_mode("ratelimited")
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.DEGRADED
    assert result.reason == "rate limited (HTTP 429, retry after 1s)"


@pytest.mark.parametrize(
    ("flavor", "reason"),
    [
        ("openai", "GET /v1/models: HTTP 500: Internal Server Error"),
        ("vllm", "GET /v1/models: HTTP 500: Internal Server Error"),  # {"object": "error"}
        ("tgi", "GET /v1/models: HTTP 500: Internal Server Error"),  # {"error": "..."}
    ],
)
async def test_5xx_fails_quoting_the_error_body(flavor: str, reason: str) -> None:
    async with FakeOpenAI(["m"], flavor=flavor) as fake, running_prober() as prober:
        fake.set_mode("error500")
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason == reason
    assert result.facts["http_status"] == 500


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("html", "GET /v1/models: HTTP 500 with an HTML page instead of JSON"),
        ("badjson", "invalid JSON: "),
        ("redirect", "redirected (HTTP 302) to /v1/models; set the endpoint to the final URL"),
        ("huge", "response too large (> 1048576 bytes)"),
        ("reset", "connection reset by peer"),
        ("down", "connection refused"),
    ],
)
async def test_broken_upstreams_fail_with_a_reason(mode: str, reason: str) -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        await fake.aset_mode(mode)
        result = await prober.run(spec("m", endpoint=fake.url))
    assert result.status is ProbeStatus.FAILED
    assert result.reason.startswith(reason), result.reason
    assert "\n" not in result.reason


@pytest.mark.parametrize("mode", ["hang", "drip"])
async def test_hanging_and_dripping_upstreams_time_out_on_the_probe_deadline(mode: str) -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        fake.drip_interval = 0.05  # 12 bytes in the deadline: plenty of progress, no end
        fake.set_mode(mode)
        started = time.perf_counter()
        result = await prober.run(spec("m", endpoint=fake.url))
        took = time.perf_counter() - started
    assert result.status is ProbeStatus.FAILED
    assert result.reason == f"timed out after {TIMEOUT:g}s"
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 0.5


async def test_spec_timeout_overrides_the_probe_timeout() -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        fake.set_mode("hang")
        started = time.perf_counter()
        result = await prober.run(spec("m", endpoint=fake.url, timeout=0.2))
    assert result.reason == "timed out after 0.2s"
    assert time.perf_counter() - started < TIMEOUT


async def test_a_fake_that_comes_back_on_the_same_port_is_healthy_again() -> None:
    async with FakeOpenAI(["m"]) as fake, running_prober() as prober:
        port = fake.port
        await fake.aset_mode("down")
        down = await prober.run(spec("m", endpoint=fake.url))
        await fake.aset_mode("normal")
        back = await prober.run(spec("m", endpoint=fake.url))
    assert down.reason == "connection refused"
    assert back.ok and fake.port == port


async def test_deep_probe_asks_for_one_token_and_measures_latency() -> None:
    async with FakeOpenAI(["m"], flavor="vllm", latency=0.05) as fake, \
            running_prober() as prober:
        result = await prober.run(spec("m", endpoint=fake.url, deep=True))
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["deep"] is True and result.facts["completion_tokens"] == 1
    assert result.latency_ms is not None and result.latency_ms >= 50
    body = fake.last_json("POST", "/v1/chat/completions")
    assert body["max_tokens"] == 1 and body["model"] == "m" and body["stream"] is False
    assert fake.count("GET", "/v1/models") == 0


async def test_deep_probe_of_an_unknown_model_quotes_vllms_error() -> None:
    async with FakeOpenAI(["m"], flavor="vllm") as fake, running_prober() as prober:
        result = await prober.run(spec("x", endpoint=fake.url), deep=True)
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "POST /v1/chat/completions: HTTP 404: The model `x` does not exist."


async def test_deep_probes_are_per_model_not_shared() -> None:
    async with (
        FakeOpenAI(["a", "b"], latency=0.05) as fake,
        running_prober() as prober,
        anyio.create_task_group() as tg,
    ):
        for name in ["a", "b", "a"]:
            tg.start_soon(prober.run, spec(name, endpoint=fake.url, deep=True))
    assert fake.count("POST", "/v1/chat/completions") == 3


async def test_a_key_with_a_trailing_newline_works_and_one_with_control_chars_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeOpenAI(["m"], api_key="sk-SECRET-key") as fake, running_prober() as prober:
        monkeypatch.setenv("KEY_WITH_NL", "sk-SECRET-key\r\n")  # a key file with CRLF
        good = await prober.run(spec("m", endpoint=fake.url, api_key_env="KEY_WITH_NL"))
        assert good.status is ProbeStatus.OK
        monkeypatch.setenv("KEY_WITH_NL", "sk-SECRET\x01key")
        fake.reset_counts()
        bad = await prober.run(spec("m", endpoint=fake.url, api_key_env="KEY_WITH_NL"))
    assert bad.status is ProbeStatus.FAILED
    assert bad.reason == "api_key_env: environment variable KEY_WITH_NL contains control characters"
    assert "SECRET" not in bad.reason and fake.total_requests == 0
