"""The front door in-process for tests: a real registry, real fakes on 127.0.0.1, the real
door on a real TCP port, and the real ``openai`` SDK as the client."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai
import structlog

from daemon.core.model import ModelSpec, ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config, GatewayConfig
from daemon.gateway import DoorServer, Gateway, make_upstream_client, refusal
from daemon.service.metrics import Metrics


@dataclass
class Door:
    url: str
    registry: ModelRegistry
    gateway: Gateway
    server: DoorServer
    metrics: Metrics
    observed: list[tuple[str, ProbeResult]] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    rechecked: list[str] = field(default_factory=list)  # recheck asked, nothing recorded

    clients: dict[str, openai.AsyncOpenAI] = field(default_factory=dict)

    def client(self, key: str = "unused") -> openai.AsyncOpenAI:
        """The SDK pointed at the door (one per key, closed with the door)."""
        if key not in self.clients:
            self.clients[key] = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key,
                                                   max_retries=0)
        return self.clients[key]

    async def settled(self, timeout: float = 2.0) -> None:
        """Wait until no request is in flight (the SDK returns once it has the whole body,
        a moment before the door has seen the upstream's end)."""
        with anyio.fail_after(timeout):
            while self.gateway.in_flight:
                await anyio.sleep(0.005)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


def spec(model_id: str, endpoint: str, *, role: str = "chat", provider: str = "openai",
         model: str | None = None, **kwargs: Any) -> ModelSpec:
    return ModelSpec(id=model_id, provider=provider, role=role, endpoint=endpoint,
                     model=model or model_id, local=True, **kwargs)


def healthy(registry: ModelRegistry, *model_ids: str) -> None:
    for model_id in model_ids or tuple(registry.models):
        for _ in range(2):
            registry.apply_probe(model_id, ProbeResult.healthy(5.0), time.time())


@contextlib.asynccontextmanager
async def running_door(models: Sequence[ModelSpec], *, gateway: GatewayConfig | None = None,
                       environ: dict[str, str] | None = None,
                       mark_healthy: bool = True) -> AsyncIterator[Door]:
    config = Config(models=tuple(models), gateway=gateway or GatewayConfig(listen="x:1"))
    registry = ModelRegistry(config, time.time())
    if mark_healthy:
        healthy(registry, *(m.id for m in models if m.provider != "local_file"))
    metrics = Metrics(lambda: registry)
    observed: list[tuple[str, ProbeResult]] = []

    def observe(model_id: str, result: ProbeResult) -> None:
        observed.append((model_id, result))
        registry.apply_probe(model_id, result, time.time())

    rechecked: list[str] = []
    env = dict(environ or {})
    log = structlog.get_logger("test.gateway")
    async with make_upstream_client() as client:
        gw = Gateway(config=lambda: config.gateway, registry=lambda: registry, observe=observe,
                     recheck=rechecked.append, client=client, log=log, metrics=metrics,
                     environ=env, created=1700000000)
        server = DoorServer(gw.handle, lambda: config.gateway.max_request_bytes, refusal, log,
                            admit=gw.admit)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, listener)
            door = Door(f"http://127.0.0.1:{port}", registry, gw, server, metrics, observed,
                        env, rechecked)
            try:
                yield door
            finally:
                for sdk in door.clients.values():
                    await sdk.close()
                await server.shutdown(0.5)
                tg.cancel_scope.cancel()
