"""modeld simulate: the schedule rules, the virtual-clock engine over the real core, the
report's shapes and the command's exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.core import schedule
from daemon.core.health import HealthState, Sample
from daemon.core.model import HealthStatus, ModelSpec
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config, PolicyConfig, ProbeConfig
from daemon.service.cli import main
from daemon.sim import TraceError, parse_trace, simulate
from daemon.sim.engine import UNKNOWN_TO_TRACE, Report
from daemon.sim.report import offset, render_text, seconds_cell

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "examples" / "traces"

QWEN = ModelSpec(id="qwen", provider="openai", role="chat", endpoint="http://a", quality=0.85,
                 latency_estimate=300, primary=True)
LLAMA = ModelSpec(id="llama", provider="ollama", role="chat", endpoint="http://b",
                  quality=0.65, latency_estimate=150)
CONFIG = Config(models=(QWEN, LLAMA), policy=PolicyConfig(auto_execute=True))


def run(config: Config, *lines: str, end: float, **options: object) -> Report:
    text = "\n".join([*lines, f'{{"at": {end}, "end": true}}'])
    return simulate(config, parse_trace(text, config), **options)  # type: ignore[arg-type]


def up(model: str, at: float = 0, latency: float = 300) -> str:
    return json.dumps({"at": at, "model": model, "ok": True, "latency_ms": latency})


def down(model: str, at: float, reason: str = "connection refused") -> str:
    return json.dumps({"at": at, "model": model, "ok": False, "reason": reason})


def changes_of(report: Report, model: str) -> list[tuple[float, str]]:
    return [(h.at, h.new) for h in report.health_changes if h.model == model]


# ----------------------------------------------------------------------------- schedule


def test_jitter_spans_ten_percent_either_way() -> None:
    assert schedule.jitter_factor(0.0) == pytest.approx(0.9)
    assert schedule.jitter_factor(0.5) == pytest.approx(1.0)
    assert schedule.jitter_factor(0.999999) == pytest.approx(1.1, abs=1e-5)


def test_models_due_within_the_slack_share_a_tick_and_in_flight_ones_wait() -> None:
    next_due = {"a": 10.0, "b": 10.04, "c": 10.2}
    assert schedule.due_models(["a", "b", "c", "d"], next_due, set(), 10.0) == ["a", "b", "d"]
    assert schedule.due_models(["a", "b"], next_due, {"a"}, 10.0) == ["b"]


def test_a_probe_is_overdue_at_four_times_the_usual_latency_and_never_when_unavailable() -> None:
    probe = ProbeConfig(recheck_interval=0.5)
    measured = HealthState(status=HealthStatus.HEALTHY,
                           window=(Sample(True, 300.0), Sample(True, 200.0)))
    assert schedule.overdue_after(QWEN, measured, probe) == pytest.approx(1.2)
    assert schedule.overdue_after(QWEN, HealthState(), probe) == pytest.approx(1.2)  # prior
    assert schedule.overdue_after(replace(QWEN, latency_estimate=10), HealthState(),
                                  probe) == 0.5  # recheck_interval at least
    down = HealthState(status=HealthStatus.UNAVAILABLE)
    assert schedule.overdue_after(QWEN, down, probe) is None
    assert schedule.overdue_at([10.0, 11.2], 1.2, 3, HealthStatus.DEGRADED) == pytest.approx(12.4)
    assert schedule.overdue_at([10.0, 11.2, 12.4], 1.2, 3, HealthStatus.DEGRADED) == math.inf
    assert schedule.overdue_at([10.0], 1.2, 3, HealthStatus.UNAVAILABLE) == math.inf
    # the endpoint answered another probe after this model's went unanswered: not hung
    assert schedule.overdue_at([10.0], 1.2, 3, HealthStatus.DEGRADED, unanswered_since=10.0,
                               answered_at=10.3) == math.inf
    assert schedule.overdue_at([10.0], 1.2, 3, HealthStatus.DEGRADED, unanswered_since=10.0,
                               answered_at=9.9) == pytest.approx(11.2)
    assert schedule.group_wake_at(["a", "b"], {"b": 20.0}, {"a"}, 0.0, {"a": 12.4}) == 12.4


def test_an_open_verdict_is_rechecked_after_the_result_else_one_jittered_interval_on() -> None:
    failing = HealthState(status=HealthStatus.DEGRADED, consecutive_failures=1)
    healthy = HealthState(status=HealthStatus.HEALTHY, consecutive_successes=3)
    common = {"tick": 100.0, "finished_at": 102.0, "interval": 5.0, "jitter": 1.1,
              "recheck_interval": 0.5}
    assert schedule.next_due_after_probe(failing, **common) == 102.5
    assert schedule.next_due_after_probe(healthy, **common) == pytest.approx(105.5)


def test_a_group_wakes_for_its_earliest_model_not_in_flight() -> None:
    next_due = {"a": 7.0, "b": 3.0}
    assert schedule.group_wake_at(["a", "b"], next_due, {"b"}, 0.0) == 7.0
    assert schedule.group_wake_at(["a", "b", "new"], next_due, set(), 1.0) == 1.0
    assert schedule.group_wake_at(["a"], next_due, {"a"}, 0.0) == math.inf


def test_models_are_grouped_by_endpoint_in_declaration_order() -> None:
    specs = [replace(QWEN, id="x"), LLAMA, replace(QWEN, id="y", endpoint="http://a/")]
    assert schedule.endpoint_groups(specs) == {"http://a": ["x", "y"], "http://b": ["llama"]}


def test_the_policy_timer_sleeps_first() -> None:
    assert list(schedule.policy_tick_times(60.0, 0.0, 180.0)) == [60.0, 120.0, 180.0]
    assert list(schedule.policy_tick_times(0.0, 0.0, 180.0)) == []


def test_a_model_interval_overrides_the_probe_section() -> None:
    probe = ProbeConfig(interval=5.0, timeout=3.0)
    assert schedule.probe_interval(replace(QWEN, interval=2.0), probe) == 2.0
    assert schedule.probe_interval(QWEN, probe) == 5.0
    assert schedule.probe_timeout(replace(QWEN, timeout=1.0), probe) == 1.0


# ----------------------------------------------------------------------------- engine


def test_a_quiet_trace_keeps_the_primary_and_accounts_every_second() -> None:
    report = run(CONFIG, up("qwen"), up("llama", latency=150), end=3600)
    chat = report.roles["chat"]
    assert chat.primary_seconds == {"qwen": 3600.0}
    assert chat.changes == 0 and chat.final_primary == "qwen"
    # nothing is usable until the first probe answers, 0.15 s in (the 150 ms one)
    assert chat.no_usable_seconds == pytest.approx(0.15)
    assert report.decisions == ()
    # one probe per model per jittered 5 s, and a policy tick a minute (none at the end)
    assert 2 * 3600 / 5.5 <= report.probes <= 2 * 3600 / 4.5 + 2
    assert report.policy_ticks == 59


def test_a_dead_server_is_unavailable_threshold_rechecks_after_its_first_failed_probe() -> None:
    report = run(CONFIG, up("qwen"), up("llama"), down("qwen", 100), end=200)
    (_, first), (degraded_at, degraded), (unavailable_at, unavailable) = changes_of(
        report, "qwen")
    assert (first, degraded, unavailable) == ("healthy", "degraded", "unavailable")
    assert 100 <= degraded_at <= 100 + 5.5 + 0.3  # the next jittered probe after 100 s
    # failure_threshold 3: two rechecks at the recheck pace (500 ms) after the first failure
    assert unavailable_at - degraded_at == pytest.approx(2 * 0.5)


def test_a_hung_server_is_unavailable_timeout_plus_two_overdue_rechecks_after_its_probe() -> None:
    report = run(CONFIG, up("qwen"), up("llama"), up("qwen", 100, latency=60_000), end=200)
    (_, _), (degraded_at, _), (unavailable_at, _) = changes_of(report, "qwen")
    # the first hung probe fails at the timeout (3 s); the rechecks started beside it once it
    # was overdue (4 × its usual 300 ms = 1.2 s, then 1.2 s after that) fail 1.2 s apart
    assert unavailable_at - degraded_at == pytest.approx(2 * 1.2)
    first_probe = degraded_at - 3.0
    assert 100 <= first_probe <= 100 + 5.5
    assert unavailable_at - first_probe == pytest.approx(3.0 + 2 * 1.2)
    reasons = {h.reason for h in report.health_changes if h.model == "qwen"}
    assert "timed out after 3s" in reasons


def test_no_early_recheck_while_the_endpoint_answers_other_probes() -> None:
    # llama behind the same endpoint keeps answering: qwen's hang is no hung server, so its
    # rechecks wait for its answers (timeout + recheck_interval apart)
    config = replace(CONFIG, models=(QWEN, replace(LLAMA, endpoint="http://a")))
    report = run(config, up("qwen"), up("llama"), up("qwen", 100, latency=60_000), end=200)
    (_, _), (degraded_at, _), (unavailable_at, _) = changes_of(report, "qwen")
    assert unavailable_at - degraded_at == pytest.approx(2 * (3.0 + 0.5))


def test_a_model_the_trace_has_not_mentioned_fails_its_probes() -> None:
    report = run(CONFIG, up("qwen"), end=60)
    assert changes_of(report, "llama")[-1][1] == "unavailable"
    assert {h.reason for h in report.health_changes if h.model == "llama"} == {
        UNKNOWN_TO_TRACE}


def test_models_behind_one_endpoint_are_probed_on_the_same_ticks() -> None:
    config = replace(CONFIG, models=(QWEN, replace(LLAMA, endpoint="http://a")))
    report = run(config, up("qwen"), up("llama"), down("qwen", 100), down("llama", 100),
                 end=200)
    assert [t for t, _ in changes_of(report, "qwen")][1:] == pytest.approx(
        [t for t, _ in changes_of(report, "llama")][1:], abs=1e-9)


def test_the_same_seed_gives_the_same_run_and_another_seed_other_jitter() -> None:
    lines = (up("qwen"), up("llama"), down("qwen", 600), up("qwen", 1800))
    first, again = (run(CONFIG, *lines, end=3600, seed=7) for _ in range(2))
    assert first == again
    other = run(CONFIG, *lines, end=3600, seed=8)
    assert changes_of(other, "qwen") != changes_of(first, "qwen")


def test_an_outage_of_every_model_is_counted_as_time_with_nothing_usable() -> None:
    report = run(CONFIG, up("qwen"), up("llama"), down("qwen", 1000), down("llama", 1000),
                 up("qwen", 2000), up("llama", 2000), end=3000)
    # unusable from the first failures' rechecks (≤ 6.5 s after 1000) until back healthy
    assert 990 <= report.roles["chat"].no_usable_seconds - 0.3 <= 1006


def test_offline_mode_stops_probing_remote_models_and_leaves_nothing_usable() -> None:
    config = replace(CONFIG, models=(QWEN, replace(LLAMA, local=True)))
    report = run(config, up("qwen"), up("llama"),
                 '{"at": 100, "operator": "offline", "enabled": true}', down("llama", 100),
                 '{"at": 200, "operator": "offline", "enabled": false}', end=400)
    kinds = [(d.kind, d.actor) for d in report.decisions]
    assert ("offline_mode_changed", "operator") in kinds
    # offline: only the local llama is eligible, and it fails from 100 s on; back online at
    # 200 s, qwen's last verdict (healthy) counts again at once
    assert 93 <= report.roles["chat"].no_usable_seconds - 0.3 <= 100


def test_a_refused_operator_promotion_is_reported_and_changes_nothing() -> None:
    report = run(CONFIG, up("qwen"), down("llama", 0),
                 '{"at": 100, "operator": "promote", "model": "llama"}', end=200)
    (refused,) = [d for d in report.decisions if d.kind == "operator_refused"]
    assert refused.at == 100 and refused.role == "chat" and refused.to_id == "llama"
    assert "refusing to promote" in refused.reason
    assert report.roles["chat"].primary_seconds == {"qwen": 200.0}
    assert [(o.action, o.outcome[:8]) for o in report.operator_steps] == [("promote",
                                                                          "refused:")]


def test_a_forced_operator_promotion_is_a_decision_by_the_operator() -> None:
    report = run(CONFIG, up("qwen"), down("llama", 0),
                 '{"at": 100, "operator": "promote", "model": "llama", "force": true}',
                 end=110)
    promoted = [d for d in report.decisions if d.kind == "model_promoted"]
    assert [(d.from_id, d.to_id, d.actor) for d in promoted] == [("qwen", "llama", "operator")]
    assert report.roles["chat"].changes >= 1


def test_without_auto_execute_the_policy_only_suggests() -> None:
    config = replace(CONFIG, policy=PolicyConfig(auto_execute=False))
    lines = (up("qwen"), up("llama"), down("qwen", 600))
    quiet = run(config, *lines, end=1200)
    assert {d.kind for d in quiet.decisions} == {"auto_upgrade_suggested"}
    assert quiet.roles["chat"].changes == 0 and not quiet.auto_execute
    acting = run(config, *lines, end=1200, auto_execute=True)
    assert "model_promoted" in {d.kind for d in acting.decisions}


def test_the_simulator_decides_with_the_real_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (up("qwen"), up("llama"), down("qwen", 600))
    assert run(CONFIG, *lines, end=1200).roles["chat"].changes == 1
    monkeypatch.setattr(ModelRegistry, "auto_upgrade_execute", lambda *args, **kwargs: [])
    assert run(CONFIG, *lines, end=1200).roles["chat"].changes == 0


def test_a_run_needing_too_many_probes_is_refused() -> None:
    with pytest.raises(TraceError, match="more than 100 probes"):
        run(CONFIG, up("qwen"), up("llama"), end=3600, max_probes=100)


def test_the_end_step_stops_the_run_even_at_time_zero() -> None:
    report = run(CONFIG, up("qwen"), end=0)
    assert report.probes == 0 and report.roles["chat"].primary_seconds == {"qwen": 0.0}


# ----------------------------------------------------------------------------- report


def test_the_json_report_has_exactly_the_design_shape() -> None:
    report = run(CONFIG, up("qwen"), up("llama"), down("qwen", 600), end=1200)
    document = report.to_json()
    assert set(document) == {"decisions", "roles"}
    assert document["decisions"]
    for decision in document["decisions"]:
        assert set(decision) == {"at", "kind", "role", "from", "to", "reason", "actor"}
    assert set(document["roles"]["chat"]) == {"primary_seconds", "changes",
                                              "no_usable_seconds", "final_primary"}
    assert sum(document["roles"]["chat"]["primary_seconds"].values()) == pytest.approx(1200)


def test_text_shows_offsets_and_seconds_with_their_units() -> None:
    assert offset(0) == "+0:00:00" and offset(3723.5) == "+1:02:03.5"
    assert seconds_cell(0.15) == "0.15 s" and seconds_cell(0) == "0 s"
    assert seconds_cell(6540) == "6,540 s (109 min)"
    report = run(CONFIG, up("qwen"), up("llama"), down("qwen", 600), end=1200)
    text = render_text(report, config_path="c.toml", trace_path="t.jsonl")
    assert text.startswith("modeld simulate: t.jsonl with c.toml\n1,200 s (20 min) simulated")
    assert "degraded → unavailable: connection refused" in text
    assert "Summary" in text and "no usable model" in text


# ----------------------------------------------------------------------------- command


def test_the_command_prints_the_json_report_of_an_example_trace() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "simulate", "--config", str(TRACES / "modeld.toml"),
         "--trace", str(TRACES / "long-outage.jsonl"), "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["roles"]["chat"]["changes"] >= 1
    assert sum(document["roles"]["chat"]["primary_seconds"].values()) == pytest.approx(7200)


def test_a_bad_trace_exits_65_naming_every_bad_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"at": 0, "model": "qwen9", "ok": true}\n{"at": -1, "end": true}\n')
    config = str(TRACES / "modeld.toml")
    assert main(["simulate", "--config", config, "--trace", str(trace)]) == 65
    err = capsys.readouterr().err
    assert f'{trace}:1: model: unknown model "qwen9"' in err
    assert f"{trace}:2: at: cannot be negative" in err


def test_a_missing_trace_exits_66_and_a_bad_config_78(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = str(TRACES / "modeld.toml")
    assert main(["simulate", "--config", config, "--trace", str(tmp_path / "no")]) == 66
    assert "file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nmin_margin = 'x'\n")
    trace = str(TRACES / "blip.jsonl")
    assert main(["simulate", "--config", str(bad), "--trace", trace]) == 78


def test_help_explains_how_to_test_a_policy_before_auto_execute(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "before you set auto_execute = true" in out and "--auto-execute" in out


def test_a_trace_too_long_for_the_probe_budget_is_refused_before_it_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(up("qwen2.5-14b") + '\n{"at": 2592000, "end": true}\n')
    config = str(TRACES / "modeld.toml")
    code = main(["simulate", "--config", config, "--trace", str(trace), "--max-probes", "1000"])
    assert code == 65
    err = capsys.readouterr().err
    assert "the trace lasts 2.592e+06 s: about 1,036,802 probes" in err
    assert "--max-probes" in err


def test_the_timeline_shows_a_suggestion_only_when_nobody_acted_on_it() -> None:
    lines = (up("qwen"), up("llama"), down("qwen", 600))
    acting = run(CONFIG, *lines, end=1200)
    text = render_text(acting, config_path="c", trace_path="t", with_health=False)
    assert " promoted " in text and " suggested " not in text and " health " not in text
    assert {d.kind for d in acting.decisions} >= {"auto_upgrade_suggested", "model_promoted"}
    quiet = run(replace(CONFIG, policy=PolicyConfig(auto_execute=False)), *lines, end=1200)
    text = render_text(quiet, config_path="c", trace_path="t")
    assert " suggested " in text and " promoted " not in text and " health " in text


def test_a_reason_is_cut_as_the_prober_cuts_every_result() -> None:
    from daemon.probing.limits import MAX_REASON_CHARS

    report = run(CONFIG, up("qwen"), up("llama"),
                 json.dumps({"at": 10, "model": "qwen", "ok": False, "reason": "x" * 900}),
                 end=30)
    (degraded,) = [h for h in report.health_changes if h.new == "degraded"]
    assert len(degraded.reason) == MAX_REASON_CHARS
