"""The ``openai`` probe: any OpenAI-compatible server (OpenAI, vLLM, SGLang, llama.cpp, TGI, ...).

Cheap probe: ``GET {endpoint}/v1/models`` (shared by every model of the endpoint); healthy when
the model id is listed **and** the server says it can serve. A listing alone is not the truth:
vLLM keeps answering ``/v1/models`` from a static list when its engine is dead (``/health``
says 503), SGLang lists its model while it is still warming up (``/health`` 503 until ready),
llama.cpp lists it while it loads (``/health`` 503 "Loading model"). So the probe knows the
server it talks to, from the model's ``server`` (``auto`` by default: detected once per
endpoint from what the listing already says, ``owned_by`` and the ``Server`` header, asking
``/version`` only when those cannot tell) and asks that server's readiness route beside the
listing, shared by every model of the endpoint like the listing: two requests per endpoint per
sweep at most (detection costs at most one more, once).

What each readiness answer means (the shapes are in :mod:`daemon.testing.fakes`):

- vLLM ``GET /health``: empty 200; empty 503 when the engine is dead (``EngineDeadError``) →
  failure; older versions answer 500 → failure.
- SGLang ``GET /health``: empty 200 (after a 1-token generation); empty 503 while it starts →
  degraded "starting".
- llama.cpp ``GET /health``: ``{"status": "ok"}``; 503 ``{"error": {"message": "Loading
  model"}}`` → degraded "loading"; the listing's ``meta: null`` means the same.
- TGI ``GET /health``: empty 200; 503 ``{"error": "unhealthy", "error_type": "healthcheck"}``
  → failure.
- llama-cpp-python and OpenAI itself have no readiness route: the listing is all there is.
- A readiness route that answers 404 does not exist on that server: the listing decides (and
  ``auto`` stops asking it).

Deep probe: ``POST /v1/chat/completions`` with ``max_tokens: 1``. A reply cut at the token
limit is a success: ``finish_reason: "length"``, empty or null content (a reasoning model spent
the budget on reasoning), or the 400 "max_tokens or model output limit was reached" that
OpenAI answers for reasoning models.

Other quirks: vLLM's extra fields (``max_model_len``) become facts; TGI lists one entry whose
``owned_by`` is the model id and answers to any model name ("tgi" included); an empty server
may send ``data: null``. 401/403 → failure "unauthorized (check api_key_env)"; 429 →
degraded; 3xx, 5xx, refused, timeouts, invalid JSON and HTML error pages → failure with that
reason.

The API key is read from the environment variable named by ``api_key_env`` at each probe and
goes only into the Authorization header: never into a reason, a fact or a log line.
"""

from __future__ import annotations

import re
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

#: Each server the probe knows → the route that says whether it can serve (None: none).
READINESS: dict[str, str | None] = {
    "vllm": "/health",
    "sglang": "/health",
    "llamacpp": "/health",
    "tgi": "/health",
    "llama-cpp-python": None,
    "openai": None,
}

#: ``owned_by`` values a server writes for itself (from each one's source; OpenAI's own API
#: answers "openai", "system" or an organisation, which name no server).
_SELF_NAMES = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llamacpp",
               "me": "llama-cpp-python"}

#: Servers remembered per endpoint, at most (beyond it the memory starts afresh).
_SERVERS_KEPT = 4096

#: OpenAI's answer when ``max_tokens`` fits no visible token of a reasoning model.
_LIMIT_REACHED = re.compile(r"(max_tokens|output limit|token limit).*\breached\b", re.IGNORECASE)


def api_base(endpoint: str) -> str:
    """The ``/v1`` base URL of an endpoint given with or without ``/v1``."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def server_root(endpoint: str) -> str:
    """The server's root URL (where ``/health`` lives) of an endpoint with or without ``/v1``."""
    base = endpoint.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


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


def _listing(answer: Reply | UpstreamError) -> tuple[Reply, Any] | ProbeResult:
    """The listing and its JSON, or the result that ends the probe (as ``fetch_json``)."""
    if isinstance(answer, UpstreamError):
        return ProbeResult.failure(answer.reason)
    verdict = judge_status(answer, "GET /v1/models")
    if verdict is not None:
        return verdict
    try:
        return answer, answer.json()
    except UpstreamError as exc:
        return ProbeResult.failure(exc.reason, answer.elapsed_ms, http_status=answer.status)


def detect_server(reply: Reply, data: dict[str, Any], entries: list[Any]) -> tuple[str | None,
                                                                                   bool]:
    """The server behind a listing, from what it sent: (name, certain).

    Certain when the server names itself (``owned_by`` "vllm", "sglang", "llamacpp", or
    llama-cpp-python's "me") or sends llama.cpp's two-convention body; a guess for TGI (one
    entry owned by itself, no ``Server`` header) and for "openai"; (None, False) for a FastAPI
    server (``Server: uvicorn``) that does not say which it is, where ``/version`` can tell.
    """
    if isinstance(data.get("models"), list):
        return "llamacpp", True  # only llama.cpp sends Ollama's "models" beside "data"
    first = next((e for e in entries if isinstance(e, dict)), None)
    owned = first.get("owned_by") if first is not None else None
    if isinstance(owned, str) and owned in _SELF_NAMES:
        return _SELF_NAMES[owned], True
    server = reply.headers.get("server", "").lower()
    if first is not None and len(entries) == 1 and owned == first.get("id") and not server:
        return "tgi", False
    if server.startswith("uvicorn"):
        return None, False
    return "openai", False


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


def judge_readiness(server: str, reply: Reply, what: str) -> tuple[ProbeResult | None, bool]:
    """What a readiness reply says: (the verdict when not ready, whether the route exists)."""
    status = reply.status
    if reply.ok:
        return None, True
    if status in (404, 405):
        return None, False
    if status == 429:
        return ProbeResult.degraded("rate limited (HTTP 429)", reply.elapsed_ms,
                                    http_status=429), True
    detail = f"{what}: HTTP {status}"
    if status == 503:
        if server == "sglang":  # warming up (or shutting down): its 503 has no body
            return ProbeResult.degraded("starting", reply.elapsed_ms, readiness=detail), True
        if server == "llamacpp":
            message = reply.error_message()
            reason = "loading" if "loading" in message.lower() else f"busy: {message}"
            return ProbeResult.degraded(reason, reply.elapsed_ms, readiness=detail), True
        if server == "vllm":
            return ProbeResult.failure(
                f"engine dead: {detail} (the server lists its models but cannot serve them)",
                reply.elapsed_ms, readiness=detail), True
        if server == "tgi":
            message = reply.error_message()
            return ProbeResult.failure(
                f"unhealthy: {detail}" + (f": {message}" if message else ""),
                reply.elapsed_ms, readiness=detail), True
    reason = http_failure_reason(reply, what) or detail
    return ProbeResult.failure(reason, reply.elapsed_ms, readiness=detail), True


class OpenAIProbe:
    """Probe for OpenAI-compatible servers."""

    def __init__(self) -> None:
        # server root → the server detected there (``server = "auto"``), and the roots whose
        # readiness route turned out not to exist
        self.servers: dict[str, str] = {}
        self._no_readiness: set[str] = set()

    def _remember(self, root: str, server: str) -> None:
        if len(self.servers) >= _SERVERS_KEPT:
            self.servers.clear()
            self._no_readiness.clear()
        if self.servers.get(root) != server:
            self._no_readiness.discard(root)
        self.servers[root] = server

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The model's health from the server's model list and readiness (or a 1-token chat
        when deep)."""
        try:
            headers = ctx.auth_headers(spec)
        except UpstreamError as exc:
            return ProbeResult.failure(exc.reason)
        if ctx.deep:
            return await self._chat(spec, ctx, headers)
        root = server_root(spec.endpoint)
        auto = spec.server == "auto"
        server = self.servers.get(root) if auto else spec.server
        ready: dict[str, Reply | UpstreamError] = {}
        listing_url = f"{api_base(spec.endpoint)}/models"
        path = self._readiness_path(root, server)
        if path is None:
            answers = await ctx.get_json_many([listing_url], headers=headers)
        else:  # both at once, shared with the endpoint's other models
            answers = await ctx.get_json_many([listing_url, f"{root}{path}"], headers=headers)
            ready[path] = answers[1]
        fetched = _listing(answers[0])
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
        if auto:
            server = await self._detect(ctx, root, reply, data, entries, server, headers)
            path = self._readiness_path(root, server)
            if path is not None and path not in ready:  # first sweep: now we know whom to ask
                await self._ask(ctx, root, path, headers, ready)
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
        if server is not None:
            facts["server"] = server
        if isinstance(entry.get("owned_by"), str):
            facts["owned_by"] = entry["owned_by"]
        if isinstance(entry.get("max_model_len"), int):
            facts["max_model_len"] = entry["max_model_len"]
        verdict = self._readiness_verdict(root, server, path, ready, auto)
        if verdict is not None:
            if isinstance(verdict, ProbeResult):
                merged = {**facts, **verdict.facts}
                if verdict.ok:
                    return ProbeResult.degraded(verdict.reason, reply.elapsed_ms, **merged)
                return ProbeResult.failure(verdict.reason, reply.elapsed_ms, **merged)
            facts["ready_ms"] = round(verdict, 3)
        if "meta" in entry and entry["meta"] is None:  # llama.cpp: listed, still loading
            return ProbeResult.degraded("loading", reply.elapsed_ms, **facts)
        return ProbeResult.healthy(reply.elapsed_ms, **facts)

    def _readiness_path(self, root: str, server: str | None) -> str | None:
        if server is None or root in self._no_readiness:
            return None
        return READINESS.get(server)

    async def _ask(self, ctx: ProbeContext, root: str, path: str, headers: dict[str, str],
                   into: dict[str, Reply | UpstreamError]) -> None:
        try:
            into[path] = await ctx.get_json(f"{root}{path}", headers=headers)
        except UpstreamError as exc:
            into[path] = exc

    async def _detect(self, ctx: ProbeContext, root: str, reply: Reply, data: dict[str, Any],
                      entries: list[Any], known: str | None, headers: dict[str, str]) -> str | None:
        """The server at ``root``: what the listing says when it is sure, else what was
        found before, else a guess (``/version`` when only that can tell), remembered."""
        seen, certain = reply.derived("openai.server", lambda _: detect_server(reply, data,
                                                                               entries))
        if certain or (known is None and seen is not None):
            if seen is not None and entries:  # an empty listing tells too little to keep
                self._remember(root, seen)
            return seen
        if known is not None:
            return known
        try:
            version = await ctx.get_json(f"{root}/version", headers=headers)
        except UpstreamError:
            return None  # ask again next time
        body = version.data if version.ok else None
        found = "vllm" if isinstance(body, dict) and isinstance(body.get("version"), str) \
            else "openai"
        self._remember(root, found)
        return found

    def _readiness_verdict(self, root: str, server: str | None, path: str | None,
                           ready: dict[str, Reply | UpstreamError],
                           auto: bool) -> ProbeResult | float | None:
        """The readiness answer: a verdict when not ready, its latency (ms) when ready, None
        when there was nothing to ask."""
        if server is None or path is None or path not in ready:
            return None
        answer = ready[path]
        what = f"GET {path}"
        if isinstance(answer, UpstreamError):
            return ProbeResult.failure(f"{what}: {answer.reason}", readiness=what)
        verdict, exists = judge_readiness(server, answer, what)
        if not exists:
            if auto:
                self._no_readiness.add(root)
            return None
        return verdict if verdict is not None else answer.elapsed_ms

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
                                   _judge_chat, json=body, headers=headers)
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
        choice = choices[0] if isinstance(choices[0], dict) else {}
        if choice.get("finish_reason") == "length":
            facts["cut_at_limit"] = True  # what max_tokens 1 asks for: a success
        message = choice.get("message")
        if isinstance(message, dict) and not message.get("content"):
            facts["empty_content"] = True  # a reasoning model spent the budget on reasoning
        return ProbeResult.healthy(reply.elapsed_ms, **facts)


def _judge_chat(reply: Reply, what: str) -> ProbeResult | None:
    """``judge_status`` for the deep probe, where a 400 saying the token limit was reached
    (a reasoning model with a 1-token budget) is the success it looks like."""
    if reply.status == 400 and _LIMIT_REACHED.search(reply.error_message()):
        return ProbeResult.healthy(reply.elapsed_ms, http_status=400, deep=True,
                                   cut_at_limit=True)
    return judge_status(reply, what)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``openai`` probe."""
    register(NAME, OpenAIProbe())
