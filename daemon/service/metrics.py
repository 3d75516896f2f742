"""Prometheus metrics (prometheus-client), on a registry of the daemon's own.

Per-model gauges are read from the model registry at scrape time by a custom collector, so
the probe path only bumps counters; nothing is kept twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.model import HealthStatus
from ..core.registry import ModelRegistry, NoUsableModel
from ..core.scoring import expected_latency_ms


class _RegistryCollector(Collector):
    def __init__(self, get_registry: Callable[[], ModelRegistry]) -> None:
        self.get_registry = get_registry

    def collect(self) -> Iterator[Metric]:
        registry = self.get_registry()
        health = GaugeMetricFamily("modeld_model_health", "1 for the model's current health "
                                   "status, 0 for the others", labels=["model_id", "role",
                                                                       "status"])
        score = GaugeMetricFamily("modeld_model_score", "The model's score, 0..1",
                                  labels=["model_id", "role"])
        latency = GaugeMetricFamily("modeld_model_latency_seconds", "Median probe latency "
                                    "over the window; the configured estimate until measured",
                                    labels=["model_id", "role"])
        retired = GaugeMetricFamily("modeld_model_retired", "1 when the model is retired "
                                    "(kept as a fallback)", labels=["model_id", "role"])
        primary = GaugeMetricFamily("modeld_role_primary", "1 for each role's primary",
                                    labels=["role", "model_id"])
        for model_id, entry in registry.models.items():
            role = entry.spec.role
            for status in HealthStatus:
                health.add_metric([model_id, role, status.value],
                                  1.0 if entry.health.status is status else 0.0)
            score.add_metric([model_id, role], entry.score.total)
            latency.add_metric([model_id, role],
                               expected_latency_ms(entry.spec, entry.health) / 1000.0)
            retired.add_metric([model_id, role], 1.0 if entry.retired else 0.0)
        usable = GaugeMetricFamily("modeld_role_usable_models", "Models resolve could answer "
                                   "with in the role now (0: nothing usable, resolve fails)",
                                   labels=["role"])
        resolves_to = GaugeMetricFamily("modeld_role_resolves_to", "1 for the model resolve "
                                        "answers with in each role (absent: nothing usable)",
                                        labels=["role", "model_id"])
        for role_name, state in registry.roles.items():
            if state.primary is not None:
                primary.add_metric([role_name, state.primary], 1.0)
            try:
                answer = registry.get_model_for_use(role_name)
            except NoUsableModel:
                usable.add_metric([role_name], 0.0)
                continue
            usable.add_metric([role_name], float(1 + len(answer.fallbacks)))
            resolves_to.add_metric([role_name, answer.model_id], 1.0)
        offline = GaugeMetricFamily("modeld_offline_mode", "1 when offline mode is on")
        offline.add_metric([], 1.0 if registry.offline_mode else 0.0)
        counts = GaugeMetricFamily("modeld_models", "Models by health status",
                                   labels=["status"])
        for status_name, count in registry.health_counts().items():
            counts.add_metric([status_name], float(count))
        yield from (health, score, latency, retired, primary, usable, resolves_to, offline,
                    counts)


class Metrics:
    """The daemon's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, get_registry: Callable[[], ModelRegistry]) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only add noise for a daemon's counters
        self.registry = CollectorRegistry()
        self.probes = Counter("modeld_probes", "Probes run, by model and outcome "
                              "(ok, degraded, failed)", ["model_id", "outcome"],
                              registry=self.registry)
        self.probe_seconds = Histogram("modeld_probe_duration_seconds", "Probe latency",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                5, 10), registry=self.registry)
        self.promotions = Counter("modeld_promotions", "Promotions, by role and whether the "
                                  "policy made them", ["role", "automatic"],
                                  registry=self.registry)
        self.rollbacks = Counter("modeld_rollbacks", "Rollbacks, by role and actor kind",
                                 ["role", "automatic"], registry=self.registry)
        self.health_changes = Counter("modeld_health_changes", "Health transitions, by new "
                                      "status", ["status"], registry=self.registry)
        self.state_write_seconds = Histogram("modeld_state_write_duration_seconds",
                                             "Time to write and fsync the state file",
                                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                      0.1, 0.25, 1),
                                             registry=self.registry)
        self.state_write_failures = Counter("modeld_state_write_failures", "State writes that "
                                            "failed (disk full, I/O error, ...)",
                                            registry=self.registry)
        # the front door (daemon/gateway/): its own block, labels bounded by the config
        self.gateway_requests = Counter(
            "modeld_gateway_requests", "Front-door requests by route, role, the model that "
            "served (empty: none), and outcome (ok, client_error, upstream_error, cut, "
            "client_gone, failed, no_usable_model, unknown_model, rejected, unauthorized)",
            ["route", "role", "model_id", "outcome"], registry=self.registry)
        self.gateway_first_byte_seconds = Histogram(
            "modeld_gateway_first_byte_seconds", "Front door: from sending a request upstream "
            "to its first byte, per role and model", ["role", "model_id"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry)
        self.gateway_attempts = Counter(
            "modeld_gateway_attempts", "Front-door attempts per model, by outcome (ok: the "
            "answer was relayed; failed: the request moved on)", ["model_id", "outcome"],
            registry=self.registry)
        self.gateway_failovers = Counter(
            "modeld_gateway_failovers", "Front-door failovers away from a model, by role and "
            "reason (refused, reset, timeout, http_503, rate_limited, key, ...)",
            ["role", "model_id", "reason"], registry=self.registry)
        self.gateway_in_flight = Gauge(
            "modeld_gateway_requests_in_flight", "Front-door requests being served now",
            registry=self.registry)
        # memory, CPU, open fds of the daemon: what an operator checks first at 3 a.m.
        ProcessCollector(registry=self.registry)
        self.registry.register(_RegistryCollector(get_registry))

    def forget_model(self, model_id: str) -> None:
        """Drop the series labelled with ``model_id`` (a reload removed the model), so that
        a removed model neither lingers in dashboards nor grows the exposition forever.
        Every metric kept here with a ``model_id`` label is listed (the registry's own
        series are collected afresh at each scrape and need nothing)."""
        for metric in (self.probes, self.gateway_requests, self.gateway_first_byte_seconds,
                       self.gateway_attempts, self.gateway_failovers):
            metric.remove_by_labels({"model_id": model_id})

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
