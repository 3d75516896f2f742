"""modeld: a model-registry daemon for LLM inference hosts.

The public facade for plugin authors and applications: the hook marker, the data types a
probe returns, and the version. Every name is imported on first use, so light entry points
(``modelctl``, which shell scripts run on every start) pay for none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.model import HealthStatus, ModelSpec, ProbeResult, ProbeStatus
    from .probing.hookspecs import hookimpl
    from .probing.prober import ProbeContext, UpstreamError

__version__ = "0.1.0"

__all__ = [
    "HealthStatus",
    "ModelSpec",
    "ProbeContext",
    "ProbeResult",
    "ProbeStatus",
    "UpstreamError",
    "__version__",
    "hookimpl",
]

_LAZY = {
    "hookimpl": "probing.hookspecs",
    "HealthStatus": "core.model",
    "ModelSpec": "core.model",
    "ProbeResult": "core.model",
    "ProbeStatus": "core.model",
    "ProbeContext": "probing.prober",
    "UpstreamError": "probing.prober",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'daemon' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
