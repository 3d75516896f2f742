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
from ..core.model import Event, HealthStatus, encodable
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
from ..probing.limits import (
    EVENT_ITEMS,
    EVENT_TEXT_CHARS,
    MAX_REASON_CHARS,
    bounded_facts,
    bounded_text,
)


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
    except StateShapeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError,
            RecursionError) as exc:
        raise StateShapeError(f"{type(exc).__name__}: {exc}") from exc


def _from_state(config: Config, data: Mapping[str, Any], now: Now,
                offline_override: bool | None) -> ModelRegistry:
    data = checked_state(data)
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
    models = data.get("models")
    for model_id, model in (models.items() if isinstance(models, dict) else ()):
        if not isinstance(model, dict) or "status" not in model or "retired" not in model:
            problems.append(f"models.{bounded_text(model_id, 60)} lacks status or retired")
    roles = data.get("roles")
    for role, state in (roles.items() if isinstance(roles, dict) else ()):
        if not isinstance(state, dict) or "primary" not in state or "history" not in state:
            problems.append(f"roles.{bounded_text(role, 60)} lacks primary or history")
    return problems


# ----------------------------------------------------------------------------- checks at load

#: The largest counter or sequence number taken from a state (2**53: exact in every JSON reader).
MAX_COUNT = 2**53
#: Times are Unix seconds (or a simulator's virtual seconds): finite, and no later than this.
MAX_TIME = 1e12
#: Longest name (actor, action) kept from a state.
MAX_NAME_CHARS = 200


def checked_state(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every value the decoder uses checked, and every string held to the
    bounds of :mod:`daemon.probing.limits`; raises StateShapeError naming the first value
    that cannot be used ("models.a.retired: expected true or false, got 'false'").

    A value is never guessed at: ``"false"`` is not false and ``"12"`` is not 12. Keys the
    decoder does not know are passed through untouched for it (or a later schema) to judge.
    """
    out = dict(data)
    out["offline_mode"] = _bool(data.get("offline_mode"), "offline_mode")
    models = {}
    for model_id, raw in _dict(data.get("models"), "models").items():
        models[model_id] = _checked_model(raw, f"models.{_where(model_id)}")
    out["models"] = models
    roles = {}
    for role, raw in _dict(data.get("roles"), "roles").items():
        roles[role] = _checked_role(raw, f"roles.{_where(role)}")
    out["roles"] = roles
    out["quarantine"] = {
        model_id: _time(until, f"quarantine.{_where(model_id)}")
        for model_id, until in _dict(data.get("quarantine", {}), "quarantine").items()}
    out["event_seq"] = _count(data.get("event_seq", 0), "event_seq")
    out["events"] = [_checked_event(e, f"events[{i}]")
                     for i, e in enumerate(_list(data.get("events", []), "events"))]
    return out


def _checked_model(raw: Any, where: str) -> dict[str, Any]:
    model = dict(_dict(raw, where))
    model["status"] = _text(model.get("status"), f"{where}.status", MAX_NAME_CHARS)
    if model.get("role") is not None:
        model["role"] = _text(model["role"], f"{where}.role", MAX_NAME_CHARS)
    for key in ("consecutive_successes", "consecutive_failures", "probes_total",
                "failures_total"):
        model[key] = _count(model.get(key, 0), f"{where}.{key}")
    model["changed_at"] = _opt_time(model.get("changed_at"), f"{where}.changed_at")
    model["retired"] = _bool(model.get("retired", False), f"{where}.retired")
    window = []
    for i, sample in enumerate(_list(model.get("window", []), f"{where}.window")):
        here = f"{where}.window[{i}]"
        if not isinstance(sample, list) or len(sample) != 2:
            raise StateShapeError(f"{here}: expected [ok, latency_ms], got {_show(sample)}")
        window.append([_bool(sample[0], f"{here}[0]"), _opt_latency(sample[1], f"{here}[1]")])
    model["window"] = window
    model["recent"] = [_checked_probe(r, f"{where}.recent[{i}]")
                       for i, r in enumerate(_list(model.get("recent", []), f"{where}.recent"))]
    return model


def _checked_probe(raw: Any, where: str) -> dict[str, Any]:
    probe = dict(_dict(raw, where))
    probe["at"] = _time(probe.get("at"), f"{where}.at")
    if "status" in probe:
        probe["status"] = _text(probe["status"], f"{where}.status", MAX_NAME_CHARS)
    if "ok" in probe:
        probe["ok"] = _bool(probe["ok"], f"{where}.ok")
    probe["reason"] = bounded_text(_text(probe.get("reason", ""), f"{where}.reason"))
    probe["latency_ms"] = _opt_latency(probe.get("latency_ms"), f"{where}.latency_ms")
    probe["facts"] = bounded_facts(_dict(probe.get("facts") or {}, f"{where}.facts"))
    return probe


def _checked_role(raw: Any, where: str) -> dict[str, Any]:
    role = dict(_dict(raw, where))
    role["primary"] = _opt_text(role.get("primary"), f"{where}.primary")
    stack = []
    for i, item in enumerate(_list(role.get("stack", []), f"{where}.stack")):
        here = f"{where}.stack[{i}]"
        entry = dict(_dict(item, here))
        entry["from"] = _opt_text(entry.get("from"), f"{here}.from")
        entry["to"] = _text(entry.get("to"), f"{here}.to", MAX_NAME_CHARS)
        entry["at"] = _time(entry.get("at"), f"{here}.at")
        entry["automatic"] = _bool(entry.get("automatic"), f"{here}.automatic")
        stack.append(entry)
    role["stack"] = stack
    history = []
    for i, item in enumerate(_list(role.get("history", []), f"{where}.history")):
        here = f"{where}.history[{i}]"
        entry = dict(_dict(item, here))
        entry["at"] = _time(entry.get("at"), f"{here}.at")
        entry["action"] = _text(entry.get("action"), f"{here}.action", MAX_NAME_CHARS)
        entry["from"] = _opt_text(entry.get("from"), f"{here}.from")
        entry["to"] = _opt_text(entry.get("to"), f"{here}.to")
        entry["reason"] = bounded_text(_text(entry.get("reason", ""), f"{here}.reason"))
        entry["actor"] = _text(entry.get("actor", ""), f"{here}.actor", MAX_NAME_CHARS)
        history.append(entry)
    role["history"] = history
    for key in ("promoted_at", "last_auto_promotion_at", "last_failback_at"):
        role[key] = _opt_time(role.get(key), f"{where}.{key}")
    role["promoted_automatically"] = _bool(role.get("promoted_automatically", False),
                                           f"{where}.promoted_automatically")
    role["preferred"] = _opt_text(role.get("preferred"), f"{where}.preferred")
    if "promotion_kind" in role:
        role["promotion_kind"] = _text(role["promotion_kind"], f"{where}.promotion_kind",
                                       MAX_NAME_CHARS)
    if role.get("hold") is not None:
        here = f"{where}.hold"
        hold = dict(_dict(role["hold"], here))
        hold["by"] = _text(hold.get("by", ""), f"{here}.by", MAX_NAME_CHARS)
        hold["reason"] = bounded_text(_text(hold.get("reason", ""), f"{here}.reason"))
        hold["since"] = _time(hold.get("since"), f"{here}.since")
        hold["until"] = _time(hold.get("until"), f"{here}.until")
        role["hold"] = hold
    return role


def _checked_event(raw: Any, where: str) -> dict[str, Any]:
    event = dict(_dict(raw, where))
    event["seq"] = _count(event.get("seq"), f"{where}.seq")
    event["at"] = _time(event.get("at"), f"{where}.at")
    event["kind"] = _text(event.get("kind"), f"{where}.kind", MAX_NAME_CHARS)
    for key in ("role", "model_id", "from", "to", "actor"):
        if event.get(key) is not None:
            event[key] = _text(event[key], f"{where}.{key}", MAX_NAME_CHARS)
    event["reason"] = bounded_text(_text(event.get("reason", ""), f"{where}.reason"))
    event["data"] = bounded_facts(_dict(event.get("data") or {}, f"{where}.data"),
                                  items=EVENT_ITEMS, text=EVENT_TEXT_CHARS, budget=None)
    return event


def _where(key: str) -> str:
    return bounded_text(key, 60)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return bounded_text(text, 60)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateShapeError(f"{where}: expected an object, got {_show(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise StateShapeError(f"{where}: expected a list, got {_show(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise StateShapeError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise StateShapeError(f"{where}: expected a whole number from 0 to {MAX_COUNT}, "
                              f"got {_show(value)}")
    return value


def _number(value: Any, where: str, what: str, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not low <= value <= high):  # NaN fails every comparison
        raise StateShapeError(f"{where}: expected {what}, got {_show(value)}")
    return float(value)


def _time(value: Any, where: str) -> float:
    return _number(value, where, f"a time in seconds (at most {MAX_TIME:g})", -MAX_TIME,
                   MAX_TIME)


def _opt_time(value: Any, where: str) -> float | None:
    return None if value is None else _time(value, where)


def _opt_latency(value: Any, where: str) -> float | None:
    if value is None:
        return None
    return _number(value, where, "a latency in ms (0 to 1e9) or null", 0.0, 1e9)


def _text(value: Any, where: str, limit: int = MAX_REASON_CHARS) -> str:
    if not isinstance(value, str):
        raise StateShapeError(f"{where}: expected a string, got {_show(value)}")
    text = bounded_text(value, limit)
    # a lone surrogate ("\ud800" in the file) has no UTF-8 form: logs and replies need one
    return text if encodable(text) else text.encode("utf-8", "replace").decode("utf-8")


def _opt_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where, MAX_NAME_CHARS)


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
