"""contrib/: the alert rules and their tests pass promtool, the daemon's metrics pass
``promtool check metrics``, and every metric the rules and the dashboard use is one the daemon
exports (so a rename cannot leave an alert that never fires).

promtool comes with Debian's ``prometheus`` package; CI (``.ci/run``) installs it and sets CI,
and then these tests fail rather than skip without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.core.model import ModelSpec, ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config, HealthConfig
from daemon.service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "modeld-alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "modeld-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "modeld.json"
METRIC_RE = re.compile(r"\b(?:modeld|process)_[a-z0-9_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run these checks (.ci/run installs it)")
        pytest.skip(message)
    return found


def populated_metrics() -> Metrics:
    """The daemon's metrics over a registry with models in two roles, one of them with
    nothing usable, and every counter and histogram touched so each has samples."""
    config = Config(health=HealthConfig(failure_threshold=1), models=(
        ModelSpec(id="qwen2.5-7b", provider="openai", role="chat", primary=True),
        ModelSpec(id="llama3-8b", provider="ollama", role="chat"),
        ModelSpec(id="embedder", provider="local_file", role="embed", primary=True),
    ))
    registry = ModelRegistry(config, 1000.0)
    registry.apply_probe("qwen2.5-7b", ProbeResult.failure("connection refused"), 1001.0)
    registry.apply_probe("llama3-8b", ProbeResult.healthy(81.5), 1001.0)
    metrics = Metrics(lambda: registry)
    metrics.probes.labels("llama3-8b", "ok").inc()
    metrics.probe_seconds.observe(0.0815)
    metrics.promotions.labels("chat", "true").inc()
    metrics.rollbacks.labels("chat", "false").inc()
    metrics.health_changes.labels("unavailable").inc()
    metrics.state_write_seconds.observe(0.004)
    metrics.state_write_failures.inc()
    metrics.gateway_requests.labels("/v1/chat/completions", "chat", "llama3-8b", "ok").inc()
    metrics.gateway_first_byte_seconds.labels("chat", "llama3-8b").observe(0.12)
    metrics.gateway_attempts.labels("qwen2.5-7b", "failed").inc()
    metrics.gateway_failovers.labels("chat", "qwen2.5-7b", "refused").inc()
    metrics.gateway_in_flight.inc()
    return metrics


def exported_series() -> set[str]:
    """Every series name the daemon exports (counters' ``_total``, histograms' ``_bucket``,
    ``_sum`` and ``_count`` included)."""
    names = set()
    for family in populated_metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
    return names


def test_the_daemons_metrics_pass_promtool_check_metrics() -> None:
    text = populated_metrics().render()
    done = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert b"modeld_model_latency_seconds{" in text and b"_ms" not in text
    # base units: the latency gauge is in seconds (81.5 ms measured)
    assert b'modeld_model_latency_seconds{model_id="llama3-8b",role="chat"} 0.0815' in text
    assert b'modeld_role_usable_models{role="chat"} 1.0' in text
    assert b'modeld_role_usable_models{role="embed"} 0.0' in text
    assert b'modeld_role_resolves_to{model_id="llama3-8b",role="chat"} 1.0' in text


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True,
                          text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_rule_test_that_fires_it() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    fired = RULE_TESTS.read_text().split("alertname: ")[1:]
    tested = {chunk.split()[0] for chunk in fired if "exp_labels" in chunk.split("alertname")[0]}
    assert alerts == tested


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    assert len(queries) >= 10
    return queries


def test_the_dashboards_queries_are_valid_promql() -> None:
    # promtool checks PromQL in rule files: the dashboard's queries as recording rules
    import tempfile

    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(_dashboard_queries()):
        concrete = query.replace("$instance", ".*")
        rules += [f"      - record: dashboard:query{number}",
                  f"        expr: {json.dumps(concrete)}"]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        file.write("\n".join(rules) + "\n")
        file.flush()
        done = subprocess.run([promtool(), "check", "rules", file.name], capture_output=True,
                              text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_and_the_dashboard_use_only_metrics_the_daemon_exports() -> None:
    exported = exported_series() | {"up"}
    used_by_rules = set(METRIC_RE.findall(RULES.read_text()))
    used_by_tests = set(METRIC_RE.findall(RULE_TESTS.read_text()))
    used_by_dashboard = {name for query in _dashboard_queries()
                         for name in METRIC_RE.findall(query)}
    assert used_by_rules and used_by_dashboard
    assert used_by_rules - exported == set()
    assert used_by_tests - exported == set()
    assert used_by_dashboard - exported == set()
    # the dashboard shows every modeld metric (the process_* ones are optional)
    modeld_families = {name for name in exported if name.startswith("modeld_")
                       and not name.endswith(("_bucket", "_count", "_sum"))}
    shown = {re.sub(r"_bucket$", "", name) for name in used_by_dashboard}
    missing = {name for name in modeld_families
               if name not in shown and name.removesuffix("_total") not in shown}
    assert missing <= {"modeld_model_retired", "modeld_models"}, missing
