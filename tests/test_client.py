"""daemon.control.client against a stub daemon on a real Unix socket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.control.client import ModeldClient, ModeldError, ModeldUnreachable
from daemon.control.listeners import create_unix_listener
from daemon.control.messages import HTTPError, Request, Response, StreamingResponse
from daemon.control.server import HTTPServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Stub:
    """Echoes what it was asked; a few routes answer specially."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.more_events = anyio.Event()

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        self.requests.append(request)
        if request.path == "/metrics":
            return Response.text("modeld_up 1\n", content_type="text/plain; version=0.0.4")
        if request.path == "/api/v1/resolve" and request.query_one("role") == "none":
            raise HTTPError(
                503,
                "no_usable_model",
                "no usable model for role none",
                reasons={"a": "unavailable"},
            )
        if request.path == "/api/v1/models/ghost":
            raise HTTPError(404, "model_not_found", "no model ghost")
        if request.path == "/api/v1/status" and request.query_one("broken"):
            return Response(500, b"<html>oops</html>", "text/html")
        if request.path == "/api/v1/events":
            return StreamingResponse(self._events(request))
        return Response.json(
            {
                "method": request.method,
                "path": request.path,
                "target": request.target,
                "query": request.query,
                "body": request.json() if request.body else None,
            }
        )

    async def _events(self, request: Request) -> AsyncIterator[bytes]:
        since = int(request.query_one("since", "1") or 1)
        for seq in range(since, 4):
            yield json.dumps({"seq": seq, "kind": "health_changed"}).encode() + b"\n"
        if request.query_one("follow") == "1":
            await self.more_events.wait()
            yield b'{"seq": 4, "kind": "model_promoted"}\n'
            await anyio.sleep_forever()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[str, Stub]]:
    stub = Stub()
    path = str(tmp_path / "control.sock")
    server = HTTPServer(stub)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path, 0o660))
        yield path, stub
        await server.shutdown(grace=1)


ROUTES: list[tuple[str, tuple[Any, ...], dict[str, Any], str, str, Any]] = [
    ("list_models", (), {}, "GET", "/api/v1/models/", None),
    ("get_model", ("llama3-8b",), {}, "GET", "/api/v1/models/llama3-8b", None),
    ("evaluate", ("llama3-8b",), {}, "POST", "/api/v1/models/llama3-8b/evaluate", {}),
    ("promote", ("qwen",), {}, "POST", "/api/v1/models/promote", {"model_id": "qwen"}),
    (
        "promote",
        ("qwen",),
        {"force": True},
        "POST",
        "/api/v1/models/promote",
        {"model_id": "qwen", "force": True},
    ),
    ("rollback", (), {}, "POST", "/api/v1/models/rollback", {}),
    ("rollback", ("chat",), {}, "POST", "/api/v1/models/rollback", {"role": "chat"}),
    ("auto_upgrade_check", (), {}, "POST", "/api/v1/models/auto-upgrade/check", {}),
    ("auto_upgrade_execute", (), {}, "POST", "/api/v1/models/auto-upgrade/execute", {}),
    ("set_offline_mode", (True,), {}, "POST", "/api/v1/models/offline-mode", {"enabled": True}),
    ("set_offline_mode", (False,), {}, "POST", "/api/v1/models/offline-mode", {"enabled": False}),
    ("offline_status", (), {}, "GET", "/api/v1/models/offline-mode/status", None),
    ("status", (), {}, "GET", "/api/v1/status", None),
    ("reload", (), {}, "POST", "/api/v1/reload", {}),
    ("promote", ("qwen",), {"reason": "key rotated"}, "POST", "/api/v1/models/promote",
     {"model_id": "qwen", "reason": "key rotated"}),
    ("rollback", ("chat",), {"reason": "back"}, "POST", "/api/v1/models/rollback",
     {"role": "chat", "reason": "back"}),
    ("history", ("chat",), {}, "GET", "/api/v1/roles/chat/history", None),
]


@pytest.mark.anyio
async def test_history_passes_the_limit(daemon: tuple[str, Stub]) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        answer = await client.history("chat", limit=5)
    assert (answer["path"], answer["query"]) == ("/api/v1/roles/chat/history", {"limit": ["5"]})


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "args", "kwargs", "verb", "path", "body"), ROUTES)
async def test_each_method_sends_its_route(
    daemon: tuple[str, Stub],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    verb: str,
    path: str,
    body: Any,
) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        answer = await getattr(client, method)(*args, **kwargs)
    assert (answer["method"], answer["path"], answer["body"]) == (verb, path, body)


@pytest.mark.anyio
async def test_resolve_sends_role_and_each_capability(daemon: tuple[str, Stub]) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        answer = await client.resolve(role="chat", capabilities=["code", "vision"])
        bare = await client.resolve()
    assert answer["path"] == "/api/v1/resolve"
    assert answer["query"] == {"role": ["chat"], "capability": ["code", "vision"]}
    assert bare["query"] == {}


@pytest.mark.anyio
async def test_model_ids_are_percent_encoded(daemon: tuple[str, Stub]) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        answer = await client.get_model("org/model:7b q")
    assert answer["path"] == "/api/v1/models/org/model:7b q"
    assert answer["target"] == "/api/v1/models/org%2Fmodel%3A7b%20q"


@pytest.mark.anyio
async def test_metrics_returns_the_text(daemon: tuple[str, Stub]) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        assert await client.metrics() == "modeld_up 1\n"


@pytest.mark.anyio
async def test_error_answers_raise_modeld_error_with_code_and_details(
    daemon: tuple[str, Stub],
) -> None:
    socket_path, _ = daemon
    async with ModeldClient(socket_path) as client:
        with pytest.raises(ModeldError) as missing:
            await client.get_model("ghost")
        with pytest.raises(ModeldError) as nothing:
            await client.resolve(role="none")
    assert (missing.value.status, missing.value.code) == (404, "model_not_found")
    assert missing.value.message == "no model ghost"
    assert (nothing.value.status, nothing.value.code) == (503, "no_usable_model")
    assert nothing.value.details == {"reasons": {"a": "unavailable"}}


def test_an_error_body_that_is_not_the_error_document_still_maps() -> None:
    error = ModeldError.from_response(502, b"<html>bad gateway</html>")
    assert (error.status, error.code, error.message) == (
        502,
        "http_error",
        "<html>bad gateway</html>",
    )
    assert ModeldError.from_response(500, b"").message == "HTTP 500"


@pytest.mark.anyio
async def test_missing_socket_raises_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.sock")
    async with ModeldClient(path) as client:
        with pytest.raises(ModeldUnreachable) as caught:
            await client.status()
    assert caught.value.status == 0 and caught.value.code == "unreachable"
    assert path in caught.value.message
    assert isinstance(caught.value, ModeldError)


@pytest.mark.anyio
async def test_socket_path_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_SOCKET", "/tmp/elsewhere.sock")
    async with ModeldClient() as client:
        assert client.socket_path == "/tmp/elsewhere.sock"
    monkeypatch.delenv("MODELD_SOCKET")
    async with ModeldClient() as client:
        assert client.socket_path == "/run/modeld/control.sock"


@pytest.mark.anyio
async def test_events_replays_and_ends(daemon: tuple[str, Stub]) -> None:
    socket_path, stub = daemon
    async with ModeldClient(socket_path) as client:
        events = [event async for event in client.events()]
        since = [event["seq"] async for event in client.events(since=2)]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert since == [2, 3]
    assert stub.requests[-1].query == {"since": ["2"]}


@pytest.mark.anyio
async def test_events_follow_yields_new_events_as_they_happen(daemon: tuple[str, Stub]) -> None:
    socket_path, stub = daemon
    seen: list[int] = []

    async def publish_later() -> None:
        await anyio.sleep(0.7)  # quieter than the client's timeout: following never times out
        stub.more_events.set()

    async with ModeldClient(socket_path, timeout=0.5) as client, anyio.create_task_group() as tg:
        stream = client.events(follow=True)
        with anyio.fail_after(5):
            async for event in stream:
                seen.append(event["seq"])
                if event["seq"] == 3:
                    tg.start_soon(publish_later)
                if event["seq"] == 4:
                    break
        await stream.aclose()  # type: ignore[attr-defined]
    assert seen == [1, 2, 3, 4]
    assert stub.requests[-1].query == {"follow": ["1"]}
