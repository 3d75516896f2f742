"""What a probe gets as ``ctx``: the shared HTTP client, its deadline, and shared requests.

- :func:`make_http_client` builds the daemon's one long-lived ``httpx.AsyncClient``.
- :class:`ProbeContext` is what a probe receives as ``ctx``. Its :meth:`ProbeContext.request`
  and :meth:`ProbeContext.get_json` are *single-flight*: concurrent probes asking for the same
  request share one HTTP exchange, so one ``GET /api/tags`` serves every Ollama model of a
  server. Every exchange is streamed, capped at ``max_response_bytes`` and bounded by the probe's
  deadline as a whole (a server that sends headers and then drips the body still times out).
  Transport problems surface as :class:`~daemon.probing.replies.UpstreamError`, whose
  ``reason`` is one readable line.
- :class:`Probe` is the protocol a probe plugin implements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json as jsonlib
import os
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import anyio
import httpx
import structlog

from .. import __version__
from ..core.model import ModelSpec, ProbeResult
from ..core.settings import ProbeConfig
from .replies import Reply, UpstreamError, describe_transport_error, parse_json_body, redact_url

USER_AGENT = f"modeld/{__version__}"

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


def upstream_auth(spec: ModelSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for requests to ``spec``'s upstream (empty without
    ``api_key_env``); raises UpstreamError naming the variable when the key is missing.

    The key is read from the environment at each call, so a rotated key takes effect at the
    next probe; it goes only into the header, never into a reason or a log line.
    """
    if not spec.api_key_env:
        return {}
    env = os.environ if environ is None else environ
    # a key file saved with a trailing newline (or CRLF) is the common case: strip it
    key = env.get(spec.api_key_env, "").strip()
    if not key:
        raise UpstreamError(
            f"api_key_env: environment variable {spec.api_key_env} is not set or empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        # never let the HTTP layer quote it back in an error message
        raise UpstreamError(f"api_key_env: environment variable {spec.api_key_env} contains "
                            "control characters")
    return {"Authorization": f"Bearer {key}"}


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

    def auth_headers(self, spec: ModelSpec) -> dict[str, str]:
        """The upstream's Authorization header for ``spec`` (from ``api_key_env``; empty
        without one). Raises UpstreamError naming the variable when it is unset, so a probe
        can let it through: the prober turns it into a failure with that reason."""
        return upstream_auth(spec)

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
        data, json_error = parse_json_body(body, reply_headers)
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



@runtime_checkable
class Probe(Protocol):
    """A health probe for one provider (``openai``, ``ollama``, ...)."""

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The verdict on ``spec``; use ``ctx`` for requests so they are shared and bounded."""
        ...


#: What ``modeld_register_probes`` is called with: ``register(name, probe)``.
Register = Callable[[str, Probe], None]
