"""The data model: what a model is declared as, what a probe says, what the daemon observed.

Pure data, no I/O. Everything here is frozen and slotted so it can be shared freely between
the probe tasks, the registry and the control socket without defensive copies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

#: Words that are path segments under /api/v1/models/ and so cannot be model ids.
RESERVED_MODEL_IDS = frozenset({"promote", "rollback", "auto-upgrade", "offline-mode"})

#: Providers probed over HTTP; they need an endpoint.
HTTP_PROVIDERS = frozenset({"openai", "ollama"})

#: What ``server`` may name on an ``openai`` model: the servers whose readiness the probe
#: knows, "openai" for any other (a listing alone), "auto" to detect it.
OPENAI_SERVERS = ("auto", "vllm", "sglang", "llamacpp", "tgi", "llama-cpp-python", "openai")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form: a lone surrogate (JSON's ``"\\ud800"``, which a
    server or a client may send) has none, and would break a log line, a reply or a state
    write that holds it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def finite_ms(value: Any) -> float | None:
    """A latency as the daemon keeps it: a finite, non-negative number of ms, else None."""
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0):
        return float(value)
    return None


def _same(text: str) -> str:
    return text


def json_safe(value: Any, text: Callable[[str], str] = _same) -> Any:
    """``value`` as JSON can hold it, whatever a plugin put in it: scalars kept (NaN and the
    infinities as strings), lists and tuples item by item, anything else as its string.
    ``text`` is applied to every string (the prober masks API keys with it)."""
    if isinstance(value, str):
        return text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [json_safe(item, text) for item in value]
    return text(str(value))


class HealthStatus(StrEnum):
    """A model's health as the daemon sees it."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"

    @property
    def usable(self) -> bool:
        """Whether a client may be sent to a model in this state."""
        return self in (HealthStatus.HEALTHY, HealthStatus.DEGRADED)


class ProbeStatus(StrEnum):
    """The verdict of one probe."""

    OK = "ok"
    DEGRADED = "degraded"  # answered, but slow, rate limited, loading, not loaded ...
    FAILED = "failed"

    @property
    def ok(self) -> bool:
        """A success, degraded or not."""
        return self is not ProbeStatus.FAILED


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model as declared in the configuration."""

    id: str
    provider: str
    role: str = "default"
    endpoint: str = ""
    model: str = ""  # upstream name; the config loader fills it with id when empty
    api_key_env: str = ""
    capability_tags: tuple[str, ...] = ()
    cost_estimate: float = 0.0  # per 1M tokens
    latency_estimate: float = 1000.0  # ms, the prior until probes measure it
    quality: float = 0.5
    local_path: str = ""
    local: bool = False
    primary: bool = False
    deep: bool = False
    sha256: str = ""
    interval: float | None = None  # seconds; None: [probe].interval
    timeout: float | None = None  # seconds; None: [probe].timeout
    server: str = "auto"  # openai provider: which server answers (OPENAI_SERVERS)

    @property
    def upstream_name(self) -> str:
        """The name the upstream server knows this model by."""
        return self.model or self.id

    @property
    def endpoint_key(self) -> str:
        """What models share a probe tick by: the endpoint, or the file for local models."""
        return self.endpoint.rstrip("/") if self.endpoint else f"file:{self.local_path}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found. ``facts`` holds probe-specific details (loaded, size_vram, ...)."""

    status: ProbeStatus
    latency_ms: float | None = None
    reason: str = ""
    facts: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @property
    def ok(self) -> bool:
        """A success, degraded or not."""
        return self.status.ok

    @classmethod
    def healthy(
        cls, latency_ms: float | None = None, reason: str = "", **facts: Any
    ) -> ProbeResult:
        """A clean success."""
        return cls(ProbeStatus.OK, latency_ms, reason, MappingProxyType(dict(facts)))

    @classmethod
    def degraded(cls, reason: str, latency_ms: float | None = None, **facts: Any) -> ProbeResult:
        """A success that the probe itself judges degraded (429, loading, not loaded, ...)."""
        return cls(ProbeStatus.DEGRADED, latency_ms, reason, MappingProxyType(dict(facts)))

    @classmethod
    def failure(cls, reason: str, latency_ms: float | None = None, **facts: Any) -> ProbeResult:
        """A failed probe; ``reason`` is one line naming what went wrong."""
        return cls(ProbeStatus.FAILED, latency_ms, reason, MappingProxyType(dict(facts)))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "status": self.status.value,
            "ok": self.ok,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "reason": self.reason,
            "facts": dict(self.facts),
        }


class EventKind(StrEnum):
    """What an event records."""

    HEALTH_CHANGED = "health_changed"
    MODEL_PROMOTED = "model_promoted"
    MODEL_ROLLED_BACK = "model_rolled_back"
    MODEL_QUARANTINED = "model_quarantined"
    AUTO_UPGRADE_SUGGESTED = "auto_upgrade_suggested"
    OFFLINE_MODE_CHANGED = "offline_mode_changed"
    CONFIG_RELOADED = "config_reloaded"
    CONFIG_RELOAD_FAILED = "config_reload_failed"
    MODEL_ADDED = "model_added"
    MODEL_REMOVED = "model_removed"
    ROLE_HELD = "role_held"
    ROLE_RELEASED = "role_released"


@dataclass(frozen=True, slots=True)
class Event:
    """One change the registry made or saw; the stream and the audit trail are made of these."""

    seq: int
    at: float  # unix time
    kind: EventKind
    role: str = ""
    model_id: str = ""
    from_id: str = ""
    to_id: str = ""
    reason: str = ""
    actor: str = "daemon"
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind.value,
            "role": self.role,
            "model_id": self.model_id,
            "from": self.from_id,
            "to": self.to_id,
            "reason": self.reason,
            "actor": self.actor,
            "data": dict(self.data),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Event:
        """The inverse of :meth:`to_json`."""
        return cls(
            seq=int(raw["seq"]),
            at=float(raw["at"]),
            kind=EventKind(raw["kind"]),
            role=str(raw.get("role", "")),
            model_id=str(raw.get("model_id", "")),
            from_id=str(raw.get("from", "")),
            to_id=str(raw.get("to", "")),
            reason=str(raw.get("reason", "")),
            actor=str(raw.get("actor", "daemon")),
            data=MappingProxyType(dict(raw.get("data") or {})),
        )
