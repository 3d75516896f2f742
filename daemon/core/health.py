"""The per-model health state machine: probe results in, a health verdict out.

Pure and synchronous. Rules (DESIGN.md §3):

- ``unknown`` until the first verdict. A model that has never answered stays ``unknown``
  through failures below the threshold: "degraded" means "answering, but not well", and a model
  that never answered must not be handed to clients as a degraded choice.
- ``failure_threshold`` consecutive failures → ``unavailable``; fewer → ``degraded``.
- A success slower than ``degraded_latency_ms``, or one the probe itself calls degraded,
  → ``degraded``; otherwise ``healthy``.
- Leaving ``unavailable`` takes ``success_threshold`` consecutive successes (hysteresis).
- Counters are consecutive and reset on the opposite result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .model import HealthStatus, ProbeResult, ProbeStatus
from .settings import HealthConfig


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe outcome kept in the window."""

    ok: bool
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class HealthState:
    """What the daemon knows of one model's health."""

    status: HealthStatus = HealthStatus.UNKNOWN
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    window: tuple[Sample, ...] = ()
    probes_total: int = 0
    failures_total: int = 0
    changed_at: float | None = None

    @property
    def success_rate(self) -> float:
        """Share of successes in the window; 1.0 while the window is empty."""
        if not self.window:
            return 1.0
        return sum(1 for s in self.window if s.ok) / len(self.window)

    def latency_percentile(self, fraction: float) -> float | None:
        """The latency (ms) at ``fraction`` of the successful probes in the window."""
        latencies = sorted(s.latency_ms for s in self.window if s.ok and s.latency_ms is not None)
        if not latencies:
            return None
        # nearest rank: the smallest value with at least `fraction` of the samples at or below it
        rank = min(max(math.ceil(fraction * len(latencies)), 1), len(latencies))
        return latencies[rank - 1]

    @property
    def p50(self) -> float | None:
        """Median latency of successful probes in the window (ms)."""
        return self.latency_percentile(0.5)

    @property
    def p95(self) -> float | None:
        """95th percentile latency of successful probes in the window (ms)."""
        return self.latency_percentile(0.95)


def apply_probe(
    state: HealthState, result: ProbeResult, config: HealthConfig, now: float
) -> HealthState:
    """The health state after one probe result."""
    window = (*state.window, Sample(result.ok, result.latency_ms))[-config.window :]
    if result.ok:
        successes = state.consecutive_successes + 1
        failures = 0
        slow = result.latency_ms is not None and result.latency_ms > config.degraded_latency_ms
        if state.status is HealthStatus.UNAVAILABLE and successes < config.success_threshold:
            status = HealthStatus.UNAVAILABLE
        elif result.status is ProbeStatus.DEGRADED or slow:
            status = HealthStatus.DEGRADED
        else:
            status = HealthStatus.HEALTHY
    else:
        successes = 0
        failures = state.consecutive_failures + 1
        if failures >= config.failure_threshold:
            status = HealthStatus.UNAVAILABLE
        elif state.status in (HealthStatus.UNKNOWN, HealthStatus.UNAVAILABLE):
            status = state.status
        else:
            status = HealthStatus.DEGRADED
    return replace(
        state,
        status=status,
        consecutive_successes=successes,
        consecutive_failures=failures,
        window=window,
        probes_total=state.probes_total + 1,
        failures_total=state.failures_total + (0 if result.ok else 1),
        changed_at=now if status is not state.status else state.changed_at,
    )


def needs_recheck(state: HealthState) -> bool:
    """Whether the verdict is still open, so the model is re-probed at the recheck pace.

    True after a failure until the model is healthy again or unavailable, and while an
    unavailable model is collecting the successes it needs to come back.
    """
    if state.status is HealthStatus.UNAVAILABLE:
        return state.consecutive_successes > 0
    return state.consecutive_failures > 0
