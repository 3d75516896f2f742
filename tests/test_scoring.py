"""The score (daemon.core.scoring): zero when not usable, the formula part by part, explainable."""

from __future__ import annotations

import pytest

from daemon.core.health import HealthState, Sample, apply_probe
from daemon.core.model import HealthStatus, ModelSpec, ProbeResult
from daemon.core.scoring import ZERO, score
from daemon.core.settings import HealthConfig, ScoreConfig

SPEC = ModelSpec(id="m", provider="openai", cost_estimate=3.0, quality=0.6,
                 latency_estimate=1500.0)
CFG = ScoreConfig()  # weights 0.5 / 0.2 / 0.1 / 0.2, target 500 ms, ceiling 30


def state(status: HealthStatus, *samples: tuple[bool, float | None]) -> HealthState:
    return HealthState(status=status, window=tuple(Sample(ok, ms) for ok, ms in samples))


@pytest.mark.parametrize("status", [HealthStatus.UNKNOWN, HealthStatus.UNAVAILABLE])
def test_unusable_model_scores_zero_with_the_reason(status):
    parts = score(SPEC, state(status, (True, 10.0)), CFG)
    assert parts.total == 0.0
    assert parts.reason == f"health is {status.value}"


def test_zero_placeholder_says_not_probed_yet():
    assert ZERO.total == 0.0
    assert ZERO.reason == "not probed yet"


def test_healthy_model_scores_the_weighted_sum_of_its_parts():
    parts = score(SPEC, state(HealthStatus.HEALTHY, (True, 500.0)), CFG)
    assert parts.health == 1.0
    assert parts.latency == pytest.approx(0.5)  # 500 / (500 + 500)
    assert parts.cost == pytest.approx(0.9)  # 1 - 3/30
    assert parts.quality == pytest.approx(0.6)
    assert parts.latency_ms == 500.0
    assert parts.total == pytest.approx(0.5 * 1.0 + 0.2 * 0.5 + 0.1 * 0.9 + 0.2 * 0.6)
    assert parts.total == pytest.approx(0.81)
    assert parts.reason == ""


def test_degraded_health_part_is_half_times_the_success_rate():
    health = state(HealthStatus.DEGRADED, (True, 500.0), (True, 500.0), (True, 500.0),
                   (False, None))
    parts = score(SPEC, health, CFG)
    assert parts.health == pytest.approx(0.5 * 0.75)
    assert parts.total == pytest.approx(0.5 * 0.375 + 0.2 * 0.5 + 0.1 * 0.9 + 0.2 * 0.6)


def test_healthy_health_part_is_the_success_rate():
    health = state(HealthStatus.HEALTHY, (False, None), (True, 500.0))
    assert score(SPEC, health, CFG).health == pytest.approx(0.5)


def test_latency_prior_is_used_until_a_latency_is_measured():
    parts = score(SPEC, state(HealthStatus.HEALTHY, (True, None)), CFG)
    assert parts.latency_ms == 1500.0
    assert parts.latency == pytest.approx(500 / 2000)


def test_measured_p50_replaces_the_latency_prior():
    health = state(HealthStatus.HEALTHY, (True, 100.0), (True, 250.0), (True, 900.0))
    parts = score(SPEC, health, CFG)
    assert parts.latency_ms == 250.0
    assert parts.latency == pytest.approx(500 / 750)


def test_zero_latency_scores_a_full_latency_part():
    assert score(SPEC, state(HealthStatus.HEALTHY, (True, 0.0)), CFG).latency == 1.0


def test_cost_at_or_above_the_ceiling_scores_zero_cost():
    for cost in (30.0, 300.0):
        spec = ModelSpec(id="m", provider="openai", cost_estimate=cost)
        assert score(spec, state(HealthStatus.HEALTHY), CFG).cost == 0.0


def test_free_model_scores_a_full_cost_part():
    spec = ModelSpec(id="m", provider="openai", cost_estimate=0.0)
    assert score(spec, state(HealthStatus.HEALTHY), CFG).cost == 1.0


def test_latency_target_and_cost_ceiling_come_from_the_config():
    config = ScoreConfig(latency_target_ms=1500.0, cost_ceiling=6.0)
    parts = score(SPEC, state(HealthStatus.HEALTHY), config)
    assert parts.latency == pytest.approx(0.5)
    assert parts.cost == pytest.approx(0.5)


def test_weights_are_normalised_to_sum_one():
    config = ScoreConfig(health=5.0, latency=2.0, cost=1.0, quality=2.0)
    assert config.normalised() == pytest.approx((0.5, 0.2, 0.1, 0.2))
    health = state(HealthStatus.HEALTHY, (True, 500.0))
    assert score(SPEC, health, config).total == pytest.approx(score(SPEC, health, CFG).total)


def test_a_single_nonzero_weight_makes_the_score_that_part():
    config = ScoreConfig(health=0.0, latency=0.0, cost=0.0, quality=3.0)
    parts = score(SPEC, state(HealthStatus.HEALTHY, (True, 500.0)), config)
    assert parts.weights == (0.0, 0.0, 0.0, 1.0)
    assert parts.total == pytest.approx(0.6)


def test_to_json_contributions_sum_to_the_total():
    health = state(HealthStatus.DEGRADED, (True, 700.0), (False, None), (True, 300.0))
    explained = score(SPEC, health, CFG).to_json()
    assert set(explained["parts"]) == {"health", "latency", "cost", "quality"}
    for part in explained["parts"].values():
        assert part["contribution"] == pytest.approx(part["value"] * part["weight"], abs=1e-6)
    total = sum(p["contribution"] for p in explained["parts"].values())
    assert total == pytest.approx(explained["total"], abs=1e-5)
    assert explained["latency_ms"] == 300.0
    assert sum(p["weight"] for p in explained["parts"].values()) == pytest.approx(1.0)


def test_to_json_of_a_zero_score_explains_why():
    explained = score(SPEC, HealthState(), CFG).to_json()
    assert explained["total"] == 0.0
    assert explained["reason"] == "health is unknown"
    assert all(p["contribution"] == 0.0 for p in explained["parts"].values())


def test_score_through_the_health_machine_matches_the_formula():
    health = HealthState()
    for i, ms in enumerate((400.0, 600.0, 500.0)):
        health = apply_probe(health, ProbeResult.healthy(ms), HealthConfig(), float(i))
    assert score(SPEC, health, CFG).total == pytest.approx(0.81)
