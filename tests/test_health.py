"""The per-model health state machine (daemon.core.health), pinned case by case."""

from __future__ import annotations

from collections.abc import Iterable

from daemon.core.health import HealthState, Sample, apply_probe, needs_recheck
from daemon.core.model import HealthStatus, ProbeResult
from daemon.core.settings import HealthConfig

CFG = HealthConfig(failure_threshold=3, success_threshold=2, degraded_latency_ms=2000.0, window=5)

OK = ProbeResult.healthy(100.0)
FAIL = ProbeResult.failure("connection refused")


def run(results: Iterable[ProbeResult], state: HealthState | None = None,
        config: HealthConfig = CFG, start: float = 100.0) -> HealthState:
    state = state or HealthState()
    for i, result in enumerate(results):
        state = apply_probe(state, result, config, start + i)
    return state


def unavailable() -> HealthState:
    state = run([OK, FAIL, FAIL, FAIL])
    assert state.status is HealthStatus.UNAVAILABLE
    return state


# ----------------------------------------------------------------------------- statuses


def test_new_state_is_unknown_with_empty_window():
    state = HealthState()
    assert state.status is HealthStatus.UNKNOWN
    assert state.success_rate == 1.0
    assert state.p50 is None and state.p95 is None
    assert not needs_recheck(state)


def test_first_fast_success_is_healthy():
    assert run([OK]).status is HealthStatus.HEALTHY


def test_unknown_stays_unknown_through_failures_below_threshold():
    # documented choice: a model that never answered is not "degraded"
    assert run([FAIL]).status is HealthStatus.UNKNOWN
    assert run([FAIL, FAIL]).status is HealthStatus.UNKNOWN


def test_unknown_becomes_unavailable_at_failure_threshold():
    assert run([FAIL, FAIL, FAIL]).status is HealthStatus.UNAVAILABLE


def test_healthy_becomes_degraded_on_one_failure_below_threshold():
    state = run([OK, FAIL])
    assert state.status is HealthStatus.DEGRADED
    assert run([OK, FAIL, FAIL]).status is HealthStatus.DEGRADED


def test_failure_threshold_consecutive_failures_make_a_healthy_model_unavailable():
    assert run([OK, FAIL, FAIL, FAIL]).status is HealthStatus.UNAVAILABLE


def test_failure_threshold_one_makes_the_first_failure_unavailable():
    config = HealthConfig(failure_threshold=1, success_threshold=1)
    assert run([OK, FAIL], config=config).status is HealthStatus.UNAVAILABLE


def test_non_consecutive_failures_never_reach_unavailable():
    state = run([OK, FAIL, FAIL, OK, FAIL, FAIL, OK, FAIL, FAIL])
    assert state.status is HealthStatus.DEGRADED
    assert state.consecutive_failures == 2


def test_one_success_after_failures_below_threshold_is_healthy_again():
    assert run([OK, FAIL, FAIL, OK]).status is HealthStatus.HEALTHY


def test_slow_success_is_degraded():
    assert run([ProbeResult.healthy(2000.1)]).status is HealthStatus.DEGRADED


def test_success_exactly_at_degraded_latency_is_healthy():
    assert run([ProbeResult.healthy(2000.0)]).status is HealthStatus.HEALTHY


def test_success_without_a_latency_is_healthy():
    assert run([ProbeResult.healthy()]).status is HealthStatus.HEALTHY


def test_probe_degraded_verdict_is_degraded_even_when_fast():
    state = run([ProbeResult.degraded("429 rate limited", 5.0)])
    assert state.status is HealthStatus.DEGRADED
    assert state.consecutive_successes == 1


def test_fast_success_after_a_slow_one_is_healthy_again():
    assert run([ProbeResult.healthy(5000.0), OK]).status is HealthStatus.HEALTHY


def test_failure_of_a_degraded_model_below_threshold_stays_degraded():
    state = run([ProbeResult.degraded("loading"), FAIL])
    assert state.status is HealthStatus.DEGRADED


# ----------------------------------------------------------------------------- hysteresis


def test_leaving_unavailable_takes_success_threshold_successes():
    state = run([OK], unavailable())
    assert state.status is HealthStatus.UNAVAILABLE
    assert state.consecutive_successes == 1
    state = run([OK], state)
    assert state.status is HealthStatus.HEALTHY


def test_failure_while_recovering_restarts_the_success_count():
    state = run([OK, FAIL, OK], unavailable())
    assert state.status is HealthStatus.UNAVAILABLE
    assert state.consecutive_successes == 1
    assert run([OK], state).status is HealthStatus.HEALTHY


def test_failures_while_unavailable_stay_unavailable():
    state = run([FAIL], unavailable())
    assert state.status is HealthStatus.UNAVAILABLE
    assert state.consecutive_failures == 4


def test_success_threshold_one_leaves_unavailable_on_the_first_success():
    config = HealthConfig(failure_threshold=2, success_threshold=1)
    state = run([FAIL, FAIL], config=config)
    assert state.status is HealthStatus.UNAVAILABLE
    assert run([OK], state, config=config).status is HealthStatus.HEALTHY


def test_success_threshold_three_needs_three_successes():
    config = HealthConfig(failure_threshold=1, success_threshold=3)
    state = run([FAIL], config=config)
    assert [run([OK] * n, state, config=config).status for n in (1, 2, 3)] == [
        HealthStatus.UNAVAILABLE, HealthStatus.UNAVAILABLE, HealthStatus.HEALTHY]


def test_slow_successes_leaving_unavailable_land_degraded():
    slow = ProbeResult.healthy(3000.0)
    assert run([slow, slow], unavailable()).status is HealthStatus.DEGRADED


def test_probe_degraded_successes_count_towards_leaving_unavailable():
    result = ProbeResult.degraded("model present but not loaded", 10.0)
    assert run([result, result], unavailable()).status is HealthStatus.DEGRADED


# ----------------------------------------------------------------------------- counters


def test_success_resets_the_failure_counter():
    state = run([OK, FAIL, FAIL, OK])
    assert (state.consecutive_successes, state.consecutive_failures) == (1, 0)


def test_failure_resets_the_success_counter():
    state = run([OK, OK, OK, FAIL])
    assert (state.consecutive_successes, state.consecutive_failures) == (0, 1)


def test_degraded_success_counts_as_a_success():
    state = run([FAIL, ProbeResult.degraded("429"), OK])
    assert (state.consecutive_successes, state.consecutive_failures) == (2, 0)


def test_totals_count_every_probe_including_those_out_of_the_window():
    state = run([OK, FAIL] * 6)
    assert state.probes_total == 12
    assert state.failures_total == 6
    assert len(state.window) == CFG.window


def test_changed_at_is_the_time_of_the_last_transition():
    state = run([OK], start=10.0)
    assert state.changed_at == 10.0
    state = apply_probe(state, OK, CFG, 20.0)
    assert state.changed_at == 10.0
    state = apply_probe(state, FAIL, CFG, 30.0)
    assert state.changed_at == 30.0


def test_apply_probe_leaves_the_old_state_untouched():
    before = run([OK])
    after = apply_probe(before, FAIL, CFG, 500.0)
    assert before.status is HealthStatus.HEALTHY and before.probes_total == 1
    assert after is not before


# ----------------------------------------------------------------------------- window


def test_window_keeps_only_the_last_samples():
    results = [ProbeResult.healthy(float(ms)) for ms in range(1, 9)]
    state = run(results)
    assert state.window == tuple(Sample(True, float(ms)) for ms in range(4, 9))


def test_success_rate_is_the_share_of_successes_in_the_window():
    assert run([OK, OK, FAIL, OK]).success_rate == 0.75
    # the window is 5: the three old failures have left it
    assert run([FAIL, FAIL, FAIL, OK, OK, OK, OK, FAIL]).success_rate == 0.8


def test_p50_and_p95_are_nearest_rank_over_successes():
    config = HealthConfig(window=20, degraded_latency_ms=10_000.0)
    state = run([ProbeResult.healthy(float(ms)) for ms in range(10, 201, 10)], config=config)
    assert state.p50 == 100.0
    assert state.p95 == 190.0
    assert state.latency_percentile(1.0) == 200.0
    assert state.latency_percentile(0.0) == 10.0


def test_p50_of_an_even_count_is_the_lower_middle():
    state = run([ProbeResult.healthy(ms) for ms in (400.0, 100.0, 300.0, 200.0)])
    assert state.p50 == 200.0
    assert state.p95 == 400.0


def test_latency_of_failed_probes_is_not_in_the_percentiles():
    state = run([ProbeResult.healthy(100.0), ProbeResult.failure("timeout", 3000.0)])
    assert state.p50 == 100.0
    assert state.p95 == 100.0


def test_percentiles_are_none_without_a_measured_success():
    assert run([ProbeResult.healthy(), FAIL]).p50 is None


# ----------------------------------------------------------------------------- recheck


def test_needs_recheck_after_a_failure_of_an_unknown_model():
    assert needs_recheck(run([FAIL]))


def test_needs_recheck_after_a_failure_of_a_healthy_model():
    assert needs_recheck(run([OK, FAIL]))


def test_no_recheck_once_healthy_again():
    assert not needs_recheck(run([OK, FAIL, OK]))


def test_no_recheck_for_a_slow_but_answering_model():
    assert not needs_recheck(run([ProbeResult.healthy(9000.0)]))


def test_no_recheck_once_unavailable_and_still_failing():
    assert not needs_recheck(unavailable())


def test_needs_recheck_while_an_unavailable_model_collects_successes():
    assert needs_recheck(run([OK], unavailable()))
