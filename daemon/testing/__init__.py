"""Helpers for testing a probe plugin, and the fakes and harness modeld's own tests use.

For plugin authors (documented in the README, "Testing a plugin"):

- :func:`probe_context` gives a real :class:`~daemon.ProbeContext` whose HTTP client answers
  from a handler of yours (``httpx.MockTransport``): unit-test a probe without a server.
- :func:`run_probe` runs a probe the way the daemon does (the real ``Prober``: deadline,
  isolation, normalisation) and returns the :class:`~daemon.ProbeResult` the daemon would keep.
- :mod:`daemon.testing.fakes` serves fakes of real servers (``FakeOpenAI``, ``FakeOllama``)
  on 127.0.0.1 for integration tests; :mod:`daemon.testing.chat_fakes` adds their generation
  routes (chat, completions, embeddings; streamed or not) and faults, for the front door;
  :mod:`daemon.testing.harness` runs the real daemon.

Importing this package imports httpx and anyio, never the daemon's service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from ..core.model import ModelSpec, ProbeResult
from ..core.settings import ProbeConfig
from ..probing.context import Probe, ProbeContext, make_http_client
from ..probing.prober import Prober

__all__ = ["Handler", "probe_context", "run_probe"]

#: Answers one request: ``httpx.MockTransport``'s handler.
Handler = Callable[[httpx.Request], httpx.Response]


@asynccontextmanager
async def probe_context(handler: Handler, *, timeout: float = 3.0, deep: bool = False,
                        max_response_bytes: int = 1048576) -> AsyncIterator[ProbeContext]:
    """A probe context whose requests are answered by ``handler`` (no network)."""
    config = ProbeConfig(timeout=timeout, max_response_bytes=max_response_bytes)
    transport = httpx.MockTransport(handler)
    async with make_http_client(config, transport=transport) as client:
        yield ProbeContext(client, timeout=timeout, deep=deep,
                           max_response_bytes=max_response_bytes)


async def run_probe(probe: Probe, spec: ModelSpec, handler: Handler, *,
                    timeout: float = 3.0) -> ProbeResult:
    """The result the daemon would record for ``probe`` on ``spec``, its requests answered by
    ``handler``: run through the real prober, so a probe that raises, hangs or returns the
    wrong type gives the failure the daemon would show."""
    config = ProbeConfig(timeout=timeout)
    async with make_http_client(config, transport=httpx.MockTransport(handler)) as client:
        return await Prober({spec.provider: probe}, client, config).run(spec)
