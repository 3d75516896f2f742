"""The policy's rules (DESIGN.md §3) on the real registry and a virtual clock, with the default
[policy] timings: sustained evidence, the primary judged since it recovered, failback, operator
holds, durations immune to wall-clock steps, and a bound on primary changes. No sleeps."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import ConfigError, parse_config
from daemon.core.clock import Instant
from daemon.core.health import needs_recheck
from daemon.core.model import Event, EventKind, HealthStatus, ProbeResult
from daemon.core.registry import InvalidHold, ModelRegistry
from daemon.persist.codec import from_state, to_state

T0 = 1_764_000_000.0
ENDPOINT = "http://10.0.0.9:8000"

Up = Callable[[str, float], bool]


def model(model_id: str, quality: float, **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "provider": "openai", "endpoint": ENDPOINT, "role": "chat",
            "quality": quality, **fields}


def registry_of(*models: dict[str, Any], **policy: Any) -> ModelRegistry:
    """A registry with the default [probe], [health] and [policy] settings but ``policy``."""
    config = parse_config({"models": list(models), "policy": policy}, "test.toml")
    return ModelRegistry(config, T0)


class Host:
    """The real registry as the daemon drives it, on a virtual clock: every model probed each
    ``interval`` and every ``recheck_interval`` while its verdict is open, the policy timer
    acting (auto_execute) each ``policy.interval``. ``up(model_id, t)`` says whether the
    model's server answers at ``t`` (seconds since T0)."""

    def __init__(self, registry: ModelRegistry, up: Up, *, latency_ms: float = 10.0) -> None:
        self.registry = registry
        self.up = up
        self.latency_ms = latency_ms
        self.t = 0.0
        self.events: list[Event] = []
        registry.listeners.append(self.events.append)
        self._due = [(0.0, model_id) for model_id in registry.models]
        heapq.heapify(self._due)
        self._tick = registry.config.policy.interval

    def run(self, until: float) -> None:
        probe = self.registry.config.probe
        while True:
            due, model_id = self._due[0]
            if min(due, self._tick) > until:
                break
            if due <= self._tick:  # probes first at the same instant, as the timer sleeps
                heapq.heappop(self._due)
                self.t = due
                ok = self.up(model_id, due)
                result = (ProbeResult.healthy(self.latency_ms) if ok
                          else ProbeResult.failure("connection refused"))
                self.registry.apply_probe(model_id, result, T0 + due)
                wait = (probe.recheck_interval
                        if needs_recheck(self.registry.models[model_id].health)
                        else probe.interval)
                heapq.heappush(self._due, (due + wait, model_id))
            else:
                self.t = self._tick
                self.registry.auto_upgrade_execute(T0 + self._tick)
                self._tick += self.registry.config.policy.interval

    @property
    def primary(self) -> str | None:
        return self.registry.roles["chat"].primary

    def changes(self) -> list[tuple[float, str, str, str]]:
        """Primary changes: (seconds since T0, kind, from, to)."""
        found = []
        for e in self.events:
            if e.kind is EventKind.MODEL_PROMOTED:
                found.append((e.at - T0, str(e.data["promotion"]), e.from_id, e.to_id))
            elif e.kind is EventKind.MODEL_ROLLED_BACK:
                found.append((e.at - T0, "rollback", e.from_id, e.to_id))
        return found


def outage(model_id: str, start: float, end: float) -> Up:
    return lambda m, t: not (m == model_id and start <= t < end)


def test_the_policy_keys_have_their_defaults_and_clear_errors() -> None:
    policy = parse_config({"models": []}, "m.toml").policy
    assert (policy.sustain, policy.failback, policy.manual_hold) == (600.0, True, 86400.0)
    with pytest.raises(ConfigError) as bad:
        parse_config({"models": [], "policy": {"sustain": "soon", "failback": "yes",
                                               "manual_hold": "-1h", "sustian": "1m"}}, "m.toml")
    assert bad.value.errors == [
        'm.toml: policy.sustain: bad duration "soon": use seconds or a number with ms, s, m '
        'or h ("30s")',
        "m.toml: policy.failback: expected true or false, got a string",
        'm.toml: policy.manual_hold: bad duration "-1h": use seconds or a number with ms, s, '
        'm or h ("30s")',
        'm.toml: policy.sustian: unknown key (did you mean "sustain"?)',
    ]


# ----------------------------------------------------------------------------- the issue


def blip_host(start: float, end: float) -> Host:
    """Issue 12's scenario: primary qwen2.5-14b (quality 0.85), candidate llama3-8b (0.65),
    the 14b's server down from ``start`` to ``end``."""
    registry = registry_of(model("qwen2.5-14b", 0.85, primary=True),
                           model("llama3-8b", 0.65))
    return Host(registry, outage("qwen2.5-14b", start, end))


def test_a_ten_second_outage_of_the_better_primary_does_not_promote_the_worse_model() -> None:
    host = blip_host(600, 610)  # between two policy ticks (600 itself sees 1 failure)
    host.run(600)
    before = host.registry.auto_upgrade_decisions(T0 + 600)[0]
    host.run(7200)
    assert host.changes() == []
    assert host.primary == "qwen2.5-14b"
    # the window still held the outage when the policy looked: it judged the 14b on its health
    # since it recovered, and the 8b never led it
    assert before.suggestion is None
    entry = host.registry.models["qwen2.5-14b"]
    assert entry.health.window[-1].ok


def test_right_after_the_blip_the_primary_is_judged_since_it_recovered() -> None:
    host = blip_host(600, 610)
    host.run(630)  # recovered, but the window holds the outage's failures
    entry = host.registry.models["qwen2.5-14b"]
    assert not all(s.ok for s in entry.health.window)
    assert entry.score.total < host.registry.models["llama3-8b"].score.total  # the old trap
    decision = host.registry.auto_upgrade_decisions(T0 + 630)[0]
    assert decision.suggestion is None
    assert "on its health since it recovered" in decision.why and "behind by" in decision.why


def test_an_outage_over_a_policy_tick_fails_over_and_back_within_a_minute() -> None:
    host = blip_host(595, 607)  # 12 s, across the tick at 600
    host.run(7200)
    assert [(kind, a, b) for _, kind, a, b in host.changes()] == [
        ("failover", "qwen2.5-14b", "llama3-8b"), ("failback", "llama3-8b", "qwen2.5-14b")]
    (failed_over, *_), (failed_back, *_) = host.changes()
    assert failed_over == 600 and failed_back == 660  # the first tick with 5 successes
    assert host.primary == "qwen2.5-14b"
    assert host.registry.roles["chat"].preferred == "qwen2.5-14b"


def test_a_twenty_minute_outage_fails_over_and_back() -> None:
    host = blip_host(600, 1800)
    host.run(7200)
    kinds = [(kind, b) for _, kind, _a, b in host.changes()]
    assert kinds == [("failover", "llama3-8b"), ("failback", "qwen2.5-14b")]
    assert host.changes()[1][0] == 1860


def test_a_genuinely_better_candidate_is_promoted_once_its_lead_is_sustained() -> None:
    registry = registry_of(model("old", 0.4, primary=True), model("new", 0.9))
    host = Host(registry, lambda m, t: True)
    host.run(7200)
    [(at, kind, frm, to)] = host.changes()
    assert (kind, frm, to) == ("upgrade", "old", "new")
    # candidate from the first tick with 5 successes (60 s); suggested once the lead held at
    # every tick for sustain (600 s)
    assert at == 660
    reason = host.registry.roles["chat"].history[-1].reason
    assert "for 600s ≥ sustain 600s" in reason
    assert registry.roles["chat"].preferred == "new"


def test_a_lead_that_does_not_hold_at_every_check_starts_over() -> None:
    registry = registry_of(model("old", 0.4, primary=True), model("new", 0.9))
    # new's server fails briefly at 300 s: its health drops below a candidate's
    host = Host(registry, outage("new", 300, 302))
    host.run(7200)
    [(at, kind, _, _)] = host.changes()
    assert kind == "upgrade" and at >= 360 + 600


def test_check_says_why_the_lead_is_not_sustained_yet() -> None:
    registry = registry_of(model("old", 0.4, primary=True), model("new", 0.9))
    host = Host(registry, lambda m, t: True)
    host.run(200)
    decision = registry.auto_upgrade_decisions(T0 + 200)[0]
    assert decision.suggestion is None
    assert decision.why.startswith("new leads old by ")
    assert "not yet for sustain 600s (for 140s so far)" in decision.why


# ----------------------------------------------------------------------------- failback


def test_failback_needs_min_consecutive_healthy_and_no_quarantine() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    host = Host(registry, outage("p", 100, 200))
    host.run(180)
    assert host.primary == "s" and registry.roles["chat"].preferred == "p"
    registry.quarantined_until["p"] = T0 + 400  # as if rolled back from
    host.run(390)
    assert host.primary == "s"
    why = registry.auto_upgrade_decisions(T0 + 390)[0].why
    assert "no failback yet: the preferred primary p is quarantined for 10s more" in why
    host.run(420)
    assert host.primary == "p"


def test_without_failback_the_old_primary_returns_only_as_an_upgrade() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5), failback=False)
    host = Host(registry, outage("p", 100, 200))
    host.run(1800)
    assert [kind for _, kind, _, _ in host.changes()] == ["failover"]
    assert host.primary == "s"
    host.run(7200)
    (failover, _, _, _), (upgrade, kind, _, _) = host.changes()
    assert kind == "upgrade" and upgrade >= failover + registry.config.policy.cooldown


def test_the_first_failback_is_not_delayed_by_the_cooldown_later_ones_are() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    # p down twice, each time across a tick, the second after the failback's probation:
    # the cooldown (30 min) starts at the first failback
    outages = [(100, 130), (890, 930)]
    host = Host(registry, lambda m, t: not (m == "p" and any(a <= t < b for a, b in outages)))
    host.run(7200)
    assert [(at, kind) for at, kind, _, _ in host.changes()] == [
        (120, "failover"), (180, "failback"), (900, "failover"), (180 + 1800, "failback")]

    host = Host(registry_of(model("p", 0.9, primary=True), model("s", 0.5)),
                lambda m, t: not (m == "p" and any(a <= t < b for a, b in outages)))
    host.run(1000)
    decision = host.registry.auto_upgrade_decisions(T0 + 1000)[0]
    assert decision.suggestion is not None and decision.suggestion.kind == "failback"
    assert decision.why.endswith("; the timer waits for the cooldown: 980s more")


def test_a_preferred_model_failing_right_after_its_failback_is_rolled_back_and_quarantined(
        ) -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    outages = [(100, 130), (700, 730)]  # the second within the failback's probation
    host = Host(registry, lambda m, t: not (m == "p" and any(a <= t < b for a, b in outages)))
    host.run(7200)
    changes = host.changes()
    assert [kind for _, kind, _, _ in changes] == ["failover", "failback", "rollback",
                                                   "failback"]
    assert registry.roles["chat"].preferred == "p"  # still: the failback was not a choice
    quarantined = next(e for e in host.events if e.kind is EventKind.MODEL_QUARANTINED)
    assert changes[3][0] >= quarantined.data["until"] - T0


def test_a_flapping_preferred_model_changes_the_primary_at_most_twice_per_cooldown() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    # p's server is down 30 s of every 90 s for four hours
    host = Host(registry, lambda m, t: not (m == "p" and t % 90 >= 60))
    host.run(4 * 3600)
    changes = host.changes()
    cooldown = registry.config.policy.cooldown
    bound = 2 * (4 * 3600 // cooldown + 1)
    assert 2 < len(changes) <= bound, changes
    failbacks = [at for at, kind, _, _ in changes if kind == "failback"]
    assert all(b - a >= cooldown for a, b in itertools.pairwise(failbacks))


# ----------------------------------------------------------------------------- holds


def better_pair(**policy: Any) -> Host:
    """a (primary, poor) and b (far better): the policy wants b."""
    registry = registry_of(model("a", 0.1, primary=True), model("b", 0.9), **policy)
    return Host(registry, lambda m, t: True)


def test_a_manual_promotion_survives_ten_policy_ticks_and_more() -> None:
    host = better_pair()
    host.run(60)
    registry = host.registry
    host.run(30)
    registry.promote_model("b", now=T0 + 100, actor="uid=0 pid=1")
    registry.promote_model("a", now=T0 + 101, actor="uid=0 pid=1", reason="evals say so")
    host.run(101 + 10 * 60)
    assert host.primary == "a"
    host.run(23 * 3600)
    assert host.primary == "a"  # held for manual_hold (24 h)
    hold = registry.roles["chat"].hold
    assert hold is not None and (hold.by, hold.reason) == ("uid=0 pid=1", "evals say so")
    assert hold.until == T0 + 101 + 86400
    why = registry.auto_upgrade_decisions(T0 + 23 * 3600)[0].why
    assert why.startswith("role held by uid=0 pid=1 for ") and "(evals say so)" in why
    # the hold ends by itself; the lead must then be sustained before the upgrade
    host.run(101 + 86400 + 590)
    assert host.primary == "a"
    host.run(101 + 86400 + 700)
    assert host.primary == "b"
    released = next(e for e in host.events if e.kind is EventKind.ROLE_RELEASED)
    # released by the first operation after its end (a probe here)
    assert released.actor == "policy"
    assert T0 + 101 + 86400 <= released.at < T0 + 101 + 86400 + 5
    assert registry.roles["chat"].history[-2].action == "release"


def test_release_lets_the_policy_act_again_and_hold_holds_without_promoting() -> None:
    host = better_pair()
    registry = host.registry
    host.run(30)
    hold = registry.hold_role("chat", now=T0 + 30, actor="uid=0 pid=1", seconds=7200,
                              reason="vendor outage")
    assert (registry.roles["chat"].primary, hold.until) == ("a", T0 + 7230)
    host.run(3600)
    assert host.changes() == []
    assert registry.release_role("chat", now=T0 + 3600, actor="uid=0 pid=1") == hold
    assert registry.release_role("chat", now=T0 + 3600, actor="uid=0 pid=1") is None
    host.run(3600 + 660)
    assert host.primary == "b"
    kinds = [e.kind for e in host.events if e.kind in (EventKind.ROLE_HELD,
                                                       EventKind.ROLE_RELEASED)]
    assert kinds == [EventKind.ROLE_HELD, EventKind.ROLE_RELEASED]
    assert [h.action for h in registry.roles["chat"].history][-3:] == [
        "hold", "release", "promote"]


def test_under_a_hold_failover_still_happens_and_fails_back_to_the_operators_model() -> None:
    registry = registry_of(model("a", 0.1, primary=True), model("b", 0.9), model("c", 0.5))
    host = Host(registry, outage("a", 1000, 1100))
    host.run(50)
    registry.promote_model("a", now=T0 + 50, actor="op")  # a is primary: made preferred
    registry.hold_role("chat", now=T0 + 51, actor="op", seconds=86400)
    host.run(7200)
    assert [(kind, to) for _, kind, _, to in host.changes()] == [
        ("failover", "b"), ("failback", "a")]
    assert host.primary == "a"


def test_an_operator_promoting_the_stand_in_keeps_it() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    host = Host(registry, outage("p", 100, 200))
    host.run(150)
    assert host.primary == "s"
    assert registry.promote_model("s", now=T0 + 150, actor="op") == []
    assert registry.roles["chat"].preferred == "s"
    host.run(7200)
    assert host.primary == "s"
    assert registry.roles["chat"].history[-1].action == "prefer"


def test_a_hold_needs_a_length_when_manual_hold_is_off() -> None:
    host = better_pair(manual_hold="0s")
    registry = host.registry
    host.run(60)
    registry.promote_model("b", now=T0 + 60, actor="op")
    assert registry.roles["chat"].hold is None
    with pytest.raises(InvalidHold, match="--for"):
        registry.hold_role("chat", now=T0 + 61, actor="op")
    with pytest.raises(InvalidHold, match="greater than 0s"):
        registry.hold_role("chat", now=T0 + 61, actor="op", seconds=0)
    assert registry.hold_role("chat", now=T0 + 61, actor="op", seconds=60).until == T0 + 121


def test_holds_and_the_preferred_primary_survive_a_restart() -> None:
    registry = registry_of(model("p", 0.9, primary=True), model("s", 0.5))
    host = Host(registry, outage("p", 100, 10_000))
    host.run(150)
    registry.hold_role("chat", now=T0 + 150, actor="op", seconds=3600, reason="r")
    saved = to_state(registry)
    back = from_state(registry.config, saved, T0 + 200)
    role = back.roles["chat"]
    assert (role.primary, role.preferred, role.promotion_kind) == ("s", "p", "failover")
    assert role.hold == registry.roles["chat"].hold
    # a hold that ended while the daemon was down is gone
    assert from_state(registry.config, saved, T0 + 150 + 3601).roles["chat"].hold is None


# ----------------------------------------------------------------------------- clock steps


def steady_registry(**policy: Any) -> tuple[ModelRegistry, Callable[[float, float], Instant]]:
    registry = registry_of(model("a", 0.1, primary=True), model("b", 0.9),
                           **{"sustain": "0s", **policy})

    def at(seconds: float, step: float = 0.0) -> Instant:
        """``seconds`` into the run on the steady clock, the wall clock stepped by ``step``."""
        return Instant(T0 + seconds + step, 5_000.0 + seconds)

    for _ in range(5):
        for model_id in ("a", "b"):
            registry.apply_probe(model_id, ProbeResult.healthy(10.0), at(0))
    return registry, at


def fail(registry: ModelRegistry, model_id: str, now: Instant) -> None:
    for _ in range(registry.config.health.failure_threshold):
        registry.apply_probe(model_id, ProbeResult.failure("HTTP 503"), now)


def test_a_step_back_of_the_wall_clock_does_not_extend_probation() -> None:
    registry, at = steady_registry()
    assert registry.auto_upgrade_execute(at(0))
    registry.apply_probe("b", ProbeResult.healthy(10.0), at(300, step=-3600))
    fail(registry, "b", at(700, step=-3600))  # 700 s after the promotion, probation 600 s
    assert registry.roles["chat"].primary == "b"
    # the promotion time moved with the step, so the file and the API agree with the clock
    assert registry.roles["chat"].promoted_at == T0 - 3600


def test_without_a_step_the_same_failure_within_probation_rolls_back() -> None:
    registry, at = steady_registry()
    assert registry.auto_upgrade_execute(at(0))
    fail(registry, "b", at(500))
    assert registry.roles["chat"].primary == "a"


def test_a_step_forward_does_not_end_a_quarantine_or_a_hold_early() -> None:
    registry, at = steady_registry()
    registry.auto_upgrade_execute(at(0))
    fail(registry, "b", at(10))  # rolled back within probation: quarantined for 1 h
    assert registry.quarantined_until["b"] == T0 + 10 + 3600
    registry.hold_role("chat", now=at(20), actor="op", seconds=1800)
    for _ in range(6):
        registry.apply_probe("b", ProbeResult.healthy(10.0), at(30, step=7200))
    decision = registry.auto_upgrade_decisions(at(60, step=7200))[0]
    assert decision.suggestion is None and "role held" in decision.why
    assert registry.roles["chat"].hold is not None
    assert registry.quarantined_until["b"] == T0 + 10 + 3600 + 7200
    registry.release_role("chat", now=at(61, step=7200), actor="op")
    why = registry.auto_upgrade_decisions(at(62, step=7200))[0].why
    assert "b quarantined for 3548s more" in why


def test_a_step_forward_does_not_complete_a_sustained_lead() -> None:
    registry, at = steady_registry(sustain="10m")
    assert registry.auto_upgrade_decisions(at(0))[0].suggestion is None
    assert registry.auto_upgrade_decisions(at(60, step=3600))[0].suggestion is None
    assert registry.auto_upgrade_decisions(at(600, step=3600))[0].suggestion is not None


def test_a_saved_time_in_the_future_is_clamped_at_start() -> None:
    registry, at = steady_registry()
    registry.auto_upgrade_execute(at(0))
    fail(registry, "b", at(10))
    registry.hold_role("chat", now=at(20), actor="op", seconds=1800)
    saved = to_state(registry)
    # the clock was stepped back a day while the daemon was down
    earlier = T0 - 86400
    back = from_state(registry.config, saved, earlier)
    role = back.roles["chat"]
    assert role.promoted_at == earlier
    assert back.quarantined_until["b"] == earlier + 3600
    assert role.hold is not None and (role.hold.since, role.hold.until) == (
        earlier, earlier + 1800)


# ----------------------------------------------------------------------------- never flap


@st.composite
def health_traces(draw: st.DrawFn) -> list[list[tuple[float, float]]]:
    """Outages (start, length) for each of three models over two hours."""
    return [draw(st.lists(st.tuples(st.floats(0, HOURS * 3600), st.floats(1, 900)),
                          max_size=10)) for _ in range(3)]


HOURS = 2


@settings(max_examples=20, deadline=None)
@given(health_traces(), st.sampled_from([0.0, 600.0]))
def test_primary_changes_are_bounded_over_any_health_trace(
        trace: list[list[tuple[float, float]]], sustain: float) -> None:
    ids = ["x", "y", "z"]
    registry = registry_of(model("x", 0.6, primary=True), model("y", 0.9), model("z", 0.3),
                           sustain=sustain, cooldown="10m")
    outages = dict(zip(ids, trace, strict=True))

    def up(model_id: str, t: float) -> bool:
        return not any(start <= t < start + length for start, length in outages[model_id])

    host = Host(registry, up)
    unavailable_primary = [0]
    primary = ["x"]  # as the events tell it, in order (they arrive after each operation)

    def count(event: Event) -> None:
        if event.kind in (EventKind.MODEL_PROMOTED, EventKind.MODEL_ROLLED_BACK):
            primary[0] = event.to_id
        elif (event.kind is EventKind.HEALTH_CHANGED and event.data["new"] == "unavailable"
                and primary[0] == event.model_id):
            unavailable_primary[0] += 1

    registry.listeners.append(count)
    host.run(HOURS * 3600)
    changes = host.changes()
    cooldown = registry.config.policy.cooldown
    optional = [at for at, kind, _, _ in changes if kind in ("upgrade", "failback")]
    automatic = [at for at, kind, _, _ in changes if kind != "rollback"]
    # an upgrade waits for the cooldown after any automatic promotion; failbacks are spaced
    for at, kind, _, _ in changes:
        if kind == "upgrade":
            assert all(at - before >= cooldown for before in automatic if before < at)
    failbacks = [at for at, kind, _, _ in changes if kind == "failback"]
    assert all(b - a >= cooldown for a, b in itertools.pairwise(failbacks))
    # the bound: optional changes at most two per cooldown; urgent ones (failover, probation
    # rollback) at most two per time the primary became unavailable
    assert len(optional) <= 2 * (HOURS * 3600 // cooldown + 1)
    assert len(changes) - len(optional) <= 2 * unavailable_primary[0]
    # and the role is never left on a stand-in when its preferred model is fit and failback on
    role = registry.roles["chat"]
    preferred = registry.models[role.preferred] if role.preferred else None
    if (preferred is not None and role.primary != role.preferred
            and preferred.health.status is HealthStatus.HEALTHY
            and preferred.health.consecutive_successes >= 14  # a tick since it had 5
            and registry.quarantined_until.get(preferred.spec.id, 0) <= T0 + host.t
            and not failbacks):
        raise AssertionError(f"stuck on {role.primary}, preferred {role.preferred}: {changes}")
