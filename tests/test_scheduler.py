"""The probe scheduler's bookkeeping, in process (no sockets): outcomes observed outside the
probes (the front door, an application's report) fold in and start rechecks at once."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from daemon.config import parse_config
from daemon.core.model import ProbeResult
from daemon.service.lifecycle import Daemon


def make_daemon(tmp_path: Path) -> Daemon:
    config = parse_config({
        "daemon": {"state_file": str(tmp_path / "state.json"),
                   "socket": str(tmp_path / "s.sock")},
        "models": [{"id": "a", "provider": "openai", "endpoint": "http://127.0.0.1:9",
                    "role": "chat", "primary": True},
                   {"id": "b", "provider": "openai", "endpoint": "http://127.0.0.1:9",
                    "role": "chat"}],
    })
    return Daemon(config, environ={})


def test_an_observed_failure_counts_and_schedules_a_recheck_now(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    scheduler = daemon.scheduler
    scheduler.observe("a", ProbeResult.healthy(10.0))
    assert "a" not in scheduler.next_due  # a success leaves the schedule alone
    before = time.monotonic()
    scheduler.observe("a", ProbeResult.failure("HTTP 503 through the front door"))
    entry = daemon.registry.models["a"]
    assert entry.health.consecutive_failures == 1
    assert entry.last_probe is not None and entry.last_probe.reason.startswith("HTTP 503")
    assert before <= scheduler.next_due["a"] <= time.monotonic()
    assert scheduler.probes_total == 2


def test_an_observation_of_an_unknown_model_is_ignored(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    daemon.scheduler.observe("gone", ProbeResult.failure("x"))
    assert daemon.scheduler.probes_total == 0


@pytest.mark.anyio
async def test_an_observed_failure_wakes_the_endpoints_loop(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    scheduler = daemon.scheduler
    woken = anyio.Event()
    scheduler._wakers["http://127.0.0.1:9"] = woken
    scheduler.observe("b", ProbeResult.failure("connection refused"))
    with anyio.fail_after(1):
        await woken.wait()
