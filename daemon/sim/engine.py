"""The simulator: the daemon's real core (registry, health, scoring, policy) driven by a trace
on a virtual clock, with the configuration's probe schedule.

A discrete-event loop. Nothing here decides anything the daemon would decide: probes are
scheduled by :mod:`daemon.core.schedule` (the same rules as the daemon's scheduler, jitter
drawn from a seeded generator), their results go through ``ModelRegistry.apply_probe``, the
policy timer calls the registry's ``auto_upgrade_check`` / ``auto_upgrade_execute`` as the
daemon's timer does, and the trace's operator steps call the same registry operations as the
control socket. The simulator only keeps the books: every decision, every health change, and
per role the seconds on each primary and with no usable model.

Events at the same virtual instant run in this order: trace steps, probe results, probe
ticks, the policy tick. The run ends at the trace's end step: trace steps at its time (before
it in the file) still run, probes and policy ticks at that instant do not.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..core import schedule
from ..core.model import Event, EventKind, ProbeResult, ProbeStatus
from ..core.registry import ModelRegistry, NoUsableModel, RegistryError
from ..core.settings import Config
from ..probing.limits import bounded_result
from .trace import Behaviour, End, Operator, Step, TraceError

#: Virtual time 0 of a trace, as the registry's unix time: far from 0, so no rule that
#: treats a zero time as "never" can misfire, and exactly representable.
EPOCH = 1_000_000_000.0

#: A run that takes more probes than this (rechecks included) is refused: before it starts
#: by the command (from the trace's length), else when it gets there.
MAX_PROBES = 20_000_000

#: Health changes and operator steps kept for the timeline; decisions are always all kept
#: (the trace's bounds bound them).
MAX_TIMELINE = 100_000

_NOT_DECISIONS = frozenset({
    EventKind.HEALTH_CHANGED, EventKind.CONFIG_RELOADED, EventKind.CONFIG_RELOAD_FAILED,
    EventKind.MODEL_ADDED, EventKind.MODEL_REMOVED,
})

# event priorities at one instant
_STEP, _RESULT, _TICK, _POLICY = 0, 1, 2, 3

UNKNOWN_TO_TRACE = "the trace says nothing of this model yet"
_UNKNOWN = (ProbeResult.failure(UNKNOWN_TO_TRACE), 0.0)


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision the daemon would have made (or an operator step it refused)."""

    at: float  # seconds from the start of the trace
    kind: str
    role: str | None
    from_id: str | None
    to_id: str | None
    reason: str
    actor: str

    def to_json(self) -> dict[str, Any]:
        """The shape DESIGN.md §7 fixes."""
        return {"at": round(self.at, 3), "kind": self.kind, "role": self.role,
                "from": self.from_id, "to": self.to_id, "reason": self.reason,
                "actor": self.actor}


@dataclass(frozen=True, slots=True)
class HealthChange:
    """A model's health verdict changed (shown in the timeline, not a decision)."""

    at: float
    model: str
    role: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperatorStep:
    """An operator step of the trace and what became of it (shown in the timeline)."""

    at: float
    role: str | None
    action: str
    subject: str
    outcome: str


@dataclass(slots=True)
class RoleBook:
    """The seconds a role spent on each primary and with nothing usable."""

    primary: str | None
    since: float
    usable: bool = False
    unusable_since: float | None = 0.0
    primary_seconds: dict[str, float] = field(default_factory=dict)
    changes: int = 0
    no_usable_seconds: float = 0.0

    def set_primary(self, primary: str | None, now: float) -> None:
        if primary == self.primary:
            return
        self._close_primary(now)
        self.primary = primary
        self.changes += 1

    def _close_primary(self, now: float) -> None:
        if self.primary is not None:
            self.primary_seconds[self.primary] = (self.primary_seconds.get(self.primary, 0.0)
                                                  + now - self.since)
        self.since = now

    def set_usable(self, usable: bool, now: float) -> None:
        if usable == self.usable:
            return
        self.usable = usable
        if usable:
            assert self.unusable_since is not None
            self.no_usable_seconds += now - self.unusable_since
            self.unusable_since = None
        else:
            self.unusable_since = now

    def close(self, now: float) -> None:
        self._close_primary(now)
        if self.unusable_since is not None:
            self.no_usable_seconds += now - self.unusable_since
            self.unusable_since = now


@dataclass(frozen=True, slots=True)
class RoleSummary:
    """One role's figures over the whole run."""

    primary_seconds: dict[str, float]
    changes: int
    no_usable_seconds: float
    final_primary: str | None

    def to_json(self) -> dict[str, Any]:
        return {"primary_seconds": {k: round(v, 3) for k, v in self.primary_seconds.items()},
                "changes": self.changes, "no_usable_seconds": round(self.no_usable_seconds, 3),
                "final_primary": self.final_primary}


@dataclass(frozen=True, slots=True)
class Report:
    """What the daemon would have decided over a trace, and what it cost each role."""

    duration: float
    seed: int
    auto_execute: bool
    decisions: tuple[Decision, ...]
    health_changes: tuple[HealthChange, ...]
    health_changes_dropped: int
    operator_steps: tuple[OperatorStep, ...]
    roles: dict[str, RoleSummary]
    probes: int
    policy_ticks: int

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` output, exactly as DESIGN.md §7 shapes it."""
        return {"decisions": [d.to_json() for d in self.decisions],
                "roles": {name: summary.to_json() for name, summary in self.roles.items()}}


@dataclass(slots=True)
class _Group:
    """The models behind one endpoint, probed on shared ticks."""

    members: list[str]
    in_flight: dict[str, list[float]] = field(default_factory=dict)  # model → probe starts
    hang_after: dict[str, float] = field(default_factory=dict)  # in flight, with allowance
    answered_at: float = -math.inf  # when a probe of this endpoint last succeeded
    # model → the tick of its oldest probe since its last success
    unanswered_since: dict[str, float] = field(default_factory=dict)
    wake_at: float = math.inf
    wake_version: int = 0


def estimated_probes(config: Config, duration: float) -> float:
    """About how many probes a run of ``duration`` seconds takes with every model answering
    (rechecks after failures come on top)."""
    return sum(duration / max(schedule.probe_interval(spec, config.probe), 1e-6) + 1
               for spec in config.models)


class Simulation:
    """One run: build with the configuration, then :meth:`run` with the trace's steps."""

    def __init__(self, config: Config, *, seed: int = 0, auto_execute: bool | None = None,
                 max_probes: int = MAX_PROBES) -> None:
        if auto_execute is not None and auto_execute != config.policy.auto_execute:
            config = replace(config, policy=replace(config.policy, auto_execute=auto_execute))
        self.config = config
        self.seed = seed
        self.max_probes = max_probes
        self.rng = random.Random(seed)
        self.registry = ModelRegistry(config, EPOCH)
        self.registry.listeners.append(self._heard)
        self.decisions: list[Decision] = []
        self.health_changes: list[HealthChange] = []
        self.health_dropped = 0
        self.operator_steps: list[OperatorStep] = []
        self.answers: dict[str, tuple[ProbeResult, float]] = {}  # model -> its current answer
        self.intervals = {spec.id: schedule.probe_interval(spec, config.probe)
                          for spec in config.models}
        self.timeouts = {spec.id: schedule.probe_timeout(spec, config.probe)
                         for spec in config.models}
        self.next_due: dict[str, float] = {}
        self.most_in_flight = schedule.max_in_flight(config.health)
        self._never_overdue = config.probe.recheck_interval - schedule.GROUP_SLACK
        self.groups = {key: _Group(ids)
                       for key, ids in schedule.endpoint_groups(config.models).items()}
        self.books = {name: RoleBook(state.primary, 0.0)
                      for name, state in sorted(self.registry.roles.items())}
        self.probes = 0
        self.policy_ticks = 0
        self.now = 0.0
        # (time, priority, sequence, what to call, its arguments): no closures, they cost
        self._queue: list[tuple[float, int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._decision_version = self.registry.decision_version

    # ----------------------------------------------------------------- the books

    def _heard(self, event: Event) -> None:
        at = self.now  # exact; event.at carries the epoch's rounding
        if event.kind is EventKind.HEALTH_CHANGED:
            if len(self.health_changes) < MAX_TIMELINE:
                self.health_changes.append(HealthChange(
                    at, event.model_id, event.role, str(event.data.get("old", "")),
                    str(event.data.get("new", "")), event.reason))
            else:
                self.health_dropped += 1
            return
        if event.kind in _NOT_DECISIONS:
            return
        # every other kind is a decision, those the policy adds too (holds, failbacks)
        self.decisions.append(Decision(
            at, event.kind.value, event.role or None, event.from_id or None,
            event.to_id or event.model_id or None, event.reason, event.actor))

    def _account(self, roles: Iterable[str] | None = None) -> None:
        """Bring the books up to date after something changed (in ``roles``, or anywhere)."""
        names = self.books if roles is None else roles
        for name in names:
            book = self.books[name]
            book.set_primary(self.registry.roles[name].primary, self.now)
            try:
                self.registry.get_model_for_use(name)
            except NoUsableModel:
                book.set_usable(False, self.now)
            else:
                book.set_usable(True, self.now)

    def _after_decisions(self) -> None:
        if self.registry.decision_version != self._decision_version:
            self._decision_version = self.registry.decision_version
            self._account()

    # ----------------------------------------------------------------- the loop

    def _at(self, when: float, priority: int, action: Callable[..., None],
            *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, priority, self._seq, action, args))

    def run(self, steps: Iterable[Step]) -> Report:
        """Simulate the trace (steps in time order, the end step last); raises TraceError
        when the trace has no end or the run takes more than ``max_probes`` probes."""
        self._steps = iter(steps)
        self._end: End | None = None
        self._end_at = math.inf
        self._account()
        for group in self.groups.values():
            self._wake(group, 0.0)
        if self.config.policy.interval > 0:
            self._at(self.config.policy.interval, _POLICY, self._policy_tick)
        self._queue_next_step()
        queue = self._queue
        # the trace's next step is always queued until the end is known, so the loop never
        # runs past a step it has not read yet
        pop = heapq.heappop
        while queue:
            if queue[0][0] >= self._end_at:
                break
            when, _, _, action, args = pop(queue)
            self.now = when
            action(*args)
        assert self._end is not None
        self.now = self._end.at
        for book in self.books.values():
            book.close(self.now)
        return Report(
            duration=self._end.at, seed=self.seed, auto_execute=self.config.policy.auto_execute,
            decisions=tuple(self.decisions), health_changes=tuple(self.health_changes),
            health_changes_dropped=self.health_dropped,
            operator_steps=tuple(self.operator_steps),
            roles={name: RoleSummary(dict(book.primary_seconds), book.changes,
                                     book.no_usable_seconds, book.primary)
                   for name, book in self.books.items()},
            probes=self.probes, policy_ticks=self.policy_ticks)

    def _queue_next_step(self) -> None:
        step = next(self._steps, None)
        if isinstance(step, End):
            self._end = step
            self._end_at = step.at
        elif step is not None:
            self._at(step.at, _STEP, self._step, step)
        else:
                raise TraceError(['the trace has no end step: the last line must be '
                              '{"at": SECONDS, "end": true}'])

    def _step(self, step: Behaviour | Operator) -> None:
        if isinstance(step, Behaviour):
            self.answers[step.model] = self._answer(step, self.timeouts[step.model])
        else:
            self._operate(step)
        self._queue_next_step()

    # ----------------------------------------------------------------- operator

    def _operate(self, step: Operator) -> None:
        registry = self.registry
        now = EPOCH + self.now
        role = step.role
        if role is None and step.model is not None:
            role = registry.models[step.model].spec.role
        before = len(self.decisions)
        try:
            if step.action == "promote":
                assert step.model is not None
                changed = bool(registry.promote_model(step.model, now=now, actor="operator",
                                                      reason=step.reason, force=step.force))
            elif step.action == "rollback":
                changed = bool(registry.rollback_model(step.role, now=now, actor="operator",
                                                       reason=step.reason))
            elif step.action == "offline":
                changed = registry.set_offline_mode(step.enabled, now=now, actor="operator",
                                                    reason=step.reason)
            elif step.action == "hold":
                assert step.role is not None  # the trace parser requires it
                changed = registry.hold_role(step.role, now=now, actor="operator",
                                             reason=step.reason,
                                             seconds=step.duration) is not None
            else:
                assert step.role is not None
                changed = registry.release_role(step.role, now=now, actor="operator",
                                                reason=step.reason) is not None
        except RegistryError as exc:
            outcome = f"refused: {exc.message}"
            # a refusal is what the daemon decided: the operator's attempt changed nothing
            self.decisions.append(Decision(self.now, "operator_refused", role, None,
                                           step.model, f"{step.action} refused: {exc.message}",
                                           "operator"))
        else:
            outcome = "done" if changed or len(self.decisions) > before else \
                "nothing to change"
        subject = step.model or ("on" if step.enabled else "off" if step.action == "offline"
                                 else role or "")
        if len(self.operator_steps) < MAX_TIMELINE:
            self.operator_steps.append(OperatorStep(self.now, role, step.action, subject,
                                                    outcome))
        self._after_decisions()

    # ----------------------------------------------------------------- probes

    def _wake(self, group: _Group, when: float) -> None:
        if when >= group.wake_at:
            return
        group.wake_at = when
        group.wake_version += 1
        self._at(when, _TICK, self._tick, group, group.wake_version)

    def _overdue(self, group: _Group) -> dict[str, float] | None:
        """When each probe in flight of the group that has an allowance turns overdue (see
        schedule.overdue_at); None when none has one, the common case."""
        if not group.hang_after:
            return None
        models = self.registry.models
        since = group.unanswered_since
        return {m: schedule.overdue_at(group.in_flight[m], after, self.most_in_flight,
                                       models[m].health.status,
                                       unanswered_since=since.get(m, math.inf),
                                       answered_at=group.answered_at)
                for m, after in group.hang_after.items()}

    def _next_wake(self, group: _Group, now: float) -> float:
        return schedule.group_wake_at(group.members, self.next_due, group.in_flight, now,
                                      self._overdue(group))

    def _tick(self, group: _Group, version: int) -> None:
        if version != group.wake_version:
            return  # superseded by an earlier wake
        group.wake_at = math.inf
        tick = self.now
        due = schedule.due_models(group.members, self.next_due, group.in_flight, tick)
        overdue: list[str] = []
        if group.hang_after:
            horizon = tick + schedule.GROUP_SLACK
            overdue = [m for m, at in (self._overdue(group) or {}).items() if at <= horizon]
        if due or overdue:
            jitter = schedule.jitter_factor(self.rng.random())
            for model_id in due:
                after = self._hang_after(model_id)
                if after is not None:
                    group.hang_after[model_id] = after
                group.unanswered_since.setdefault(model_id, tick)
                self._start_probe(group, model_id, tick, jitter)
            for model_id in overdue:
                self._start_probe(group, model_id, tick, jitter)
        self._wake(group, self._next_wake(group, tick))

    def _hang_after(self, model_id: str) -> float | None:
        """schedule.overdue_after for a probe launched now, or None when its answer comes
        before it could be overdue. The daemon computes the allowance for every probe, but
        for one answered in time it only wakes the loop once for nothing; leaving it out
        saves sorting the window on every probe and a wake-up per sweep."""
        seconds = self.answers.get(model_id, _UNKNOWN)[1]
        if seconds < self._never_overdue:  # the allowance is recheck_interval at least
            return None
        entry = self.registry.models[model_id]
        after = schedule.overdue_after(entry.spec, entry.health, self.config.probe)
        if after is None or seconds < after - schedule.GROUP_SLACK:
            return None
        return after

    def _start_probe(self, group: _Group, model_id: str, tick: float, jitter: float) -> None:
        entry = self.registry.models[model_id]
        interval = self.intervals[model_id]
        if not self.registry.eligible(entry):
            self.registry.mark_not_probed(model_id, "not probed: offline")
            if model_id not in group.in_flight:
                group.hang_after.pop(model_id, None)
            self.next_due[model_id] = schedule.next_due_not_probed(
                tick=tick, interval=interval, jitter=jitter)
            return
        result, seconds = self.answers.get(model_id, _UNKNOWN)
        group.in_flight.setdefault(model_id, []).append(tick)
        self.probes += 1
        if self.probes > self.max_probes:
            raise TraceError([f"more than {self.max_probes:,} probes simulated (rechecks "
                              "included); shorten the trace, or raise --max-probes"])
        self._at(tick + seconds, _RESULT, self._finish_probe, group, model_id, result, tick,
                 jitter, interval)

    def _answer(self, step: Behaviour, timeout: float) -> tuple[ProbeResult, float]:
        """What every probe of a model answers while ``step`` holds, and how long it takes
        (seconds), bounded as the prober bounds every result. Computed once per step:
        results are immutable."""
        latency = step.latency_ms
        if latency is not None and latency / 1000.0 >= timeout:
            return ProbeResult.failure(f"timed out after {timeout:g}s"), timeout
        seconds = 0.0 if latency is None else latency / 1000.0
        if step.status is ProbeStatus.OK:
            result = ProbeResult.healthy(latency, step.reason)
        elif step.status is ProbeStatus.DEGRADED:
            result = ProbeResult.degraded(step.reason or "degraded", latency)
        else:
            result = ProbeResult.failure(step.reason or "probe failed", latency)
        return bounded_result(result), seconds

    def _finish_probe(self, group: _Group, model_id: str, result: ProbeResult, tick: float,
                      jitter: float, interval: float) -> None:
        applied = self.registry.apply_probe(model_id, result, EPOCH + self.now)
        if result.ok:
            group.answered_at = self.now
            group.unanswered_since.pop(model_id, None)
        starts = group.in_flight.get(model_id, [])
        if tick in starts:
            starts.remove(tick)
        if not starts:
            group.in_flight.pop(model_id, None)
            group.hang_after.pop(model_id, None)
        entry = self.registry.models[model_id]
        due = schedule.next_due_after_probe(
            entry.health, tick=tick, finished_at=self.now, interval=interval, jitter=jitter,
            recheck_interval=self.config.probe.recheck_interval)
        self.next_due[model_id] = due
        if starts or due < group.wake_at:
            # the daemon's loop is woken and looks again: it probes what is due (or overdue)
            # by now plus the slack, else sleeps until the earliest of those; the same, one
            # event less
            wake = self._next_wake(group, self.now)
            self._wake(group, self.now if wake <= self.now + schedule.GROUP_SLACK else wake)
        if applied.event is not None:
            self._account((entry.spec.role,))
        self._after_decisions()

    # ----------------------------------------------------------------- policy

    def _policy_tick(self) -> None:
        """What the daemon's policy timer does on each tick (service/timers.policy_tick)."""
        now = EPOCH + self.now
        registry = self.registry
        suggestions = registry.auto_upgrade_check(now)
        registry.note_suggestions(suggestions, now)
        if self.config.policy.auto_execute and suggestions:
            registry.auto_upgrade_execute(now, actor="policy")
        self.policy_ticks += 1
        self._after_decisions()
        self._at(self.now + self.config.policy.interval, _POLICY, self._policy_tick)


def simulate(config: Config, steps: Iterable[Step], *, seed: int = 0,
             auto_execute: bool | None = None, max_probes: int = MAX_PROBES) -> Report:
    """Run the trace's steps through the real core on a virtual clock; the report of what
    the daemon would have decided. ``auto_execute`` overrides the configuration's."""
    return Simulation(config, seed=seed, auto_execute=auto_execute,
                      max_probes=max_probes).run(steps)
