"""A quiet host stays quiet (issue 13): probes that change no verdict are checkpointed at most
every ``state_checkpoint``, a verdict change is saved within ``state_flush_interval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from scheduler_support import in_process_daemon

from daemon.config import ConfigError, parse_config
from daemon.core.model import ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.service import timers

MODELS: list[dict[str, Any]] = [
    {"id": f"m{i}", "provider": "openai", "endpoint": "http://127.0.0.1:9"} for i in range(3)]


def registry() -> ModelRegistry:
    return ModelRegistry(parse_config({"models": MODELS}), 0.0)


def test_a_probe_that_keeps_the_verdict_is_no_material_change() -> None:
    reg = registry()
    reg.apply_probe("m0", ProbeResult.healthy(10.0), 1.0)  # unknown → healthy: a verdict
    assert reg.material_version == reg.version
    material = reg.material_version
    for n in range(5):
        reg.apply_probe("m0", ProbeResult.healthy(10.0 + n), 2.0 + n)  # latencies move
    assert reg.version > material and reg.material_version == material
    reg.apply_probe("m0", ProbeResult.failure("connection refused"), 9.0)  # → degraded
    assert reg.material_version == reg.version


def test_decisions_are_material() -> None:
    reg = registry()
    reg.apply_probe("m0", ProbeResult.healthy(1.0), 1.0)
    reg.apply_probe("m0", ProbeResult.healthy(1.0), 2.0)
    assert reg.material_version < reg.version
    reg.set_offline_mode(True, now=3.0, actor="test")
    assert reg.material_version == reg.version


def test_state_checkpoint_is_a_duration_and_zero_means_every_flush() -> None:
    assert parse_config({}).daemon.state_checkpoint == 300.0
    assert parse_config({"daemon": {"state_checkpoint": "0s"}}).daemon.state_checkpoint == 0.0
    with pytest.raises(ConfigError, match=r"daemon\.state_checkpoint: a duration cannot be "
                       "negative"):
        parse_config({"daemon": {"state_checkpoint": -1}})


@pytest.mark.anyio
async def test_the_flusher_writes_verdicts_at_once_and_latencies_at_the_checkpoint(
        tmp_path: Path) -> None:
    daemon = in_process_daemon(tmp_path, MODELS,
                               daemon={"state_flush_interval": "20ms",
                                       "state_checkpoint": "400ms"})
    writes: list[int] = []
    real_write = daemon.store.write

    def counting_write(snapshot: Any) -> int:
        writes.append(daemon.registry.version)
        return real_write(snapshot)

    daemon.store.write = counting_write  # type: ignore[method-assign]
    scheduler = daemon.scheduler
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.flusher, daemon)
        for model in ("m0", "m1", "m2"):
            scheduler.apply(daemon.registry.models[model].spec, ProbeResult.healthy(5.0))
        await anyio.sleep(0.1)
        assert len(writes) == 1  # three verdicts (unknown → healthy) in one flush
        for n in range(10):  # a quiet host: every probe answers, only latencies move
            for model in ("m0", "m1", "m2"):
                scheduler.apply(daemon.registry.models[model].spec,
                                ProbeResult.healthy(5.0 + n))
            await anyio.sleep(0.02)
        assert len(writes) == 1  # 30 probes, 10 flushes, no write
        scheduler.apply(daemon.registry.models["m1"].spec, ProbeResult.failure("refused"))
        await anyio.sleep(0.1)
        assert len(writes) == 2  # a verdict changed: written within the flush interval
        scheduler.apply(daemon.registry.models["m0"].spec, ProbeResult.healthy(7.0))
        await anyio.sleep(0.5)
        assert len(writes) == 3  # the latency, at the checkpoint
        tg.cancel_scope.cancel()
    assert daemon.saver.saved_version == daemon.registry.version
