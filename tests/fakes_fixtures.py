"""Helpers for the probe tests: a Prober with the built-in probes and a short timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from daemon.core.model import ModelSpec
from daemon.core.settings import ProbeConfig
from daemon.probing.context import Probe, make_http_client
from daemon.probing.plugins import collect_probes, get_plugin_manager
from daemon.probing.prober import Prober

#: Short enough that hang and drip tests stay quick, long enough for a loaded CI box.
TIMEOUT = 0.6


def builtin_probes() -> dict[str, Probe]:
    """The built-in probes, loaded the way the daemon loads them."""
    return collect_probes(get_plugin_manager(load_entry_points=False))


@asynccontextmanager
async def running_prober(
    probes: Mapping[str, Probe] | None = None, **config: Any
) -> AsyncIterator[Prober]:
    """A Prober with its own HTTP client; ``config`` overrides ProbeConfig fields."""
    settings = ProbeConfig(**{"timeout": TIMEOUT, **config})
    async with make_http_client(settings) as client:
        yield Prober(builtin_probes() if probes is None else probes, client, settings)


def spec(model_id: str = "m", provider: str = "openai", **fields: Any) -> ModelSpec:
    """A ModelSpec with ``model`` defaulting to the id, as the config loader does."""
    fields.setdefault("model", model_id)
    return ModelSpec(id=model_id, provider=provider, **fields)
