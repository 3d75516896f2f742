"""The score: one number in [0, 1] per model, explainable part by part.

Unavailable or unknown → 0. Otherwise a weighted sum (weights normalised to 1) of:
health (healthy 1, degraded 0.5) × success rate over the window; latency
``target / (target + p50)``; cost ``1 − min(cost / ceiling, 1)``; the quality prior.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .health import HealthState
from .model import HealthStatus, ModelSpec
from .settings import ScoreConfig

_HEALTH_VALUE = {HealthStatus.HEALTHY: 1.0, HealthStatus.DEGRADED: 0.5}


@dataclass(frozen=True, slots=True)
class ScoreParts:
    """A score and the parts it is made of: each part's value in [0, 1] and its weight."""

    total: float
    health: float = 0.0
    latency: float = 0.0
    cost: float = 0.0
    quality: float = 0.0
    weights: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    latency_ms: float | None = None  # the latency the latency part was computed from
    reason: str = ""  # why the score is 0, when it is

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready breakdown: value, weight and contribution of each part."""
        names = ("health", "latency", "cost", "quality")
        values = (self.health, self.latency, self.cost, self.quality)
        return {
            "total": round(self.total, 6),
            "parts": {
                name: {
                    "value": round(value, 6),
                    "weight": round(weight, 6),
                    "contribution": round(value * weight, 6),
                }
                for name, value, weight in zip(names, values, self.weights, strict=True)
            },
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "reason": self.reason,
        }


ZERO = ScoreParts(total=0.0, reason="not probed yet")


def expected_latency_ms(spec: ModelSpec, health: HealthState) -> float:
    """The latency to expect of a model: the median of its probes in the window once it has
    been measured, the configured prior (``latency_estimate``) until then."""
    p50 = health.p50  # sorts the window: once, not twice (the simulator calls this a lot)
    return p50 if p50 is not None else spec.latency_estimate


def score(spec: ModelSpec, health: HealthState, config: ScoreConfig) -> ScoreParts:
    """The model's score from its health, measured latency, cost and quality prior."""
    weights = config.normalised()
    if not health.status.usable:
        return ScoreParts(total=0.0, weights=weights, reason=f"health is {health.status.value}")
    health_part = _HEALTH_VALUE[health.status] * health.success_rate
    latency_ms = max(expected_latency_ms(spec, health), 0.0)
    latency_part = config.latency_target_ms / (config.latency_target_ms + latency_ms)
    cost_part = 1.0 - min(max(spec.cost_estimate, 0.0) / config.cost_ceiling, 1.0)
    quality_part = min(max(spec.quality, 0.0), 1.0)
    w_health, w_latency, w_cost, w_quality = weights
    total = (
        w_health * health_part
        + w_latency * latency_part
        + w_cost * cost_part
        + w_quality * quality_part
    )
    return ScoreParts(
        total=min(max(total, 0.0), 1.0),
        health=health_part,
        latency=latency_part,
        cost=cost_part,
        quality=quality_part,
        weights=weights,
        latency_ms=latency_ms,
    )


def since_recovery(health: HealthState, failure_threshold: int) -> HealthState:
    """The health with its window cut to the probes since it last recovered: after the last
    run of ``failure_threshold`` failures in a row (an outage) the window still holds. The
    health unchanged when the window holds no outage, or when it ends in one."""
    window = health.window
    run = 0
    cut = 0
    for index, sample in enumerate(window):
        run = 0 if sample.ok else run + 1
        if run >= failure_threshold:
            cut = index + 1
    if cut == 0 or cut >= len(window):
        return health
    return replace(health, window=window[cut:])


def score_since_recovery(spec: ModelSpec, health: HealthState, config: ScoreConfig,
                         failure_threshold: int) -> ScoreParts:
    """The model's score judged on its health since it recovered from its last outage: what
    the policy holds a primary to, so that an outage it came back from does not sink it."""
    return score(spec, since_recovery(health, failure_threshold), config)
