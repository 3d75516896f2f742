"""The probe schedule as arithmetic: when each model is probed next, and when the policy runs.

Pure: no clock, no randomness of its own. The caller passes the time (``tick``, ``finished_at``)
and a uniform sample in [0, 1) for the jitter, so the daemon's scheduler (real clock,
``random.random()``) and ``modeld simulate`` (virtual clock, a seeded generator) follow one
set of rules (DESIGN.md §3, §7):

- Models behind one endpoint are probed on shared ticks: at a tick, every model of the group
  due within :data:`GROUP_SLACK` of it is probed, with one jitter factor for the whole tick.
- After a probe, a model whose verdict is still open (:func:`~.health.needs_recheck`) is due
  again ``recheck_interval`` after the result came in; otherwise one jittered interval after
  the tick it was probed on (so a slow probe does not push the schedule back).
- A model not probed (offline mode, remote) keeps its place: due one jittered interval on.
- A probe still unanswered after :func:`overdue_after` (``HANG_FACTOR`` times the model's
  usual latency, ``recheck_interval`` at least) does not hold the next recheck back: another
  probe of the model starts beside it, up to ``failure_threshold`` in flight, so a server that
  accepts and never answers is unavailable about ``timeout + (failure_threshold − 1) ×
  overdue`` after its first probe. Not for a model already unavailable (its rechecks wait),
  nor when the endpoint has answered another probe since the model's went unanswered (a busy
  loop or one stuck generation is no hung server).
- The policy timer sleeps ``policy.interval`` between ticks: ticks at interval, 2 × interval, …
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

from .health import HealthState, needs_recheck
from .model import HealthStatus, ModelSpec
from .settings import HealthConfig, ProbeConfig

#: ± share of the interval each tick's jitter may move the next probe (10 %).
JITTER = 0.1

#: Seconds: models of one endpoint due this close together share a tick.
GROUP_SLACK = 0.05

#: A probe is overdue once unanswered for this many times the model's usual latency (and
#: for recheck_interval at least): "far below" in DESIGN.md §3.
HANG_FACTOR = 4.0


def probe_interval(spec: ModelSpec, probe: ProbeConfig) -> float:
    """Seconds between a model's regular probes: its own ``interval``, else ``[probe]``'s."""
    return spec.interval or probe.interval


def probe_timeout(spec: ModelSpec, probe: ProbeConfig) -> float:
    """Seconds a probe of this model may take before it counts as failed."""
    return spec.timeout or probe.timeout


def jitter_factor(sample: float) -> float:
    """The factor an interval is multiplied by for a uniform ``sample`` in [0, 1):
    1 − :data:`JITTER` … 1 + :data:`JITTER` (``random.uniform(0.9, 1.1)`` is
    ``jitter_factor(random.random())``)."""
    return (1.0 - JITTER) + 2.0 * JITTER * sample


def due_models(model_ids: Iterable[str], next_due: Mapping[str, float],
               in_flight: Collection[str], tick: float,
               slack: float = GROUP_SLACK) -> list[str]:
    """The models of a group to probe on the tick at ``tick``: not already being probed, and
    due by ``tick + slack`` (a model never scheduled is due at once)."""
    limit = tick + slack
    return [m for m in model_ids if m not in in_flight and next_due.get(m, 0.0) <= limit]


def next_due_after_probe(health: HealthState, *, tick: float, finished_at: float,
                         interval: float, jitter: float, recheck_interval: float) -> float:
    """When a model probed on the tick at ``tick`` (result in at ``finished_at``) is due
    again: at the recheck pace while its verdict is open, else one jittered interval after
    the tick."""
    if needs_recheck(health):
        return finished_at + recheck_interval
    return tick + interval * jitter


def next_due_not_probed(*, tick: float, interval: float, jitter: float) -> float:
    """When a model skipped on a tick (offline mode) is looked at again."""
    return tick + interval * jitter


def overdue_after(spec: ModelSpec, health: HealthState, probe: ProbeConfig) -> float | None:
    """Seconds after which a probe of the model still unanswered counts as hanging, so that
    the next recheck starts beside it; None when none should (the model is unavailable
    already: its rechecks wait for answers). Taken when a sweep launches the model's probe."""
    if health.status is HealthStatus.UNAVAILABLE:
        return None
    usual_ms = health.p95
    if usual_ms is None:
        usual_ms = spec.latency_estimate
    return max(probe.recheck_interval, HANG_FACTOR * usual_ms / 1000.0)


def max_in_flight(health: HealthConfig) -> int:
    """Probes of one model that may be in flight at once (the hung-server rechecks)."""
    return max(1, health.failure_threshold)


def overdue_at(starts: Sequence[float], hang_after: float | None, most: int,
               status: HealthStatus, *, unanswered_since: float = math.inf,
               answered_at: float = -math.inf) -> float:
    """When the newest of a model's probes in flight (started at ``starts``) turns overdue,
    so another starts beside it; infinity when none may: ``most`` in flight already, no
    allowance, the model unavailable now, or the endpoint answered a probe (``answered_at``)
    after the model's probes began to go unanswered (``unanswered_since``: the tick of its
    oldest probe since its last success)."""
    if (len(starts) >= most or hang_after is None or answered_at > unanswered_since
            or status is HealthStatus.UNAVAILABLE):
        return math.inf
    return starts[-1] + hang_after


def group_wake_at(model_ids: Iterable[str], next_due: Mapping[str, float],
                  in_flight: Collection[str], tick: float,
                  overdue: Mapping[str, float] | None = None) -> float:
    """When a group's loop wakes next: the earliest due time of its models not in flight (a
    model never scheduled counts as due at ``tick``) and, given ``overdue`` (in-flight model →
    :func:`overdue_at`), the earliest a probe in flight turns overdue; infinity if never."""
    wake = math.inf
    for model_id in model_ids:  # a loop, not min() of a generator: called once per probe
        if model_id not in in_flight:
            due = next_due.get(model_id, tick)
        elif overdue is not None:
            due = overdue.get(model_id, math.inf)
        else:
            continue
        if due < wake:
            wake = due
    return wake


def endpoint_groups(specs: Iterable[ModelSpec]) -> dict[str, list[str]]:
    """Model ids by the endpoint they share probe ticks on, in declaration order."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        groups.setdefault(spec.endpoint_key, []).append(spec.id)
    return groups


def policy_tick_times(interval: float, start: float, end: float) -> Iterable[float]:
    """The policy timer's ticks after ``start`` up to ``end`` included: start + k × interval
    for k ≥ 1 (the timer sleeps first, then checks)."""
    if interval <= 0:
        return
    k = 1
    while (at := start + k * interval) <= end:
        yield at
        k += 1
