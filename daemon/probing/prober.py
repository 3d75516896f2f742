"""Running one probe: deadlines, response caps, shared requests, and isolation from plugin bugs.

A probe plugin only answers "how is this model?"; everything that keeps a misbehaving plugin
or upstream from hurting the daemon lives here:

- :func:`make_http_client` builds the daemon's one long-lived ``httpx.AsyncClient``.
- :class:`ProbeContext` is what a probe receives as ``ctx``. Its :meth:`ProbeContext.request`
  and :meth:`ProbeContext.get_json` are *single-flight*: concurrent probes asking for the same
  request share one HTTP exchange, so one ``GET /api/tags`` serves every Ollama model of a
  server. Every exchange is streamed, capped at ``max_response_bytes`` and bounded by the probe's
  deadline as a whole (a server that sends headers and then drips the body still times out).
  Transport problems surface as :class:`UpstreamError`, whose ``reason`` is one readable line.
- :class:`Prober` runs a probe and always returns a :class:`~daemon.core.model.ProbeResult`: an
  unknown provider, a probe that raises, hangs or returns the wrong type all become failures
  with a reason. Only cancellation propagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json as jsonlib
import os
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import structlog

from .. import __version__
from ..core.model import ModelSpec, ProbeResult, ProbeStatus, finite_ms, json_safe
from ..core.settings import ProbeConfig

USER_AGENT = f"modeld/{__version__}"

#: Longest reason kept in a result; reasons are one line for logs, tables and the API.
MAX_REASON_CHARS = 300

#: Extra time a probe gets beyond its own deadline, so that the deadline of a ``ctx`` request
#: (which ends exactly at the probe's deadline) fires first and gives a specific reason.
_GRACE_MAX = 0.25

Log = Any  # a structlog bound logger; structlog's own types are too loose to be useful here


# ----------------------------------------------------------------------------- the client


def make_http_client(
    probe: ProbeConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The daemon's one shared HTTP client, sized and bounded for probing.

    Redirects are not followed (a probe reports them), proxies from the environment are not
    used (probes go straight to the host's servers), the pool holds at most ``max_concurrent``
    connections, and every phase has an explicit timeout. ``transport`` is for tests
    (``httpx.MockTransport``).
    """
    limits = httpx.Limits(
        max_connections=probe.max_concurrent,
        max_keepalive_connections=probe.max_concurrent,
        keepalive_expiry=max(30.0, 2 * probe.interval),
    )
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        limits=limits,
        timeout=httpx.Timeout(probe.timeout),
        # the pid tells an upstream's operator which modeld instance is probing it
        headers={"User-Agent": f"{USER_AGENT} (pid {os.getpid()})"},
        transport=transport,
    )


# ----------------------------------------------------------------------------- replies


class UpstreamError(Exception):
    """A request to an upstream failed before a complete reply; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP reply from an upstream, body read in full (within the size cap).

    ``data`` holds the parsed JSON body when it parsed; otherwise ``json_error`` says why not
    ("empty body", "HTML page instead of JSON", "invalid JSON: ..."). A reply is shared between
    every probe that asked for the same request, so treat it as read-only.
    """

    method: str
    url: str
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    elapsed_ms: float
    data: Any = None
    json_error: str | None = None

    @property
    def ok(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status < 300

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case ("" when absent)."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def is_html(self) -> bool:
        """Whether the body is an HTML page (a proxy or web server error page, usually)."""
        if self.content_type in ("text/html", "application/xhtml+xml"):
            return True
        head = self.body[:64].lstrip().lower()
        return head.startswith((b"<!doctype html", b"<html"))

    def json(self) -> Any:
        """The parsed JSON body; raises :class:`UpstreamError` when the body is not JSON."""
        if self.json_error is not None:
            raise UpstreamError(self.json_error)
        return self.data

    def error_message(self) -> str:
        """The message of a JSON error body in any common shape, or a short text excerpt.

        Knows OpenAI ``{"error": {"message"}}``, vLLM ``{"object": "error", "message"}``,
        llama.cpp ``{"error": {"code", "message", "type"}}``, TGI and Ollama
        ``{"error": "..."}`` and FastAPI ``{"detail": "..."}``.
        """
        data = self.data
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return one_line(error["message"])
            if isinstance(error, str):
                return one_line(error)
            for key in ("message", "detail"):
                if isinstance(data.get(key), str):
                    return one_line(data[key])
        if self.is_html:
            return ""
        try:
            text = self.body[:200].decode("utf-8")
        except UnicodeDecodeError:
            return ""
        return one_line(text, 120)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` on one line, whitespace collapsed, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def http_failure_reason(reply: Reply, what: str = "") -> str | None:
    """The failure reason for a reply that is not a usable success, or None for a 2xx.

    The reasons are the ones an operator needs: a redirect names its target, 401/403 points
    at ``api_key_env``, an error page says it is HTML, and an error body's message is quoted.
    ``what`` (e.g. "GET /v1/models") prefixes 4xx/5xx reasons. 429 is not covered here:
    rate limiting is a degraded success, and each probe says so itself.
    """
    status = reply.status
    if 200 <= status < 300:
        return None
    prefix = f"{what}: " if what else ""
    if 300 <= status < 400:
        location = reply.headers.get("location", "")
        target = f" to {redact_url(location)}" if location else ""
        return f"redirected (HTTP {status}){target}; set the endpoint to the final URL"
    if status in (401, 403):
        return "unauthorized (check api_key_env)"
    if reply.is_html:
        return f"{prefix}HTTP {status} with an HTML page instead of JSON"
    message = reply.error_message()
    return f"{prefix}HTTP {status}" + (f": {message}" if message else "")


def redact_url(url: str) -> str:
    """``url`` without user:password and without a query string (which may carry a key)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def describe_transport_error(exc: httpx.HTTPError) -> str:
    """A one-line reason for an httpx transport error ("connection refused", ...)."""
    chain = _exception_chain(exc)
    errnos = {e.errno for e in chain if isinstance(e, OSError) and e.errno is not None}
    text = " ".join(str(e) for e in chain).lower()
    if isinstance(exc, httpx.ConnectError):
        if errno.ECONNREFUSED in errnos or "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text or (
            "temporary failure in name resolution" in text
        ):
            return "cannot resolve host name"
        return f"cannot connect: {one_line(str(exc)) or type(exc).__name__}"
    if errno.ECONNRESET in errnos or "reset by peer" in text:
        return "connection reset by peer"
    if isinstance(exc, httpx.RemoteProtocolError):
        if "peer closed" in text or "incomplete" in text or "without sending" in text:
            return "server closed the connection before the reply was complete"
        return f"HTTP protocol error: {one_line(str(exc))}"
    if isinstance(exc, httpx.DecodingError):
        return f"cannot decode the response body: {one_line(str(exc))}"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"bad endpoint URL: {one_line(str(exc))}"
    detail = one_line(str(exc))
    return f"{type(exc).__name__}" + (f": {detail}" if detail else "")


def _parse_json(body: bytes, headers: Mapping[str, str]) -> tuple[Any, str | None]:
    if not body.strip():
        return None, "empty body"
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    head = body[:64].lstrip().lower()
    if content_type == "text/html" or head.startswith((b"<!doctype html", b"<html")):
        return None, "HTML page instead of JSON"
    try:
        return jsonlib.loads(body), None
    except UnicodeDecodeError:
        return None, "invalid JSON: not UTF-8 text"
    except ValueError as exc:
        return None, f"invalid JSON: {one_line(str(exc), 120)}"


# ----------------------------------------------------------------------------- single flight


@dataclass(slots=True)
class _Flight:
    done: anyio.Event
    reply: Reply | None = None
    reason: str | None = None  # UpstreamError reason; both None: the leader was cancelled


class SingleFlight:
    """Concurrent callers with the same key share one call; no results are kept afterwards."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def do(self, key: Hashable, exchange: Any) -> Reply:
        """The reply of ``await exchange()``, run once for all callers waiting on ``key``."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.reply is not None:
                return flight.reply
            if flight.reason is not None:
                raise UpstreamError(flight.reason)
            # the leader was cancelled (its own probe's deadline): go again, maybe as leader
        flight = _Flight(anyio.Event())
        self._flights[key] = flight
        try:
            flight.reply = await exchange()
            return flight.reply
        except UpstreamError as exc:
            flight.reason = exc.reason
            raise
        finally:
            del self._flights[key]
            flight.done.set()


def _fingerprint(headers: Mapping[str, str] | None) -> str:
    """A digest of request headers: part of a flight key without holding a token in clear."""
    if not headers:
        return ""
    lines = sorted(f"{name.lower()}:{value}" for name, value in headers.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ----------------------------------------------------------------------------- the context


class ProbeContext:
    """What a probe gets as ``ctx``: the shared client, its deadline and shared requests.

    Attributes: ``client`` (the daemon's ``httpx.AsyncClient``), ``timeout`` (seconds for the
    whole probe), ``deadline`` (on anyio's clock), ``deep`` (a deep probe was asked for),
    ``log`` (a structlog logger bound to the model), ``max_response_bytes``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        timeout: float,
        deep: bool = False,
        log: Log | None = None,
        max_response_bytes: int = 1048576,
        flights: SingleFlight | None = None,
        deadline: float | None = None,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.deep = deep
        self.log: Log = log if log is not None else structlog.get_logger("modeld.probe")
        self.max_response_bytes = max_response_bytes
        self.deadline = anyio.current_time() + timeout if deadline is None else deadline
        self._flights = flights if flights is not None else SingleFlight()
        self._limiter = limiter

    def remaining(self) -> float:
        """Seconds left before the probe's deadline (never negative)."""
        return max(0.0, self.deadline - anyio.current_time())

    def timed_out_reason(self) -> str:
        """The reason used when the deadline passes: "timed out after 3s"."""
        return f"timed out after {self.timeout:g}s"

    async def get_json(self, url: str, *, headers: Mapping[str, str] | None = None) -> Reply:
        """``GET url`` asking for JSON, shared with concurrent identical requests.

        Returns the :class:`Reply` whatever its status (``reply.json()`` gives the parsed
        body or raises :class:`UpstreamError`); raises :class:`UpstreamError` when no complete
        reply arrived (refused, reset, timed out, too large, ...).
        """
        merged = {"Accept": "application/json", **(headers or {})}
        return await self.request("GET", url, headers=merged)

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        shared: bool | None = None,
    ) -> Reply:
        """One HTTP exchange within the probe's deadline and the response size cap.

        ``shared`` (default: true for GET and HEAD) makes concurrent calls with the same
        method, URL, headers and JSON body share one exchange; deep probes pass requests that
        are per model, which simply differ in body. Raises :class:`UpstreamError`.
        """
        method = method.upper()
        if shared is None:
            shared = method in ("GET", "HEAD")
        if not shared:
            return await self._exchange(method, url, json, headers)
        body_key = "" if json is None else jsonlib.dumps(json, sort_keys=True, default=str)
        key = (method, url, _fingerprint(headers), body_key)
        with anyio.move_on_after(self.remaining()) as scope:
            return await self._flights.do(
                key, lambda: self._exchange(method, url, json, headers)
            )
        assert scope.cancelled_caught
        raise UpstreamError(self.timed_out_reason())

    async def _exchange(
        self, method: str, url: str, json: Any, headers: Mapping[str, str] | None
    ) -> Reply:
        remaining = self.remaining()
        if remaining <= 0:
            raise UpstreamError(self.timed_out_reason())
        cap = self.max_response_bytes
        started = time.perf_counter()
        chunks: list[bytes] = []
        try:
            # fail_after bounds the whole exchange: httpx's timeouts are per read, so a server
            # that drips one byte a second would otherwise never time out.
            with anyio.fail_after(remaining):
                async with self._slot(), self.client.stream(
                    method, url, json=json, headers=headers, timeout=httpx.Timeout(remaining)
                ) as response:
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > cap:
                        raise UpstreamError(f"response too large (> {cap} bytes)")
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > cap:
                            raise UpstreamError(f"response too large (> {cap} bytes)")
                        chunks.append(chunk)
                    status = response.status_code
                    reply_headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:
            raise UpstreamError(self.timed_out_reason()) from None
        except httpx.TimeoutException:
            raise UpstreamError(self.timed_out_reason()) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(describe_transport_error(exc)) from None
        body = b"".join(chunks)
        data, json_error = _parse_json(body, reply_headers)
        return Reply(
            method=method,
            url=redact_url(url),
            status=status,
            headers=MappingProxyType(reply_headers),
            body=body,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
            data=data,
            json_error=json_error,
        )


    def _slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A slot among the daemon's concurrent upstream requests (none when unlimited)."""
        return self._limiter if self._limiter is not None else contextlib.nullcontext()


#: Judges a reply's status: the verdict that ends the probe, or None to read the body.
Judge = Callable[[Reply, str], ProbeResult | None]


async def fetch_json(
    ctx: ProbeContext,
    method: str,
    url: str,
    what: str,
    judge: Judge,
    *,
    json: Any = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[Reply, Any] | ProbeResult:
    """The reply and its parsed JSON, or the result that ends the probe: a transport failure,
    ``judge``'s verdict on the status, or a body that is not JSON. ``what`` names the call
    in reasons ("GET /v1/models")."""
    merged = {"Accept": "application/json", **(headers or {})}
    try:
        reply = await ctx.request(method, url, json=json, headers=merged)
    except UpstreamError as exc:
        return ProbeResult.failure(exc.reason)
    verdict = judge(reply, what)
    if verdict is not None:
        return verdict
    try:
        return reply, reply.json()
    except UpstreamError as exc:
        return ProbeResult.failure(exc.reason, reply.elapsed_ms, http_status=reply.status)


# ----------------------------------------------------------------------------- probes


@runtime_checkable
class Probe(Protocol):
    """A health probe for one provider (``openai``, ``ollama``, ...)."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The verdict on ``spec``; use ``ctx`` for requests so they are shared and bounded."""
        ...


class Prober:
    """Runs probes by provider name; ``run`` always returns a result.

    ``probes`` is a plain attribute so a reload can swap in a new mapping; in-flight probes
    keep the probe object they started with.
    """

    def __init__(
        self,
        probes: Mapping[str, Probe],
        client: httpx.AsyncClient,
        config: ProbeConfig,
        log: Log | None = None,
    ) -> None:
        self.probes: Mapping[str, Probe] = probes
        self.client = client
        self.config = config
        self.log: Log = log if log is not None else structlog.get_logger("modeld.prober")
        self.flights = SingleFlight()
        # At most max_concurrent requests go to the client at once. httpx's pool could queue
        # the rest itself, but its queue costs O(waiting x connections) per request, which
        # at a thousand endpoints starves the event loop. Waiting probes that share a flight
        # do not take a slot.
        self.limiter = anyio.CapacityLimiter(config.max_concurrent)

    async def run(self, spec: ModelSpec, *, deep: bool | None = None) -> ProbeResult:
        """Probe ``spec`` once and return the verdict; never raises except on cancellation."""
        started = time.perf_counter()

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000.0

        probe = self.probes.get(spec.provider)
        if probe is None:
            known = ", ".join(sorted(self.probes)) or "none"
            return ProbeResult.failure(
                f'no probe plugin registered for provider "{spec.provider}" (known: {known})',
                0.0,
            )
        timeout = spec.timeout or self.config.timeout
        log = self.log.bind(model_id=spec.id, provider=spec.provider)
        ctx = ProbeContext(
            self.client,
            timeout=timeout,
            deep=spec.deep if deep is None else deep,
            log=log,
            max_response_bytes=self.config.max_response_bytes,
            flights=self.flights,
            limiter=self.limiter,
        )
        grace = min(_GRACE_MAX, timeout * 0.1)
        result: Any = None
        with anyio.move_on_after(timeout + grace) as scope:
            try:
                result = await probe.probe(spec, ctx)
            except UpstreamError as exc:  # a probe may let ctx's errors through: fine
                result = ProbeResult.failure(exc.reason)
            except anyio.get_cancelled_exc_class():
                raise
            except (Exception, SystemExit) as exc:  # sys.exit() in a plugin is a plugin bug
                secrets = _secrets(spec)
                log.warning("probe_raised", error_type=type(exc).__name__,
                            error=_mask(str(exc)[:300], secrets))
                detail = one_line(str(exc), 200)
                result = ProbeResult.failure(
                    f"probe raised {type(exc).__name__}" + (f": {detail}" if detail else "")
                )
        if scope.cancelled_caught:
            result = ProbeResult.failure(ctx.timed_out_reason())
        if not isinstance(result, ProbeResult):
            result = ProbeResult.failure(
                f"probe returned {type(result).__name__}, not ProbeResult"
            )
        verdict = _normalised(result, _secrets(spec))
        if verdict.latency_ms is None or scope.cancelled_caught:
            verdict = dataclasses.replace(verdict, latency_ms=elapsed_ms())
        return verdict


def _secrets(spec: ModelSpec) -> tuple[str, ...]:
    """The forms in which the model's API key could be echoed back: as is, stripped, and
    escaped the way Python and the HTTP layer quote bytes in error messages."""
    secret = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
    forms = {secret, secret.strip(), repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    # too short to search for without masking innocent text
    return tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _normalised(result: ProbeResult, secrets: tuple[str, ...]) -> ProbeResult:
    """``result`` as the rest of the daemon can rely on it, whatever a plugin built: a real
    status, a finite non-negative latency (or None), a one-line string reason and JSON-safe
    facts, with the model's API key masked should a probe have echoed it anywhere."""
    status = result.status
    if not isinstance(status, ProbeStatus):
        try:
            status = ProbeStatus(status)
        except ValueError:
            return ProbeResult.failure(
                f"probe returned a ProbeResult with an invalid status {one_line(repr(status))}"
            )
    raw_facts = result.facts if isinstance(result.facts, Mapping) else {}

    def masked(text: str) -> str:
        return _mask(text, secrets)

    return ProbeResult(
        status,
        finite_ms(result.latency_ms),
        masked(one_line(str(result.reason))),
        MappingProxyType({str(k): json_safe(v, masked) for k, v in raw_facts.items()}),
    )
