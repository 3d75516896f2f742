"""Issue 10.4: time queued for a probe slot is not the probe's, and no endpoint takes them all.

With 250 servers that accept and never answer, healthy models on another server were marked
"timed out after 3s", then unavailable: their probes waited for one of ``max_concurrent``
slots behind the hung requests, and the wait counted against their deadline. Now a probe's
deadline and latency start when its request does, and one endpoint holds at most a quarter
of the slots.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from fakes_fixtures import running_prober, spec
from scheduler_support import in_process_daemon, scheduling

from daemon.core.model import HealthStatus, ProbeResult
from daemon.probing.context import endpoint_share
from daemon.testing.fakes import FakeOpenAI

pytestmark = pytest.mark.anyio

HUNG_SERVERS = 8
HEALTHY_MODELS = 4
MAX_CONCURRENT = 4
TIMEOUT_S = 0.3


async def test_hung_servers_cost_their_own_models_never_a_healthy_neighbours(
        tmp_path: Path) -> None:
    async with (
        FakeOpenAI([f"ok-{i}" for i in range(HEALTHY_MODELS)], flavor="vllm") as healthy,
        anyio.create_task_group() as fakes,
    ):
        hung: list[FakeOpenAI] = []
        for i in range(HUNG_SERVERS):
            fake = FakeOpenAI([f"hung-{i}"], flavor="vllm")
            await fakes.start(fake.serve)
            hung.append(fake)
        models = [{"id": f"hung-{i}", "provider": "openai", "endpoint": fake.url}
                  for i, fake in enumerate(hung)]
        models += [{"id": f"ok-{i}", "provider": "openai", "endpoint": healthy.url,
                    "role": "chat"} for i in range(HEALTHY_MODELS)]
        daemon = in_process_daemon(
            tmp_path, models,
            probe={"interval": "200ms", "timeout": TIMEOUT_S, "recheck_interval": "100ms",
                   "max_concurrent": MAX_CONCURRENT})
        async with scheduling(daemon):
            await anyio.sleep(0.2)  # every model probed once, all answering
            for fake in hung:
                fake.set_mode("hang")
            await anyio.sleep(3 * TIMEOUT_S)
        fakes.cancel_scope.cancel()
    assert daemon.prober is not None
    slots = daemon.prober.slots  # the hung endpoints share half of the slots, at most
    assert not slots.hanging(healthy.url + "/v1/models")
    assert sum(slots.hanging(fake.url + "/v1/models") for fake in hung) >= HUNG_SERVERS // 2
    registry = daemon.registry
    for i in range(HEALTHY_MODELS):
        entry = registry.models[f"ok-{i}"]
        assert entry.health.status is HealthStatus.HEALTHY, entry.last_probe
        assert entry.health.failures_total == 0, [r.reason for r in entry.recent]
        assert entry.health.probes_total >= 3  # kept probed, not starved by the hung ones
        # the latency is the request's own, not the time it queued behind the hung servers
        assert all(r.latency_ms is not None and r.latency_ms < 100 for r in entry.recent)
    # the hung servers' own models pay: they share half of the slots between them, so not
    # every one has a verdict yet, and every failure they have is their own timeout
    hung_entries = [registry.models[f"hung-{i}"] for i in range(HUNG_SERVERS)]
    assert sum(1 for e in hung_entries if e.health.failures_total) >= HUNG_SERVERS // 2
    assert all(r.reason.endswith(f"timed out after {TIMEOUT_S:g}s")  # listing or /health
               for e in hung_entries for r in e.recent if not r.status.ok)


async def test_one_endpoint_holds_at_most_its_share_of_the_slots() -> None:
    share = endpoint_share(MAX_CONCURRENT)
    assert share == 1
    deep_models = 3
    async with (
        FakeOpenAI([f"deep-{i}" for i in range(deep_models)], flavor="vllm") as busy,
        FakeOpenAI(["other"], flavor="vllm") as other,
        running_prober(max_concurrent=MAX_CONCURRENT, timeout=TIMEOUT_S) as prober,
    ):
        busy.set_mode("hang")
        done: list[tuple[str, ProbeResult]] = []

        async def probe(model: str, url: str, deep: bool) -> None:
            done.append((model, await prober.run(spec(model, endpoint=url), deep=deep)))

        async with anyio.create_task_group() as tg:
            for i in range(deep_models):  # deep probes are per model: one POST each
                tg.start_soon(probe, f"deep-{i}", busy.url, True)
            await anyio.sleep(0.1)
            sent_at_first = busy.count("POST", "/v1/chat/completions")
            tg.start_soon(probe, "other", other.url, False)
        sent_in_all = busy.count("POST", "/v1/chat/completions")
    assert sent_at_first == share  # the others wait for the endpoint's slot
    first_model, first = done[0]
    assert first_model == "other" and first.ok, done[0]  # it did not wait behind them
    # the queued probes were not timed out while they waited: each sent its request in turn
    # and was cut at its own deadline, its latency its own request's
    assert sent_in_all == deep_models
    assert [r.reason for _m, r in done[1:]] == [f"timed out after {TIMEOUT_S:g}s"] * deep_models
    assert all(r.latency_ms is not None and r.latency_ms < TIMEOUT_S * 1000 + 300
               for _m, r in done[1:])
