"""The ``openai`` probe: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, TGI, ...).

Cheap probe: ``GET {endpoint}/v1/models`` (shared by every model of the endpoint); healthy when
the model id is listed. Deep probe: ``POST /v1/chat/completions`` with ``max_tokens: 1``.

What real servers send, and what it means here:

- OpenAI: ``{"object": "list", "data": [{"id", "object", "created", "owned_by"}]}``.
- vLLM: extra fields (``root``, ``max_model_len``, ``permission``); errors as
  ``{"object": "error", "message", "type", "code": 404}`` with an integer code.
- llama.cpp server: ``meta: null`` on the model while it is still loading, and 503
  ``{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}``
  elsewhere during loading → degraded, reason "loading".
- llama-cpp-python: entries without ``created``. TGI: one entry whose ``owned_by`` is the model
  id (TGI answers to any model name, "tgi" included). An empty server may send ``data: null``.
- 401/403 → failure "unauthorized (check api_key_env)"; 429 → degraded; 3xx, 5xx, refused,
  timeouts, invalid JSON and HTML error pages → failure with that reason.

The API key is read from the environment variable named by ``api_key_env`` at each probe and
goes only into the Authorization header: never into a reason, a fact or a log line.
"""

from __future__ import annotations

from typing import Any

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

NAME = "openai"


def api_base(endpoint: str) -> str:
    """The ``/v1`` base URL of an endpoint given with or without ``/v1``."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def is_loading(reply: Reply) -> bool:
    """Whether a 503 is llama.cpp's (or a similar server's) "Loading model"."""
    return reply.status == 503 and "loading" in reply.error_message().lower()


def judge_status(reply: Reply, what: str) -> ProbeResult | None:
    """The verdict for a non-2xx reply (None for a 2xx): degraded for 429 and loading."""
    if reply.status == 429:
        retry = reply.headers.get("retry-after", "")
        suffix = f", retry after {one_line(retry, 20)}s" if retry.isdigit() else ""
        return ProbeResult.degraded(
            f"rate limited (HTTP 429{suffix})", reply.elapsed_ms, http_status=429
        )
    if is_loading(reply):
        return ProbeResult.degraded("loading", reply.elapsed_ms, http_status=reply.status)
    reason = http_failure_reason(reply, what)
    if reason is None:
        return None
    return ProbeResult.failure(reason, reply.elapsed_ms, http_status=reply.status)


def _index(entries: list[Any]) -> dict[str, Any]:
    """Model id → its entry (the first one listed under that id)."""
    index: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            index.setdefault(entry["id"], entry)
    return index


def find_entry(reply: Reply, entries: list[Any], name: str) -> Any:
    """The listing's entry for ``name`` (None when not listed).

    Every model of an endpoint reads the same shared reply, so its list is indexed once per
    reply, not scanned once per model; the index lives on the reply and goes with it.
    """
    found = reply.derived("openai.index", lambda _: _index(entries)).get(name)
    if found is None and name == "tgi" and len(entries) == 1:
        # TGI serves one model and accepts any name for it; "tgi" is the name its docs use
        only = entries[0]
        if isinstance(only, dict) and only.get("owned_by") == only.get("id"):
            found = only
    return found


class OpenAIProbe:
    """Probe for OpenAI-compatible servers."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The model's health from the server's model list (or a 1-token chat when deep)."""
        try:
            headers = ctx.auth_headers(spec)
        except UpstreamError as exc:
            return ProbeResult.failure(exc.reason)
        if ctx.deep:
            return await self._chat(spec, ctx, headers)
        fetched = await fetch_json(ctx, "GET", f"{api_base(spec.endpoint)}/models",
                                   "GET /v1/models", judge_status, headers=headers)
        if isinstance(fetched, ProbeResult):
            return fetched
        reply, data = fetched
        if not isinstance(data, dict):
            return ProbeResult.failure(
                f"GET /v1/models: expected a JSON object, got {type(data).__name__}",
                reply.elapsed_ms,
            )
        entries = data.get("data")
        if entries is None:  # llama.cpp and others with nothing loaded
            entries = []
        if not isinstance(entries, list):
            return ProbeResult.failure(
                'GET /v1/models: "data" is not a list', reply.elapsed_ms
            )
        name = spec.upstream_name
        entry = find_entry(reply, entries, name)
        if entry is None:
            ids = [str(e.get("id")) for e in entries if isinstance(e, dict)]
            listed = (
                f"it lists {', '.join(ids[:5])}" + (f" and {len(ids) - 5} more" if len(ids) > 5
                                                    else "")
                if ids
                else "it lists no models"
            )
            return ProbeResult.failure(
                f'model "{name}" not listed by the server ({listed})',
                reply.elapsed_ms,
                http_status=reply.status,
            )
        facts: dict[str, Any] = {"http_status": reply.status, "listed": len(entries)}
        if isinstance(entry.get("owned_by"), str):
            facts["owned_by"] = entry["owned_by"]
        if isinstance(entry.get("max_model_len"), int):
            facts["max_model_len"] = entry["max_model_len"]
        if "meta" in entry and entry["meta"] is None:  # llama.cpp: listed, still loading
            return ProbeResult.degraded("loading", reply.elapsed_ms, **facts)
        return ProbeResult.healthy(reply.elapsed_ms, **facts)

    async def _chat(
        self, spec: ModelSpec, ctx: ProbeContext, headers: dict[str, str]
    ) -> ProbeResult:
        body = {
            "model": spec.upstream_name,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
        }
        url = f"{api_base(spec.endpoint)}/chat/completions"
        fetched = await fetch_json(ctx, "POST", url, "POST /v1/chat/completions",
                                   judge_status, json=body, headers=headers)
        if isinstance(fetched, ProbeResult):
            return fetched
        reply, data = fetched
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            return ProbeResult.failure(
                "POST /v1/chat/completions: no choices in the reply", reply.elapsed_ms
            )
        facts: dict[str, Any] = {"http_status": reply.status, "deep": True}
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            facts["completion_tokens"] = usage["completion_tokens"]
        return ProbeResult.healthy(reply.elapsed_ms, **facts)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``openai`` probe."""
    register(NAME, OpenAIProbe())
