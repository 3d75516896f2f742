"""A modeld probe plugin for any server with a plain ``GET /health`` (vLLM, TGI, llama.cpp).

Install: copy this file into a directory listed in ``[daemon].plugin_dirs`` (by default
``/etc/modeld/plugins.d``), restart modeld (a reload does not load plugins), and check
``modeld plugins``. Then declare models with ``provider = "http_health"``:

    [[models]]
    id = "qwen2.5-7b"
    provider = "http_health"
    endpoint = "http://127.0.0.1:8000"
"""

from __future__ import annotations

from daemon import (
    ModelSpec,
    ProbeContext,
    ProbeResult,
    Register,
    UpstreamError,
    hookimpl,
    http_failure_reason,
)


class HttpHealthProbe:
    """Healthy when ``GET {endpoint}/health`` answers 200; "loading" 503s are degraded."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        # ctx.get_json is shared between models of one endpoint, capped in size and bounded
        # by the probe's timeout; transport problems arrive as UpstreamError with a reason.
        try:
            reply = await ctx.get_json(spec.endpoint.rstrip("/") + "/health")
        except UpstreamError as exc:
            return ProbeResult.failure(exc.reason)
        if reply.status == 200:
            return ProbeResult.healthy(reply.elapsed_ms, http_status=200)
        if reply.status == 503 and "loading" in reply.error_message().lower():
            return ProbeResult.degraded("loading", reply.elapsed_ms, http_status=503)
        reason = http_failure_reason(reply, "GET /health") or f"HTTP {reply.status}"
        return ProbeResult.failure(reason, reply.elapsed_ms, http_status=reply.status)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``http_health`` probe."""
    register("http_health", HttpHealthProbe())

