"""The policy's promises on the real daemon, with short timings (issue 12): an outage of the
better primary, short or long, fails over to the stand-in and back, and never leaves the role
on the worse model; an operator's promotion survives the policy's ticks. The pure rules behind
it are in tests/test_policy_rules.py; here the real scheduler, timers, socket and state file
play them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

# probes every 200 ms, an outage confirmed after 3 failures 50 ms apart, a window of 10 probes
# (2 s): a "short" outage leaves part of the window healthy, a "long" one fills it with failures
TIMINGS: dict[str, Any] = {
    "probe": {"interval": "200ms", "timeout": "300ms", "recheck_interval": "50ms"},
    "health": {"failure_threshold": 3, "success_threshold": 2, "window": 10},
    "policy": {"interval": "200ms", "auto_execute": True, "min_consecutive_healthy": 2,
               "min_margin": 0.05, "sustain": "1s", "cooldown": "1s", "probation": "200ms",
               "quarantine": "1h", "failback": True},
}


@pytest.fixture
def servers() -> Iterator[FakeServers]:
    with FakeServers() as running:
        yield running


def primary(daemon: DaemonProcess) -> str | None:
    status, body = daemon.request("GET", "/api/v1/roles/chat/history")
    assert status == 200
    return body["primary"]  # type: ignore[no-any-return]


def test_outages_of_the_better_primary_fail_over_and_back_and_never_swap_it_for_good(
        workdir: Path, servers: FakeServers) -> None:
    big = servers.start(FakeOpenAI(["qwen2.5-14b"], flavor="vllm"))
    small = servers.start(FakeOpenAI(["llama3-8b"], flavor="vllm"))
    models = [
        {"id": "qwen2.5-14b", "provider": "openai", "endpoint": big.url, "role": "chat",
         "primary": True, "quality": 0.85},
        {"id": "llama3-8b", "provider": "openai", "endpoint": small.url, "role": "chat",
         "quality": 0.65},
    ]
    with DaemonProcess(workdir, daemon_config(workdir, models, **TIMINGS)) as daemon:
        daemon.wait_health("qwen2.5-14b", "healthy")
        daemon.wait_health("llama3-8b", "healthy")
        for outage in (0.6, 2.5):  # seconds the server is down after the outage is confirmed
            big.set_mode("down")
            wait_for(lambda: primary(daemon) == "llama3-8b", 5, what="failover to the 8b")
            time.sleep(outage)
            big.set_mode("normal")
            wait_for(lambda: primary(daemon) == "qwen2.5-14b", 8, what="failback to the 14b")
            # the healed window must not make the 8b look better than the 14b it stood in for:
            # past sustain and cooldown, several policy ticks, the role stays on the 14b
            time.sleep(1.6)
            assert primary(daemon) == "qwen2.5-14b"

        history = daemon.request("GET", "/api/v1/roles/chat/history")[1]["history"]
        changes = [(h["action"], h["from"], h["to"], h["automatic"]) for h in history
                   if h["action"] != "initial"]
        assert changes == [
            ("promote", "qwen2.5-14b", "llama3-8b", True),
            ("promote", "llama3-8b", "qwen2.5-14b", True),
        ] * 2, changes
        reasons = [h["reason"] for h in history if h["action"] == "promote"]
        assert all("unavailable" in r for r in reasons[0::2]), reasons
        assert all("fail" in r.lower() for r in reasons[1::2]), reasons
        assert daemon.state()["roles"]["chat"]["primary"] == "qwen2.5-14b"  # saved so

        # an operator's choice, even of the worse model, survives the policy's ticks (10 and
        # more, past sustain and cooldown) until the operator releases the role
        daemon.post("/api/v1/models/promote", {"model_id": "llama3-8b", "reason": "evals"})
        time.sleep(10 * 0.2 + 1.0)
        assert primary(daemon) == "llama3-8b"
        assert daemon.state()["roles"]["chat"]["hold"] is not None
        daemon.post("/api/v1/roles/chat/release")
        # released, the 14b's lead (quality 0.85 vs 0.65: 0.04 of score) is below min_margin,
        # so the policy leaves the operator's model, and says why in numbers
        time.sleep(1.5)
        assert primary(daemon) == "llama3-8b"
        status, check = daemon.request("POST", "/api/v1/models/auto-upgrade/check")
        assert status == 200 and check["suggestions"] == []
        why = check["roles"]["chat"]["why"]
        assert "qwen2.5-14b" in why and "min_margin" in why, why
