"""The front door against hostile or odd input: headers that must not reach an upstream, and
the x-modeld headers on every answer (bodies: tests/reliability/test_input_bodies.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import anyio
import anyio.abc
import h11
import httpx
import openai
import pytest
from gateway_support import running_door, spec

from daemon.core.settings import GatewayConfig
from daemon.testing.chat_fakes import ChatOllama, ChatOpenAI

pytestmark = pytest.mark.anyio

QWEN = "Qwen/Qwen2.5-7B-Instruct"
HELLO = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


async def test_every_answer_the_door_gives_itself_says_how_many_models_it_tried() -> None:
    config = GatewayConfig(listen="0.0.0.0:1", clients_key_env="DOOR_KEY", max_request_bytes=512)
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)], gateway=config,
                         environ={"DOOR_KEY": "k"}) as door, httpx.AsyncClient() as client:
        sdk = door.client("k")
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.chat.completions.create(model="gpt-17", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError) as refused:
            await door.client("wrong").models.list()
        listing = await sdk.models.with_raw_response.list()
        auth = {"authorization": "Bearer k"}
        missing = await client.post(f"{door.url}{CHAT}", json={}, headers=auth)
        big = await client.post(f"{door.url}{CHAT}", headers=auth,
                                json={"model": "chat", "messages": [{"content": "x" * 600}]})
        vllm.set_chat_fault("error503")
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk.chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
    for response in (unknown.value.response, refused.value.response, missing, big):
        assert response.headers["x-modeld-attempts"] == "0", response.status_code
    assert listing.headers["x-modeld-attempts"] == "0"
    assert failed.value.response.headers["x-modeld-attempts"] == "1"
    assert failed.value.response.headers.get_list("x-modeld-attempts") == ["1"]


async def test_the_clients_credentials_and_hop_by_hop_headers_never_reach_the_upstream() -> None:
    async with ChatOpenAI([QWEN], flavor="vllm", api_key="up") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True, api_key_env="UP")],
                         environ={"UP": "up"}) as door, httpx.AsyncClient() as client:
        answer = await client.post(f"{door.url}{CHAT}", json={"model": "chat", "messages": HELLO},
                                   headers={
                                       "authorization": "Bearer client-token",
                                       "api-key": "client-azure-key",
                                       "x-api-key": "client-other-key",
                                       "cookie": "session=1",
                                       "proxy-authorization": "Basic eA==",
                                       "connection": "keep-alive, x-hop",
                                       "x-hop": "1", "te": "trailers", "keep-alive": "timeout=5",
                                       "expect": "100-continue",
                                       "x-modeld-model": "forged",
                                       "x-request-id": "abc",  # an end-to-end header: kept
                                   })
        sent = vllm.last_headers("POST", CHAT)
        sent_body = vllm.last_body("POST", CHAT)
        # curl -d without -H: the body the door sends is JSON all the same
        form = await client.post(f"{door.url}{CHAT}", content=json.dumps(
            {"model": "chat", "messages": HELLO}),
            headers={"content-type": "application/x-www-form-urlencoded"})
        sent_form = vllm.last_headers("POST", CHAT)
    assert answer.status_code == 200, answer.text
    assert sent is not None
    assert sent["authorization"] == "Bearer up"
    for name in ("api-key", "x-api-key", "cookie", "proxy-authorization", "x-hop", "te",
                 "keep-alive", "expect", "x-modeld-model"):
        assert name not in sent, name
    assert "client" not in json.dumps(sent)
    assert sent["x-request-id"] == "abc"
    assert sent["content-length"] == str(len(sent_body or b""))
    assert sent["host"] == vllm.url.removeprefix("http://")
    assert sent["content-type"] == "application/json"
    assert form.status_code == 200
    assert sent_form is not None and sent_form["content-type"] == "application/json"


class _BigTokens(ChatOpenAI):
    """Streams ``tokens`` events of 64 KiB each, as fast as it may."""

    def _text(self) -> list[str]:
        return ["x" * 65536] * self.tokens


async def test_a_client_that_stops_reading_holds_the_upstream_back_not_the_doors_memory() -> None:
    tokens = 300  # ~20 MB: more than the kernel's buffers on the way are likely to hold
    async with _BigTokens([QWEN], flavor="vllm", tokens=tokens, coalesce=False) as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        port = int(door.url.rsplit(":", 1)[1])
        body = json.dumps({"model": "chat", "messages": HELLO, "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await anyio.sleep(0.5)  # the client reads nothing
        assert door.gateway.in_flight == 1  # still relaying, at the client's pace
        (conn,) = door.server._connections
        buffered = conn.stream._transport.get_write_buffer_size()  # type: ignore[attr-defined]
        assert buffered <= 256 * 1024  # at most one read beyond the transport's high-water mark
        assert vllm.streams_completed == 0  # the upstream is held back
        sock.setblocking(False)
        received = bytearray()
        with anyio.fail_after(10):
            while True:
                await anyio.wait_readable(sock)
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += data
        sock.close()
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "d")]))
    client.receive_data(bytes(received))
    client.receive_data(b"")
    events = []
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        events.append(event)
    assert events[0].status_code == 200  # type: ignore[union-attr]
    stream = b"".join(bytes(e.data) for e in events[1:])  # type: ignore[union-attr]
    assert stream.endswith(b"data: [DONE]\n\n")
    assert stream.count(b'"content":"' + b"x" * 65536 + b'"') == tokens  # every event, whole


async def test_a_client_without_the_key_is_refused_at_the_head_before_any_body() -> None:
    config = GatewayConfig(listen="0.0.0.0:1", clients_key_env="DOOR_KEY")
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)], gateway=config,
                         environ={"DOOR_KEY": "k"}) as door:
        port = int(door.url.rsplit(":", 1)[1])
        # a head announcing 10 MB, and the body never sent: the door must not wait for it
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: d\r\n"
                              b"Authorization: Bearer wrong\r\nContent-Length: 10000000\r\n\r\n")
            answer = b""
            with anyio.fail_after(2):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b"www-authenticate: bearer" in answer.lower()
        # the SDK with the right key still comes in, the wrong one still gets its error
        ok = await door.client("k").chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError) as refused:
            await door.client("wrong").chat.completions.create(model="chat", messages=HELLO)  # type: ignore[arg-type]
    assert ok.choices[0].message.content == "Hi t1 t2"
    assert refused.value.code == "invalid_api_key"
    assert door.sample("modeld_gateway_requests_total", route=CHAT, role="", model_id="",
                       outcome="unauthorized") == 2


async def test_a_404_saying_the_model_is_gone_fails_over_a_404_for_a_path_is_passed_back() -> None:
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            ChatOllama(["llama3:8b"]) as ollama, ChatOpenAI(["llama3"]) as other, \
            running_door([spec("qwen", vllm.url, model="Qwen/renamed", primary=True),
                          spec("olla", ollama.url, provider="ollama", model="gone:1b",
                               quality=0.9),
                          spec("llama", other.url, model="llama3", quality=0.1),
                          spec("lost", f"{vllm.url}/no/such/base", role="x", model=QWEN)]
                         ) as door:
        raw = await door.client().chat.completions.with_raw_response.create(
            model="chat", messages=HELLO)  # type: ignore[arg-type]
        await door.settled()
        observed = dict(door.observed)
        door.observed.clear()
        with pytest.raises(openai.NotFoundError) as bad_path:
            await door.client().chat.completions.create(model="lost", messages=HELLO)  # type: ignore[arg-type]
    assert raw.headers["x-modeld-model"] == "llama"
    assert raw.headers["x-modeld-attempts"] == "3"
    assert "does not exist" in observed["qwen"].reason
    assert "not found" in observed["olla"].reason
    assert door.sample("modeld_gateway_failovers_total", role="chat", model_id="qwen",
                       reason="model_missing") == 1
    # a 404 that is not about the model is passed back as it came, and blames nobody
    assert bad_path.value.body == "Not Found" or bad_path.value.response.json() == {
        "detail": "Not Found"}
    assert bad_path.value.response.headers["x-modeld-model"] == "lost"
    assert door.observed == []


async def test_a_server_that_never_accepts_the_connection_is_failed_over_at_the_connect_timeout(
        ) -> None:
    # a listener whose backlog is full: further SYNs are dropped, as by a dead host's network
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen(0)
    held = []
    for _ in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(dead.getsockname())
        held.append(sock)
    await anyio.sleep(0.05)
    port = dead.getsockname()[1]
    config = GatewayConfig(listen="x:1", first_byte_timeout=5)
    try:
        async with ChatOpenAI(["llama3"]) as other, running_door(
                [spec("qwen", f"http://127.0.0.1:{port}", model=QWEN, primary=True),
                 spec("llama", other.url, model="llama3")], gateway=config) as door:
            door.gateway.client.connect_timeout = 0.3
            started = time.monotonic()
            raw = await door.client().chat.completions.with_raw_response.create(
                model="chat", messages=HELLO)  # type: ignore[arg-type]
            took = time.monotonic() - started
            await door.settled()
    finally:
        for sock in (*held, dead):
            sock.close()
    assert raw.headers["x-modeld-model"] == "llama"
    assert 0.3 <= took < 2.0
    ((model_id, result),) = door.observed
    assert model_id == "qwen" and "connect timed out" in result.reason
    assert door.sample("modeld_gateway_failovers_total", role="chat", model_id="qwen",
                       reason="timeout") == 1


async def test_a_head_over_the_cap_is_refused_however_its_bytes_arrive() -> None:
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        port = int(door.url.rsplit(":", 1)[1])
        filler = b"".join(b"x-f%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))  # 100 kB
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /v1/models HTTP/1.1\r\nHost: d\r\n" + filler + b"\r\n")
            answer = b""
            with anyio.fail_after(2), contextlib.suppress(anyio.EndOfStream):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
    assert b"request head" in answer


async def test_capability_headers_are_bounded_and_deduplicated() -> None:
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec(f"m{i}", vllm.url, model=QWEN, primary=i == 0,
                               capability_tags=("code",)) for i in range(20)]) as door, \
            httpx.AsyncClient() as client:
        many = await client.post(f"{door.url}{CHAT}", json={"model": "chat", "messages": HELLO},
                                 headers={"x-modeld-capabilities": ",".join(
                                     f"tag{i}" for i in range(5000))})
        long = await client.post(f"{door.url}{CHAT}", json={"model": "chat", "messages": HELLO},
                                 headers={"x-modeld-capabilities": "x" * 5000})
        repeated = await client.post(f"{door.url}{CHAT}",
                                     json={"model": "chat", "messages": HELLO},
                                     headers={"x-modeld-capabilities": ",".join(["code"] * 500)})
    for answer in (many, long):
        assert answer.status_code == 400, answer.status_code
        assert answer.json()["error"]["code"] == "invalid_capabilities"
        assert len(answer.content) < 1000
    assert repeated.status_code == 200
    assert repeated.headers["x-modeld-model"] == "m0"


async def test_an_unknown_model_is_named_in_the_404_but_never_echoed_whole() -> None:
    async with ChatOpenAI([QWEN], flavor="vllm") as vllm, \
            running_door([spec("qwen", vllm.url, model=QWEN, primary=True)]) as door:
        with pytest.raises(openai.NotFoundError) as unknown:
            await door.client().chat.completions.create(model="y" * 200_000, messages=HELLO)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found"
    assert "y" * 128 in unknown.value.message and "200000 characters" in unknown.value.message
    assert len(unknown.value.response.content) < 2000


async def test_an_upstream_redirect_fails_over_and_never_reaches_the_client() -> None:
    async def redirect(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 301 Moved Permanently\r\n"
                              b"Location: https://upstream.internal:8443/v1/chat/completions\r\n"
                              b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg, ChatOpenAI(["llama3"]) as other:
        tg.start_soon(listener.serve, redirect)
        async with running_door([spec("qwen", f"http://127.0.0.1:{port}", model=QWEN,
                                      primary=True),
                                 spec("llama", other.url, model="llama3")]) as door:
            raw = await door.client().chat.completions.with_raw_response.create(
                model="chat", messages=HELLO)  # type: ignore[arg-type]
            await door.settled()
            ((model_id, result),) = door.observed
            with pytest.raises(openai.InternalServerError) as only:
                await door.client().chat.completions.create(model="qwen", messages=HELLO)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
    assert raw.headers["x-modeld-model"] == "llama"
    assert model_id == "qwen" and "redirect" in result.reason
    assert "location" not in only.value.response.headers
    assert "upstream.internal" not in only.value.response.text
