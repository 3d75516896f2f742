"""The registry ⇄ JSON codec: what the state file holds, and how a registry is rebuilt from it.

Encoding reads the registry; decoding checks the shape, then builds a fresh registry for the
current configuration through its constructor and hands it the saved observations
(:meth:`~daemon.core.registry.ModelRegistry.restore`), so a field added to the registry is
never left unset after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.clock import Now
from ..core.health import HealthState, Sample
from ..core.model import Event, HealthStatus
from ..core.registry import (
    HistoryEntry,
    Hold,
    ModelRegistry,
    Observed,
    ProbeRecord,
    Promotion,
    RoleState,
)
from ..core.settings import Config


class StateShapeError(ValueError):
    """A saved state that parses as JSON but does not have the expected shape."""


def to_state(registry: ModelRegistry, events_kept: int = 200,
             probes_kept: int = 1) -> dict[str, Any]:
    """Everything worth keeping across restarts, as JSON-ready data (never a secret).

    Of each model's recent probes only the last ``probes_kept`` are saved: the full list
    was three quarters of the file and is only a convenience for ``show``.
    """
    models = {}
    for model_id, entry in registry.models.items():
        h = entry.health
        models[model_id] = {
            "role": entry.spec.role,
            "status": h.status.value,
            "consecutive_successes": h.consecutive_successes,
            "consecutive_failures": h.consecutive_failures,
            # microseconds are finer than any probe's jitter; full float reprs made the
            # window the costliest part of encoding the state
            "window": [[s.ok, _ms(s.latency_ms)] for s in h.window],
            "probes_total": h.probes_total,
            "failures_total": h.failures_total,
            "changed_at": h.changed_at,
            "retired": entry.retired,
            "score": round(entry.score.total, 6),
            "latency_p50_ms": _ms(h.p50),
            "recent": [r.to_json() for r in list(entry.recent)[-probes_kept:]]
            if probes_kept else [],
            "not_probed": entry.not_probed,
        }
    roles = {
        name: {
            "primary": state.primary,
            "stack": [p.to_json() for p in state.stack],
            "history": [h.to_json() for h in state.history],
            "promoted_at": state.promoted_at,
            "promoted_automatically": state.promoted_automatically,
            "last_auto_promotion_at": state.last_auto_promotion_at,
            "preferred": state.preferred,
            "hold": None if state.hold is None else state.hold.to_json(),
            "promotion_kind": state.promotion_kind,
            "last_failback_at": state.last_failback_at,
        }
        for name, state in registry.roles.items()
    }
    events = list(registry.events)[-events_kept:] if events_kept else []
    return {
        "offline_mode": registry.offline_mode,
        "models": models,
        "roles": roles,
        "quarantine": dict(registry.quarantined_until),
        "event_seq": registry.event_seq,
        "events": [e.to_json() for e in events],
    }


def from_state(config: Config, data: Mapping[str, Any], now: Now, *,
               offline_override: bool | None = None) -> ModelRegistry:
    """A registry for ``config`` with the observed state in ``data`` restored.

    Raises StateShapeError when ``data`` is not a state.
    """
    try:
        return _from_state(config, data, now, offline_override)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateShapeError(f"{type(exc).__name__}: {exc}") from exc


def _from_state(config: Config, data: Mapping[str, Any], now: Now,
                offline_override: bool | None) -> ModelRegistry:
    observed = {}
    for model_id, raw in dict(data["models"]).items():
        window = tuple(Sample(bool(ok), None if lat is None else float(lat))
                       for ok, lat in raw.get("window", []))
        health = HealthState(
            status=HealthStatus(raw["status"]),
            consecutive_successes=int(raw.get("consecutive_successes", 0)),
            consecutive_failures=int(raw.get("consecutive_failures", 0)),
            window=window,
            probes_total=int(raw.get("probes_total", 0)),
            failures_total=int(raw.get("failures_total", 0)),
            changed_at=_opt_float(raw.get("changed_at")),
        )
        observed[str(model_id)] = Observed(
            role=None if raw.get("role") is None else str(raw["role"]),
            health=health,
            retired=bool(raw.get("retired", False)),
            recent=tuple(ProbeRecord.from_json(r) for r in raw.get("recent", [])),
        )
    roles = {}
    for role_name, raw in dict(data["roles"]).items():
        roles[str(role_name)] = RoleState(
            primary=raw.get("primary"),
            stack=[Promotion.from_json(x) for x in raw.get("stack", [])],
            history=[HistoryEntry.from_json(h) for h in raw.get("history", [])],
            promoted_at=_opt_float(raw.get("promoted_at")),
            promoted_automatically=bool(raw.get("promoted_automatically", False)),
            last_auto_promotion_at=_opt_float(raw.get("last_auto_promotion_at")),
            # absent in states saved before holds and failback: no preferred primary (the
            # registry takes the primary), no hold
            preferred=None if raw.get("preferred") is None else str(raw["preferred"]),
            hold=None if raw.get("hold") is None else Hold.from_json(raw["hold"]),
            promotion_kind=str(raw.get("promotion_kind", "")),
            last_failback_at=_opt_float(raw.get("last_failback_at")),
        )
    offline = bool(data["offline_mode"]) if offline_override is None else offline_override
    registry = ModelRegistry(config, now, offline_mode=offline)
    registry.restore(
        now=now,
        offline_mode=offline,
        observed=observed,
        roles=roles,
        quarantined_until={str(k): float(v) for k, v in dict(data.get("quarantine", {})).items()},
        events=[Event.from_json(e) for e in data.get("events", [])],
        event_seq=int(data.get("event_seq", 0)),
    )
    return registry


def check_state_shape(data: Any) -> list[str]:
    """Problems that make ``data`` not a valid state of this schema (empty when it is)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["state is not a JSON object"]
    expected: dict[str, type | tuple[type, ...]] = {
        "schema_version": int, "offline_mode": bool, "models": dict, "roles": dict,
        "quarantine": dict, "event_seq": int, "events": list, "saved_at": (int, float),
    }
    for key, kind in expected.items():
        if key not in data:
            problems.append(f"missing key {key}")
        elif not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            problems.append(f"{key} has the wrong type ({type(data[key]).__name__})")
    for model_id, model in (data.get("models") or {}).items():
        if not isinstance(model, dict) or "status" not in model or "retired" not in model:
            problems.append(f"models.{model_id} lacks status or retired")
    for role, state in (data.get("roles") or {}).items():
        if not isinstance(state, dict) or "primary" not in state or "history" not in state:
            problems.append(f"roles.{role} lacks primary or history")
    return problems


def _opt_float(value: Any) -> float | None:
    """A saved time: None, or a number; anything else makes the state invalid (it would
    otherwise load, then break the first probation or cooldown check)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number or null, got {type(value).__name__} {value!r:.40}")
    return float(value)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
