"""Issue 10.2: a huge model listing probed over and over must not pile up in memory.

A server lists 62,000 models in 1 MB (under the default ``max_response_bytes``). The openai
probe indexes a listing once per shared reply so that the models of an endpoint do not each
scan it; that index used to be kept in a cache of up to 256 parsed listings keyed by ``id()``,
so every probe of such a server left ~20 MB behind (RSS 35 MB → 2.3 GB in 30 s at one probe
every 200 ms). Now the index lives on the reply and goes with it.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from fakes_fixtures import running_prober, spec

import plugins.openai
from daemon.testing.fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

ENTRIES = 62_000
ROUNDS = 8
MODELS_PER_ROUND = 3  # models of one endpoint probed together: one shared reply per round


class HugeListing(FakeUpstream):
    """An OpenAI-compatible server whose ``/v1/models`` lists 62,000 short ids (~1 MB)."""

    def __init__(self) -> None:
        super().__init__()
        data = [{"id": f"m{i:05d}"} for i in range(ENTRIES)]
        self.body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytes) -> FakeResponse:
        return FakeResponse(200, self.body)


async def probe_round(prober: Any, url: str) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(MODELS_PER_ROUND):
            model = f"m{i * 1000:05d}"

            async def one(model: str = model) -> None:
                result = await prober.run(spec(model, endpoint=url))
                assert result.ok, result.reason

            tg.start_soon(one)


async def test_a_huge_listing_probed_repeatedly_leaves_nothing_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    built = 0
    real_index = plugins.openai._index

    def counting_index(entries: list[Any]) -> dict[str, Any]:
        nonlocal built
        built += 1
        return real_index(entries)

    monkeypatch.setattr(plugins.openai, "_index", counting_index)
    fake = HugeListing()
    assert 900_000 < len(fake.body) < 1_048_576  # the attack: just under the default cap
    async with fake, running_prober(timeout=10.0) as prober:
        await probe_round(prober, fake.url)  # warm-up: connections, imports, caches
        gc.collect()
        tracemalloc.start()
        try:
            gc.collect()
            baseline, _ = tracemalloc.get_traced_memory()
            for _ in range(ROUNDS):
                await probe_round(prober, fake.url)
            gc.collect()
            retained, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    rounds = ROUNDS + 1
    assert fake.count("GET", "/v1/models") == rounds  # one shared request per round
    assert built == rounds  # indexed once per shared reply, not once per model
    growth_mb = (retained - baseline) / 1e6
    print(f"retained {growth_mb:.2f} MB, peak {(peak - baseline) / 1e6:.0f} MB")
    # one parsed listing with its index is ~15 MB; the old cache kept every one of them
    assert growth_mb < 2.0, f"{growth_mb:.1f} MB retained after {ROUNDS} rounds"
    assert peak - baseline < 60e6, f"peak {(peak - baseline) / 1e6:.0f} MB over the baseline"
