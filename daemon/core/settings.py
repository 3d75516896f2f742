"""The configuration as the core sees it: frozen dataclasses, every default filled.

Pure data. ``daemon.config`` builds these from TOML and names every error; nothing here
reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ModelSpec


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_file: str = "/var/lib/modeld/model_registry.json"
    socket: str = "/run/modeld/control.sock"
    socket_mode: int = 0o660
    admin_group: str = "modeld"
    plugin_dirs: tuple[str, ...] = ("/etc/modeld/plugins.d",)
    metrics_listen: str = ""
    log_format: str = "auto"
    state_flush_interval: float = 2.0
    state_checkpoint: float = 300.0
    shutdown_grace: float = 5.0
    max_connections: int = 1024
    request_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """What one local user may hold of the control socket ([control])."""

    max_connections_per_peer: int = 128  # per uid; admins are held only to the total
    admin_reserve: int = 32  # of daemon.max_connections, only admins may use these
    idle_timeout: float = 15.0  # an idle keep-alive connection is closed after this
    max_followers_per_peer: int = 16  # GET /api/v1/events?follow=1 streams per uid


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    interval: float = 5.0
    timeout: float = 3.0
    max_concurrent: int = 64
    recheck_interval: float = 0.5
    max_response_bytes: int = 1048576


@dataclass(frozen=True, slots=True)
class HealthConfig:
    failure_threshold: int = 3
    success_threshold: int = 2
    degraded_latency_ms: float = 2000.0
    window: int = 20


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    health: float = 0.5
    latency: float = 0.2
    cost: float = 0.1
    quality: float = 0.2
    latency_target_ms: float = 500.0
    cost_ceiling: float = 30.0

    def normalised(self) -> tuple[float, float, float, float]:
        """The four weights (health, latency, cost, quality) scaled to sum to 1."""
        total = self.health + self.latency + self.cost + self.quality
        return (self.health / total, self.latency / total, self.cost / total, self.quality / total)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    interval: float = 60.0
    auto_execute: bool = False
    min_margin: float = 0.05
    min_consecutive_healthy: int = 5
    cooldown: float = 1800.0
    probation: float = 600.0
    quarantine: float = 3600.0
    sustain: float = 600.0  # an optional upgrade's lead must have held this long
    failback: bool = True  # after an urgent failover, return to the preferred primary
    manual_hold: float = 86400.0  # an operator's promote/rollback holds the role (0: no hold)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The OpenAI-compatible front door (DESIGN.md §6); off while ``listen`` is empty."""

    listen: str = ""  # "HOST:PORT" or "unix:PATH"
    clients_key_env: str = ""
    first_byte_timeout: float = 60.0
    stream_idle_timeout: float = 120.0
    max_attempts: int = 3
    max_request_bytes: int = 16 * 1024 * 1024
    max_concurrent: int = 256

    @property
    def enabled(self) -> bool:
        """Whether the front door is served."""
        return bool(self.listen)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    models: tuple[ModelSpec, ...] = ()
    path: str = ""

    def model(self, model_id: str) -> ModelSpec | None:
        """The spec with this id, if declared."""
        for spec in self.models:
            if spec.id == model_id:
                return spec
        return None
