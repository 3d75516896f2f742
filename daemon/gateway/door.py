"""The front door's requests: who may come in, where each one goes, failover, the relay.

A request names a role or a model (:mod:`.routing`); its chain is tried in order, at most
``max_attempts`` models. An attempt fails over — before anything reached the client — when
the upstream refuses or resets the connection, sends nothing within ``first_byte_timeout``
(no headers, or headers and no first chunk), or answers 502/503/504/429 (or 401/403: the
upstream refused *modeld's* key; or a 404 saying the model is not there: the door chose that
name, not the client; or a redirect, which would send the client past the door). Each failed
attempt is an observation for that model's health, handed to the scheduler, which starts
rechecks at once: the first failed request, not the next probe, moves ``resolve`` and the
door for everyone. A request's success is not a latency sample (generation time is not
probe latency), so it is not observed.

Any other answer is the client's: relayed byte for byte (hop-by-hop headers dropped), chunk
by chunk as it arrives, each chunk sent before the next is read — the upstream slows down
to the client's pace. After the first byte there is no retry: if the upstream dies or
pauses longer than ``stream_idle_timeout``, the client sees its stream cut.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from .. import __version__
from ..control.messages import HTTPError, parse_json
from ..core.model import ModelSpec, ProbeResult
from ..core.registry import ModelRegistry
from ..core.settings import GatewayConfig
from ..probing.context import upstream_auth
from ..probing.replies import UpstreamError, one_line
from .routing import (
    PROXIED,
    Chain,
    DoorError,
    choose,
    model_entry,
    model_listing,
    parse_capabilities,
    routable,
    upstream_url,
)
from .server import DoorRequest, Reply
from .upstream import TransportError, UpstreamPool, UpstreamResponse

#: Upstream statuses that move the request to the next model (before the first byte).
FAILOVER_STATUSES = frozenset({502, 503, 504, 429, 401, 403})

#: Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), plus the ones
#: the door sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "cookie",
                               "user-agent",
                               # the client's key in other SDKs' headers (Azure's, Anthropic's)
                               "api-key", "x-api-key",
                               # about the client's hop: the door sends the body at once
                               "expect",
                               # the body is the door's JSON (re-written), whatever the client
                               # called its own (curl -d says form-urlencoded; FastAPI servers
                               # such as vLLM then answer 422)
                               "content-type", "content-encoding"}
_ERROR_PEEK_BYTES = 2048

Observe = Callable[[str, ProbeResult], None]
Recheck = Callable[[str], None]


@dataclass(slots=True)
class _Failure:
    reason: str  # one line, for the log, the metrics and the 503's reasons
    kind: str  # refused, reset, timeout, http_503, key, ...
    result: ProbeResult
    # False: the attempt says nothing about the model's health (a long generation that sends
    # nothing before its end); the probes are asked to look at once instead
    observed: bool = True


def make_upstream_client() -> UpstreamPool:
    """The door's client for upstreams (:mod:`.upstream`: h11 with a keep-alive pool; why not
    httpx is said there, and measured in tests/bench/bench_gateway.py)."""
    return UpstreamPool(user_agent=f"modeld/{__version__} (front door, pid {os.getpid()})"
                        .encode())


class Gateway:
    """Serves the OpenAI API on top of the registry: give :meth:`handle` to a DoorServer.

    ``config``, ``registry`` are read at each request (a reload applies to the next one);
    ``observe(model_id, result)`` takes each failed attempt; ``metrics`` is the daemon's
    :class:`~daemon.service.metrics.Metrics` (or None).
    """

    def __init__(self, *, config: Callable[[], GatewayConfig],
                 registry: Callable[[], ModelRegistry], observe: Observe,
                 client: UpstreamPool, log: Any, metrics: Any = None,
                 recheck: Recheck | None = None,
                 environ: Mapping[str, str] | None = None,
                 created: int | None = None) -> None:
        self.config = config
        self.registry = registry
        self.observe = observe
        self.recheck = recheck
        self.client = client
        self.log = log
        self.metrics = metrics
        self.environ = os.environ if environ is None else environ
        self.created = int(time.time()) if created is None else created
        self.in_flight = 0

    # ------------------------------------------------------------------ the entry point

    async def handle(self, request: DoorRequest, reply: Reply) -> None:
        """Answer one request (the DoorServer's handler)."""
        try:
            self._authorize(request)
            if request.path in PROXIED:
                if request.method != "POST":
                    raise DoorError(405, "method_not_allowed",
                                    f"{request.method} {request.path}: use POST")
                await self._limited(request, reply)
            elif request.path == "/v1/models" or request.path.startswith("/v1/models/"):
                if request.method != "GET":
                    raise DoorError(405, "method_not_allowed",
                                    f"{request.method} {request.path}: use GET")
                await self._models(request, reply)
            else:
                raise DoorError(404, "unknown_url",
                                f"Invalid URL ({request.method} {request.path}): the door "
                                "serves POST /v1/chat/completions, /v1/completions, "
                                "/v1/embeddings and GET /v1/models")
        except DoorError as exc:
            if reply.started:  # pragma: no cover - errors are raised before the answer
                reply.abort()
                return
            await reply.complete(exc.status, [*error_headers(exc.headers)], exc.body())

    def admit(self, head: DoorRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The DoorServer's look at a request's head, before its body is read: a client
        without the door's key is answered 401 there, so it cannot make the door read and
        hold a body (up to max_request_bytes per connection) first."""
        try:
            self._authorize(head)
        except DoorError as exc:
            return exc.status, error_headers(exc.headers), exc.body()
        return None

    def _authorize(self, request: DoorRequest) -> None:
        name = self.config().clients_key_env
        if not name:
            return  # loopback without a key: the client's Authorization is ignored
        key = self.environ.get(name, "").strip()
        given = request.header("authorization") or ""
        scheme, _, token = given.partition(" ")
        if not key or scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), key.encode()):
            self._count(request.path, "", "", "unauthorized")
            raise DoorError(401, "invalid_api_key",
                            "Incorrect API key provided: send the front door's client key as "
                            "Authorization: Bearer <key> (gateway.clients_key_env).",
                            headers=(("www-authenticate", 'Bearer realm="modeld"'),))

    async def _models(self, request: DoorRequest, reply: Reply) -> None:
        registry = self.registry()
        if request.path == "/v1/models":
            document: dict[str, Any] = model_listing(registry, self.created)
        else:
            wanted = request.path[len("/v1/models/"):]
            listing = model_listing(registry, self.created)["data"]
            found = next((item for item in listing if item["id"] == wanted), None)
            if found is None:
                entry = registry.models.get(wanted)
                if entry is None or not routable(entry.spec):
                    raise DoorError(404, "model_not_found",
                                    f"The model `{wanted}` does not exist.")
                found = model_entry(entry, self.created)  # pragma: no cover - listed above
            document = found
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        await reply.complete(200, error_headers(), body)

    # ------------------------------------------------------------------ proxied routes

    async def _limited(self, request: DoorRequest, reply: Reply) -> None:
        config = self.config()
        if self.in_flight >= config.max_concurrent:
            self._count(request.path, "", "", "rejected")
            raise DoorError(429, "too_many_requests",
                            f"the front door has {self.in_flight} requests in flight, its limit "
                            f"(gateway.max_concurrent = {config.max_concurrent}); retry shortly",
                            headers=(("retry-after", "1"),))
        self.in_flight += 1
        if self.metrics is not None:
            self.metrics.gateway_in_flight.inc()
        try:
            await self._proxy(request, reply, config)
        finally:
            self.in_flight -= 1
            if self.metrics is not None:
                self.metrics.gateway_in_flight.dec()

    async def _proxy(self, request: DoorRequest, reply: Reply, config: GatewayConfig) -> None:
        payload = _parse_body(request.body)
        asked = payload.get("model")
        if not isinstance(asked, str) or not asked:
            raise DoorError(400, "missing_model", 'the request body needs "model": a role '
                            '(e.g. "chat") or a model id; GET /v1/models lists them')
        registry = self.registry()
        capabilities = _capabilities(request.header("x-modeld-capabilities"))
        try:
            chain = choose(registry, asked, capabilities)
        except DoorError as exc:
            self._count(request.path, asked if asked in registry.roles else "", "",
                        "no_usable_model" if exc.status == 503 else "unknown_model")
            raise
        headers = _forwarded_headers(request)
        failures: dict[str, str] = {}
        tried = chain.model_ids[: config.max_attempts]
        role_label = chain.role or ""
        bodies: dict[str, bytes] = {}  # upstream name -> the rewritten body
        try:
            for attempt, model_id in enumerate(tried, start=1):
                entry = registry.models.get(model_id)
                if entry is None:  # removed by a reload meanwhile
                    continue
                spec = entry.spec
                role_label = chain.role or spec.role
                name = spec.upstream_name
                body = bodies.get(name) or bodies.setdefault(name, _rewritten(payload, name))
                failure = await self._attempt(spec, request, body, headers, reply, attempt,
                                              chain, config, payload.get("stream") is True)
                if failure is None:
                    return
                failures[model_id] = failure.reason
                self._observe_failure(spec, failure)
                nxt = tried[attempt] if attempt < len(tried) else None
                self.log.warning("gateway_failover" if nxt else "gateway_attempt_failed",
                                 route=request.path, asked=asked, model_id=model_id,
                                 next_model=nxt, attempt=attempt, reason=failure.reason)
                if self.metrics is not None:
                    self.metrics.gateway_attempts.labels(model_id, "failed").inc()
                    if nxt:
                        self.metrics.gateway_failovers.labels(role_label, model_id,
                                                              failure.kind).inc()
        finally:
            if reply.served_by:
                pass  # counted when the answer ended
            elif reply.started or len(failures) < len(tried):
                # the client hung up (mid-answer, or while an attempt was under way)
                self._count(request.path, role_label, "", "client_gone")
            else:
                self._count(request.path, role_label, "", "failed")
        detail = "; ".join(f"{m}: {why}" for m, why in failures.items())
        raise DoorError(503, "no_usable_model",
                        f'every model tried for "{asked}" failed ({detail})',
                        headers=(("retry-after", "1"), ("x-modeld-attempts",
                                                        str(len(failures)))),
                        reasons=failures)

    async def _attempt(self, spec: ModelSpec, request: DoorRequest, body: bytes,
                       headers: list[tuple[bytes, bytes]], reply: Reply, attempt: int,
                       chain: Chain, config: GatewayConfig,
                       streaming: bool) -> _Failure | None:
        """One try: None when the answer was the client's (relayed), else why it failed."""
        try:
            auth = upstream_auth(spec, self.environ)
        except UpstreamError as exc:
            return _Failure(exc.reason, "key", ProbeResult.failure(exc.reason))
        headers_out: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"), *headers,
            *((k.encode(), v.encode()) for k, v in auth.items())]
        url = upstream_url(spec, PROXIED[request.path])
        started = time.perf_counter()
        first_byte_deadline = anyio.current_time() + config.first_byte_timeout
        response: UpstreamResponse | None = None
        first: bytes | None = None
        try:
            try:
                # one deadline for the head and the first chunk (a scope costs a timer)
                with anyio.fail_at(first_byte_deadline):
                    response = await self.client.request("POST", url, headers_out, body)
                    if response.status not in FAILOVER_STATUSES:
                        first = await response.next_chunk()
            except TimeoutError:
                reason = (f"nothing within {config.first_byte_timeout:g}s "
                          "(gateway.first_byte_timeout)")
                if response is not None:
                    reason = f"headers, then {reason}"
                elif not streaming:
                    # vLLM, llama.cpp and Ollama send nothing of a non-streamed answer before
                    # its end: a long generation is not a hung server. Fail over, and let the
                    # probes (their hang detection) tell which it was
                    return _Failure(reason, "timeout", ProbeResult.failure(reason),
                                    observed=False)
                return _Failure(reason, "timeout", ProbeResult.failure(reason))
            except TransportError as exc:
                if response is None:
                    return _Failure(exc.reason, _kind(exc.reason),
                                    ProbeResult.failure(exc.reason))
                reason = f"before the first byte: {exc.reason}"
                return _Failure(reason, "reset", ProbeResult.failure(reason))
            status = response.status
            if status in FAILOVER_STATUSES:
                return await self._refused(response, first_byte_deadline)
            if 300 <= status < 400:
                # never the client's: relayed, its Location would send the client (and its
                # SDK, which follows redirects) to the upstream itself, past the door
                reason = (f"HTTP {status}: a redirect (the endpoint is not where the server "
                          "answers: check the model's endpoint)")
                return _Failure(reason, "redirect", ProbeResult.failure(reason))
            if status == 404 and (missing := _model_missing(first)) is not None:
                # the door chose the upstream name, not the client: the model is gone from
                # that server (deleted, renamed, another one loaded) — fail over
                reason = f"HTTP 404: {missing}"
                return _Failure(reason, "model_missing", ProbeResult.failure(reason))
            # the answer is the client's from here on: no retry
            await reply.start(status, _answer_headers(response.headers, spec.id, attempt),
                              first or b"")
            role = chain.role or spec.role
            if self.metrics is not None:
                self.metrics.gateway_first_byte_seconds.labels(
                    role, spec.id).observe(time.perf_counter() - started)
                self.metrics.gateway_attempts.labels(spec.id, "ok").inc()
            try:
                while (chunk := await response.next_chunk(config.stream_idle_timeout)
                       ) is not None:
                    await reply.write(chunk)
            except (TransportError, TimeoutError) as exc:
                paused = isinstance(exc, TimeoutError)
                reason = ("paused longer than gateway.stream_idle_timeout "
                          f"({config.stream_idle_timeout:g}s)" if paused
                          else exc.reason)  # type: ignore[union-attr]
                self.log.warning("gateway_stream_cut", model_id=spec.id, route=request.path,
                                 reason=f"after the first byte: {reason}")
                reply.abort()
                reply.served_by = spec.id
                self._count(request.path, role, spec.id, "cut")
                if not paused:
                    self.observe(spec.id, ProbeResult.failure(
                        f"front door: after the first byte: {reason}"))
                return None
            # counted before the end reaches the client, so a scrape right after sees it
            reply.served_by = spec.id
            self._count(request.path, role, spec.id, _outcome(reply))
            await reply.finish()
            return None
        finally:
            if response is not None:
                await response.aclose()

    async def _refused(self, response: UpstreamResponse, deadline: float) -> _Failure:
        """The failure for a 5xx/429/401/403 answer, its message peeked at for the reason."""
        status = response.status
        peek = b""
        with anyio.move_on_at(min(deadline, anyio.current_time() + 1.0)):
            try:
                while len(peek) < _ERROR_PEEK_BYTES and (chunk := await response.next_chunk()):
                    peek += chunk
            except TransportError:
                pass
        detail = _error_message(peek[:_ERROR_PEEK_BYTES])
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status == 429:
            return _Failure(reason, "rate_limited", ProbeResult.degraded(reason))
        if status in (401, 403):
            reason += " (the upstream refused modeld's key: check api_key_env)"
            return _Failure(reason, "key", ProbeResult.failure(reason))
        return _Failure(reason, f"http_{status}", ProbeResult.failure(reason))

    def _observe_failure(self, spec: ModelSpec, failure: _Failure) -> None:
        if not failure.observed:
            if self.recheck is not None:
                self.recheck(spec.id)
            return
        result = failure.result
        self.observe(spec.id, ProbeResult(result.status, None, f"front door: {result.reason}",
                                          result.facts))

    def _count(self, route: str, role: str, model_id: str, outcome: str) -> None:
        if self.metrics is not None:
            # the label takes the known routes only: any path can be asked for
            known = route if route in PROXIED or route == "/v1/models" else "other"
            self.metrics.gateway_requests.labels(known, role, model_id, outcome).inc()


# ----------------------------------------------------------------------------- helpers


#: ``x-modeld-capabilities`` is bounded: each tag is checked against every model of the role
#: and named in the reasons of a 503, so 10,000 tags cost 20 ms of the loop and megabytes
MAX_CAPABILITIES = 32
MAX_CAPABILITY_CHARS = 64


def _capabilities(header: str | None) -> tuple[str, ...]:
    tags = parse_capabilities(header)
    if len(tags) > MAX_CAPABILITIES or any(len(t) > MAX_CAPABILITY_CHARS for t in tags):
        raise DoorError(400, "invalid_capabilities",
                        f"x-modeld-capabilities: at most {MAX_CAPABILITIES} tags of at most "
                        f"{MAX_CAPABILITY_CHARS} characters, comma-separated "
                        f"(got {len(tags)})")
    return tags


def _parse_body(body: bytes) -> dict[str, Any]:
    # the control socket's strict parse: too deep (a RecursionError, here or when the body
    # is written back upstream), NaN, 1e999 and lone surrogates are a clear 400 too
    try:
        payload = parse_json(body, "the request body")
    except HTTPError as exc:
        raise DoorError(400, "invalid_json", exc.message) from None
    if not isinstance(payload, dict):
        raise DoorError(400, "invalid_json", "the request body must be a JSON object")
    return payload


def _rewritten(payload: dict[str, Any], upstream_name: str) -> bytes:
    """The request body for the upstream: the client's JSON with ``model`` rewritten (the
    strict parse let through only what writes back: no lone surrogate, bounded depth)."""
    return json.dumps({**payload, "model": upstream_name}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _forwarded_headers(request: DoorRequest) -> list[tuple[bytes, bytes]]:
    """The client's headers that go upstream: not hop-by-hop, not its credentials, not
    modeld's own (the User-Agent is the door's: the upstream's operator sees who asks)."""
    named = {token.strip().lower() for value in
             (v for k, v in request.headers if k == "connection") for token in value.split(",")}
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers
            if name not in _NOT_FORWARDED and name not in named
            and not name.startswith("x-modeld-")]


def _answer_headers(raw: list[tuple[bytes, bytes]], model_id: str,
                    attempts: int) -> list[tuple[bytes, bytes]]:
    named = {token.strip().lower() for name, value in raw if name == b"connection"
             for token in value.decode("latin-1").split(",")}
    headers = [(name, value) for name, value in raw
               if (low := name.decode("latin-1")) not in HOP_BY_HOP
               and low not in named and not low.startswith("x-modeld-")]
    headers.append((b"x-modeld-model", model_id.encode()))
    headers.append((b"x-modeld-attempts", str(attempts).encode()))
    return headers


def error_headers(extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[bytes, bytes]]:
    """Headers of an answer the door gives itself: ``x-modeld-attempts`` on every one (0 when
    no upstream was tried), as on the answers it relays."""
    attempts = () if any(k == "x-modeld-attempts" for k, _ in extra) else (
        (b"x-modeld-attempts", b"0"),)
    return [(b"content-type", b"application/json"), (b"server", b"modeld"), *attempts,
            *((k.encode(), v.encode()) for k, v in extra)]


def _error_message(body: bytes) -> str:
    """The message of an upstream's error body, whatever its shape, on one line."""
    if not body.strip():
        return ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # 2 kB of "[" nest deeper than the interpreter goes
        return one_line(body.decode("utf-8", "replace"), 160)
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or ""
        else:
            message = error
        return one_line(str(message or data.get("detail") or ""), 160)
    return ""


def _model_missing(body: bytes | None) -> str | None:
    """The message of a 404 that says the *model* is not on the server (vLLM's "The model
    `x` does not exist.", Ollama's 'model "x" not found, try pulling it first', OpenAI's
    ``model_not_found``), None for any other 404 (a bad path: the client's to see)."""
    message = _error_message((body or b"")[:_ERROR_PEEK_BYTES])
    low = message.lower()
    if "model" in low and ("not found" in low or "does not exist" in low):
        return message
    if b"model_not_found" in (body or b"")[:_ERROR_PEEK_BYTES]:
        return message or "model_not_found"
    return None


def _kind(reason: str) -> str:
    if "timed out" in reason:
        return "timeout"
    if "refused" in reason:
        return "refused"
    if "reset" in reason or "closed" in reason:
        return "reset"
    return "transport"


def _outcome(reply: Reply) -> str:
    if reply.status >= 500:
        return "upstream_error"
    if reply.status >= 400:
        return "client_error"
    return "ok"
