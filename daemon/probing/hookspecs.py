"""The plugin contract: pluggy markers for project ``modeld`` and every hook spec."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ..core.model import HealthStatus, ModelSpec, ProbeResult
    from .context import Register

PROJECT = "modeld"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def modeld_register_probes(register: Register) -> None:
    """Register probes: call ``register(name, probe)`` for each provider name you serve."""


@hookspec
def modeld_health_changed(
    spec: ModelSpec, old: HealthStatus, new: HealthStatus, result: ProbeResult
) -> None:
    """Observe a model's health changing (called synchronously; keep it quick)."""


@hookspec
def modeld_primary_changed(role: str, old: str | None, new: str, reason: str) -> None:
    """Observe a role's primary changing by promotion or rollback (synchronous; keep it quick)."""
