"""The ``ollama`` probe: models served by an Ollama server.

Cheap probe: ``GET /api/tags`` (is the model pulled?) and ``GET /api/ps`` (is it loaded?), both
shared by every model of the server, so a sweep costs two requests per server. A model present
but not loaded is healthy with ``loaded: false`` (Ollama loads it on first use). Facts:
``loaded``, ``size_vram``, ``expires_at``, and the model's size, parameter size and
quantization from the tags.

Deep probe: ``POST /api/generate`` with ``stream: false`` and ``options.num_predict: 1`` (this
loads the model if needed, as any request would). Ollama's 404 ``{"error": "model 'x' not
found"}`` becomes a failure with exactly that message.

Names match on ``name`` or ``model``, with or without the implicit ``:latest`` tag.
"""

from __future__ import annotations

from typing import Any

import anyio

from daemon import (
    ModelSpec,
    ProbeContext,
    ProbeResult,
    Register,
    Reply,
    UpstreamError,
    fetch_json,
    hookimpl,
    http_failure_reason,
    one_line,
)

NAME = "ollama"


def canonical_name(name: str) -> str:
    """``name`` with Ollama's implicit ``:latest`` tag made explicit."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def find_model(models: Any, name: str) -> dict[str, Any] | None:
    """The entry of a tags/ps ``models`` list naming ``name`` (by ``name`` or ``model``)."""
    if not isinstance(models, list):
        return None
    wanted = canonical_name(name)
    for entry in models:
        if not isinstance(entry, dict):
            continue
        for key in ("name", "model"):
            value = entry.get(key)
            if isinstance(value, str) and canonical_name(value) == wanted:
                return entry
    return None


def _judge(reply: Reply, what: str) -> ProbeResult | None:
    if reply.status == 429:
        return ProbeResult.degraded("rate limited (HTTP 429)", reply.elapsed_ms, http_status=429)
    if reply.status == 404 and reply.error_message().startswith("model "):
        return ProbeResult.failure(reply.error_message(), reply.elapsed_ms, http_status=404)
    reason = http_failure_reason(reply, what)
    if reason is None:
        return None
    return ProbeResult.failure(reason, reply.elapsed_ms, http_status=reply.status)


def _models_of(reply: Reply, what: str) -> tuple[list[Any] | None, str | None]:
    try:
        data = reply.json()
    except UpstreamError as exc:
        return None, exc.reason
    if not isinstance(data, dict):
        return None, f"{what}: expected a JSON object, got {type(data).__name__}"
    models = data.get("models")
    if models is None:
        return [], None
    if not isinstance(models, list):
        return None, f'{what}: "models" is not a list'
    return models, None


class OllamaProbe:
    """Probe for Ollama servers."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The model's health from the server's tags and running models (or a 1-token run)."""
        base = spec.endpoint.rstrip("/")
        if ctx.deep:
            return await self._generate(spec, ctx, base)
        replies: dict[str, Reply | UpstreamError] = {}

        async def fetch(path: str) -> None:
            try:
                replies[path] = await ctx.get_json(f"{base}{path}")
            except UpstreamError as exc:
                replies[path] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, "/api/tags")
            tg.start_soon(fetch, "/api/ps")

        tags = replies["/api/tags"]
        if isinstance(tags, UpstreamError):
            return ProbeResult.failure(tags.reason)
        verdict = _judge(tags, "GET /api/tags")
        if verdict is not None:
            return verdict
        models, problem = _models_of(tags, "GET /api/tags")
        if problem:
            return ProbeResult.failure(problem, tags.elapsed_ms, http_status=tags.status)
        name = spec.upstream_name
        entry = find_model(models, name)
        if entry is None:
            return ProbeResult.failure(
                f"model '{name}' not found on the server ({len(models or [])} models pulled)",
                tags.elapsed_ms,
                http_status=tags.status,
            )
        facts: dict[str, Any] = {"http_status": tags.status}
        if isinstance(entry.get("size"), int):
            facts["size"] = entry["size"]
        details = entry.get("details")
        if isinstance(details, dict):
            for key in ("parameter_size", "quantization_level"):
                if isinstance(details.get(key), str):
                    facts[key] = details[key]

        ps = replies["/api/ps"]
        latency = tags.elapsed_ms
        if isinstance(ps, UpstreamError):
            return ProbeResult.degraded(f"GET /api/ps: {ps.reason}", latency, **facts)
        latency = max(latency, ps.elapsed_ms)
        if ps.status == 404:  # Ollama before /api/ps existed: presence is all we can tell
            return ProbeResult.healthy(latency, loaded=None, **facts)
        verdict = _judge(ps, "GET /api/ps")
        if verdict is not None:
            return ProbeResult.degraded(verdict.reason, latency, **facts)
        running, problem = _models_of(ps, "GET /api/ps")
        if problem:
            return ProbeResult.degraded(problem, latency, **facts)
        loaded = find_model(running, name)
        if loaded is None:
            return ProbeResult.healthy(latency, loaded=False, **facts)
        facts["loaded"] = True
        if isinstance(loaded.get("size_vram"), int):
            facts["size_vram"] = loaded["size_vram"]
        if isinstance(loaded.get("expires_at"), str):
            facts["expires_at"] = loaded["expires_at"]
        return ProbeResult.healthy(latency, **facts)

    async def _generate(self, spec: ModelSpec, ctx: ProbeContext, base: str) -> ProbeResult:
        body = {
            "model": spec.upstream_name,
            "prompt": "ping",
            "stream": False,
            "options": {"num_predict": 1},
        }
        fetched = await fetch_json(ctx, "POST", f"{base}/api/generate", "POST /api/generate",
                                   _judge, json=body)
        if isinstance(fetched, ProbeResult):
            return fetched
        reply, data = fetched
        if not isinstance(data, dict) or "response" not in data:
            return ProbeResult.failure(
                "POST /api/generate: no response in the reply", reply.elapsed_ms
            )
        if isinstance(data.get("error"), str):
            return ProbeResult.failure(one_line(data["error"]), reply.elapsed_ms)
        facts: dict[str, Any] = {"http_status": reply.status, "deep": True, "loaded": True}
        if isinstance(data.get("load_duration"), int):
            facts["load_ms"] = round(data["load_duration"] / 1e6, 3)
        if isinstance(data.get("eval_count"), int):
            facts["eval_count"] = data["eval_count"]
        return ProbeResult.healthy(reply.elapsed_ms, **facts)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``ollama`` probe."""
    register(NAME, OllamaProbe())
