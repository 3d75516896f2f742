"""modeld: a model-registry daemon for LLM inference hosts.

The public facade for plugin authors and applications: the hook marker, the data types a
probe returns, and the version. ``hookimpl`` is imported lazily so that light entry points
(``modelctl``) do not pay for pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import HealthStatus, ModelSpec, ProbeResult, ProbeStatus

if TYPE_CHECKING:
    from .hookspecs import hookimpl
    from .prober import ProbeContext, UpstreamError

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


def __getattr__(name: str) -> Any:
    # imported on first use: modelctl imports this package and must not pay for pluggy/httpx
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    if name in ("ProbeContext", "UpstreamError"):
        from . import prober

        return getattr(prober, name)
    raise AttributeError(f"module 'daemon' has no attribute {name!r}")
