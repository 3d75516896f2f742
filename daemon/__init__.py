"""modeld: a model-registry daemon for LLM inference hosts.

The public facade for plugin authors and applications: the hook marker, the data types a
probe returns, and the version.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .model import HealthStatus, ModelSpec, ProbeResult, ProbeStatus

__version__ = "0.1.0"

__all__ = ["HealthStatus", "ModelSpec", "ProbeResult", "ProbeStatus", "__version__", "hookimpl"]
