"""The front door in-process: the real ``openai`` SDK against the door, the door against fakes
of vLLM, llama.cpp and Ollama on 127.0.0.1 (daemon/testing/chat_fakes.py)."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import openai
import pytest
from gateway_support import healthy, running_door, spec
from structlog.testing import capture_logs

from daemon.core.model import ProbeStatus
from daemon.core.settings import GatewayConfig
from daemon.testing.chat_fakes import ChatOllama, ChatOpenAI

pytestmark = pytest.mark.anyio

QWEN = "Qwen/Qwen2.5-7B-Instruct"
HELLO = [{"role": "user", "content": "a secret prompt"}]


def chat_pair(vllm: ChatOpenAI, other: ChatOpenAI | ChatOllama, **kwargs: object) -> list:
    second = (spec("llama", other.url, provider="ollama", model="llama3:8b")
              if isinstance(other, ChatOllama) else spec("llama", other.url, model="llama3"))
    return [spec("qwen", vllm.url, model=QWEN, primary=True, **kwargs), second]


async def test_a_role_is_served_by_its_primary_with_the_model_rewritten_and_the_upstream_key():
    async with ChatOpenAI([QWEN], flavor="vllm", api_key="upstream-key") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True,
                               api_key_env="QWEN_KEY")],
                         environ={"QWEN_KEY": "upstream-key"}) as door:
        raw = await door.client("the-clients-own-token").chat.completions.with_raw_response.create(
            model="chat", messages=HELLO)
        answer = raw.parse()
    assert answer.choices[0].message.content == "Hi t1 t2"
    assert answer.model == QWEN
    assert raw.headers["x-modeld-model"] == "qwen"
    assert raw.headers["x-modeld-attempts"] == "1"
    sent = vllm.last_json("POST", "/v1/chat/completions")
    assert sent["model"] == QWEN and sent["messages"] == HELLO


async def test_streams_pass_through_byte_for_byte_and_chunk_by_chunk_as_they_arrive():
    async with ChatOpenAI([QWEN], flavor="vllm", tokens=6, chunk_interval=0.05) as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        body = {"model": QWEN, "messages": HELLO, "stream": True}
        async with httpx.AsyncClient() as client:
            direct = await client.post(f"{vllm.url}/v1/chat/completions", json=body)
            arrivals: list[tuple[float, bytes]] = []
            started = time.monotonic()
            async with client.stream("POST", f"{door.url}/v1/chat/completions",
                                     json={**body, "model": "chat"}) as through:
                async for chunk in through.aiter_raw():
                    arrivals.append((time.monotonic() - started, chunk))
                headers = through.headers
    relayed = b"".join(chunk for _, chunk in arrivals)
    # the same events as the server sent, apart from their `created` second
    assert _strip_created(relayed) == _strip_created(direct.content)
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    # not buffered: the first event reached the client long before the last one was sent
    assert len(arrivals) >= 5
    assert arrivals[-1][0] - arrivals[0][0] > 0.2


def _strip_created(data: bytes) -> bytes:
    import re

    return re.sub(rb'"created":\d+', b'"created":0', data)


async def test_llama_cpp_streams_parse_in_the_sdk_and_its_keep_alive_header_is_dropped():
    async with ChatOpenAI(["qwen2.5-7b-instruct-q4_k_m.gguf"], flavor="llamacpp") as llama, \
            running_door([spec("local-qwen", llama.url, model="whatever", primary=True)]) as door:
        stream = await door.client().chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream.parse()
                  if chunk.choices]
    assert "".join(p or "" for p in pieces) == "Hi t1 t2"
    assert "keep-alive" not in stream.headers
    assert stream.headers["x-modeld-model"] == "local-qwen"


async def test_ollama_models_go_through_ollamas_own_v1():
    async with ChatOllama(["llama3:8b"]) as ollama, \
            running_door([spec("llama", ollama.url, provider="ollama", model="llama3:8b",
                               primary=True)]) as door:
        answer = await door.client().chat.completions.create(model="llama", messages=HELLO)
        stream = await door.client().chat.completions.create(model="chat", messages=HELLO,
                                                             stream=True)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert answer.choices[0].message.content == "Hi t1 t2"
    assert "".join(pieces) == "Hi t1 t2"
    assert ollama.last_json("POST", "/v1/chat/completions")["model"] == "llama3:8b"


async def test_completions_and_embeddings_are_routed_too():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        client = door.client()
        completion = await client.completions.create(model="chat", prompt="Once")
        embedded = await client.embeddings.create(model="qwen", input=["a", "b"])
    assert completion.choices[0].text == "Hi t1 t2"
    assert [item.index for item in embedded.data] == [0, 1]
    assert len(embedded.data[0].embedding) == 8


async def test_a_503_fails_over_to_the_next_model_and_is_an_observation_logged_without_secrets():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOllama(["llama3:8b"]) as ollama, \
            running_door(chat_pair(vllm, ollama, api_key_env="QWEN_KEY"),
                         environ={"QWEN_KEY": "sk-upstream-secret"}) as door:
        vllm.set_chat_fault("error503")
        with capture_logs() as logs:
            raw = await door.client().chat.completions.with_raw_response.create(
                model="chat", messages=HELLO)
        assert raw.headers["x-modeld-model"] == "llama"
        assert raw.headers["x-modeld-attempts"] == "2"
        assert door.observed == [("qwen", door.observed[0][1])]
        result = door.observed[0][1]
        assert result.status is ProbeStatus.FAILED and result.latency_ms is None
        assert result.reason == "front door: HTTP 503: Service Unavailable"
        assert door.registry.models["qwen"].health.status.value == "degraded"
        assert door.sample("modeld_gateway_failovers_total", role="chat", model_id="qwen",
                           reason="http_503") == 1
        await door.settled()
        assert door.sample("modeld_gateway_requests_total", route="/v1/chat/completions",
                           role="chat", model_id="llama", outcome="ok") == 1
    (warning,) = [e for e in logs if e["event"] == "gateway_failover"]
    assert warning["log_level"] == "warning"
    assert (warning["model_id"], warning["next_model"]) == ("qwen", "llama")
    text = json.dumps(logs)
    assert "secret" not in text  # neither the prompt nor the upstream key


@pytest.mark.parametrize(("fault", "kind"), [("down", "refused"), ("ratelimited", "rate_limited")])
async def test_refused_connections_and_429_fail_over(fault, kind):
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door(chat_pair(vllm, other)) as door:
        if fault == "down":
            await vllm.aset_mode("down")
        else:
            vllm.set_chat_fault(fault)
        raw = await door.client().chat.completions.with_raw_response.create(
            model="chat", messages=HELLO)
        assert raw.headers["x-modeld-model"] == "llama"
        await door.settled()
        ((model_id, result),) = door.observed
        assert model_id == "qwen"
        # a 429 is the server's "busy", like the probes' degraded; a refusal is a failure
        assert result.status is (ProbeStatus.DEGRADED if fault == "ratelimited"
                                 else ProbeStatus.FAILED)
        assert door.sample("modeld_gateway_failovers_total", role="chat", model_id="qwen",
                           reason=kind) == 1


@pytest.mark.parametrize("fault", ["hang", "stall"])
async def test_an_upstream_silent_past_the_first_byte_timeout_hands_over_to_the_next(fault):
    config = GatewayConfig(listen="x:1", first_byte_timeout=0.3)
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door(chat_pair(vllm, other), gateway=config) as door:
        vllm.set_chat_fault(fault)
        started = time.monotonic()
        answer = await door.client().chat.completions.create(model="chat", messages=HELLO,
                                                             stream=True)
        pieces = [c.choices[0].delta.content async for c in answer if c.choices]
        took = time.monotonic() - started
        assert "".join(p or "" for p in pieces) == "Hi t1 t2"
        assert 0.3 <= took < 1.5
        (_, result), = door.observed
        assert "gateway.first_byte_timeout" in result.reason


async def test_a_non_streamed_answer_slower_than_the_first_byte_timeout_fails_over_unblamed():
    # vLLM, llama.cpp and Ollama send nothing of a non-streamed answer before its end: a long
    # generation looks like a hang to the door. It moves on, and asks the probes to look at once
    # instead of counting a failure (three long generations must not mark a healthy model down)
    config = GatewayConfig(listen="x:1", first_byte_timeout=0.3)
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door(chat_pair(vllm, other), gateway=config) as door:
        vllm.set_chat_fault("hang")
        for _ in range(3):
            raw = await door.client().chat.completions.with_raw_response.create(
                model="chat", messages=HELLO)
            assert raw.headers["x-modeld-model"] == "llama"
            assert raw.headers["x-modeld-attempts"] == "2"
        await door.settled()
        assert door.observed == []
        assert door.rechecked == ["qwen"] * 3
        assert door.registry.models["qwen"].health.status.value == "healthy"
        assert door.sample("modeld_gateway_failovers_total", role="chat", model_id="qwen",
                           reason="timeout") == 3


async def test_a_client_error_is_passed_back_untouched_and_counts_against_nobody():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door(chat_pair(vllm, other)) as door:
        async with httpx.AsyncClient() as client:
            direct = await client.post(f"{vllm.url}/v1/chat/completions", json={"model": QWEN})
            through = await client.post(f"{door.url}/v1/chat/completions",
                                        json={"model": "chat"})
        with pytest.raises(openai.BadRequestError):
            await door.client().chat.completions.create(model="chat", messages="nope")  # type: ignore[arg-type]
    assert through.status_code == direct.status_code == 400
    assert through.content == direct.content
    assert through.headers["content-length"] == str(len(direct.content))
    assert through.headers["x-modeld-model"] == "qwen"
    assert through.headers["x-modeld-attempts"] == "1"
    assert door.observed == []
    assert other.count("POST", "/v1/chat/completions") == 0


async def test_after_the_first_byte_there_is_no_retry_the_client_sees_the_stream_cut():
    async with ChatOpenAI([QWEN], flavor="vllm", tokens=8) as vllm, \
            ChatOpenAI(["llama3"]) as other, running_door(chat_pair(vllm, other)) as door:
        vllm.set_chat_fault("die_midstream")
        stream = await door.client().chat.completions.create(model="chat", messages=HELLO,
                                                             stream=True)
        got = []
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            async for chunk in stream:
                got.append(chunk)
        assert 0 < len(got) < 9
        assert other.count("POST", "/v1/chat/completions") == 0
        await door.settled()
        (model_id, result), = door.observed
        assert model_id == "qwen" and "after the first byte" in result.reason
        assert door.sample("modeld_gateway_requests_total", route="/v1/chat/completions",
                           role="chat", model_id="qwen", outcome="cut") == 1


async def test_a_client_that_hangs_up_mid_stream_cancels_the_upstream_request_at_once():
    async with ChatOpenAI([QWEN], flavor="vllm", tokens=200, chunk_interval=0.02) as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        async with httpx.AsyncClient() as client, client.stream(
                "POST", f"{door.url}/v1/chat/completions",
                json={"model": "chat", "messages": HELLO, "stream": True}) as response:
            async for _chunk in response.aiter_raw():
                break  # the first event arrived: hang up
        started = time.monotonic()
        while vllm.streams_closed_by_client == 0 and time.monotonic() - started < 2:
            await anyio.sleep(0.01)
        assert vllm.streams_closed_by_client == 1
        assert time.monotonic() - started < 0.5
        assert door.gateway.in_flight == 0
        assert door.observed == []  # the client's hang-up says nothing about the model


async def test_unknown_models_and_nothing_usable_get_openai_shaped_errors():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, running_door(
            [spec("qwen", vllm.url, model=QWEN, primary=True),
             spec("tiny", "", provider="local_file", role="edge", local_path="/m.gguf")]) as door:
        client = door.client()
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="gpt-17", messages=HELLO)
        with pytest.raises(openai.InternalServerError) as local_only:
            await client.chat.completions.create(model="edge", messages=HELLO)
        healthy(door.registry, "tiny")  # healthy, and still no server to send requests to
        with pytest.raises(openai.InternalServerError) as healthy_local:
            await client.chat.completions.create(model="edge", messages=HELLO)
        with pytest.raises(openai.NotFoundError) as by_id:
            await client.chat.completions.create(model="tiny", messages=HELLO)
    assert unknown.value.status_code == 404
    assert unknown.value.code == "model_not_found"
    assert "chat" in unknown.value.message and "qwen" in unknown.value.message
    assert local_only.value.status_code == 503
    assert local_only.value.code == "no_usable_model"
    assert "not routable" in local_only.value.body["reasons"]["tiny"]  # type: ignore[index]
    assert "not routable" in healthy_local.value.body["reasons"]["tiny"]  # type: ignore[index]
    assert "no server" in by_id.value.message


async def test_a_model_id_means_that_model_only():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door(chat_pair(vllm, other)) as door:
        vllm.set_chat_fault("error503")
        with pytest.raises(openai.InternalServerError) as caught:
            await door.client().chat.completions.create(model="qwen", messages=HELLO)
    assert caught.value.status_code == 503
    assert caught.value.body["reasons"] == {  # type: ignore[index]
        "qwen": "HTTP 503: Service Unavailable"}
    assert other.count("POST", "/v1/chat/completions") == 0


async def test_capabilities_narrow_a_role():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, ChatOpenAI(["llama3"]) as other, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True),
                          spec("coder", other.url, model="llama3",
                               capability_tags=("code", "long_context"))]) as door:
        raw = await door.client().chat.completions.with_raw_response.create(
            model="chat", messages=HELLO,
            extra_headers={"x-modeld-capabilities": "code, long_context"})
        assert raw.headers["x-modeld-model"] == "coder"
        with pytest.raises(openai.InternalServerError) as caught:
            await door.client().chat.completions.create(
                model="chat", messages=HELLO, extra_headers={"x-modeld-capabilities": "vision"})
    assert caught.value.code == "no_usable_model"


async def test_the_model_list_has_every_role_and_routable_model_with_its_health():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, running_door(
            [spec("qwen", vllm.url, model=QWEN, primary=True),
             spec("tiny", "", provider="local_file", local_path="/m.gguf")]) as door:
        listing = await door.client().models.list()
        one = await door.client().models.retrieve("chat")
    entries = {m.id: m.model_dump() for m in listing.data}
    assert set(entries) == {"chat", "qwen"}  # tiny has no server
    assert all(e["owned_by"] == "modeld" and e["object"] == "model" for e in entries.values())
    assert entries["chat"]["kind"] == "role" and entries["chat"]["serves"] == "qwen"
    assert entries["qwen"]["health_status"] == "healthy"
    assert entries["qwen"]["upstream_model"] == QWEN
    assert one.id == "chat"


async def test_limits_413_and_429_with_retry_after():
    config = GatewayConfig(listen="x:1", max_request_bytes=2048, max_concurrent=1)
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)],
                         gateway=config) as door:
        vllm.set_chat_fault("hang")
        async with httpx.AsyncClient(timeout=5) as client, anyio.create_task_group() as tg:
            async def hung() -> None:
                await client.post(f"{door.url}/v1/chat/completions",
                                  json={"model": "chat", "messages": HELLO})

            tg.start_soon(hung)
            while door.gateway.in_flight == 0:
                await anyio.sleep(0.01)
            busy = await client.post(f"{door.url}/v1/chat/completions",
                                     json={"model": "chat", "messages": HELLO})
            big = await client.post(f"{door.url}/v1/chat/completions",
                                    json={"model": "chat", "messages": [
                                        {"role": "user", "content": "x" * 4096}]})
            tg.cancel_scope.cancel()
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "too_many_requests"
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    assert "gateway.max_request_bytes" in big.json()["error"]["message"]


async def test_with_a_clients_key_only_its_bearers_come_in():
    config = GatewayConfig(listen="0.0.0.0:1", clients_key_env="DOOR_KEY")
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)], gateway=config,
                         environ={"DOOR_KEY": "door-secret"}) as door:
        with pytest.raises(openai.AuthenticationError) as refused:
            await door.client("wrong").chat.completions.create(model="chat", messages=HELLO)
        answer = await door.client("door-secret").chat.completions.create(model="chat",
                                                                          messages=HELLO)
        async with httpx.AsyncClient() as client:
            made_up = await client.get(f"{door.url}/wp-admin/setup-config.php")
    assert refused.value.code == "invalid_api_key"
    assert made_up.status_code == 401
    assert door.sample("modeld_gateway_requests_total", route="other", role="", model_id="",
                       outcome="unauthorized") == 1
    assert door.sample("modeld_gateway_requests_total", route="/v1/chat/completions",
                       role="", model_id="", outcome="unauthorized") == 1
    assert answer.choices[0].message.content == "Hi t1 t2"
    # the client's token went nowhere but the door
    assert vllm.last_json("POST", "/v1/chat/completions") is not None


async def test_bad_requests_name_what_is_wrong():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door, \
            httpx.AsyncClient() as client:
        no_model = await client.post(f"{door.url}/v1/chat/completions", json={})
        not_json = await client.post(f"{door.url}/v1/chat/completions", content=b"{")
        wrong_path = await client.get(f"{door.url}/v1/files")
        wrong_method = await client.get(f"{door.url}/v1/chat/completions")
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "missing_model"
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    assert wrong_path.status_code == 404 and wrong_path.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405
    assert vllm.count("POST", "/v1/chat/completions") == 0


async def test_a_stream_that_pauses_past_the_idle_timeout_is_cut_without_blaming_the_model():
    config = GatewayConfig(listen="x:1", stream_idle_timeout=0.2)
    async with ChatOpenAI([QWEN], flavor="vllm", tokens=3, chunk_interval=1.0) as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)],
                         gateway=config) as door:
        stream = await door.client().chat.completions.create(model="chat", messages=HELLO,
                                                             stream=True)
        started = time.monotonic()
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            async for _chunk in stream:
                pass
        assert time.monotonic() - started < 0.8
        await door.settled()
        assert door.observed == []  # a long pause is not a dead server
        assert door.sample("modeld_gateway_requests_total", route="/v1/chat/completions",
                           role="chat", model_id="qwen", outcome="cut") == 1


async def test_connections_beyond_the_cap_are_turned_away_with_503():
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        door.server.max_connections = lambda: 1
        async with httpx.AsyncClient() as first, httpx.AsyncClient() as second:
            kept = await first.get(f"{door.url}/v1/models")  # keep-alive: holds the one slot
            refused = await second.get(f"{door.url}/v1/models")
    assert kept.status_code == 200
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["retry-after"] == "1"


@pytest.mark.parametrize(("fake", "model", "content_type", "first_delta"), [
    (lambda: ChatOpenAI([QWEN], flavor="vllm"), QWEN, "text/event-stream; charset=utf-8",
     {"role": "assistant", "content": ""}),
    (lambda: ChatOpenAI(["q.gguf"], flavor="llamacpp"), "any", "text/event-stream",
     {"role": "assistant", "content": None}),
    (lambda: ChatOllama(["llama3:8b"]), "llama3:8b", "text/event-stream",
     {"role": "assistant", "content": "Hi"}),
], ids=["vllm", "llamacpp", "ollama"])
async def test_the_fakes_stream_as_the_real_servers_do(fake, model, content_type, first_delta):
    async with fake() as server, httpx.AsyncClient() as client:
        streamed = await client.post(f"{server.url}/v1/chat/completions",
                                     json={"model": model, "messages": HELLO, "stream": True})
        failed = await client.post(f"{server.url}/v1/chat/completions", json={"model": model})
    assert streamed.headers["content-type"] == content_type
    assert streamed.headers["transfer-encoding"] == "chunked"
    events = streamed.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    docs = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") and b'": ' not in e for e in events[:-2])  # compact
    assert docs[0]["object"] == "chat.completion.chunk"
    assert docs[0]["choices"][0]["delta"] == first_delta
    # errors come whole, with a Content-Length
    assert failed.status_code == 400
    assert failed.headers["content-length"] == str(len(failed.content))


@pytest.mark.parametrize("answer", [
    b"this is not HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-filler: " + b"a" * 100_000,  # a head that never ends
], ids=["not-http", "endless-head"])
async def test_an_upstream_answering_garbage_fails_over(answer):
    async def garbage(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(answer)
            await anyio.sleep(5)  # and keep the connection open

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg, ChatOpenAI(["llama3"]) as other:
        tg.start_soon(listener.serve, garbage)
        async with running_door([spec("qwen", f"http://127.0.0.1:{port}", model=QWEN,
                                      primary=True),
                                 spec("llama", other.url, model="llama3")]) as door:
            raw = await door.client().chat.completions.with_raw_response.create(
                model="chat", messages=HELLO)
            assert raw.headers["x-modeld-model"] == "llama"
            await door.settled()
            ((model_id, result),) = door.observed
            assert model_id == "qwen" and result.reason.startswith("front door: ")
        tg.cancel_scope.cancel()
