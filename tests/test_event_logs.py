"""What the registry's events become in the log (so ``journalctl -p warning`` shows every
outage), in the metrics, and in the API's role summary."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from daemon.control.views import role_summary
from daemon.core.model import ModelSpec, ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config, HealthConfig, PolicyConfig
from daemon.service.events import EventFanout
from daemon.service.metrics import Metrics

T0 = 1_764_143_823.0


def registry_with_fanout() -> tuple[ModelRegistry, Metrics]:
    """Two models in role chat, the daemon's event listener (log, metrics) attached."""
    config = Config(
        health=HealthConfig(failure_threshold=2, success_threshold=1),
        policy=PolicyConfig(min_consecutive_healthy=1, min_margin=0.01, sustain=0.0),
        models=(ModelSpec(id="a", provider="openai", role="chat", primary=True, quality=0.1),
                ModelSpec(id="b", provider="openai", role="chat", quality=0.9)),
    )
    registry = ModelRegistry(config, T0)
    metrics = Metrics(lambda: registry)
    registry.listeners.append(EventFanout(structlog.get_logger("modeld"), metrics,
                                          lambda: None))
    return registry, metrics


def test_a_model_becoming_unavailable_is_a_warning_and_its_recovery_info() -> None:
    registry, _ = registry_with_fanout()
    with capture_logs() as logs:
        registry.apply_probe("a", ProbeResult.healthy(41.71234567891), T0 + 1)
        registry.apply_probe("a", ProbeResult.failure("connection refused"), T0 + 2)
        registry.apply_probe("a", ProbeResult.failure("connection refused"), T0 + 3)
        registry.apply_probe("a", ProbeResult.healthy(40.0), T0 + 4)
    changes = [(e["log_level"], e["old"], e["new"]) for e in logs
               if e["event"] == "health_changed"]
    assert changes == [("info", "unknown", "healthy"), ("info", "healthy", "degraded"),
                       ("warning", "degraded", "unavailable"), ("info", "unavailable", "healthy")]
    first = next(e for e in logs if e["event"] == "health_changed")
    assert first["latency_ms"] == 41.7  # rounded for people; the event keeps the raw value
    assert registry.events[0].data["latency_ms"] == 41.71234567891


def test_an_automatic_rollback_is_a_warning_a_manual_one_info_and_both_say_from_and_to() -> None:
    registry, metrics = registry_with_fanout()
    for model_id in ("a", "b"):
        registry.apply_probe(model_id, ProbeResult.healthy(40.0), T0 + 1)
    with capture_logs() as logs:
        # an operator's `upgrade execute`: automatic (its probation applies), by a uid
        assert registry.auto_upgrade_execute(T0 + 2, actor="uid=0 pid=7", respect_cooldown=False)
        for at in (T0 + 3, T0 + 4):  # unavailable within probation: rolled back by the policy
            registry.apply_probe("b", ProbeResult.failure("HTTP 503"), at)
        registry.promote_model("b", now=T0 + 5, force=True, actor="uid=0 pid=7")
        registry.rollback_model("chat", now=T0 + 6, actor="uid=0 pid=7")
    rollbacks = [e for e in logs if e["event"] == "model_rolled_back"]
    assert [(e["log_level"], e["actor"]) for e in rollbacks] == [
        ("warning", "policy"), ("info", "uid=0 pid=7")]
    promoted = next(e for e in logs if e["event"] == "model_promoted")
    assert (promoted["from"], promoted["to"]) == ("a", "b")
    assert not {"from_id", "to_id"} & set(promoted)
    text = metrics.render().decode()
    # counted by what the event says (automatic), not by who asked
    assert 'modeld_promotions_total{automatic="true",role="chat"} 1.0' in text
    assert 'modeld_promotions_total{automatic="false",role="chat"} 1.0' in text
    assert 'modeld_rollbacks_total{automatic="true",role="chat"} 1.0' in text


def test_a_rejected_configuration_is_an_event_logged_as_an_error() -> None:
    registry, _ = registry_with_fanout()
    errors = ["/etc/modeld/modeld.toml: probe.intervall: unknown key"]
    with capture_logs() as logs:
        event = registry.note_config_rejected(T0, actor="SIGHUP", errors=errors)
    assert event.kind.value == "config_reload_failed" and event.data["errors"] == errors
    assert [(e["event"], e["log_level"], e["errors"]) for e in logs] == [
        ("config_reload_failed", "error", errors)]
    assert registry.events[-1] is event  # kept, streamed, saved like every event


def test_role_summary_names_the_model_resolve_answers_with() -> None:
    registry, _ = registry_with_fanout()
    assert role_summary(registry, "chat") == {"role": "chat", "primary": "a",
                                              "resolves_to": None, "preferred": "a",
                                              "hold": None}
    registry.apply_probe("b", ProbeResult.healthy(40.0), T0 + 1)
    assert role_summary(registry, "chat")["resolves_to"] == "b"  # a fallback stands in
    registry.apply_probe("a", ProbeResult.healthy(40.0), T0 + 1)
    assert role_summary(registry, "chat")["resolves_to"] == "a"


def test_a_refused_promotion_tells_modelctl_users_to_add_force() -> None:
    import pytest

    from daemon.core.registry import ModelUnavailable

    registry, _ = registry_with_fanout()
    with pytest.raises(ModelUnavailable) as refused:
        registry.promote_model("b", now=T0)
    assert refused.value.message == (
        'refusing to promote "b": it is unknown (not probed yet); to promote it anyway: '
        'modelctl promote b --force (API: "force": true)')


def test_a_failed_state_write_is_logged_as_an_error_and_counted() -> None:
    import errno

    import anyio
    import pytest

    from daemon.control.api import StateNotSaved
    from daemon.service.saving import StateSaver

    class FullDisk:
        path = "/var/lib/modeld/model_registry.json"

        def write(self, snapshot: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    registry, metrics = registry_with_fanout()
    saver = StateSaver(FullDisk(), lambda: registry, metrics,  # type: ignore[arg-type]
                       structlog.get_logger("modeld"))
    with capture_logs() as logs, pytest.raises(StateNotSaved):
        anyio.run(saver.persist)
    assert [(e["event"], e["log_level"], e["error"]) for e in logs] == [
        ("state_write_failed", "error", "No space left on device")]
    assert "modeld_state_write_failures_total 1.0" in metrics.render().decode()


def test_forgetting_a_model_drops_every_series_labelled_with_it_and_only_those() -> None:
    _, metrics = registry_with_fanout()
    for model_id in ("a", "b"):
        metrics.probes.labels(model_id, "ok").inc()
        metrics.gateway_requests.labels("chat_completions", "chat", model_id, "ok").inc()
        metrics.gateway_first_byte_seconds.labels("chat", model_id).observe(0.01)
        metrics.gateway_attempts.labels(model_id, "failed").inc()
        metrics.gateway_failovers.labels("chat", model_id, "refused").inc()
    metrics.forget_model("b")
    text = metrics.render().decode()
    kept = [line for line in text.splitlines() if 'model_id="a"' in line]
    gone = [line for line in text.splitlines() if 'model_id="b"' in line
            and not line.startswith(("modeld_model_", "modeld_role_"))]  # collected per scrape
    assert gone == []
    for name in ("modeld_probes_total", "modeld_gateway_requests_total",
                 "modeld_gateway_first_byte_seconds_count", "modeld_gateway_attempts_total",
                 "modeld_gateway_failovers_total"):
        assert any(line.startswith(name) for line in kept), name
