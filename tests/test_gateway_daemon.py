"""The front door in the real daemon (``modeld run`` in a subprocess), the real ``openai`` SDK
as the client, fakes of vLLM and Ollama on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from daemon.testing.chat_fakes import ChatOllama, ChatOpenAI
from daemon.testing.fakes import FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

QWEN = "Qwen/Qwen2.5-7B-Instruct"
HELLO = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def models(vllm: ChatOpenAI, ollama: ChatOllama) -> list[dict[str, Any]]:
    return [
        {"id": "qwen", "provider": "openai", "role": "chat", "endpoint": vllm.url,
         "model": QWEN, "primary": True, "latency_estimate": 100, "quality": 0.7},
        {"id": "llama", "provider": "ollama", "role": "chat", "endpoint": ollama.url,
         "model": "llama3:8b", "latency_estimate": 200, "quality": 0.5},
    ]


def start(workdir: Path, vllm: ChatOpenAI, ollama: ChatOllama, **gateway: Any
          ) -> tuple[DaemonProcess, str]:
    port = free_port()
    config = daemon_config(workdir, models(vllm, ollama),
                           gateway={"listen": f"127.0.0.1:{port}", **gateway},
                           probe={"interval": "5s", "timeout": "1s",
                                  "recheck_interval": "100ms"})
    daemon = DaemonProcess(workdir, config)
    daemon.start()
    daemon.wait_health("qwen", "healthy")
    daemon.wait_health("llama", "healthy")
    return daemon, f"http://127.0.0.1:{port}/v1"


def test_a_client_loop_sees_no_error_while_the_primarys_server_is_killed(workdir: Path):
    with FakeServers() as servers:
        vllm = servers.start(ChatOpenAI([QWEN], flavor="vllm"))
        ollama = servers.start(ChatOllama(["llama3:8b"], loaded=["llama3:8b"]))
        daemon, base = start(workdir, vllm, ollama)
        try:
            client = openai.OpenAI(base_url=base, api_key="anything", max_retries=0)
            served: list[str] = []
            errors: list[BaseException] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        raw = client.chat.completions.with_raw_response.create(
                            model="chat", messages=HELLO, stream=len(served) % 2 == 0)
                        served.append(raw.headers["x-modeld-model"])
                        body = raw.parse()
                        if not isinstance(body, openai.types.chat.ChatCompletion):
                            "".join(c.choices[0].delta.content or "" for c in body if c.choices)
                    except Exception as exc:
                        errors.append(exc)

            worker = threading.Thread(target=traffic)
            worker.start()
            wait_for(lambda: len(served) >= 20, 10, what="traffic through the door")
            killed_at = time.monotonic()
            vllm.set_mode("down")
            # the first failed request, not the next probe (5 s away), moves resolve
            wait_for(lambda: daemon.get("/api/v1/resolve?role=chat")["model_id"] == "llama",
                     3, what="resolve moving to llama")
            moved = time.monotonic() - killed_at
            count_then = len(served)
            wait_for(lambda: len(served) >= count_then + 20, 10, what="more traffic")
            stop.set()
            worker.join(10)
            client.close()
            assert errors == [], [repr(e.__cause__) for e in errors]
            assert served[:5] == ["qwen"] * 5 and served[-5:] == ["llama"] * 5
            assert moved < 2.0
            view = daemon.model("qwen")
            assert view["health_status"] == "unavailable"
            failovers = daemon.log_events("gateway_failover")
            assert any(f["reason"] == "connection refused" for f in failovers)
            assert {f["level"] for f in failovers} == {"warning"}
            metrics = daemon.request("GET", "/metrics")[1]
            assert 'modeld_gateway_failovers_total{model_id="qwen",reason="refused",' \
                   'role="chat"}' in metrics
        finally:
            daemon.close()


def test_a_hung_upstream_hands_over_after_the_first_byte_timeout_and_a_hang_up_frees_it(
        workdir: Path):
    with FakeServers() as servers:
        vllm = servers.start(ChatOpenAI([QWEN], flavor="vllm", tokens=500,
                                        chunk_interval=0.01))
        ollama = servers.start(ChatOllama(["llama3:8b"], loaded=["llama3:8b"]))
        daemon, base = start(workdir, vllm, ollama, first_byte_timeout="400ms",
                             max_concurrent=2)
        try:
            # a client hanging up mid-stream: the upstream sees its connection closed at once
            with httpx.Client(timeout=5) as http, http.stream(
                    "POST", f"{base}/chat/completions",
                    json={"model": "chat", "messages": HELLO, "stream": True}) as response:
                assert response.headers["x-modeld-model"] == "qwen"
                next(response.iter_raw())
            wait_for(lambda: vllm.streams_closed_by_client == 1, 1.0,
                     what="the upstream seeing the hang-up")
            vllm.set_chat_fault("hang")
            client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
            started = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(model="chat",
                                                                   messages=HELLO)
            took = time.monotonic() - started
            assert raw.headers["x-modeld-model"] == "llama"
            assert raw.headers["x-modeld-attempts"] == "2"
            assert 0.4 <= took < 2.0
            # limits: a body over max_request_bytes is refused before any upstream sees it
            big = httpx.post(f"{base}/chat/completions", timeout=5,
                             json={"model": "chat", "messages": [
                                 {"role": "user", "content": "x" * 17_000_000}]})
            assert big.status_code == 413
            client.close()
        finally:
            daemon.close()


def test_a_door_that_needs_a_client_key_refuses_to_start_without_it(workdir: Path):
    with FakeServers() as servers:
        vllm = servers.start(ChatOpenAI([QWEN], flavor="vllm"))
        ollama = servers.start(ChatOllama(["llama3:8b"]))
        port = free_port()
        unkeyed = daemon_config(workdir / "a", models(vllm, ollama),
                                gateway={"listen": f"0.0.0.0:{port}"})
        assert DaemonProcess(workdir / "a", unkeyed).run_to_exit() == 78
        keyed = daemon_config(workdir / "b", models(vllm, ollama),
                              gateway={"listen": f"0.0.0.0:{port}",
                                       "clients_key_env": "MODELD_TEST_DOOR_KEY"})
        missing = DaemonProcess(workdir / "b", keyed, extra_env={"MODELD_TEST_DOOR_KEY": ""})
        assert missing.run_to_exit() == 78
        assert "MODELD_TEST_DOOR_KEY is not set or empty" in missing.log_tail()
        daemon = DaemonProcess(workdir / "c", dict(keyed, daemon=daemon_config(
            workdir / "c", [])["daemon"]), extra_env={"MODELD_TEST_DOOR_KEY": "door-key"})
        try:
            daemon.start()
            daemon.wait_health("qwen", "healthy")
            base = f"http://127.0.0.1:{port}/v1"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=base, api_key="guess", max_retries=0).models.list()
            listing = openai.OpenAI(base_url=base, api_key="door-key", max_retries=0).models.list()
            assert {m.id for m in listing.data} == {"chat", "qwen", "llama"}
            # reload: what can apply does, the address needs a restart and says so
            changed = dict(daemon.config)
            changed["gateway"] = {**keyed["gateway"], "listen": f"127.0.0.1:{free_port()}",
                                  "clients_key_env": "", "max_attempts": 1}
            daemon.write_config(changed)
            answer = daemon.post("/api/v1/reload")
            assert answer["restart_required"] == ["gateway.listen"]
            # the door keeps its address and, being open to the network, its key
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=base, api_key="guess", max_retries=0).models.list()
            shown = daemon.request("GET", "/api/v1/status")[1]
            assert shown["gateway"]["listen"] == f"0.0.0.0:{port}"  # until a restart
            assert shown["gateway"]["in_flight"] == 0
        finally:
            daemon.close()
