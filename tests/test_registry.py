"""The registry (daemon.core.registry): resolve, promote, rollback, offline, auto-upgrade,
probation, events, configuration reloads and persistence, pinned case by case."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.control.views import model_view
from daemon.core.model import EventKind, HealthStatus, ProbeResult, ProbeStatus
from daemon.core.registry import (
    HistoryEntry,
    ModelRegistry,
    ModelUnavailable,
    NothingToRollBack,
    NoUsableModel,
    RoleRequired,
    UnknownModel,
    UnknownRole,
)
from daemon.core.settings import Config
from daemon.persist.codec import StateShapeError, from_state, to_state

T0 = 1_700_000_000.0
REMOTE = "http://10.0.0.9:8000"
LOOPBACK = "http://127.0.0.1:11434"


def remote(model_id: str, role: str = "chat", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "provider": "openai", "endpoint": REMOTE, "role": role, **fields}


def local(model_id: str, role: str = "chat", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "provider": "ollama", "endpoint": LOOPBACK, "role": role, **fields}


def make_config(*models: dict[str, Any], **sections: Any) -> Config:
    # These tests pin one rule at a time: the lead needs no time to be sustained and a
    # manual promotion holds nothing unless a test says otherwise (tests/test_policy_rules.py
    # pins sustain and holds with their defaults).
    policy = {"sustain": 0, "manual_hold": 0, **sections.pop("policy", {})}
    return parse_config({"models": list(models), "policy": policy, **sections}, "test.toml")


def make(*models: dict[str, Any], now: float = T0, **sections: Any) -> ModelRegistry:
    return ModelRegistry(make_config(*models, **sections), now)


def up(registry: ModelRegistry, *model_ids: str, now: float = T0, n: int = 5,
       ms: float = 100.0) -> None:
    for model_id in model_ids:
        for _ in range(n):
            registry.apply_probe(model_id, ProbeResult.healthy(ms), now)


def down(registry: ModelRegistry, *model_ids: str, now: float = T0,
         reason: str = "connection refused") -> None:
    for model_id in model_ids:
        for _ in range(registry.config.health.failure_threshold):
            registry.apply_probe(model_id, ProbeResult.failure(reason), now)


def kinds(registry: ModelRegistry) -> list[EventKind]:
    return [e.kind for e in registry.events]


def primaries(registry: ModelRegistry) -> dict[str, str | None]:
    return {name: role.primary for name, role in registry.roles.items()}


# ----------------------------------------------------------------------------- construction


def test_configured_primary_starts_as_primary_with_an_initial_history_entry():
    registry = make(remote("a", primary=True), remote("b"))
    assert registry.roles["chat"].primary == "a"
    entry = registry.roles["chat"].history[0]
    assert (entry.at, entry.action, entry.from_id, entry.to_id, entry.actor) == (
        T0, "initial", None, "a", "config")
    assert registry.models["a"].health.status is HealthStatus.UNKNOWN


def test_role_without_a_configured_primary_has_none():
    assert make(remote("a"), remote("b")).roles["chat"].primary is None


# ----------------------------------------------------------------------------- resolve


def test_resolve_returns_the_usable_primary_and_the_rest_by_score():
    registry = make(remote("a", primary=True, quality=0.5), remote("b", quality=0.9),
                    remote("c", quality=0.2))
    up(registry, "a", "b", "c")
    found = registry.get_model_for_use("chat")
    assert (found.role, found.model_id, found.fallbacks) == ("chat", "a", ("b", "c"))


def test_resolve_chooses_a_degraded_primary_over_healthy_others():
    registry = make(remote("a", primary=True), remote("b", quality=1.0))
    up(registry, "b")
    registry.apply_probe("a", ProbeResult.degraded("429 rate limited", 50.0), T0)
    assert registry.get_model_for_use("chat").model_id == "a"


def test_resolve_falls_back_to_retired_models_before_better_scoring_others():
    registry = make(remote("a", primary=True, quality=0.1), remote("b"),
                    remote("c", quality=0.9), remote("d", quality=0.5))
    up(registry, "a", "b", "c", "d")
    registry.promote_model("b", now=T0)  # a retired
    down(registry, "b")
    found = registry.get_model_for_use("chat")
    assert (found.model_id, found.fallbacks) == ("a", ("c", "d"))


def test_resolve_orders_retired_fallbacks_best_score_first():
    registry = make(remote("a", primary=True, quality=0.2), remote("b", quality=0.8),
                    remote("c"), remote("d", quality=1.0))
    up(registry, "a", "b", "c", "d")
    registry.promote_model("b", now=T0)
    registry.promote_model("c", now=T0)  # a and b retired
    found = registry.get_model_for_use("chat")
    assert (found.model_id, found.fallbacks) == ("c", ("b", "a", "d"))


def test_resolve_breaks_score_ties_by_id():
    registry = make(remote("z"), remote("m"), remote("a"))
    up(registry, "z", "m", "a")
    found = registry.get_model_for_use("chat")
    assert (found.model_id, found.fallbacks) == ("a", ("m", "z"))


def test_resolve_without_primary_picks_the_best_score():
    registry = make(remote("a", quality=0.1), remote("b", quality=0.9))
    up(registry, "a", "b")
    assert registry.get_model_for_use("chat").model_id == "b"


def test_resolve_skips_unusable_models_from_the_chain():
    registry = make(remote("a", primary=True), remote("b"), remote("c"))
    up(registry, "a", "c")
    down(registry, "a")
    found = registry.get_model_for_use("chat")
    assert (found.model_id, found.fallbacks) == ("c", ())


def test_resolve_filters_by_capability():
    registry = make(remote("a", primary=True, capability_tags=["chat"]),
                    remote("b", capability_tags=["code"], quality=0.2),
                    remote("c", capability_tags=["code", "reasoning"], quality=0.9))
    up(registry, "a", "b", "c")
    found = registry.get_model_for_use("chat", ["code"])
    assert (found.model_id, found.fallbacks) == ("c", ("b",))
    both = registry.get_model_for_use("chat", ["code", "reasoning"])
    assert (both.model_id, both.fallbacks) == ("c", ())


def test_resolve_in_offline_mode_returns_only_local_models():
    registry = make(remote("cloud", primary=True, quality=1.0), local("ollama", quality=0.1),
                    {"id": "file", "provider": "local_file", "local_path": "/m/x.gguf",
                     "role": "chat"})
    up(registry, "cloud", "ollama", "file")
    registry.set_offline_mode(True, now=T0)
    found = registry.get_model_for_use("chat")
    assert found.model_id == "file"  # quality 0.5 beats 0.1
    assert found.fallbacks == ("ollama",)
    registry.set_offline_mode(False, now=T0)
    assert registry.get_model_for_use("chat").model_id == "cloud"


def test_resolve_with_nothing_usable_gives_a_reason_per_model():
    registry = make(remote("never", primary=True), remote("dead"), remote("slow"),
                    remote("untagged", capability_tags=[]), local("local-dead"))
    registry.apply_probe("slow", ProbeResult.healthy(5.0), T0)
    down(registry, "dead", reason="connection refused")
    down(registry, "local-dead", reason="HTTP 500")
    registry.set_offline_mode(True, now=T0)
    with pytest.raises(NoUsableModel) as caught:
        registry.get_model_for_use("chat")
    error = caught.value
    assert (error.code, error.status) == ("no_usable_model", 503)
    assert error.reasons == {
        "never": "remote model, offline mode is on",
        "dead": "remote model, offline mode is on",
        "slow": "remote model, offline mode is on",
        "untagged": "remote model, offline mode is on",
        "local-dead": "unavailable: HTTP 500",
    }
    assert 'no usable model in role "chat"' in error.message


def test_resolve_reasons_say_not_probed_unavailable_and_missing_capability():
    registry = make(remote("never", primary=True), remote("dead"), remote("plain"),
                    remote("failing"))
    up(registry, "plain")
    down(registry, "dead", reason="connection refused")
    registry.apply_probe("failing", ProbeResult.failure("HTTP 502"), T0)
    with pytest.raises(NoUsableModel) as caught:
        registry.get_model_for_use("chat", ["vision"])
    assert caught.value.reasons == {"never": "lacks capability vision",
                                    "dead": "lacks capability vision",
                                    "plain": "lacks capability vision",
                                    "failing": "lacks capability vision"}
    assert "with capability vision" in caught.value.message
    found = registry.get_model_for_use("chat")
    assert (found.model_id, found.fallbacks) == ("plain", ())
    registry.apply_config(make_config(remote("never", primary=True), remote("dead"),
                                      remote("failing")), T0)
    with pytest.raises(NoUsableModel) as caught:
        registry.get_model_for_use("chat")
    assert caught.value.reasons == {"never": "unknown: not probed yet",
                                    "dead": "unavailable: connection refused",
                                    "failing": "unknown: HTTP 502"}


def test_resolve_unknown_role_names_the_known_roles():
    registry = make(remote("a"), remote("b", role="code"))
    with pytest.raises(UnknownRole) as caught:
        registry.get_model_for_use("vision")
    assert caught.value.status == 404
    assert "chat, code" in caught.value.message


# ----------------------------------------------------------------------------- promote


def test_promote_retires_the_old_primary_and_keeps_it_as_first_fallback():
    registry = make(remote("a", primary=True), remote("b"), remote("c", quality=1.0))
    up(registry, "a", "b", "c")
    changes = registry.promote_model("b", now=T0 + 1, actor="uid:1000", reason="faster")
    assert [(c.role, c.from_id, c.to_id, c.reason) for c in changes] == [
        ("chat", "a", "b", "faster")]
    assert registry.roles["chat"].primary == "b"
    assert registry.models["a"].retired and not registry.models["b"].retired
    assert registry.get_model_for_use("chat").fallbacks == ("a", "c")
    assert registry.is_primary("b") and not registry.is_primary("a")


def test_promote_records_time_from_to_reason_and_actor():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    registry.promote_model("b", now=T0 + 42, actor="uid:1000", reason="evals say so")
    entry = registry.roles["chat"].history[-1]
    assert entry.to_json() == {"at": T0 + 42, "action": "promote", "from": "a", "to": "b",
                               "reason": "evals say so", "actor": "uid:1000",
                               "automatic": False}


def test_promote_without_reason_says_who_did_it():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    registry.promote_model("b", now=T0, actor="uid:7")
    assert registry.roles["chat"].history[-1].reason == "manual promotion by uid:7"


def test_promote_in_a_role_without_primary_comes_from_none():
    registry = make(remote("a"))
    up(registry, "a")
    changes = registry.promote_model("a", now=T0)
    assert changes[0].from_id is None and changes[0].to_id == "a"


def test_promote_an_unavailable_model_is_refused_and_changes_nothing():
    registry = make(remote("a", primary=True), remote("b"))
    down(registry, "b", reason="connection refused")
    before = (registry.version, registry.decision_version, len(registry.events))
    with pytest.raises(ModelUnavailable) as caught:
        registry.promote_model("b", now=T0)
    assert caught.value.status == 409
    assert "unavailable" in caught.value.message and "connection refused" in caught.value.message
    assert "force" in caught.value.message
    assert registry.roles["chat"].primary == "a"
    assert (registry.version, registry.decision_version, len(registry.events)) == before


def test_promote_a_never_probed_model_is_refused():
    registry = make(remote("a", primary=True), remote("b"))
    with pytest.raises(ModelUnavailable, match="not probed yet"):
        registry.promote_model("b", now=T0)
    assert registry.roles["chat"].primary == "a"


def test_forced_promotion_of_an_unavailable_model_succeeds_and_says_forced():
    registry = make(remote("a", primary=True), remote("b"))
    down(registry, "b")
    registry.promote_model("b", now=T0, actor="uid:0", force=True)
    assert registry.roles["chat"].primary == "b"
    assert registry.roles["chat"].history[-1].reason == "manual promotion by uid:0 (forced)"
    assert registry.events[-1].data["forced"] is True


def test_promote_a_degraded_model_is_allowed():
    registry = make(remote("a", primary=True), remote("b"))
    registry.apply_probe("b", ProbeResult.degraded("loading"), T0)
    registry.promote_model("b", now=T0)
    assert registry.roles["chat"].primary == "b"


def test_promote_the_current_primary_is_a_no_op():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "a")
    before = (registry.version, registry.decision_version, len(registry.events),
              len(registry.roles["chat"].history), len(registry.roles["chat"].stack))
    assert registry.promote_model("a", now=T0) == []
    assert (registry.version, registry.decision_version, len(registry.events),
            len(registry.roles["chat"].history), len(registry.roles["chat"].stack)) == before


def test_promote_an_unknown_model_names_the_known_ones():
    registry = make(remote("a"), remote("b"))
    with pytest.raises(UnknownModel) as caught:
        registry.promote_model("zz", now=T0)
    assert caught.value.status == 404 and "a, b" in caught.value.message


def test_promote_un_retires_a_retired_model():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "a", "b")
    registry.promote_model("b", now=T0)
    registry.promote_model("a", now=T0)
    assert not registry.models["a"].retired and registry.models["b"].retired


def test_promote_only_touches_its_own_role():
    registry = make(remote("a", primary=True), remote("b"),
                    remote("x", role="code", primary=True), remote("y", role="code"))
    up(registry, "b")
    registry.promote_model("b", now=T0)
    assert primaries(registry) == {"chat": "b", "code": "x"}
    assert not registry.models["x"].retired


def test_promote_emits_an_event_with_actor_and_bumps_the_decision_version():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    version, decision = registry.version, registry.decision_version
    registry.promote_model("b", now=T0 + 3, actor="uid:5", reason="why not")
    event = registry.events[-1]
    assert event.kind is EventKind.MODEL_PROMOTED
    assert (event.at, event.role, event.model_id, event.from_id, event.to_id, event.reason,
            event.actor) == (T0 + 3, "chat", "b", "a", "b", "why not", "uid:5")
    assert event.data["automatic"] is False
    assert registry.version > version and registry.decision_version == decision + 1


# ----------------------------------------------------------------------------- rollback


def test_rollback_restores_the_previous_primary_and_retires_the_current():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "a", "b")
    registry.promote_model("b", now=T0)
    changes = registry.rollback_model("chat", now=T0 + 5, actor="uid:0")
    assert [(c.role, c.from_id, c.to_id) for c in changes] == [("chat", "b", "a")]
    assert registry.roles["chat"].primary == "a"
    assert not registry.models["a"].retired and registry.models["b"].retired
    entry = registry.roles["chat"].history[-1]
    assert (entry.at, entry.action, entry.from_id, entry.to_id, entry.reason, entry.actor) == (
        T0 + 5, "rollback", "b", "a", "manual rollback by uid:0", "uid:0")
    event = registry.events[-2]
    assert (event.kind, event.from_id, event.to_id, event.actor) == (
        EventKind.MODEL_ROLLED_BACK, "b", "a", "uid:0")


def test_model_rolled_back_from_is_quarantined_so_the_policy_does_not_undo_the_rollback():
    registry = make(remote("a", primary=True, quality=0.0), remote("b", quality=1.0))
    up(registry, "a", "b", n=6)
    registry.promote_model("b", now=T0)
    registry.rollback_model("chat", now=T0 + 5, actor="uid:0")
    assert registry.quarantined_until == {"b": T0 + 5 + 3600}
    event = registry.events[-1]
    assert (event.kind, event.model_id) == (EventKind.MODEL_QUARANTINED, "b")
    assert event.reason == "rolled back: manual rollback by uid:0"
    # b is still far better, yet neither suggested nor promoted until the quarantine ends
    assert registry.auto_upgrade_check(T0 + 6) == []
    assert registry.auto_upgrade_execute(T0 + 6, respect_cooldown=False) == []
    assert [s.to_id for s in registry.auto_upgrade_check(T0 + 5 + 3600)] == ["b"]


def test_rollback_goes_several_levels_deep_then_has_nothing_left():
    registry = make(remote("a", primary=True), remote("b"), remote("c"), remote("d"))
    up(registry, "a", "b", "c", "d")
    for model_id in ("b", "c", "d"):
        registry.promote_model(model_id, now=T0)
    restored = [registry.rollback_model("chat", now=T0)[0].to_id for _ in range(3)]
    assert restored == ["c", "b", "a"]
    assert registry.roles["chat"].primary == "a"
    assert [m for m, e in registry.models.items() if e.retired] == ["b", "c", "d"]
    with pytest.raises(NothingToRollBack):
        registry.rollback_model("chat", now=T0)


def test_rollback_with_no_history_is_refused():
    registry = make(remote("a", primary=True))
    with pytest.raises(NothingToRollBack) as caught:
        registry.rollback_model("chat", now=T0)
    assert caught.value.status == 409
    assert 'role "chat" has no promotion to roll back' in caught.value.message
    with pytest.raises(NothingToRollBack, match="no role has a promotion"):
        registry.rollback_model(now=T0)


def test_rollback_of_a_first_promotion_leaves_the_role_without_primary():
    registry = make(remote("a"))
    up(registry, "a")
    registry.promote_model("a", now=T0)
    changes = registry.rollback_model("chat", now=T0)
    assert changes[0].to_id is None and registry.roles["chat"].primary is None
    assert registry.models["a"].retired


def test_rollback_without_role_takes_the_only_role_with_history():
    registry = make(remote("a", primary=True), remote("b"),
                    remote("x", role="code", primary=True), remote("y", role="code"))
    up(registry, "y")
    registry.promote_model("y", now=T0)
    assert registry.rollback_model(now=T0)[0].role == "code"


def test_rollback_without_role_prefers_the_default_role():
    registry = make(remote("a", role="default", primary=True), remote("b", role="default"),
                    remote("x", primary=True), remote("y"))
    up(registry, "b", "y")
    registry.promote_model("y", now=T0)
    registry.promote_model("b", now=T0)
    assert registry.rollback_model(now=T0)[0].role == "default"


def test_rollback_without_role_and_several_roles_with_history_requires_a_role():
    registry = make(remote("a", primary=True), remote("b"),
                    remote("x", role="code", primary=True), remote("y", role="code"))
    up(registry, "b", "y")
    registry.promote_model("b", now=T0)
    registry.promote_model("y", now=T0)
    with pytest.raises(RoleRequired) as caught:
        registry.rollback_model(now=T0)
    assert caught.value.status == 422 and "chat, code" in caught.value.message
    assert primaries(registry) == {"chat": "b", "code": "y"}


def test_rollback_of_an_unknown_role_is_refused():
    registry = make(remote("a"))
    with pytest.raises(UnknownRole):
        registry.rollback_model("nope", now=T0)


# ----------------------------------------------------------------------------- offline


def test_set_offline_mode_emits_an_event_and_marks_remote_models_not_probed():
    registry = make(remote("cloud"), local("ollama"))
    decision = registry.decision_version
    assert registry.set_offline_mode(True, now=T0 + 1, actor="uid:0") is True
    event = registry.events[-1]
    assert (event.kind, event.at, event.actor, event.data["enabled"]) == (
        EventKind.OFFLINE_MODE_CHANGED, T0 + 1, "uid:0", True)
    assert event.reason == "set by uid:0"
    assert registry.decision_version == decision + 1
    assert registry.models["cloud"].not_probed == "not probed: offline"
    assert registry.models["ollama"].not_probed == ""
    assert model_view(registry, "cloud")["eligible"] is False
    assert registry.set_offline_mode(False, now=T0 + 2) is True
    assert registry.models["cloud"].not_probed == ""
    assert registry.events[-1].data["enabled"] is False


def test_set_offline_mode_to_the_current_value_changes_nothing():
    registry = make(remote("cloud"))
    before = (registry.version, len(registry.events))
    assert registry.set_offline_mode(False, now=T0) is False
    assert (registry.version, len(registry.events)) == before


def test_offline_mode_keeps_the_last_state_of_remote_models():
    registry = make(remote("cloud", primary=True))
    up(registry, "cloud")
    registry.set_offline_mode(True, now=T0)
    assert registry.models["cloud"].health.status is HealthStatus.HEALTHY
    assert registry.roles["chat"].primary == "cloud"


# ----------------------------------------------------------------------------- auto-upgrade


def policy_registry(**policy: Any) -> ModelRegistry:
    """a (primary, poor), b (better), c (best): b and a healthy long enough to count."""
    return make(remote("a", primary=True, quality=0.1), remote("b", quality=0.5),
                remote("c", quality=0.9), policy=policy)


def test_auto_upgrade_check_suggests_and_changes_nothing():
    registry = policy_registry()
    up(registry, "a", "b")
    before = (registry.version, registry.decision_version, len(registry.events))
    suggestions = registry.auto_upgrade_check(T0)
    assert [(s.role, s.from_id, s.to_id) for s in suggestions] == [("chat", "a", "b")]
    assert "min_margin" in suggestions[0].reason
    assert registry.roles["chat"].primary == "a"
    assert (registry.version, registry.decision_version, len(registry.events)) == before


def test_auto_upgrade_check_needs_min_consecutive_healthy():
    registry = policy_registry()
    up(registry, "a")
    up(registry, "b", n=4)
    assert registry.auto_upgrade_check(T0) == []
    up(registry, "b", n=1)
    assert len(registry.auto_upgrade_check(T0)) == 1


def test_auto_upgrade_check_ignores_remote_candidates_in_offline_mode():
    registry = make(local("a", primary=True, quality=0.1), remote("b", quality=0.9))
    up(registry, "a", "b")
    registry.set_offline_mode(True, now=T0)
    assert registry.auto_upgrade_check(T0) == []


def test_auto_upgrade_execute_promotes_automatically_as_policy():
    registry = policy_registry()
    up(registry, "a", "b")
    changes = registry.auto_upgrade_execute(T0 + 10)
    assert [(c.from_id, c.to_id) for c in changes] == [("a", "b")]
    assert changes[0].reason.startswith("auto-upgrade: ")
    role = registry.roles["chat"]
    assert (role.primary, role.promoted_automatically, role.last_auto_promotion_at) == (
        "b", True, T0 + 10)
    event = registry.events[-1]
    assert (event.kind, event.actor, event.data["automatic"]) == (
        EventKind.MODEL_PROMOTED, "policy", True)
    assert registry.roles["chat"].history[-1].actor == "policy"
    assert registry.roles["chat"].history[-1].automatic is True
    assert registry.roles["chat"].history[-1].to_json()["automatic"] is True


def test_history_says_which_changes_the_policy_made_and_keeps_it_across_a_save():
    registry = policy_registry()
    up(registry, "a", "b")
    registry.auto_upgrade_execute(T0 + 10)
    registry.rollback_model("chat", now=T0 + 20, actor="uid=1000")
    history = registry.roles["chat"].history
    assert [(h.action, h.automatic) for h in history] == [
        ("initial", False), ("promote", True), ("rollback", False)]
    again = [HistoryEntry.from_json(h.to_json()) for h in history]
    assert again == history
    # a state file written before the field: the policy's entries were the automatic ones
    old = {k: v for k, v in history[1].to_json().items() if k != "automatic"}
    assert HistoryEntry.from_json(old).automatic is True
    assert HistoryEntry.from_json({**old, "actor": "uid=0"}).automatic is False
    assert HistoryEntry.from_json({**old, "automatic": "yes"}).automatic is False


def test_auto_upgrade_execute_waits_for_the_cooldown():
    registry = policy_registry()
    up(registry, "a", "b")
    registry.auto_upgrade_execute(T0)
    up(registry, "c", now=T0 + 700)
    assert [s.to_id for s in registry.auto_upgrade_check(T0 + 700)] == ["c"]
    assert registry.auto_upgrade_execute(T0 + 700) == []
    assert registry.auto_upgrade_execute(T0 + 1799) == []
    assert registry.roles["chat"].primary == "b"
    changes = registry.auto_upgrade_execute(T0 + 1800)
    assert [(c.from_id, c.to_id) for c in changes] == [("b", "c")]


def test_auto_upgrade_execute_without_cooldown_acts_at_once():
    registry = policy_registry()
    up(registry, "a", "b")
    registry.auto_upgrade_execute(T0)
    up(registry, "c", now=T0 + 700)
    changes = registry.auto_upgrade_execute(T0 + 700, actor="uid:0", respect_cooldown=False)
    assert [(c.from_id, c.to_id) for c in changes] == [("b", "c")]
    assert registry.events[-1].actor == "uid:0"


def test_unavailable_primary_bypasses_the_cooldown():
    registry = policy_registry()
    up(registry, "a", "b")
    registry.auto_upgrade_execute(T0)
    up(registry, "c", now=T0 + 700)
    up(registry, "a", now=T0 + 700)
    down(registry, "b", now=T0 + 700)  # after probation (600 s): no automatic rollback
    assert registry.roles["chat"].primary == "b"
    changes = registry.auto_upgrade_execute(T0 + 700)
    assert [(c.from_id, c.to_id) for c in changes] == [("b", "c")]
    assert "primary b is unavailable" in changes[0].reason


def test_manual_promotion_without_a_hold_does_not_start_the_cooldown():
    # manual_hold = "0s": the operator asked for no hold, so nothing protects the choice but
    # sustain (0 here) — the policy may undo it at its next tick; with the default hold it
    # may not (tests/test_policy_rules.py)
    registry = policy_registry()
    up(registry, "a", "b", "c")
    registry.promote_model("b", now=T0)
    assert registry.roles["chat"].last_auto_promotion_at is None
    assert registry.roles["chat"].hold is None
    assert [(c.from_id, c.to_id) for c in registry.auto_upgrade_execute(T0 + 1)] == [("b", "c")]


def test_note_suggestions_emits_each_new_suggestion_once():
    registry = policy_registry()
    up(registry, "a", "b")
    first = registry.note_suggestions(registry.auto_upgrade_check(T0), T0)
    again = registry.note_suggestions(registry.auto_upgrade_check(T0 + 60), T0 + 60)
    assert [s.to_id for s in first] == ["b"] and again == []
    event = registry.events[-1]
    assert (event.kind, event.actor, event.from_id, event.to_id) == (
        EventKind.AUTO_UPGRADE_SUGGESTED, "policy", "a", "b")
    assert kinds(registry).count(EventKind.AUTO_UPGRADE_SUGGESTED) == 1
    up(registry, "c")
    assert [s.to_id for s in registry.note_suggestions(registry.auto_upgrade_check(T0), T0)] \
        == ["c"]


# ----------------------------------------------------------------------------- probation


def auto_promoted() -> ModelRegistry:
    registry = policy_registry()
    up(registry, "a", "b")
    assert registry.auto_upgrade_execute(T0)
    assert registry.roles["chat"].primary == "b"
    return registry


def test_primary_unavailable_during_probation_rolls_back_and_is_quarantined():
    registry = auto_promoted()
    applied = None
    for _ in range(3):
        applied = registry.apply_probe("b", ProbeResult.failure("HTTP 503"), T0 + 60)
    assert applied is not None and applied.new is HealthStatus.UNAVAILABLE
    assert [(c.role, c.from_id, c.to_id) for c in applied.changes] == [("chat", "b", "a")]
    assert "probation" in applied.changes[0].reason
    assert registry.roles["chat"].primary == "a"
    assert not registry.models["a"].retired and registry.models["b"].retired
    assert registry.quarantined_until["b"] == T0 + 60 + 3600
    assert kinds(registry)[-3:] == [EventKind.HEALTH_CHANGED, EventKind.MODEL_ROLLED_BACK,
                                    EventKind.MODEL_QUARANTINED]
    assert registry.events[-2].actor == "policy" and registry.events[-1].actor == "policy"
    assert registry.events[-1].data["until"] == T0 + 60 + 3600


def test_primary_unavailable_after_probation_is_not_rolled_back():
    registry = auto_promoted()
    down(registry, "b", now=T0 + 601)
    assert registry.roles["chat"].primary == "b"
    assert "b" not in registry.quarantined_until


def test_manually_promoted_primary_is_not_on_probation():
    registry = policy_registry()
    up(registry, "a", "b")
    registry.promote_model("b", now=T0)
    down(registry, "b", now=T0 + 1)
    assert registry.roles["chat"].primary == "b"
    assert registry.quarantined_until == {}


def test_quarantined_model_is_not_suggested_again_until_the_quarantine_expires():
    # b far better than a, so that it still wins after its failures dent its success rate
    registry = make(remote("a", primary=True, quality=0.0), remote("b", quality=1.0))
    up(registry, "a", "b")
    assert registry.auto_upgrade_execute(T0)
    down(registry, "b", now=T0 + 60)
    up(registry, "b", now=T0 + 100, n=12)  # healthy again, long enough to be a candidate
    assert registry.models["b"].health.status is HealthStatus.HEALTHY
    until = registry.quarantined_until["b"]
    assert registry.auto_upgrade_check(until - 1) == []
    assert registry.auto_upgrade_execute(until - 1, respect_cooldown=False) == []
    assert [s.to_id for s in registry.auto_upgrade_check(until)] == ["b"]


def test_quarantine_does_not_stop_a_manual_promotion():
    registry = auto_promoted()
    down(registry, "b", now=T0 + 60)
    up(registry, "b", now=T0 + 61)
    registry.promote_model("b", now=T0 + 62)
    assert registry.roles["chat"].primary == "b"


# ----------------------------------------------------------------------------- events


def test_events_carry_increasing_seq_kind_time_and_actor():
    registry = make(remote("a", primary=True), remote("b"))
    registry.apply_probe("b", ProbeResult.healthy(10.0), T0 + 1)
    registry.promote_model("b", now=T0 + 2, actor="uid:0")
    registry.set_offline_mode(True, now=T0 + 3, actor="uid:0")
    assert [e.seq for e in registry.events] == [1, 2, 3]
    assert [(e.kind, e.at, e.actor) for e in registry.events] == [
        (EventKind.HEALTH_CHANGED, T0 + 1, "daemon"),
        (EventKind.MODEL_PROMOTED, T0 + 2, "uid:0"),
        (EventKind.OFFLINE_MODE_CHANGED, T0 + 3, "uid:0"),
    ]
    assert registry.event_seq == 3
    assert [e.seq for e in registry.events_since(1)] == [2, 3]


def test_health_changed_event_only_on_a_transition():
    registry = make(remote("a"))
    first = registry.apply_probe("a", ProbeResult.healthy(10.0), T0)
    second = registry.apply_probe("a", ProbeResult.healthy(10.0), T0)
    assert first.event is not None and second.event is None
    assert (first.old, first.new) == (HealthStatus.UNKNOWN, HealthStatus.HEALTHY)
    assert first.event.data["old"] == "unknown" and first.event.data["new"] == "healthy"
    assert first.event.model_id == "a" and first.event.role == "chat"
    assert kinds(registry) == [EventKind.HEALTH_CHANGED]


def test_listeners_are_called_with_every_event():
    registry = make(remote("a", primary=True), remote("b"))
    seen = []
    registry.listeners.append(seen.append)
    up(registry, "b", n=2)
    registry.promote_model("b", now=T0)
    assert seen == list(registry.events)
    assert [e.kind for e in seen] == [EventKind.HEALTH_CHANGED, EventKind.MODEL_PROMOTED]


def test_a_listener_that_raises_cannot_leave_a_half_done_rollback():
    registry = auto_promoted()
    heard: list[tuple[EventKind, str | None]] = []

    def snapshot(event: Any) -> None:
        # what the registry looked like when each event reached the listeners
        heard.append((event.kind, registry.roles["chat"].primary))

    def broken(event: Any) -> None:
        if event.kind is EventKind.MODEL_ROLLED_BACK:
            raise RuntimeError("observer bug")

    registry.listeners[:] = [broken, snapshot]
    registry.apply_probe("b", ProbeResult.failure("HTTP 503"), T0 + 60)
    registry.apply_probe("b", ProbeResult.failure("HTTP 503"), T0 + 60)
    with pytest.raises(RuntimeError, match="observer bug"):
        registry.apply_probe("b", ProbeResult.failure("HTTP 503"), T0 + 60)
    # the rollback is whole: previous primary back, b retired and quarantined
    assert registry.roles["chat"].primary == "a"
    assert registry.models["b"].retired and not registry.models["a"].retired
    assert registry.quarantined_until["b"] == T0 + 60 + 3600
    # every listener heard every event, each only after the whole change was made
    assert heard[-3:] == [(EventKind.HEALTH_CHANGED, "a"), (EventKind.MODEL_ROLLED_BACK, "a"),
                          (EventKind.MODEL_QUARANTINED, "a")]


def test_events_of_an_operation_a_listener_starts_are_delivered_in_order():
    registry = make(remote("a", primary=True), remote("b"), remote("c"))
    up(registry, "b", "c")
    seen: list[int] = []

    def react(event: Any) -> None:
        if event.kind is EventKind.MODEL_PROMOTED and event.to_id == "b":
            registry.promote_model("c", now=T0 + 2)

    registry.listeners[:] = [react, lambda e: seen.append(e.seq)]
    registry.promote_model("b", now=T0 + 1)
    assert registry.roles["chat"].primary == "c"
    assert seen == sorted(seen) and seen[-1] == registry.event_seq


def test_event_json_round_trips():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    registry.promote_model("b", now=T0, actor="uid:0", reason="r")
    event = registry.events[-1]
    raw = event.to_json()
    assert (raw["from"], raw["to"], raw["kind"]) == ("a", "b", "model_promoted")
    assert type(event).from_json(json.loads(json.dumps(raw))) == event


def test_probe_results_bump_version_but_not_decision_version():
    registry = make(remote("a"))
    version, decision = registry.version, registry.decision_version
    registry.apply_probe("a", ProbeResult.healthy(10.0), T0)
    assert registry.version > version and registry.decision_version == decision


def test_every_event_is_a_change_to_save_so_its_seq_is_never_reused():
    registry = make(remote("a", primary=True), remote("b", quality=1.0))
    up(registry, "a", "b")
    version = registry.version
    fresh = registry.note_suggestions(registry.auto_upgrade_check(T0), T0)
    assert fresh and registry.events[-1].kind is EventKind.AUTO_UPGRADE_SUGGESTED
    assert registry.version > version  # the flusher will write the suggestion event


def test_apply_probe_of_an_unknown_model_is_refused():
    with pytest.raises(UnknownModel):
        make(remote("a")).apply_probe("b", ProbeResult.healthy(), T0)


def test_apply_probe_records_the_last_probe_and_rescores():
    registry = make(remote("a"))
    registry.apply_probe("a", ProbeResult.healthy(250.0, loaded=True), T0 + 1)
    entry = registry.models["a"]
    assert entry.last_probe is not None
    assert (entry.last_probe.at, entry.last_probe.ok, entry.last_probe.latency_ms) == (
        T0 + 1, True, 250.0)
    assert entry.last_probe.facts["loaded"] is True
    assert entry.score.total > 0
    view = model_view(registry, "a")
    assert view["health_status"] == "healthy" and view["latency_estimate"] == 250.0
    assert view["last_probe"] == {"at": T0 + 1, "ok": True, "reason": "", "latency_ms": 250.0}


# ----------------------------------------------------------------------------- apply_config


def test_apply_config_adds_removes_and_changes_models_keeping_state():
    registry = make(remote("a", primary=True, quality=0.5), remote("b"), remote("gone"))
    up(registry, "a", "b", "gone")
    old_health = registry.models["a"].health
    old_score = registry.models["a"].score.total
    diff = registry.apply_config(make_config(remote("a", primary=True, quality=0.9),
                                             remote("b"), remote("new")), T0 + 1)
    assert (diff.added, diff.removed, diff.changed) == (("new",), ("gone",), ("a",))
    assert list(registry.models) == ["a", "b", "new"]
    assert registry.models["a"].health == old_health
    assert registry.models["a"].spec.quality == 0.9
    assert registry.models["a"].score.total > old_score
    assert registry.models["b"].health.consecutive_successes == 5
    assert registry.models["new"].health.status is HealthStatus.UNKNOWN
    assert registry.roles["chat"].primary == "a"
    assert {(e.kind, e.model_id) for e in registry.events} >= {
        (EventKind.MODEL_ADDED, "new"), (EventKind.MODEL_REMOVED, "gone")}


def test_apply_config_bumps_the_decision_version():
    registry = make(remote("a"))
    decision = registry.decision_version
    registry.apply_config(make_config(remote("a"), remote("b")), T0)
    assert registry.decision_version == decision + 1


def test_apply_config_removing_the_primary_leaves_the_role_without_primary():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "a", "b")
    registry.apply_config(make_config(remote("b")), T0 + 1, actor="reload")
    role = registry.roles["chat"]
    assert role.primary is None
    assert role.history[-1].to_json() == {
        "at": T0 + 1, "action": "removed", "from": "a", "to": None,
        "reason": "removed from the configuration", "actor": "reload", "automatic": False}
    assert registry.get_model_for_use("chat").model_id == "b"


def test_apply_config_drops_rollback_steps_and_quarantine_of_removed_models():
    registry = make(remote("a", primary=True), remote("b"), remote("c"))
    up(registry, "a", "b", "c")
    registry.promote_model("b", now=T0)
    registry.quarantine("a", now=T0, reason="test")
    registry.apply_config(make_config(remote("b"), remote("c")), T0)
    assert "a" not in registry.quarantined_until
    with pytest.raises(NothingToRollBack):
        registry.rollback_model("chat", now=T0)


def test_apply_config_moving_a_model_to_another_role():
    registry = make(remote("a", primary=True), remote("b"), remote("x", role="code"))
    up(registry, "a", "b", "x")
    registry.promote_model("b", now=T0)  # a retired in chat
    diff = registry.apply_config(make_config(remote("a", role="code"), remote("b"),
                                             remote("x", role="code")), T0)
    assert diff.changed == ("a",)
    assert registry.models["a"].spec.role == "code"
    assert not registry.models["a"].retired
    assert registry.models["a"].health.consecutive_successes == 5
    assert registry.get_model_for_use("chat").fallbacks == ()
    assert set(registry.get_model_for_use("code").fallbacks) | {
        registry.get_model_for_use("code").model_id} == {"a", "x"}
    with pytest.raises(NothingToRollBack):  # the promotion involving a is gone
        registry.rollback_model("chat", now=T0)


def test_apply_config_moving_a_primary_leaves_its_old_role_without_primary():
    registry = make(remote("a", primary=True), remote("b"))
    registry.apply_config(make_config(remote("a", role="code"), remote("b")), T0)
    assert registry.roles["chat"].primary is None
    assert registry.roles["code"].primary is None


def test_apply_config_dropping_every_model_of_a_role_drops_the_role():
    registry = make(remote("a"), remote("x", role="code"))
    registry.apply_config(make_config(remote("a")), T0)
    assert list(registry.roles) == ["chat"]
    with pytest.raises(UnknownRole):
        registry.get_model_for_use("code")


def test_apply_config_added_primary_of_a_new_role_becomes_primary():
    registry = make(remote("a"))
    registry.apply_config(make_config(remote("a"), remote("x", role="code", primary=True)), T0)
    assert registry.roles["code"].primary == "x"


def test_apply_config_new_weights_rescore_every_model():
    registry = make(remote("a", quality=1.0))
    up(registry, "a")
    before = registry.models["a"].score.total
    registry.apply_config(make_config(remote("a", quality=1.0),
                                      score={"health": 0, "latency": 0, "cost": 0,
                                             "quality": 1}), T0)
    assert registry.models["a"].score.total == 1.0 != before


# ----------------------------------------------------------------------------- persistence


def busy() -> ModelRegistry:
    registry = make(remote("a", primary=True, quality=0.1), remote("b", quality=0.9),
                    local("c"), remote("x", role="code", primary=True), remote("y", role="code"))
    up(registry, "a", "b", "c", "x", "y")
    registry.apply_probe("y", ProbeResult.degraded("429", 90.0, retry_after=3), T0 + 1)
    registry.apply_probe("x", ProbeResult.failure("timeout", 3000.0), T0 + 2)
    registry.auto_upgrade_execute(T0 + 3)
    registry.promote_model("c", now=T0 + 4, actor="uid:0")
    registry.quarantine("a", now=T0 + 5, reason="test")
    registry.set_offline_mode(True, now=T0 + 6)
    return registry


def json_round_trip(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


def test_to_state_from_state_round_trip_is_exact():
    registry = busy()
    state = json_round_trip(to_state(registry))
    restored = from_state(registry.config, state, T0 + 7)
    assert to_state(restored) == to_state(registry)
    assert primaries(restored) == primaries(registry) == {"chat": "c", "code": "x"}
    assert restored.roles["chat"].history == registry.roles["chat"].history
    assert restored.models["x"].health == registry.models["x"].health
    assert restored.quarantined_until == {"a": T0 + 5 + 3600}
    assert restored.event_seq == registry.event_seq
    assert restored.rollback_model("chat", now=T0 + 8)[0].to_id == "b"


def test_restored_registry_continues_the_event_sequence():
    registry = busy()
    restored = from_state(registry.config, json_round_trip(to_state(registry)),
                                        T0 + 7)
    restored.set_offline_mode(False, now=T0 + 8)
    assert restored.events[-1].seq == registry.event_seq + 1


def test_state_never_holds_the_api_key_env_or_endpoint():
    registry = make(remote("a", api_key_env="SECRET_TOKEN_VAR"))
    up(registry, "a")
    text = json.dumps(to_state(registry))
    assert "SECRET_TOKEN_VAR" not in text


def test_from_state_drops_models_no_longer_in_config():
    registry = busy()
    state = json_round_trip(to_state(registry))
    config = make_config(remote("b", quality=0.9), local("c"),
                         remote("x", role="code", primary=True))
    restored = from_state(config, state, T0 + 7)
    assert list(restored.models) == ["b", "c", "x"]
    assert set(to_state(restored)["models"]) == {"b", "c", "x"}
    assert "a" not in restored.quarantined_until
    assert restored.models["b"].health.consecutive_successes == 5
    assert list(restored.roles) == ["chat", "code"]


def test_from_state_drops_a_primary_that_is_no_longer_declared_in_its_role():
    registry = busy()
    state = json_round_trip(to_state(registry))
    config = make_config(remote("a", primary=True), remote("b"), local("c", role="code"),
                         remote("x", role="code", primary=True))
    restored = from_state(config, state, T0 + 7)
    assert restored.roles["chat"].primary is None  # c moved away; history exists: no reset
    assert restored.roles["code"].primary == "x"


def test_from_state_uses_the_configured_primary_for_a_role_without_history():
    registry = make(remote("a"))
    state = json_round_trip(to_state(registry))
    config = make_config(remote("a"), remote("n", role="new", primary=True))
    restored = from_state(config, state, T0)
    assert restored.roles["new"].primary == "n"


@pytest.mark.parametrize(("saved", "override", "expected"), [
    (True, None, True), (False, None, False), (True, False, False), (False, True, True)])
def test_from_state_offline_override_wins_over_the_saved_value(saved, override, expected):
    registry = make(remote("a"), local("b"))
    registry.set_offline_mode(saved, now=T0)
    restored = from_state(registry.config, json_round_trip(to_state(registry)),
                                        T0, offline_override=override)
    assert restored.offline_mode is expected
    assert (restored.models["a"].not_probed == "not probed: offline") is expected


def test_from_state_drops_expired_quarantines():
    registry = make(remote("a"), remote("b"))
    registry.quarantine("a", now=T0, reason="test")
    state = json_round_trip(to_state(registry))
    assert from_state(registry.config, state, T0 + 3599).quarantined_until
    assert from_state(registry.config, state, T0 + 3600).quarantined_until == {}


def test_from_state_restores_last_probe_from_recent_probes():
    registry = make(remote("a"))
    registry.apply_probe("a", ProbeResult.healthy(10.0), T0)
    registry.apply_probe("a", ProbeResult.failure("boom", 20.0), T0 + 1)
    restored = from_state(registry.config, json_round_trip(to_state(registry)),
                                        T0 + 2)
    last = restored.models["a"].last_probe
    assert last is not None and (last.at, last.reason, last.ok) == (T0 + 1, "boom", False)


@pytest.mark.parametrize("data", [{}, {"offline_mode": False}, {"offline_mode": False,
                                  "models": {"a": {"status": "sideways"}}, "roles": {}}])
def test_from_state_with_a_bad_shape_raises_state_shape_error(data):
    with pytest.raises(StateShapeError):
        from_state(make_config(remote("a")), data, T0)


def test_fresh_registry_state_versions_start_at_zero_and_restored_ones_too():
    registry = busy()
    assert registry.version > 0 and registry.decision_version > 0
    restored = from_state(registry.config, json_round_trip(to_state(registry)),
                                        T0)
    assert (restored.version, restored.decision_version) == (0, 0)


def test_apply_config_emits_config_reloaded_with_the_diff():
    registry = make(remote("a"), remote("gone"))
    registry.apply_config(make_config(remote("a", quality=0.9), remote("new")), T0,
                          actor="sighup")
    event = registry.events[-1]
    assert (event.kind, event.actor) == (EventKind.CONFIG_RELOADED, "sighup")
    assert (event.data["added"], event.data["removed"], event.data["changed"]) == (
        ["new"], ["gone"], ["a"])


def test_rollback_and_quarantine_bump_the_decision_version():
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    registry.promote_model("b", now=T0)
    decision = registry.decision_version
    registry.rollback_model("chat", now=T0)
    assert registry.decision_version == decision + 2  # the rollback and b's quarantine
    registry.quarantine("a", now=T0, reason="test")
    assert registry.decision_version == decision + 3


def test_probation_rollback_of_a_first_automatic_promotion_leaves_no_primary():
    registry = make(remote("a"), remote("b", quality=0.9))
    up(registry, "a", "b")
    changes = registry.auto_upgrade_execute(T0)
    assert [(c.from_id, c.to_id) for c in changes] == [(None, "b")]
    down(registry, "b", now=T0 + 10)
    assert registry.roles["chat"].primary is None
    assert "b" in registry.quarantined_until
    assert registry.get_model_for_use("chat").model_id == "a"


def test_model_moved_to_another_role_is_not_retired_there_after_a_restart():
    # a reload (apply_config) un-retires a model that moves to another role; a restart with
    # the same new config (from_state) must give the same answer, not rank the moved model
    # as a retired fallback ahead of better ones in its new role
    old = make_config(remote("a", primary=True, quality=0.1), remote("b"),
                      remote("x", role="code", primary=True), remote("y", role="code",
                                                                      quality=0.9))
    new = make_config(remote("a", role="code", quality=0.1), remote("b"),
                      remote("x", role="code", primary=True), remote("y", role="code",
                                                                      quality=0.9))
    registry = ModelRegistry(old, T0)
    up(registry, "a", "b", "x", "y")
    registry.promote_model("b", now=T0)  # a is retired in chat
    saved = json_round_trip(to_state(registry))
    registry.apply_config(new, T0 + 1)
    restarted = from_state(new, saved, T0 + 1)
    assert registry.get_model_for_use("code").fallbacks == ("y", "a")
    assert restarted.models["a"].retired is registry.models["a"].retired is False
    assert restarted.get_model_for_use("code").fallbacks == ("y", "a")


def test_non_finite_latency_and_facts_from_a_plugin_never_break_the_state() -> None:
    import json

    registry = make(remote("a", primary=True))
    registry.apply_probe("a", ProbeResult.healthy(-5.0), T0)
    registry.apply_probe("a", ProbeResult.healthy(float("nan"), weird=float("inf")), T0)
    entry = registry.models["a"]
    assert entry.last_probe is not None and entry.last_probe.latency_ms is None
    assert all(s.latency_ms is None for s in entry.health.window)
    assert 0.0 <= entry.score.total <= 1.0
    text = json.dumps(to_state(registry), allow_nan=False)  # raises on NaN or infinity
    assert '"weird":"inf"' in text.replace(" ", "")
    odd: Any = ProbeResult(ProbeStatus.FAILED, True, reason=ValueError("boom"))  # type: ignore
    registry.apply_probe("a", odd, T0)
    last = registry.models["a"].last_probe
    assert last is not None and last.reason == "boom" and last.latency_ms is None
    json.dumps(to_state(registry), allow_nan=False)


@pytest.mark.parametrize("field", ["promoted_at", "last_auto_promotion_at"])
def test_a_saved_time_of_the_wrong_type_makes_the_state_invalid(field: str) -> None:
    registry = make(remote("a", primary=True), remote("b"))
    up(registry, "b")
    registry.promote_model("b", now=T0, automatic=True)
    state = json_round_trip(to_state(registry))
    state["roles"]["chat"][field] = "2024-01-01T00:00:00Z"
    with pytest.raises(StateShapeError):
        from_state(registry.config, state, T0 + 1)


def test_a_nan_inside_a_list_fact_never_reaches_the_state_encoder() -> None:
    import json

    registry = make(remote("a", primary=True))
    registry.apply_probe("a", ProbeResult.healthy(1.0, samples=[1.0, float("nan")]), T0)
    text = json.dumps(to_state(registry), allow_nan=False)  # raises on NaN
    assert '"samples":[1.0,"nan"]' in text.replace(" ", "")
