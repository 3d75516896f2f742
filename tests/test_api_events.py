"""The event stream's ending: a dropped follower is told so; a shutdown ends it quietly."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from daemon.config import parse_config
from daemon.control.api import ControlAPI
from daemon.core.model import Event
from daemon.core.registry import ModelRegistry


class StubDaemon:
    def __init__(self, stopping: bool) -> None:
        config = parse_config({"models": [{"id": "a", "provider": "openai",
                                           "endpoint": "http://127.0.0.1:9"}]})
        self.registry = ModelRegistry(config, 0.0)
        self._stopping = stopping
        self.send: MemoryObjectSendStream[Event] | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](4)
        self.send = send
        self.registry.listeners.append(lambda e: send.send_nowait(e))
        try:
            yield receive
        finally:
            receive.close()

    def stopping(self) -> bool:
        return self._stopping


async def follow_until_closed(daemon: StubDaemon) -> list[dict[str, Any]]:
    api = ControlAPI(daemon, log=None)  # type: ignore[arg-type]
    lines: list[dict[str, Any]] = []
    stream = api._follow(None)

    async def produce() -> None:
        await anyio.sleep(0.01)
        daemon.registry.set_offline_mode(True, now=1.0)
        daemon.registry.set_offline_mode(False, now=2.0)
        assert daemon.send is not None
        daemon.send.close()  # what the daemon does to a follower it drops, or at shutdown

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async for chunk in stream:
            lines.extend(json.loads(x) for x in chunk.decode().splitlines())
    return lines


@pytest.mark.anyio
async def test_a_dropped_follower_gets_a_last_line_naming_what_it_saw() -> None:
    lines = await follow_until_closed(StubDaemon(stopping=False))
    assert [x["kind"] for x in lines] == ["offline_mode_changed", "offline_mode_changed",
                                          "stream_dropped"]
    assert lines[-1]["last_seq"] == lines[1]["seq"]
    assert f"since={lines[1]['seq']}" in lines[-1]["reason"]


@pytest.mark.anyio
async def test_a_shutdown_ends_the_stream_without_a_drop_notice() -> None:
    lines = await follow_until_closed(StubDaemon(stopping=True))
    assert [x["kind"] for x in lines] == ["offline_mode_changed", "offline_mode_changed"]
