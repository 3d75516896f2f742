"""The API's views of the registry: a model as clients see it (spec and observed state merged,
the seed's field names kept), and a role."""

from __future__ import annotations

from typing import Any

from ..core.registry import ModelRegistry, NoUsableModel
from ..core.scoring import expected_latency_ms


def model_view(registry: ModelRegistry, model_id: str, *, detail: bool = False) -> dict[str, Any]:
    """A model as the API shows it: spec and observed state merged, seed names kept."""
    entry = registry.entry(model_id)
    spec = entry.spec
    health = entry.health
    last = entry.last_probe
    view: dict[str, Any] = {
        "id": spec.id,
        "role": spec.role,
        "provider": spec.provider,
        "primary": registry.is_primary(spec.id),
        "local": spec.local,
        "capability_tags": list(spec.capability_tags),
        "cost_estimate": spec.cost_estimate,
        "latency_estimate": round(expected_latency_ms(spec, health), 3),
        "health_status": health.status.value,
        "score": round(entry.score.total, 6),
        "retired": entry.retired,
        "local_path": spec.local_path,
        "last_probe": None if last is None else {
            "at": last.at, "ok": last.ok, "reason": last.reason,
            "latency_ms": None if last.latency_ms is None else round(last.latency_ms, 3),
        },
        "model": spec.upstream_name,
        "endpoint": spec.endpoint,
        "quality": spec.quality,
        "eligible": registry.eligible(entry),
        "not_probed": entry.not_probed,
        "quarantined_until": registry.quarantined_until.get(spec.id),
        "health_changed_at": health.changed_at,
    }
    if detail:
        view["score_parts"] = entry.score.to_json()
        view["health"] = {
            "status": health.status.value,
            "consecutive_successes": health.consecutive_successes,
            "consecutive_failures": health.consecutive_failures,
            "success_rate": round(health.success_rate, 6),
            "latency_p50_ms": health.p50,
            "latency_p95_ms": health.p95,
            "probes_total": health.probes_total,
            "failures_total": health.failures_total,
            "changed_at": health.changed_at,
        }
        view["recent_probes"] = [r.to_json() for r in reversed(entry.recent)]
        view["capabilities"] = list(spec.capability_tags)
        view["deep"] = spec.deep
        view["api_key_env"] = spec.api_key_env
    return view


def role_view(registry: ModelRegistry, role_name: str) -> dict[str, Any]:
    role = registry.roles[role_name]
    return {
        "primary": role.primary,
        "promoted_at": role.promoted_at,
        "promoted_automatically": role.promoted_automatically,
        "rollback_depth": len(role.stack),
        "preferred": role.preferred,
        "promotion_kind": role.promotion_kind,
        "hold": None if role.hold is None else role.hold.to_json(),
        "history": [h.to_json() for h in role.history[-20:]],
    }


def role_summary(registry: ModelRegistry, role_name: str) -> dict[str, Any]:
    """A role at a glance: its primary and the model ``resolve`` answers with now (None when
    nothing is usable), which differ while a fallback stands in for the primary; the
    preferred primary (the one it fails back to) and the operator's hold (None when none)."""
    try:
        resolves_to: str | None = registry.get_model_for_use(role_name).model_id
    except NoUsableModel:
        resolves_to = None
    state = registry.roles[role_name]
    return {"role": role_name, "primary": state.primary, "resolves_to": resolves_to,
            "preferred": state.preferred,
            "hold": None if state.hold is None else state.hold.to_json()}
