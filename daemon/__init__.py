"""modeld: a model-registry daemon for LLM inference hosts.

This package's top level is the public API, for plugin authors and applications: the hook
marker, the probe protocol and the context a probe gets, the data types a probe returns, the
reply helpers the built-in probes use, and the version. Everything else under ``daemon.`` is
internal and may change between releases (``daemon.testing`` is the documented exception:
helpers for testing a plugin). Every name is imported on first use, so light entry points
(``modelctl``, which shell scripts run on every start) pay for none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.model import HealthStatus, ModelSpec, ProbeResult, ProbeStatus
    from .probing.context import Judge, Probe, ProbeContext, Register, fetch_json
    from .probing.hookspecs import hookimpl
    from .probing.replies import Reply, UpstreamError, http_failure_reason, one_line, redact_url

__version__ = "0.1.0"

__all__ = [
    "HealthStatus",
    "Judge",
    "ModelSpec",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "ProbeStatus",
    "Register",
    "Reply",
    "UpstreamError",
    "__version__",
    "fetch_json",
    "hookimpl",
    "http_failure_reason",
    "one_line",
    "redact_url",
]

_LAZY = {
    "hookimpl": "probing.hookspecs",
    "HealthStatus": "core.model",
    "ModelSpec": "core.model",
    "ProbeResult": "core.model",
    "ProbeStatus": "core.model",
    "Probe": "probing.context",
    "ProbeContext": "probing.context",
    "Judge": "probing.context",
    "Register": "probing.context",
    "Reply": "probing.replies",
    "UpstreamError": "probing.replies",
    "fetch_json": "probing.context",
    "http_failure_reason": "probing.replies",
    "one_line": "probing.replies",
    "redact_url": "probing.replies",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'daemon' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
