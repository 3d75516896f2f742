"""The registry: the in-memory truth about every model and every role.

Pure and synchronous: no I/O, no awaits, no clock reads (``now`` is passed in). Each
operation therefore runs atomically with respect to the event loop and needs no lock.
Every change records an :class:`~daemon.core.model.Event` and bumps ``version``; decisions
(promote, rollback, offline, reload, holds) also bump ``decision_version`` so the daemon knows
to make them durable before it answers. ``material_version`` is the ``version`` of the last
change worth saving soon: everything but a probe that left the verdict as it was (its
latency, counters and window are checkpointed, not saved each time). Events are queued and
handed to the listeners only once the operation has finished its change: a listener that
raises, or that calls back into the registry, never sees (or leaves) a half-done rollback.

The seed's names are kept: ``get_model_for_use``, ``promote_model``, ``rollback_model``,
``set_offline_mode``, ``auto_upgrade_check``, ``evaluate_model`` (here ``apply_probe``: the
probe's I/O lives in the prober).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import policy
from .clock import STEP_TOLERANCE, Instant, Now
from .health import HealthState, apply_probe
from .model import (
    Event,
    EventKind,
    HealthStatus,
    ModelSpec,
    ProbeResult,
    ProbeStatus,
    finite_ms,
    json_safe,
)
from .policy import Candidate, Suggestion
from .scoring import ZERO, ScoreParts, score, score_since_recovery
from .settings import Config

EVENTS_KEPT = 1000
HISTORY_KEPT = 200
ROLLBACK_DEPTH = 50
RECENT_PROBES_KEPT = 10


# ----------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """A refused operation: ``code`` and ``status`` say which, the message says why."""

    code = "refused"
    status = 409

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class UnknownModel(RegistryError):
    code = "unknown_model"
    status = 404


class UnknownRole(RegistryError):
    code = "unknown_role"
    status = 404


class ModelUnavailable(RegistryError):
    code = "model_unavailable"
    status = 409


class NothingToRollBack(RegistryError):
    code = "nothing_to_roll_back"
    status = 409


class InvalidHold(RegistryError):
    code = "invalid_hold"
    status = 422


class RoleRequired(RegistryError):
    code = "role_required"
    status = 422


class NoUsableModel(RegistryError):
    code = "no_usable_model"
    status = 503

    def __init__(self, message: str, reasons: Mapping[str, str]) -> None:
        super().__init__(message, reasons=dict(reasons))
        self.reasons = dict(reasons)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """One probe as remembered: when, the verdict, why, how fast, and the probe's facts."""

    at: float
    status: ProbeStatus
    reason: str
    latency_ms: float | None
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "ok": self.ok,
            "status": self.status.value,
            "reason": self.reason,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "facts": _jsonable(self.facts),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProbeRecord:
        return cls(
            at=float(raw["at"]),
            status=ProbeStatus(raw.get("status", "ok" if raw.get("ok") else "failed")),
            reason=str(raw.get("reason", "")),
            latency_ms=None if raw.get("latency_ms") is None else float(raw["latency_ms"]),
            facts=MappingProxyType(dict(raw.get("facts") or {})),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a role's primary, as the API reports it."""

    role: str
    from_id: str | None
    to_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "from": self.from_id, "to": self.to_id, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Promotion:
    """A promotion that can be rolled back: who was primary before, and how it happened."""

    from_id: str | None
    to_id: str
    at: float
    automatic: bool

    def to_json(self) -> dict[str, Any]:
        return {"from": self.from_id, "to": self.to_id, "at": self.at, "automatic": self.automatic}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Promotion:
        return cls(raw.get("from"), str(raw["to"]), float(raw["at"]), bool(raw["automatic"]))


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """The audit trail of a role: who was made primary when, why, and by whom."""

    at: float
    action: str  # initial | promote | rollback | removed
    from_id: str | None
    to_id: str | None
    reason: str
    actor: str
    automatic: bool = False  # made by the policy (failover, failback, upgrade, probation rollback)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "action": self.action, "from": self.from_id, "to": self.to_id,
                "reason": self.reason, "actor": self.actor, "automatic": self.automatic}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HistoryEntry:
        actor = str(raw.get("actor", ""))
        # state files from before the field: the policy's entries are the automatic ones
        automatic = raw.get("automatic", actor == "policy")
        return cls(float(raw["at"]), str(raw["action"]), raw.get("from"), raw.get("to"),
                   str(raw.get("reason", "")), actor, automatic is True)


@dataclass(slots=True)
class ModelEntry:
    """A declared model and everything observed about it."""

    spec: ModelSpec
    health: HealthState = field(default_factory=HealthState)
    score: ScoreParts = ZERO
    retired: bool = False
    last_probe: ProbeRecord | None = None
    recent: deque[ProbeRecord] = field(default_factory=lambda: deque(maxlen=RECENT_PROBES_KEPT))
    not_probed: str = ""  # why the model is not being probed now (offline mode), if it is not


@dataclass(frozen=True, slots=True)
class Hold:
    """An operator's hold on a role: no optional promotion there until ``until``."""

    by: str
    reason: str
    since: float
    until: float

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "reason": self.reason, "since": self.since, "until": self.until}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Hold:
        since, until = raw["since"], raw["until"]
        for value in (since, until):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"a hold's since and until must be numbers, got {value!r:.40}")
        return cls(str(raw.get("by", "")), str(raw.get("reason", "")), float(since),
                   float(until))

    def shifted(self, delta: float) -> Hold:
        return replace(self, since=self.since + delta, until=self.until + delta)


@dataclass(slots=True)
class RoleState:
    """One role: its primary, what a rollback would restore, and its history.

    ``preferred`` is the primary the role returns to after an urgent failover (the target of
    the last deliberate choice: an operator's promote or rollback, a policy upgrade);
    ``promotion_kind`` says how the current primary got there (initial, manual, rollback,
    upgrade, failover, failback)."""

    primary: str | None = None
    stack: list[Promotion] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    promoted_at: float | None = None
    promoted_automatically: bool = False
    last_auto_promotion_at: float | None = None
    preferred: str | None = None
    hold: Hold | None = None
    promotion_kind: str = ""
    last_failback_at: float | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """What was observed of one model before a restart, as saved."""

    role: str | None  # the role the model was in when saved (None: not recorded)
    health: HealthState
    retired: bool
    recent: tuple[ProbeRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolution:
    """The answer to "which model do I use now": the choice and the ordered fallbacks."""

    role: str
    model_id: str
    fallbacks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProbeApplied:
    """What applying one probe result did."""

    old: HealthStatus
    new: HealthStatus
    event: Event | None  # the health_changed event, when the status changed
    changes: tuple[Change, ...] = ()  # an automatic rollback triggered by it


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a new configuration changed in the registry."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


# ----------------------------------------------------------------------------- registry

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _operation(
    method: Callable[Concatenate[ModelRegistry, _P], _R],
) -> Callable[Concatenate[ModelRegistry, _P], _R]:
    """A public registry operation: the events it records reach the listeners after it
    has finished (after the outermost one, when operations call each other)."""

    @functools.wraps(method)
    def run(self: ModelRegistry, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._deliver()

    return run



class ModelRegistry:
    """Every model's spec and state, every role's primary and history, offline mode."""

    def __init__(self, config: Config, now: Now, *, offline_mode: bool = False) -> None:
        self._skew: float | None = None  # wall minus steady time, as of the last Instant
        self._next_expiry: float | None = None  # the earliest hold to end
        self._leads: dict[str, policy.Leads] = {}
        now = self._at(now)
        self.config = config
        self.models: dict[str, ModelEntry] = {}
        self.roles: dict[str, RoleState] = {}
        self.offline_mode = offline_mode
        self.quarantined_until: dict[str, float] = {}
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self.event_seq = 0
        self.version = 0
        self.decision_version = 0
        self.material_version = 0
        self.listeners: list[Callable[[Event], None]] = []
        self._pending: deque[Event] = deque()  # recorded, not yet handed to the listeners
        self._depth = 0  # operations in progress (they call each other)
        self._delivering = False
        self._last_suggestion: dict[str, tuple[str | None, str]] = {}
        for spec in config.models:
            self.models[spec.id] = ModelEntry(spec=spec)
        self._index_roles()
        for spec in config.models:
            if spec.primary and self.roles[spec.role].primary is None:
                self._set_initial_primary(spec, now)
        self._refresh_offline_marks()

    @_operation
    def restore(self, *, now: Now, offline_mode: bool, observed: Mapping[str, Observed],
                roles: Mapping[str, RoleState], quarantined_until: Mapping[str, float],
                events: Iterable[Event], event_seq: int) -> None:
        """Adopt what a saved state observed, on top of this fresh registry for the current
        configuration. State of models no longer declared is dropped; a role keeps its saved
        primary only if that model is still declared in it; a role with no saved history
        keeps the primary the configuration declares.

        Saved times are wall times. One in the future (the clock was stepped back while the
        daemon was down) is clamped: a start to now, a quarantine to at most
        ``policy.quarantine`` from now, a hold to at most its own length from now."""
        now = self._at(now)
        self.offline_mode = offline_mode
        self.events = deque(events, maxlen=EVENTS_KEPT)
        self.event_seq = event_seq
        longest = self.config.policy.quarantine
        self.quarantined_until = {model_id: min(until, now + longest)
                                  for model_id, until in quarantined_until.items()
                                  if model_id in self.models and until > now}
        for model_id, seen in observed.items():
            entry = self.models.get(model_id)
            if entry is None:
                continue
            entry.health = replace(seen.health,
                                   window=seen.health.window[-self.config.health.window:])
            # retired is a place in a role's fallback order: it does not follow a model that
            # the configuration moved to another role (as apply_config does on reload)
            entry.retired = seen.retired and seen.role in (None, entry.spec.role)
            entry.recent.extend(seen.recent)
            entry.last_probe = entry.recent[-1] if entry.recent else None
            entry.score = score(entry.spec, entry.health, self.config.score)
        for role_name, saved in roles.items():
            if role_name not in self.roles or (saved.primary is None and not saved.history):
                continue
            members = set(self._by_role[role_name])
            saved.primary = saved.primary if saved.primary in members else None
            saved.stack = [p for p in saved.stack if p.to_id in members
                           and (p.from_id is None or p.from_id in members)]
            saved.preferred = (saved.preferred if saved.preferred in members
                               else saved.primary)
            saved.promoted_at = _not_after(saved.promoted_at, now)
            saved.last_auto_promotion_at = _not_after(saved.last_auto_promotion_at, now)
            saved.last_failback_at = _not_after(saved.last_failback_at, now)
            if saved.hold is not None and saved.hold.since > now:
                saved.hold = saved.hold.shifted(now - saved.hold.since)
            if saved.hold is not None and saved.hold.until <= now:
                saved.hold = None  # ended while the daemon was down
            self.roles[role_name] = saved
        self._plan_expiry()
        for state in self.roles.values():
            if state.primary is not None:
                self.models[state.primary].retired = False
        self._refresh_offline_marks()

    # --------------------------------------------------------------- small helpers

    def _index_roles(self) -> None:
        self._by_role: dict[str, list[str]] = {}
        for model_id, entry in self.models.items():
            self._by_role.setdefault(entry.spec.role, []).append(model_id)
            self.roles.setdefault(entry.spec.role, RoleState())

    def _set_initial_primary(self, spec: ModelSpec, now: float) -> None:
        role = self.roles[spec.role]
        role.primary = spec.id
        role.preferred = spec.id
        role.promotion_kind = "initial"
        self.models[spec.id].retired = False
        role.history.append(HistoryEntry(now, "initial", None, spec.id,
                                         "primary = true in the configuration", "config"))

    # --------------------------------------------------------------- time

    def _at(self, now: Now) -> float:
        """The wall time of ``now``. Given an :class:`Instant` whose two clocks have drifted
        apart since the last one (the wall clock was stepped), every stored time is first
        shifted by the step, so durations run on as if the clock had not moved. Holds that
        have ended by then are released."""
        if isinstance(now, Instant):
            if self._skew is None:
                self._skew = now.skew
            elif abs(now.skew - self._skew) > STEP_TOLERANCE:
                self._shift(now.skew - self._skew)
                self._skew = now.skew
            at = now.wall
        else:
            at = float(now)
        if self._next_expiry is not None and at >= self._next_expiry:
            self._expire_holds(at)
        return at

    def _shift(self, delta: float) -> None:
        """Move every stored time that a duration is measured from by ``delta`` seconds."""
        def moved(value: float | None) -> float | None:
            return None if value is None else value + delta

        for role in self.roles.values():
            role.promoted_at = moved(role.promoted_at)
            role.last_auto_promotion_at = moved(role.last_auto_promotion_at)
            role.last_failback_at = moved(role.last_failback_at)
            if role.hold is not None:
                role.hold = role.hold.shifted(delta)
        self.quarantined_until = {k: v + delta for k, v in self.quarantined_until.items()}
        self._leads = {k: v.shifted(delta) for k, v in self._leads.items()}
        for entry in self.models.values():
            if entry.health.changed_at is not None:
                entry.health = replace(entry.health, changed_at=entry.health.changed_at + delta)
        self._next_expiry = moved(self._next_expiry)
        self._touch()  # the shifted times are saved with the next write

    def _expire_holds(self, now: float) -> None:
        for name in sorted(self.roles):
            hold = self.roles[name].hold
            if hold is not None and hold.until <= now:
                self._end_hold(name, now, actor="policy",
                               reason=f"the hold by {hold.by} ended (it was for "
                               f"{hold.until - hold.since:g}s)")
        self._plan_expiry()

    def _plan_expiry(self) -> None:
        ends = [r.hold.until for r in self.roles.values() if r.hold is not None]
        self._next_expiry = min(ends) if ends else None

    def entry(self, model_id: str) -> ModelEntry:
        """The entry of a model; raises UnknownModel naming the known ids."""
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models)[:20]) or "none"
            raise UnknownModel(f'unknown model "{model_id}" (known: {known})',
                               model_id=model_id) from None

    def role_members(self, role: str) -> list[ModelEntry]:
        """The entries of one role."""
        return [self.models[m] for m in self._by_role.get(role, ())]

    def is_primary(self, model_id: str) -> bool:
        entry = self.models.get(model_id)
        return entry is not None and self.roles[entry.spec.role].primary == model_id

    def eligible(self, entry: ModelEntry) -> bool:
        """Whether offline rules allow the model: any model online, only local ones offline."""
        return not self.offline_mode or entry.spec.local

    def _touch(self, decision: bool = False, material: bool = True) -> None:
        self.version += 1
        if decision:
            self.decision_version += 1
        if material or decision:
            self.material_version = self.version

    def _emit(self, now: float, kind: EventKind, *, role: str = "", model_id: str = "",
              from_id: str | None = None, to_id: str | None = None, reason: str = "",
              actor: str = "daemon", **data: Any) -> Event:
        self.event_seq += 1
        self.version += 1  # events are saved: one never saved could see its seq reused
        self.material_version = self.version
        event = Event(seq=self.event_seq, at=now, kind=kind, role=role, model_id=model_id,
                      from_id=from_id or "", to_id=to_id or "", reason=reason, actor=actor,
                      data=MappingProxyType(data))
        self.events.append(event)
        self._pending.append(event)
        return event

    def _deliver(self) -> None:
        """Hand the queued events to the listeners, oldest first. Every listener hears every
        event even when one raises; the first error is raised once all are delivered (the
        change itself is complete by then). Events of operations a listener starts are
        queued behind and delivered by this same loop, in order."""
        if self._delivering:
            return
        self._delivering = True
        errors: list[Exception] = []
        try:
            while self._pending:
                event = self._pending.popleft()
                for listener in list(self.listeners):
                    try:
                        listener(event)
                    except Exception as exc:  # raised below, once every listener heard every event
                        errors.append(exc)
        finally:
            self._delivering = False
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.add_note(f"{len(errors) - 1} more listener error(s): "
                               + "; ".join(f"{type(e).__name__}: {e}" for e in errors[1:]))
            raise first

    def events_since(self, seq: int) -> list[Event]:
        """Events with a sequence number greater than ``seq``, oldest first."""
        return [e for e in self.events if e.seq > seq]

    # --------------------------------------------------------------- probes

    @_operation
    def apply_probe(self, model_id: str, result: ProbeResult, now: Now) -> ProbeApplied:
        """Fold one probe result into the model's health and score (the seed's evaluate_model).

        When the model is a primary promoted automatically and still on probation, and this
        result makes it unavailable, the promotion is rolled back at once and the model
        quarantined.
        """
        now = self._at(now)
        entry = self.entry(model_id)
        result = _sane(result)
        old = entry.health.status
        entry.health = apply_probe(entry.health, result, self.config.health, now)
        entry.score = score(entry.spec, entry.health, self.config.score)
        record = ProbeRecord(now, result.status, result.reason, result.latency_ms, result.facts)
        entry.last_probe = record
        entry.recent.append(record)
        # a probe that leaves the verdict as it was moves only latencies and counters: worth a
        # checkpoint, not a write of its own (a verdict change emits an event, which is)
        self._touch(material=entry.not_probed != "")
        entry.not_probed = ""
        new = entry.health.status
        if new is old:
            return ProbeApplied(old, new, None)
        event = self._emit(now, EventKind.HEALTH_CHANGED, role=entry.spec.role,
                           model_id=model_id, reason=result.reason or new.value,
                           old=old.value, new=new.value, latency_ms=result.latency_ms)
        changes: tuple[Change, ...] = ()
        if new is HealthStatus.UNAVAILABLE:
            changes = tuple(self._probation_rollback(entry, now))
        return ProbeApplied(old, new, event, changes)

    def _probation_rollback(self, entry: ModelEntry, now: float) -> list[Change]:
        role = self.roles[entry.spec.role]
        if role.primary != entry.spec.id or not role.stack:
            return []
        if not policy.in_probation(role.promoted_at, role.promoted_automatically, now,
                                   self.config.policy):
            return []
        assert role.promoted_at is not None
        after = now - role.promoted_at
        reason = (f"probation: {entry.spec.id} became unavailable {after:.1f}s after its "
                  f"automatic promotion (probation {self.config.policy.probation:g}s)")
        return self.rollback_model(entry.spec.role, now=now, actor="policy", reason=reason,
                                   automatic=True)

    @_operation
    def mark_not_probed(self, model_id: str, reason: str) -> None:
        """Record why a model is skipped by the scheduler (offline mode)."""
        entry = self.entry(model_id)
        if entry.not_probed != reason:
            entry.not_probed = reason
            self._touch()

    def _refresh_offline_marks(self) -> None:
        for entry in self.models.values():
            wanted = "" if self.eligible(entry) else "not probed: offline"
            if entry.not_probed != wanted:
                entry.not_probed = wanted

    # --------------------------------------------------------------- resolve

    def unusable_reason(self, entry: ModelEntry, capabilities: Sequence[str]) -> str | None:
        """Why ``entry`` cannot answer a request needing ``capabilities`` now (None: it can):
        what resolve's 503 and the front door say per model."""
        missing = [tag for tag in capabilities if tag not in entry.spec.capability_tags]
        if missing:
            return f"lacks capability {', '.join(missing)}"
        if not self.eligible(entry):
            return "remote model, offline mode is on"
        status = entry.health.status
        if not status.usable:
            detail = entry.last_probe.reason if entry.last_probe and entry.last_probe.reason else ""
            if status is HealthStatus.UNKNOWN and entry.last_probe is None:
                detail = "not probed yet"
            return f"{status.value}: {detail}" if detail else status.value
        return None

    def _preference_order(self, role: str) -> list[ModelEntry]:
        """Primary, then retired models best score first, then the others best score first."""
        primary_id = self.roles[role].primary if role in self.roles else None
        members = self.role_members(role)

        def by_score(e: ModelEntry) -> tuple[float, str]:
            return (-e.score.total, e.spec.id)

        retired = sorted((e for e in members if e.retired and e.spec.id != primary_id),
                         key=by_score)
        others = sorted((e for e in members if not e.retired and e.spec.id != primary_id),
                        key=by_score)
        head = [self.models[primary_id]] if primary_id in self.models else []
        return head + retired + others

    def get_model_for_use(self, role: str = "default",
                          capabilities: Sequence[str] = ()) -> Resolution:
        """The model to use now in ``role`` and its ordered fallback chain (resolve).

        Raises UnknownRole when the role has no models, NoUsableModel (with a reason per
        model) when none is usable.
        """
        if role not in self._by_role:
            roles = ", ".join(sorted(self._by_role)) or "none"
            raise UnknownRole(f'no models in role "{role}" (roles: {roles})', role=role)
        chain: list[str] = []
        reasons: dict[str, str] = {}
        for entry in self._preference_order(role):
            why = self.unusable_reason(entry, capabilities)
            if why is None:
                chain.append(entry.spec.id)
            else:
                reasons[entry.spec.id] = why
        if not chain:
            wanted = f" with capability {', '.join(capabilities)}" if capabilities else ""
            raise NoUsableModel(f'no usable model in role "{role}"{wanted}', reasons)
        return Resolution(role, chain[0], tuple(chain[1:]))

    # --------------------------------------------------------------- decisions

    @_operation
    def promote_model(self, model_id: str, *, now: Now, actor: str = "daemon",
                      reason: str = "", force: bool = False,
                      automatic: bool = False, kind: str = "") -> list[Change]:
        """Make ``model_id`` its role's primary; the old primary is retired, kept as fallback.

        Refused for a model that is unavailable or never probed, unless ``force``.
        Promoting the current primary changes no primary and returns no changes; when a
        stand-in is primary, an operator's promotion of it makes it the preferred primary
        (and holds the role), so the role does not fail back from it.

        ``kind`` (automatic promotions): failover, failback or upgrade. A manual promotion,
        and an upgrade, make the model the role's preferred primary; a failover keeps the
        preferred one, to fail back to. A manual promotion holds the role for
        ``policy.manual_hold``.
        """
        now = self._at(now)
        entry = self.entry(model_id)
        role_name = entry.spec.role
        role = self.roles[role_name]
        kind = kind or (policy.UPGRADE if automatic else "manual")
        if role.primary == model_id:
            if not automatic and role.preferred != model_id:
                role.preferred = model_id
                self._record(role, HistoryEntry(now, "prefer", model_id, model_id,
                                                reason or f"kept as primary by {actor}", actor))
                self._touch(decision=True)
                self._hold_after_manual(role_name, now, actor, reason or
                                        f"{model_id} kept as primary by {actor}")
            return []
        status = entry.health.status
        if not force and not status.usable:
            why = (entry.last_probe.reason if entry.last_probe else "") or "not probed yet"
            raise ModelUnavailable(
                f'refusing to promote "{model_id}": it is {status.value} ({why}); '
                f'to promote it anyway: modelctl promote {model_id} --force (API: "force": '
                f"true)", model_id=model_id, health_status=status.value)
        old = role.primary
        reason = reason or (f"manual promotion by {actor}" + (" (forced)" if force else ""))
        role.stack.append(Promotion(old, model_id, now, automatic))
        del role.stack[:-ROLLBACK_DEPTH]
        if old is not None and old in self.models:
            self.models[old].retired = True
        entry.retired = False
        role.primary = model_id
        role.promoted_at = now
        role.promoted_automatically = automatic
        role.promotion_kind = kind
        if automatic:
            role.last_auto_promotion_at = now
        if kind == policy.FAILOVER:
            role.preferred = role.preferred or old  # the stand-in is not preferred
        elif kind != policy.FAILBACK:
            role.preferred = model_id
        self._record(role, HistoryEntry(now, "promote", old, model_id, reason, actor, automatic))
        self._touch(decision=True)
        self._emit(now, EventKind.MODEL_PROMOTED, role=role_name, model_id=model_id,
                   from_id=old, to_id=model_id, reason=reason, actor=actor,
                   automatic=automatic, forced=force, promotion=kind,
                   failback=kind == policy.FAILBACK)
        if not automatic:
            self._hold_after_manual(role_name, now, actor, reason)
        return [Change(role_name, old, model_id, reason)]

    def _hold_after_manual(self, role_name: str, now: float, actor: str, reason: str) -> None:
        # the promote or rollback entry of the history is the audit of this hold
        if self.config.policy.manual_hold > 0:
            self._start_hold(role_name, now, actor, reason, self.config.policy.manual_hold,
                             record=False)

    def _record(self, role: RoleState, entry: HistoryEntry) -> None:
        role.history.append(entry)
        del role.history[:-HISTORY_KEPT]

    def _rollback_role(self, role: str | None) -> str:
        if role is not None:
            if role not in self.roles:
                roles = ", ".join(sorted(self.roles)) or "none"
                raise UnknownRole(f'unknown role "{role}" (roles: {roles})', role=role)
            return role
        with_history = sorted(name for name, state in self.roles.items() if state.stack)
        if "default" in with_history or len(with_history) == 1:
            return "default" if "default" in with_history else with_history[0]
        if not with_history:
            raise NothingToRollBack("no role has a promotion to roll back")
        raise RoleRequired(f"several roles have promotions to roll back "
                           f"({', '.join(with_history)}); name one with role")

    @_operation
    def rollback_model(self, role: str | None = None, *, now: Now, actor: str = "daemon",
                       reason: str = "", automatic: bool = False) -> list[Change]:
        """Undo the role's last promotion: the previous primary returns, the current one is
        retired and quarantined (the policy will not promote it again for
        ``policy.quarantine``, so a rollback is not undone by the next timer tick).
        Repeatable, one level per call, as deep as the history goes.

        An operator's rollback (not ``automatic``) makes the restored model the preferred
        primary and holds the role; the policy's (probation) makes it preferred only when it
        undoes the policy's own upgrade."""
        now = self._at(now)
        role_name = self._rollback_role(role)
        state = self.roles[role_name]
        if not state.stack:
            raise NothingToRollBack(f'role "{role_name}" has no promotion to roll back',
                                    role=role_name)
        promotion = state.stack.pop()
        current = state.primary
        restored = promotion.from_id if promotion.from_id in self.models else None
        if current is not None and current in self.models:
            self.models[current].retired = True
        if restored is not None:
            self.models[restored].retired = False
        # the policy undoing its own upgrade drops its choice; undoing a failover or a
        # failback keeps the preferred primary (failing back to it is the point)
        if restored is not None and (not automatic or state.promotion_kind == policy.UPGRADE
                                     or state.preferred is None):
            state.preferred = restored
        state.primary = restored
        state.promoted_at = now
        state.promoted_automatically = False
        state.promotion_kind = "rollback"
        reason = reason or f"manual rollback by {actor}"
        self._record(state, HistoryEntry(now, "rollback", current, restored, reason, actor,
                                         automatic))
        self._touch(decision=True)
        self._emit(now, EventKind.MODEL_ROLLED_BACK, role=role_name, model_id=restored or "",
                   from_id=current, to_id=restored, reason=reason, actor=actor,
                   automatic=automatic)
        if current is not None and current in self.models:
            self.quarantine(current, now=now, reason=f"rolled back: {reason}")
        if not automatic:
            self._hold_after_manual(role_name, now, actor, reason)
        return [Change(role_name, current, restored, reason)]

    @_operation
    def quarantine(self, model_id: str, *, now: Now, reason: str) -> None:
        """Keep a model from automatic promotion for ``policy.quarantine`` seconds."""
        now = self._at(now)
        entry = self.entry(model_id)
        until = now + self.config.policy.quarantine
        self.quarantined_until[model_id] = until
        self._touch(decision=True)
        self._emit(now, EventKind.MODEL_QUARANTINED, role=entry.spec.role, model_id=model_id,
                   reason=reason, actor="policy", until=until)

    @_operation
    def set_offline_mode(self, enabled: bool, *, now: Now, actor: str = "daemon",
                         reason: str = "") -> bool:
        """Turn offline mode on or off; returns whether it changed."""
        now = self._at(now)
        if enabled == self.offline_mode:
            return False
        self.offline_mode = enabled
        self._refresh_offline_marks()
        self._touch(decision=True)
        self._emit(now, EventKind.OFFLINE_MODE_CHANGED, reason=reason or f"set by {actor}",
                   actor=actor, enabled=enabled)
        return True

    # --------------------------------------------------------------- auto-upgrade

    def _candidate(self, entry: ModelEntry, as_primary: bool = False) -> Candidate:
        if as_primary:
            judged = score_since_recovery(entry.spec, entry.health, self.config.score,
                                          self.config.health.failure_threshold)
            return Candidate(entry.spec.id, entry.health.status, judged.total,
                             entry.health.consecutive_successes, self.eligible(entry),
                             window_score=entry.score.total)
        return Candidate(entry.spec.id, entry.health.status, entry.score.total,
                         entry.health.consecutive_successes, self.eligible(entry))

    def _hold_text(self, hold: Hold, now: float) -> str:
        text = f"by {hold.by} for {max(hold.until - now, 0.0):.0f}s more"
        return f"{text} ({hold.reason})" if hold.reason else text

    @_operation
    def auto_upgrade_decisions(self, now: Now) -> list[policy.Decision]:
        """The policy's decision for every role, with why nothing is suggested where nothing
        is. Changes no primary; it remembers since when each candidate leads (for
        ``sustain``), so every evaluation is one sample of the lead."""
        now = self._at(now)
        decisions = []
        for role_name in sorted(self._by_role):
            state = self.roles[role_name]
            primary_id = state.primary
            primary = self._candidate(self.models[primary_id], True) if primary_id else None
            members = [self._candidate(e) for e in self.role_members(role_name)]
            hold = state.hold if state.hold is not None and state.hold.until > now else None
            decision = policy.decide(
                role_name, primary, members, self.quarantined_until, now, self.config.policy,
                preferred=state.preferred, leads=self._leads.get(role_name),
                held=None if hold is None else self._hold_text(hold, now))
            if decision.leads is None:
                self._leads.pop(role_name, None)
            else:
                self._leads[role_name] = decision.leads
            wait = self._cooldown_wait(state, decision.suggestion, now)
            if wait > 0:
                decision = replace(decision, why=f"{decision.why}; the timer waits for the "
                                   f"cooldown: {wait:.0f}s more")
            decisions.append(decision)
        return decisions

    def _cooldown_wait(self, role: RoleState, suggestion: Suggestion | None,
                       now: float) -> float:
        """Seconds the timer waits before acting on ``suggestion`` (0: it acts now)."""
        if suggestion is None or suggestion.urgent:
            return 0.0
        since = (role.last_failback_at if suggestion.kind == policy.FAILBACK
                 else role.last_auto_promotion_at)
        return policy.cooldown_remaining(since, now, self.config.policy)

    def auto_upgrade_check(self, now: Now) -> list[Suggestion]:
        """Promotions the policy recommends now, one role at most once; changes no primary."""
        return [d.suggestion for d in self.auto_upgrade_decisions(now)
                if d.suggestion is not None]

    @_operation
    def note_suggestions(self, suggestions: Iterable[Suggestion], now: Now) -> list[Suggestion]:
        """Emit an event for each suggestion that is new since the last check of its role."""
        now = self._at(now)
        fresh = []
        current = {s.role: s for s in suggestions}
        for role_name in list(self._last_suggestion):
            if role_name not in current:
                del self._last_suggestion[role_name]
        for role_name, suggestion in current.items():
            key = (suggestion.from_id, suggestion.to_id)
            if self._last_suggestion.get(role_name) == key:
                continue
            self._last_suggestion[role_name] = key
            fresh.append(suggestion)
            self._emit(now, EventKind.AUTO_UPGRADE_SUGGESTED, role=role_name,
                       model_id=suggestion.to_id, from_id=suggestion.from_id,
                       to_id=suggestion.to_id, reason=suggestion.reason, actor="policy",
                       score_from=suggestion.score_from, score_to=suggestion.score_to,
                       promotion=suggestion.kind, urgent=suggestion.urgent)
        return fresh

    @_operation
    def auto_upgrade_execute(self, now: Now, *, actor: str = "policy",
                             respect_cooldown: bool = True) -> list[Change]:
        """Act on the current suggestions. With ``respect_cooldown`` (the timer), a role
        promoted automatically less than ``cooldown`` ago is not upgraded, and a role that
        failed back less than ``cooldown`` ago does not fail back again (a failback right after
        the failover it undoes is never delayed); an urgent failover always goes ahead."""
        now = self._at(now)
        changes: list[Change] = []
        for suggestion in self.auto_upgrade_check(now):
            role = self.roles[suggestion.role]
            if respect_cooldown and self._cooldown_wait(role, suggestion, now) > 0:
                continue
            label = "auto-upgrade" if suggestion.kind == policy.UPGRADE else suggestion.kind
            changes += self.promote_model(suggestion.to_id, now=now, actor=actor,
                                          reason=f"{label}: {suggestion.reason}",
                                          automatic=True, kind=suggestion.kind)
            if suggestion.kind == policy.FAILBACK and not suggestion.urgent:
                role.last_failback_at = now
        return changes

    # --------------------------------------------------------------- holds

    def _start_hold(self, role_name: str, now: float, actor: str, reason: str,
                    seconds: float, record: bool = True) -> Hold:
        state = self.roles[role_name]
        hold = Hold(actor, reason, now, now + seconds)
        state.hold = hold
        self._plan_expiry()
        if record:
            self._record(state, HistoryEntry(now, "hold", state.primary, state.primary,
                                             f"held for {seconds:g}s: {reason}", actor))
        self._touch(decision=True)
        self._emit(now, EventKind.ROLE_HELD, role=role_name, model_id=state.primary or "",
                   reason=reason, actor=actor, until=hold.until, seconds=seconds,
                   preferred=state.preferred)
        return hold

    def _end_hold(self, role_name: str, now: float, actor: str, reason: str) -> Hold | None:
        state = self.roles[role_name]
        hold = state.hold
        if hold is None:
            return None
        state.hold = None
        self._plan_expiry()
        self._record(state, HistoryEntry(now, "release", state.primary, state.primary, reason,
                                         actor))
        self._touch(decision=True)
        self._emit(now, EventKind.ROLE_RELEASED, role=role_name, model_id=state.primary or "",
                   reason=reason, actor=actor, held_by=hold.by, held_since=hold.since)
        return hold

    def _known_role(self, role: str) -> RoleState:
        state = self.roles.get(role)
        if state is None:
            roles = ", ".join(sorted(self.roles)) or "none"
            raise UnknownRole(f'unknown role "{role}" (roles: {roles})', role=role)
        return state

    @_operation
    def hold_role(self, role: str, *, now: Now, actor: str = "daemon", reason: str = "",
                  seconds: float | None = None) -> Hold:
        """Hold ``role`` against optional promotions for ``seconds`` (default
        ``policy.manual_hold``) without promoting; a hold in force is replaced. Urgent
        failovers and failbacks to the preferred primary still happen."""
        now = self._at(now)
        self._known_role(role)
        if seconds is None:
            seconds = self.config.policy.manual_hold
            if seconds <= 0:
                raise InvalidHold(f'role "{role}": say how long to hold it (modelctl hold '
                                  f'{role} --for 2h; API: "for": "2h"): policy.manual_hold is '
                                  "0s, so there is no default hold", role=role)
        if not seconds > 0 or seconds == float("inf"):
            raise InvalidHold(f'role "{role}": a hold must last a finite time greater than 0s, '
                              f"got {seconds!r}", role=role)
        return self._start_hold(role, now, actor, reason or f"held by {actor}", seconds)

    @_operation
    def release_role(self, role: str, *, now: Now, actor: str = "daemon",
                     reason: str = "") -> Hold | None:
        """End the hold on ``role``; the hold that ended, or None when there was none (then
        nothing changes)."""
        now = self._at(now)
        self._known_role(role)
        return self._end_hold(role, now, actor, reason or f"released by {actor}")

    # --------------------------------------------------------------- configuration

    @_operation
    def apply_config(self, config: Config, now: Now, actor: str = "config") -> ConfigDiff:
        """Adopt a new configuration: new models start fresh, removed ones leave, changed ones
        keep their observed state (rescored under the new spec and weights)."""
        now = self._at(now)
        old_ids = set(self.models)
        new_specs = {spec.id: spec for spec in config.models}
        added = tuple(sorted(set(new_specs) - old_ids))
        removed = tuple(sorted(old_ids - set(new_specs)))
        changed = tuple(sorted(i for i in old_ids & set(new_specs)
                               if self.models[i].spec != new_specs[i]))
        self.config = config
        for model_id in removed:
            self._remove(model_id, now, actor)
        for model_id in changed:
            entry = self.models[model_id]
            old_role = entry.spec.role
            entry.spec = new_specs[model_id]
            if entry.spec.role != old_role:
                self._leave_role(model_id, old_role, now, actor, "moved to role "
                                 f"{entry.spec.role} by the configuration")
                entry.retired = False
        for model_id in added:
            self.models[model_id] = ModelEntry(spec=new_specs[model_id])
        # keep declaration order, so listings follow the config file
        self.models = {spec.id: self.models[spec.id] for spec in config.models}
        self.roles = {name: state for name, state in self.roles.items()
                      if any(e.spec.role == name for e in self.models.values())}
        self._index_roles()
        for model_id in added:
            spec = new_specs[model_id]
            if spec.primary and self.roles[spec.role].primary is None:
                self._set_initial_primary(spec, now)
            self._emit(now, EventKind.MODEL_ADDED, role=spec.role, model_id=model_id,
                       actor=actor, reason="added by the configuration")
        for entry in self.models.values():
            entry.score = score(entry.spec, entry.health, config.score)
        self._refresh_offline_marks()
        self._touch(decision=True)
        self._emit(now, EventKind.CONFIG_RELOADED, actor=actor,
                   reason=f"{len(added)} added, {len(removed)} removed, {len(changed)} changed",
                   added=list(added), removed=list(removed), changed=list(changed))
        return ConfigDiff(added, removed, changed)

    @_operation
    def note_config_rejected(self, now: Now, *, actor: str, errors: Sequence[str]) -> Event:
        """Record that a new configuration was refused and the old one kept (an event)."""
        now = self._at(now)
        return self._emit(now, EventKind.CONFIG_RELOAD_FAILED, actor=actor,
                          reason=f"{len(errors)} error(s); the old configuration stays in effect",
                          errors=list(errors))

    def _remove(self, model_id: str, now: float, actor: str) -> None:
        entry = self.models.pop(model_id)
        self.quarantined_until.pop(model_id, None)
        self._leave_role(model_id, entry.spec.role, now, actor, "removed from the configuration")
        self._emit(now, EventKind.MODEL_REMOVED, role=entry.spec.role, model_id=model_id,
                   actor=actor, reason="removed from the configuration")

    def _leave_role(self, model_id: str, role_name: str, now: float, actor: str,
                    reason: str) -> None:
        role = self.roles.get(role_name)
        if role is None:
            return
        role.stack = [p for p in role.stack if model_id not in (p.from_id, p.to_id)]
        if role.preferred == model_id:
            role.preferred = None if role.primary == model_id else role.primary
        if role.primary == model_id:
            role.primary = None
            role.promoted_automatically = False
            self._record(role, HistoryEntry(now, "removed", model_id, None, reason, actor))

    # --------------------------------------------------------------- queries

    def health_counts(self) -> dict[str, int]:
        """How many models are in each health status."""
        counts = {status.value: 0 for status in HealthStatus}
        for entry in self.models.values():
            counts[entry.health.status.value] += 1
        return counts


def _not_after(value: float | None, now: float) -> float | None:
    return None if value is None else min(value, now)


def _sane(result: ProbeResult) -> ProbeResult:
    """The result as the registry can keep it: a latency that is a finite, non-negative
    number of ms (else None) and a reason that is a string. A plugin's NaN latency or odd
    reason must not reach the score or the state file."""
    latency = finite_ms(result.latency_ms)
    if latency == result.latency_ms and isinstance(result.reason, str):
        return result
    return ProbeResult(result.status, latency, str(result.reason), result.facts)


def _jsonable(facts: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key): json_safe(value) for key, value in facts.items()}
