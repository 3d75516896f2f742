"""The probe scheduler: its bookkeeping in process (outcomes observed outside the probes fold
in and start rechecks at once), and its timing against fakes on 127.0.0.1 (a hung server is
found out without waiting for each probe's timeout in turn)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from scheduler_support import in_process_daemon, scheduling

from daemon.config import parse_config
from daemon.core import schedule
from daemon.core.model import HealthStatus, ProbeResult
from daemon.service.lifecycle import Daemon
from daemon.sim.engine import Simulation
from daemon.testing.fakes import HANG, FakeOpenAI, FakeResponse


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


# ----------------------------------------------------------------------------- hang detection

TIMEOUT_S = 0.6
RECHECK_S = 0.1
THRESHOLD = 3
#: DESIGN.md §3: unavailable about this long after the first unanswered probe
TARGET_S = TIMEOUT_S + (THRESHOLD - 1) * RECHECK_S
#: before: each recheck waited for the previous probe's timeout
BEFORE_S = THRESHOLD * TIMEOUT_S + (THRESHOLD - 1) * RECHECK_S


def hang_daemon(tmp_path: Path, url: str, interval: str = "300ms") -> Daemon:
    return in_process_daemon(
        tmp_path,
        [{"id": "llama", "provider": "openai", "endpoint": url, "server": "openai"}],
        probe={"interval": interval, "timeout": TIMEOUT_S, "recheck_interval": RECHECK_S},
        health={"failure_threshold": THRESHOLD})


async def until(predicate: Any, timeout: float) -> float:
    """Poll ``predicate`` every 10 ms; the monotonic time it first held."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
    return time.monotonic()


@pytest.mark.anyio
async def test_a_server_that_accepts_and_never_answers_is_unavailable_within_the_target(
        tmp_path: Path) -> None:
    async with FakeOpenAI(["llama"], flavor="llamacpp") as fake:
        daemon = hang_daemon(tmp_path, fake.url)
        entry = daemon.registry.models["llama"]
        async with scheduling(daemon):
            await until(lambda: entry.health.consecutive_successes >= 2, 3.0)
            fake.reset_counts()
            fake.set_mode("hang")  # like a llama-server stopped by SIGSTOP
            unavailable_at = await until(
                lambda: entry.health.status is HealthStatus.UNAVAILABLE, BEFORE_S + 2.0)
            hung = fake.arrivals("GET", "/v1/models")
    took = unavailable_at - hung[0]
    print(f"unavailable {took:.3f} s after the first unanswered probe "
          f"(target {TARGET_S:.2f} s)")
    # the rechecks did not wait for the first probe's timeout: they started a recheck
    # interval apart, each with a request of its own, never more than the threshold at once
    assert len(hung) >= THRESHOLD
    assert hung[THRESHOLD - 1] - hung[0] < TIMEOUT_S
    # in flight from its arrival until the client's deadline, timeout after the request
    # started (which is a moment before it arrives: connecting takes a little)
    cut = TIMEOUT_S - 0.05
    in_flight_at_most = max(sum(1 for a in hung if t - cut < a <= t) for t in hung)
    assert in_flight_at_most <= THRESHOLD
    assert took < (TARGET_S + BEFORE_S) / 2, f"{took:.2f} s (target {TARGET_S:.2f} s)"


@pytest.mark.anyio
async def test_a_slow_model_is_not_rechecked_before_its_probe_answers(tmp_path: Path) -> None:
    # 0.25 s a reply: well over the recheck interval, so a probe in flight is not overdue
    async with FakeOpenAI(["llama"], flavor="llamacpp", latency=0.25) as fake:
        daemon = hang_daemon(tmp_path, fake.url, interval="100ms")
        entry = daemon.registry.models["llama"]
        async with scheduling(daemon):
            await until(lambda: entry.health.probes_total >= 4, 5.0)
            arrivals = fake.arrivals("GET", "/v1/models")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.25 - 0.02, gaps  # one probe at a time
    assert entry.health.status is HealthStatus.HEALTHY


class OneStuckModel(FakeOpenAI):
    """A server whose generations for model "stuck" never finish; the rest answer."""

    stuck_at: list[float]

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytes) -> FakeResponse:
        if path == "/v1/chat/completions" and b'"stuck"' in body:
            self.stuck_at.append(time.monotonic())
            return HANG
        return super().route(method, path, headers, body)


@pytest.mark.anyio
async def test_no_early_recheck_while_the_endpoint_answers_the_other_models(
        tmp_path: Path) -> None:
    # one model's deep probe hangs, its neighbour's answers: the server is not hung, so the
    # stuck model's rechecks wait for its timeouts as before (one generation at a time)
    fake = OneStuckModel(["ok", "stuck"], flavor="vllm")
    fake.stuck_at = []
    async with fake:
        daemon = in_process_daemon(
            tmp_path,
            [{"id": name, "provider": "openai", "endpoint": fake.url, "deep": True,
              "latency_estimate": 10} for name in ("ok", "stuck")],
            probe={"interval": "200ms", "timeout": TIMEOUT_S, "recheck_interval": RECHECK_S},
            health={"failure_threshold": THRESHOLD})
        async with scheduling(daemon):
            await until(lambda: daemon.registry.models["stuck"].health.failures_total >= 2,
                        2 * TIMEOUT_S + 1.0)
    gaps = [b - a for a, b in itertools.pairwise(fake.stuck_at)]
    assert gaps and min(gaps) >= TIMEOUT_S - 0.05, gaps


# ------------------------------------------ one schedule for the daemon and the simulator
# The scheduler computes its schedule with daemon/core/schedule.py, the rules `modeld
# simulate` drives: the same inputs give the same next due time in both, and a change to a
# shared rule reaches both (a copy of the rules in the scheduler would not follow it).


def twin(tmp_path: Path, url: str, local: bool = True) -> tuple[Daemon, Simulation]:
    """A daemon's scheduler and a simulation of the same configuration (``local``: probed
    in offline mode too)."""
    daemon = in_process_daemon(
        tmp_path,
        [{"id": "llama", "provider": "openai", "endpoint": url, "server": "openai",
          "interval": "7s", "local": local}],
        probe={"interval": "5s", "recheck_interval": "1s"})
    return daemon, Simulation(daemon.config)


def simulated_next_due(sim: Simulation, result: ProbeResult | None, *, tick: float,
                       jitter: float, finished_at: float) -> float:
    """The simulator's next due time for a probe of "llama" on ``tick`` answering ``result``
    at ``finished_at`` (None: not probed, offline)."""
    group = next(iter(sim.groups.values()))
    sim.now = tick
    if result is None:
        sim.registry.offline_mode = True
        sim._start_probe(group, "llama", tick, jitter)
    else:
        group.in_flight["llama"] = [tick]
        sim.now = finished_at
        sim._finish_probe(group, "llama", result, tick, jitter,
                          schedule.probe_interval(sim.config.models[0], sim.config.probe))
    return sim.next_due["llama"]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["normal", "error500", "offline"])
async def test_the_scheduler_and_the_simulator_schedule_the_next_probe_alike(
        tmp_path: Path, mode: str) -> None:
    async with FakeOpenAI(["llama"], flavor="llamacpp") as fake:
        if mode != "offline":
            fake.set_mode(mode)
        daemon, sim = twin(tmp_path, fake.url, local=mode != "offline")
        daemon.registry.offline_mode = mode == "offline"
        tick = time.monotonic()
        assert daemon.client is not None
        async with daemon.client:
            result = await daemon.scheduler._probe("llama", tick, 1.05)
        finished_at = time.monotonic()
    assert (result is None) == (mode == "offline")
    simulated = simulated_next_due(sim, result, tick=tick, jitter=1.05,
                                   finished_at=finished_at)
    due = daemon.scheduler.next_due["llama"]
    if mode == "error500":  # open verdict: one recheck interval after the answer came in
        assert due == pytest.approx(simulated, abs=finished_at - tick)
        assert tick + 1.0 <= due <= finished_at + 1.0
    else:  # one jittered interval (the model's own, 7 s) after the tick
        assert due == simulated == pytest.approx(tick + 7.0 * 1.05)


def test_the_scheduler_follows_the_shared_hang_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, _ = twin(tmp_path, "http://127.0.0.1:9")
    entry = daemon.registry.models["llama"]
    scheduler = daemon.scheduler
    # an unmeasured model: its latency estimate, 4 × 1000 ms = 4 s (over recheck_interval)
    assert scheduler.overdue_after("llama") == pytest.approx(4.0)
    monkeypatch.setattr(schedule, "HANG_FACTOR", 10.0)
    assert scheduler.overdue_after("llama") == pytest.approx(10.0)
    assert scheduler.overdue_after("llama") == schedule.overdue_after(
        entry.spec, entry.health, daemon.config.probe)
    assert scheduler.overdue_after("gone") is None
