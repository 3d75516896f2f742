"""The fake upstream servers: shapes per flavor, modes, controls from other threads, scale."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest
from fakes_fixtures import running_prober, spec

from daemon.testing.fakes import MODES, FakeOllama, FakeOpenAI, FakeServers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ----------------------------------------------------------------------------- shapes


@pytest.mark.anyio
async def test_openai_flavors_reproduce_their_list_shapes() -> None:
    shapes = {}
    async with httpx.AsyncClient() as client:
        for flavor in ("openai", "vllm", "llamacpp", "llama-cpp-python", "tgi"):
            async with FakeOpenAI(["m"], flavor=flavor) as fake:
                shapes[flavor] = (await client.get(fake.url + "/v1/models")).json()
    assert shapes["openai"] == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 1715000000, "owned_by": "system"}]}
    vllm = shapes["vllm"]["data"][0]
    assert vllm["root"] == "m" and vllm["max_model_len"] == 8192 and vllm["permission"]
    llamacpp = shapes["llamacpp"]
    assert llamacpp["models"][0]["name"] == "m" and llamacpp["data"][0]["meta"]["n_vocab"]
    assert "created" not in shapes["llama-cpp-python"]["data"][0]
    assert shapes["tgi"]["data"][0]["owned_by"] == "m"


@pytest.mark.anyio
async def test_health_and_info_routes_per_flavor() -> None:
    async with httpx.AsyncClient() as client:
        async with FakeOpenAI(["m"], flavor="llamacpp") as fake:
            ok = await client.get(fake.url + "/health")
            fake.set_mode("loading")
            loading = await client.get(fake.url + "/health")
            listed = (await client.get(fake.url + "/v1/models")).json()
        async with FakeOpenAI(["org/model"], flavor="tgi") as fake:
            info = (await client.get(fake.url + "/info")).json()
            health = await client.get(fake.url + "/health")
        async with FakeOpenAI(["m"], flavor="vllm") as fake:
            vllm_health = await client.get(fake.url + "/health")
            missing = await client.post(fake.url + "/v1/chat/completions",
                                        json={"model": "x", "messages": []})
        async with FakeOpenAI(["m"], flavor="llama-cpp-python") as fake:
            no_health = await client.get(fake.url + "/health")
    assert ok.json() == {"status": "ok"}
    assert loading.status_code == 503
    assert loading.json() == {
        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    assert listed["data"][0]["meta"] is None
    assert info["model_id"] == "org/model" and health.status_code == 200
    assert vllm_health.status_code == 200 and vllm_health.content == b""
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "The model `x` does not exist.",
                                        "type": "NotFoundError", "param": None, "code": 404}}
    assert no_health.status_code == 404 and no_health.json() == {"detail": "Not Found"}


@pytest.mark.anyio
async def test_readiness_states_per_flavor_as_the_real_servers_send_them() -> None:
    async with httpx.AsyncClient(timeout=0.5) as client:
        async with FakeOpenAI(["m"], flavor="vllm") as fake:
            fake.set_mode("dead")
            vllm = [await client.get(fake.url + p) for p in ("/v1/models", "/health")]
            vllm_chat = await client.post(fake.url + "/v1/chat/completions",
                                          json={"model": "m", "messages": []})
        async with FakeOpenAI(["m"], flavor="sglang") as fake:
            ready = await client.get(fake.url + "/health")
            fake.set_mode("loading")
            sglang = [await client.get(fake.url + p) for p in ("/v1/models", "/health")]
            fake.set_mode("dead")
            with pytest.raises(httpx.ReadTimeout):  # a stuck scheduler: /health waits
                await client.get(fake.url + "/health")
        async with FakeOpenAI(["org/m"], flavor="tgi") as fake:
            fake.set_mode("dead")
            tgi = await client.get(fake.url + "/health")
    assert [r.status_code for r in vllm] == [200, 503] and vllm[1].content == b""
    assert vllm[0].headers["server"] == "uvicorn"
    assert vllm_chat.status_code == 500
    assert vllm_chat.json()["error"]["message"].startswith("EngineCore encountered an issue")
    assert ready.status_code == 200 and ready.content == b""
    assert [r.status_code for r in sglang] == [200, 503] and sglang[1].content == b""
    assert sglang[0].json()["data"][0]["owned_by"] == "sglang"
    assert tgi.status_code == 503
    assert tgi.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert "server" not in tgi.headers  # axum sends none; nor does llama.cpp's cpp-httplib


@pytest.mark.anyio
async def test_reasoning_models_spend_a_tiny_budget_before_any_visible_output() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    async with httpx.AsyncClient() as client:
        async with FakeOpenAI(["m"], flavor="vllm", reasoning="empty") as fake:
            empty = (await client.post(fake.url + "/v1/chat/completions", json=body)).json()
        async with FakeOpenAI(["m"], reasoning="limit_error") as fake:
            refused = await client.post(fake.url + "/v1/chat/completions", json=body)
    choice = empty["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert refused.status_code == 400
    assert "max_tokens or model output limit was reached" in refused.json()["error"]["message"]


@pytest.mark.anyio
async def test_chat_completion_answers_with_one_token_and_api_key_is_enforced() -> None:
    async with httpx.AsyncClient() as client, FakeOpenAI(["m"], api_key="sk-1") as fake:
        denied = await client.get(fake.url + "/v1/models")
        reply = await client.post(fake.url + "/v1/chat/completions",
                                  headers={"Authorization": "Bearer sk-1"},
                                  json={"model": "m", "messages": [], "max_tokens": 1})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == "Hi"
    assert body["usage"]["completion_tokens"] == 1


@pytest.mark.anyio
async def test_ollama_routes() -> None:
    async with httpx.AsyncClient() as client, FakeOllama(["llama3"]) as fake:
        tags = (await client.get(fake.url + "/api/tags")).json()
        ps_before = (await client.get(fake.url + "/api/ps")).json()
        missing = await client.post(fake.url + "/api/generate", json={"model": "phi3"})
        streamed = await client.post(fake.url + "/api/generate",
                                     json={"model": "llama3", "prompt": "hi"})
        ps_after = (await client.get(fake.url + "/api/ps")).json()
        root = await client.get(fake.url + "/")
    assert [m["name"] for m in tags["models"]] == ["llama3:latest"]
    assert tags["models"][0]["details"]["format"] == "gguf"
    assert ps_before == {"models": []}
    assert missing.status_code == 404 and missing.json() == {"error": "model 'phi3' not found"}
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert [line["done"] for line in lines] == [False, True]
    assert [m["name"] for m in ps_after["models"]] == ["llama3:latest"]
    assert ps_after["models"][0]["size_vram"] > 0
    assert root.text == "Ollama is running"


# ----------------------------------------------------------------------------- modes


@pytest.mark.anyio
async def test_huge_mode_streams_a_big_body_and_the_fake_survives_a_client_hanging_up() -> None:
    async with httpx.AsyncClient() as client, FakeOpenAI(["m"]) as fake:
        fake.set_mode("huge")
        received = 0
        async with client.stream("GET", fake.url + "/v1/models") as response:
            assert "content-length" not in response.headers
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received > 4 << 20:
                    break
        fake.set_mode("normal")
        again = await client.get(fake.url + "/v1/models")
    assert received > 4 << 20
    assert again.status_code == 200


@pytest.mark.anyio
async def test_reset_mode_resets_the_connection_mid_body() -> None:
    async with httpx.AsyncClient() as client, FakeOpenAI(["m"]) as fake:
        fake.set_mode("reset")
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(fake.url + "/v1/models")


@pytest.mark.anyio
async def test_latency_delays_each_response() -> None:
    async with httpx.AsyncClient() as client, FakeOpenAI(["m"], latency=0.1) as fake:
        started = time.perf_counter()
        await client.get(fake.url + "/v1/models")
        fake.set_latency(0.0)
        middle = time.perf_counter()
        await client.get(fake.url + "/v1/models")
        done = time.perf_counter()
    assert middle - started >= 0.1
    assert done - middle < 0.1


def test_unknown_modes_and_flavors_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode 'sleepy'"):
        FakeOpenAI().set_mode("sleepy")
    with pytest.raises(ValueError, match="unknown flavor"):
        FakeOpenAI(flavor="bard")
    assert {"down", "hang", "drip", "huge", "reset", "html", "badjson", "redirect",
            "error500", "loading", "dead", "unauthorized", "ratelimited", "normal"} == MODES


# ----------------------------------------------------------------------------- threads


def test_fakes_on_a_background_loop_are_controlled_from_this_thread() -> None:
    with FakeServers() as servers, httpx.Client(timeout=2) as client:
        openai = servers.start(FakeOpenAI(["m"], flavor="vllm"))
        ollama = servers.start(FakeOllama(["llama3"]))
        assert client.get(openai.url + "/v1/models").status_code == 200
        assert client.get(ollama.url + "/api/tags").status_code == 200
        port = openai.port
        openai.set_mode("down")  # returns once the listener is closed
        with pytest.raises(httpx.ConnectError):
            client.get(openai.url + "/v1/models")
        openai.set_mode("normal")  # returns once the same port is bound again
        assert openai.port == port
        assert client.get(openai.url + "/v1/models").status_code == 200
        openai.add_model("n")
        ollama.remove_model("llama3")
        ollama.set_latency(0.05)
        assert [m["id"] for m in client.get(openai.url + "/v1/models").json()["data"]] == \
            ["m", "n"]
        assert client.get(ollama.url + "/api/tags").json() == {"models": []}
        assert openai.count("GET", "/v1/models") == 3
        assert openai.total_requests == 3
        servers.stop(ollama)
        time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            client.get(ollama.url + "/api/tags")


@pytest.mark.anyio
async def test_a_thousand_fakes_run_in_one_process() -> None:
    """A thousand endpoints answering in 20 ms each, as the benchmark runs them.

    Every fourth one is probed here to keep the test quick; the client side (httpx in this
    same process) costs more than the fakes.
    """
    fakes = [FakeOpenAI([f"m{i}"], latency=0.02) for i in range(1000)]
    probed = fakes[::4]
    async with anyio.create_task_group() as tg:
        for fake in fakes:
            await tg.start(fake.serve)
        async with running_prober(timeout=10.0) as prober:
            results = []

            async def probe(fake: FakeOpenAI) -> None:
                results.append(await prober.run(spec(fake.models[0], endpoint=fake.url)))

            async with anyio.create_task_group() as probes:
                for fake in probed:
                    probes.start_soon(probe, fake)
        tg.cancel_scope.cancel()
    assert len({fake.port for fake in fakes}) == 1000
    assert [r.reason for r in results if not r.ok] == []
    # At least, not exactly, one: with a thousand ephemeral ports taken, a stray client of
    # another process on this host (retrying a port it expects to be closed) may land here.
    assert all(fake.count("GET", "/v1/models") >= 1 for fake in probed)
