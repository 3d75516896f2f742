"""What a probe gets as ``ctx``: the shared HTTP client, its deadline, and shared requests.

- :func:`make_http_client` builds the daemon's one long-lived ``httpx.AsyncClient``.
- :class:`ProbeContext` is what a probe receives as ``ctx``. Its :meth:`ProbeContext.request`
  and :meth:`ProbeContext.get_json` are *single-flight*: concurrent probes asking for the same
  request share one HTTP exchange, so one ``GET /api/tags`` serves every Ollama model of a
  server. Every exchange is streamed, capped at ``max_response_bytes`` and bounded by the probe's
  deadline as a whole (a server that sends headers and then drips the body still times out).
  The cap counts *decoded* bytes: probes ask for ``identity``, and a body compressed anyway is
  decoded here in bounded steps (the client's transport never lets httpx inflate it), so a
  decompression bomb stops at the cap instead of inflating first.
  Transport problems surface as :class:`~daemon.probing.replies.UpstreamError`, whose
  ``reason`` is one readable line.
- :class:`Probe` is the protocol a probe plugin implements.
"""

from __future__ import annotations

import functools
import hashlib
import json as jsonlib
import math
import os
import time
import zlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import anyio
import h11
import httpx
import structlog

from .. import __version__
from ..core.model import ModelSpec, ProbeResult
from ..core.settings import ProbeConfig
from .replies import (
    Reply,
    UpstreamError,
    describe_transport_error,
    one_line,
    parse_json_body,
    redact_url,
)

if TYPE_CHECKING:  # imported where used: daemon.gateway imports this module
    from ..gateway.upstream import UpstreamPool, UpstreamResponse

USER_AGENT = f"modeld/{__version__}"

Log = Any  # a structlog bound logger; structlog's own types are too loose to be useful here


# ----------------------------------------------------------------------------- the client


def make_http_client(
    probe: ProbeConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> ProbeClient:
    """The daemon's one shared HTTP client, sized and bounded for probing.

    Redirects are not followed (a probe reports them), proxies from the environment are not
    used (probes go straight to the host's servers), the pool holds at most ``max_concurrent``
    connections, and every phase has an explicit timeout. ``transport`` is for tests
    (``httpx.MockTransport``).
    """
    keepalive = max(30.0, 2 * probe.interval)
    limits = httpx.Limits(
        max_connections=probe.max_concurrent,
        max_keepalive_connections=probe.max_concurrent,
        keepalive_expiry=keepalive,
    )
    from ..gateway.upstream import UpstreamPool

    lean: UpstreamPool | None = None
    if transport is None:
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        lean = UpstreamPool(idle_expiry=keepalive, max_idle_per_origin=probe.max_concurrent,
                            user_agent=f"{USER_AGENT} (pid {os.getpid()})".encode())
    return ProbeClient(
        lean,
        follow_redirects=False,
        trust_env=False,
        limits=limits,
        timeout=httpx.Timeout(probe.timeout),
        # the pid tells an upstream's operator which modeld instance is probing it; probes
        # need no compression, and a compressed body is a bomb waiting to go off (decoding,
        # should a server compress anyway, is done and capped by ProbeContext, not httpx)
        headers={"User-Agent": f"{USER_AGENT} (pid {os.getpid()})",
                 "Accept-Encoding": "identity"},
        transport=UndecodedTransport(transport),
    )


class ProbeClient(httpx.AsyncClient):
    """The daemon's probe client: httpx, plus ``lean``, the h11 keep-alive pool that
    :class:`ProbeContext` sends its plain-HTTP requests through (None with a test transport).

    Why: on a quiet host the probes' own requests were most of the daemon's CPU — an httpx
    request through the context cost about 1 ms of CPU, the same exchange on the front door's
    h11 client (:class:`~daemon.gateway.upstream.UpstreamPool`) 0.3 ms (tests/bench/
    bench_quiet.py). A plugin using ``ctx.client`` directly still gets httpx; so do https
    and deep probes' bodies.
    """

    def __init__(self, lean: UpstreamPool | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean = lean

    async def aclose(self) -> None:
        if self.lean is not None:
            await self.lean.aclose()
        await super().aclose()


#: Where :class:`UndecodedTransport` moves a response's Content-Encoding.
RAW_ENCODING_HEADER = "x-modeld-content-encoding"


class UndecodedTransport(httpx.AsyncBaseTransport):
    """A transport whose responses httpx never decompresses.

    httpx inflates a compressed body chunk by chunk, each chunk (and each layer of it)
    completely, before anyone can count the bytes: a 2 kB double-gzip body becomes 1 GB in
    one step. This wrapper moves ``Content-Encoding`` to ``X-Modeld-Content-Encoding`` on
    every response, so httpx hands over the bytes as sent, whoever reads them — a plugin
    using ``ctx.client`` directly gets the small compressed body, not the bomb — and
    :class:`ProbeContext` decodes them itself, capped as it goes.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        encoding = response.headers.get("content-encoding")
        if encoding is not None:
            del response.headers["content-encoding"]
            response.headers[RAW_ENCODING_HEADER] = encoding
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


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


# ----------------------------------------------------------------------------- decoding

#: Decoded bytes produced per step of a decoder: the most any layer holds at once.
_DECODE_PIECE = 64 * 1024
#: Content-Encoding layers decoded at most ("gzip, gzip" is two).
MAX_ENCODING_LAYERS = 2
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class _Inflater:
    """One Content-Encoding layer (gzip or deflate), decoded in pieces of bounded size.

    Every layer's output is capped at ``cap`` bytes: a compressed body is smaller than the
    document it decodes to, so no honest reply needs more at any layer, and a bomb stops
    after ``cap`` bytes of work instead of inflating completely first.
    """

    def __init__(self, encoding: str, cap: int) -> None:
        self.encoding = encoding
        self.cap = cap
        self.total = 0
        self._fed = False  # an empty body (HEAD, 204) is empty whatever its Content-Encoding
        self._raw_deflate_fallback = encoding == "deflate"
        wbits = _GZIP_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data`` (each at most _DECODE_PIECE bytes)."""
        self._fed = self._fed or bool(data)
        while data and not self._z.eof:
            try:
                out = self._z.decompress(data, _DECODE_PIECE)
            except zlib.error as exc:
                if self._raw_deflate_fallback and self.total == 0:
                    # "deflate" is often sent without its zlib wrapper (raw deflate)
                    self._raw_deflate_fallback = False
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise UpstreamError(f"response body is not valid {self.encoding} "
                                    f"(Content-Encoding): {exc}") from None
            if len(data) >= 2:  # zlib's two-byte header has been checked: no fallback now
                self._raw_deflate_fallback = False
            data = self._z.unconsumed_tail
            yield from self._counted(out)

    def finish(self) -> Iterator[bytes]:
        """What the decoder still holds once the input has ended."""
        while self._fed and not self._z.eof:
            try:
                out = self._z.decompress(b"", _DECODE_PIECE)
            except zlib.error as exc:
                raise UpstreamError(f"response body is not valid {self.encoding} "
                                    f"(Content-Encoding): {exc}") from None
            if not out:
                raise UpstreamError(f"response body ends inside its {self.encoding} data "
                                    "(Content-Encoding): truncated")
            yield from self._counted(out)

    def _counted(self, out: bytes) -> Iterator[bytes]:
        self.total += len(out)
        if self.total > self.cap:
            raise UpstreamError(f"response too large (> {self.cap} bytes once decoded from "
                                f"{self.encoding})")
        if out:
            yield out


def _decoders(header: str, cap: int) -> list[_Inflater]:
    """The decoders for a Content-Encoding header, outermost (last applied) first."""
    names = [n.strip().lower() for n in header.split(",")]
    names = [n for n in names if n and n != "identity"]
    unknown = [n for n in names if n not in ("gzip", "x-gzip", "deflate")]
    if unknown:
        raise UpstreamError(f"response has Content-Encoding {unknown[0][:40]}, which modeld "
                            "does not decode (it asks for identity)")
    if len(names) > MAX_ENCODING_LAYERS:
        raise UpstreamError(f"response has {len(names)} layers of Content-Encoding "
                            f"({header[:60]}); at most {MAX_ENCODING_LAYERS} are decoded")
    return [_Inflater(name, cap) for name in reversed(names)]


def _decoded(layers: Sequence[_Inflater], data: bytes, final: bool = False) -> Iterator[bytes]:
    """``data`` (raw bytes from the wire) through every layer, piece by piece."""
    if not layers:
        if data:
            yield data
        return
    first, rest = layers[0], layers[1:]
    for piece in first.feed(data):
        yield from _decoded(rest, piece)
    if final:
        for piece in first.finish():
            yield from _decoded(rest, piece)
        yield from _decoded(rest, b"", final=True)


async def _raw_chunks(response: httpx.Response, layers: list[_Inflater]) -> Any:
    """The body as it came from the wire. An in-process transport (``httpx.MockTransport``
    given ``content=bytes``) hands over a body already read and decoded: that one is yielded
    as it is, with no layers left to decode."""
    if response.is_stream_consumed:
        layers.clear()
        yield response.content
        return
    async for raw in response.aiter_raw():
        yield raw


# ----------------------------------------------------------------------------- single flight


@dataclass(slots=True)
class _Flight:
    created_at: float  # anyio's clock
    done: anyio.Event
    started: anyio.Event  # the leader holds its slot: the request is under way
    reply: Reply | None = None
    reason: str | None = None  # UpstreamError reason; both None: the leader gave up


#: A follower whose leader gave up goes again only with this share of its timeout left.
_RETRY_MIN = 0.1


class _LeaderGaveUp(UpstreamError):
    """The leader's own deadline passed: its followers, who may have more time, go again."""


class _TimedOut(_LeaderGaveUp):
    """A request was sent and its answer did not come within the deadline."""


class SingleFlight:
    """Concurrent callers with the same key share one call; no results are kept afterwards.

    Used through :meth:`ProbeContext.request`: a caller joins the flight in progress for its
    key (unless that flight began before the caller's ``fresh_after``: a recheck of a hung
    server wants a request of its own), or leads a new one.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def joinable(self, key: Hashable, fresh_after: float | None) -> _Flight | None:
        """The flight in progress for ``key``, if it began after ``fresh_after``."""
        flight = self._flights.get(key)
        if flight is None or (fresh_after is not None and flight.created_at <= fresh_after):
            return None
        return flight

    def begin(self, key: Hashable) -> _Flight:
        """A new flight for ``key``; later callers join it (an older one runs on unlisted)."""
        flight = self._flights[key] = _Flight(anyio.current_time(), anyio.Event(), anyio.Event())
        return flight

    def end(self, key: Hashable, flight: _Flight) -> None:
        """``flight`` is over: wake its followers."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.started.set()
        flight.done.set()


# ----------------------------------------------------------------------------- slots


def endpoint_share(max_concurrent: int) -> int:
    """How many of ``max_concurrent`` requests one endpoint may hold: a quarter (at least 1),
    so a server that hangs every request costs its own models, never its neighbours'."""
    return max(1, max_concurrent // 4)


def _endpoint_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}".lower()


#: Endpoints remembered as hanging, at most (beyond it the memory starts afresh).
_SUSPECTS_KEPT = 10_000


class Slots:
    """The daemon's slots for upstream requests: ``limiter`` bounds them all
    (``max_concurrent``); each endpoint gets at most its :func:`endpoint_share`; and endpoints
    whose last request timed out (*hanging*) share at most half of the slots between them,
    so the other half always serves servers that answer.

    Waiting for a slot is queueing, not probing: :class:`ProbeContext` stops a probe's clock
    while it waits (its deadline and latency start when its request does).
    """

    def __init__(self, max_concurrent: int) -> None:
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        self._hanging_limiter = anyio.CapacityLimiter(max(1, max_concurrent // 2))
        self._endpoints: dict[str, tuple[anyio.CapacityLimiter, int]] = {}
        self._hanging: set[str] = set()

    def hanging(self, url: str) -> bool:
        """Whether the last request to ``url``'s endpoint timed out."""
        return _endpoint_of(url) in self._hanging

    async def acquire(self, url: str, borrower: object) -> Callable[[bool | None], None]:
        """Wait for a slot for a request to ``url``; returns the function that frees it,
        called with whether the request timed out (None: it tells nothing of the server)."""
        key = _endpoint_of(url)
        total = int(self.limiter.total_tokens)
        limiter, users = self._endpoints.get(key, (None, 0))
        if limiter is None:
            limiter = anyio.CapacityLimiter(endpoint_share(total))
        self._endpoints[key] = (limiter, users + 1)
        held: list[anyio.CapacityLimiter] = []

        def release(timed_out: bool | None) -> None:
            for each in reversed(held):
                each.release_on_behalf_of(borrower)
            held.clear()
            current, count = self._endpoints[key]
            if count <= 1:
                del self._endpoints[key]
            else:
                self._endpoints[key] = (current, count - 1)
            if timed_out is None:
                return
            if timed_out:
                if len(self._hanging) >= _SUSPECTS_KEPT:
                    self._hanging.clear()
                self._hanging.add(key)
            else:
                self._hanging.discard(key)

        try:
            await limiter.acquire_on_behalf_of(borrower)
            held.append(limiter)
            if key in self._hanging:
                self._hanging_limiter.total_tokens = max(1, total // 2)
                await self._hanging_limiter.acquire_on_behalf_of(borrower)
                held.append(self._hanging_limiter)
            await self.limiter.acquire_on_behalf_of(borrower)
            held.append(self.limiter)
        except BaseException:
            release(None)
            raise
        return release


def _fingerprint(headers: Mapping[str, str] | None) -> str:
    """A digest of request headers: part of a flight key without holding a token in clear."""
    if not headers:
        return ""
    return _digest(tuple(sorted((name.lower(), value) for name, value in headers.items())))


@functools.lru_cache(maxsize=1024)
def _digest(items: tuple[tuple[str, str], ...]) -> str:
    # every probe of a sweep sends the same few header sets: hash each once
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in items).encode()).hexdigest()


# ----------------------------------------------------------------------------- the context


class ProbeContext:
    """What a probe gets as ``ctx``: the shared client, its deadline and shared requests.

    Attributes: ``client`` (the daemon's ``httpx.AsyncClient``), ``timeout`` (seconds for the
    whole probe), ``deadline`` (on anyio's clock), ``deep`` (a deep probe was asked for),
    ``log`` (a structlog logger bound to the model), ``max_response_bytes``.

    The probe's clock stops while it only waits for a slot among the daemon's concurrent
    requests (``queued`` sums that time): a probe queued behind hung servers is not timed
    out, nor its latency inflated, by its neighbours' trouble. ``deadline`` moves on by the
    time queued.
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
        slots: Slots | None = None,
        fresh_after: float | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.deep = deep
        self.log: Log = log if log is not None else structlog.get_logger("modeld.probe")
        self.max_response_bytes = max_response_bytes
        self.deadline = anyio.current_time() + timeout if deadline is None else deadline
        self._flights = flights if flights is not None else SingleFlight()
        self._limiter = limiter
        self._slots = slots
        #: join no shared request that began at or before this time (anyio's clock)
        self.fresh_after = fresh_after
        #: seconds this probe spent waiting for a slot with none of its requests under way
        self.queued = 0.0
        #: called with the new deadline (``math.inf`` while queued): the prober keeps its own
        #: cancel scope in step
        self.on_deadline: Callable[[float], None] | None = None
        self._waiting = 0  # requests of this probe waiting for a slot (or for their leader's)
        self._running = 0  # requests of this probe under way
        self._paused_at: float | None = None

    def remaining(self) -> float:
        """Seconds left before the probe's deadline (never negative)."""
        if self._paused_at is not None:
            return self.timeout  # while queued, the clock does not run (never past timeout)
        return max(0.0, self.deadline - anyio.current_time())

    def _clock(self, waiting: int = 0, running: int = 0) -> None:
        """Account for requests starting or stopping to wait or run; the clock stops while
        the probe has requests waiting and none under way."""
        self._waiting += waiting
        self._running += running
        pause = self._waiting > 0 and self._running == 0
        if pause and self._paused_at is None:
            self._paused_at = anyio.current_time()
            if self.on_deadline is not None:
                self.on_deadline(math.inf)
        elif not pause and self._paused_at is not None:
            queued = anyio.current_time() - self._paused_at
            self._paused_at = None
            self.queued += queued
            self.deadline += queued
            if self.on_deadline is not None:
                self.on_deadline(self.deadline)

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
            return await self._slotted(method, url, json, headers, None)
        body_key = "" if json is None else jsonlib.dumps(json, sort_keys=True, default=str)
        key = (method, url, _fingerprint(headers), body_key)
        return await self._shared(key, method, url, json, headers)

    async def get_json_many(
        self, urls: Sequence[str], *, headers: Mapping[str, str] | None = None
    ) -> list[Reply | UpstreamError]:
        """Several :meth:`get_json` at once (a listing and a readiness route, say): each
        URL's reply, or the :class:`UpstreamError` it failed with, in order.

        The requests run concurrently and shared, as separate ``get_json`` calls in a task
        group would; but a request another probe already leads is joined without a task of
        its own, so the followers of a sweep (every model but the first) spawn none.
        """
        merged = {"Accept": "application/json", **(headers or {})}
        fingerprint = _fingerprint(merged)
        keys = [("GET", url, fingerprint, "") for url in urls]
        joined = [self._flights.joinable(key, self.fresh_after) for key in keys]
        answers: list[Reply | UpstreamError | None] = [None] * len(keys)

        async def one(index: int) -> None:
            try:
                answers[index] = await self._shared(keys[index], "GET", urls[index], None,
                                                    merged, joined[index])
            except UpstreamError as exc:
                answers[index] = exc

        new = [i for i, flight in enumerate(joined) if flight is None]
        if len(new) > 1:
            async with anyio.create_task_group() as tg:
                for index in new[1:]:
                    tg.start_soon(one, index)
                await one(new[0])
        elif new:
            await one(new[0])
        for index, flight in enumerate(joined):  # under way meanwhile: waiting costs nothing
            if flight is not None:
                await one(index)
        return [a if a is not None else UpstreamError("no answer") for a in answers]

    async def _shared(self, key: Hashable, method: str, url: str, json: Any,
                      headers: Mapping[str, str] | None,
                      flight: _Flight | None = None) -> Reply:
        """The reply of the flight for ``key``: ``flight`` if given, else the one under way,
        else a new one led by this call."""
        flights = self._flights
        if flight is None:
            flight = flights.joinable(key, self.fresh_after)
        while flight is not None:
            if not flight.started.is_set():  # its leader waits for a slot: so do we
                self._clock(waiting=1)
                try:
                    await flight.started.wait()
                finally:
                    self._clock(waiting=-1)
            self._clock(running=1)
            try:
                with anyio.move_on_after(self.remaining()):
                    await flight.done.wait()
            finally:
                self._clock(running=-1)
            if not flight.done.is_set():
                raise UpstreamError(self.timed_out_reason())
            if flight.reply is not None:
                return flight.reply
            if flight.reason is not None:
                raise UpstreamError(flight.reason)
            # the leader gave up (cancelled, or its own deadline passed): go again, unless
            # our own deadline is as good as gone too (probes of one sweep start together)
            if self.remaining() < _RETRY_MIN * self.timeout:
                raise UpstreamError(self.timed_out_reason())
            flight = flights.joinable(key, self.fresh_after)
        flight = flights.begin(key)
        try:
            flight.reply = await self._slotted(method, url, json, headers, flight.started)
            return flight.reply
        except _LeaderGaveUp:
            raise
        except UpstreamError as exc:
            flight.reason = exc.reason
            raise
        finally:
            flights.end(key, flight)

    async def _slotted(
        self, method: str, url: str, json: Any, headers: Mapping[str, str] | None,
        started: anyio.Event | None,
    ) -> Reply:
        """``_exchange`` once it has a slot; the clock stops while it waits for one."""
        release: Callable[[bool | None], None] | None = None
        if self._slots is not None or self._limiter is not None:
            self._clock(waiting=1)
            try:
                release = await self._acquire_slot(url)
            finally:
                self._clock(waiting=-1, running=1 if release is not None else 0)
        else:
            self._clock(running=1)
        timed_out: bool | None = None  # None: no news of the endpoint (never sent, cancelled)
        try:
            if started is not None:
                started.set()
            reply = await self._exchange(method, url, json, headers)
            timed_out = False
            return reply
        except _TimedOut:
            timed_out = True
            raise
        except _LeaderGaveUp:
            raise
        except UpstreamError:
            timed_out = False
            raise
        finally:
            self._clock(running=-1)
            if release is not None:
                release(timed_out)

    async def _acquire_slot(self, url: str) -> Callable[[bool | None], None]:
        if self._slots is not None:
            return await self._slots.acquire(url, object())
        limiter, borrower = self._limiter, object()
        assert limiter is not None
        await limiter.acquire_on_behalf_of(borrower)
        return lambda _timed_out: limiter.release_on_behalf_of(borrower)

    async def _exchange(
        self, method: str, url: str, json: Any, headers: Mapping[str, str] | None
    ) -> Reply:
        remaining = self.remaining()
        if remaining <= 0:
            raise _LeaderGaveUp(self.timed_out_reason())
        lean = getattr(self.client, "lean", None)
        if lean is not None and _lean_fits(method, url, json, headers):
            return await self._exchange_lean(lean, method, url, headers, remaining)
        cap = self.max_response_bytes
        started = time.perf_counter()
        try:
            # fail_after bounds the whole exchange: httpx's timeouts are per read, so a server
            # that drips one byte a second would otherwise never time out.
            with anyio.fail_after(remaining):
                async with self.client.stream(
                    method, url, json=json, headers=headers, timeout=httpx.Timeout(remaining)
                ) as response:
                    _check_declared(response.headers.get("content-length", ""), cap)
                    # the raw bytes, decoded here: httpx would inflate a whole chunk (and
                    # every layer of it) before any cap could be checked
                    encoding = response.headers.get(
                        RAW_ENCODING_HEADER, response.headers.get("content-encoding", ""))
                    layers = _decoders(encoding, cap)
                    chunks = await _capped_body(_raw_chunks(response, layers), layers, cap)
                    status = response.status_code
                    reply_headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:
            raise _TimedOut(self.timed_out_reason()) from None
        except httpx.TimeoutException:
            raise _TimedOut(self.timed_out_reason()) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(describe_transport_error(exc)) from None
        return self._reply(method, url, status, reply_headers, chunks, started)

    async def _exchange_lean(self, pool: UpstreamPool, method: str, url: str,
                             headers: Mapping[str, str] | None, remaining: float) -> Reply:
        """The same exchange on the h11 pool: the same identity request, the same caps on
        raw and decoded bytes as they arrive, the same deadline for the whole of it."""
        from ..gateway.upstream import TransportError

        cap = self.max_response_bytes
        started = time.perf_counter()
        sent = {"accept": "*/*", "accept-encoding": "identity"}
        sent.update((k.lower(), v) for k, v in (headers or {}).items())
        try:
            with anyio.fail_after(remaining):
                response = await pool.request(
                    method, url, [(k.encode(), v.encode()) for k, v in sent.items()], b"")
                try:
                    reply_headers = _joined_headers(response.headers)
                    _check_declared(reply_headers.get("content-length", ""), cap)
                    encoding = reply_headers.pop("content-encoding", None)
                    if encoding is not None:  # as UndecodedTransport shows it
                        reply_headers[RAW_ENCODING_HEADER] = encoding
                    layers = _decoders(encoding or "", cap)
                    chunks = await _capped_body(_lean_chunks(response), layers, cap)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise _TimedOut(self.timed_out_reason()) from None
        except TransportError as exc:
            raise UpstreamError(exc.reason) from None
        except h11.ProtocolError as exc:
            raise UpstreamError(f"HTTP protocol error: {one_line(str(exc))}") from None
        return self._reply(method, url, response.status, reply_headers, chunks, started)

    @staticmethod
    def _reply(method: str, url: str, status: int, reply_headers: dict[str, str],
               chunks: list[bytes], started: float) -> Reply:
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


def _lean_fits(method: str, url: str, json: Any, headers: Mapping[str, str] | None) -> bool:
    """Whether a request can go through the h11 pool: plain HTTP, no body, no user info in
    the URL, and no header the pool sets itself. Anything else goes through httpx."""
    if json is not None or method not in ("GET", "HEAD") or not url.startswith("http://"):
        return False
    if "@" in url.partition("//")[2].partition("/")[0]:
        return False
    return not any(k.lower() in ("host", "user-agent", "content-length",
                                 "transfer-encoding") for k in headers or {})


def _check_declared(declared: str, cap: int) -> None:
    if declared.isdigit() and int(declared) > cap:
        raise UpstreamError(f"response too large (> {cap} bytes)")


def _joined_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers by lower-case name, repeated ones joined with ", " (as httpx's
    ``Headers.items()`` gives them)."""
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


async def _lean_chunks(response: UpstreamResponse) -> Any:
    while (chunk := await response.next_chunk()) is not None:
        yield chunk


async def _capped_body(raw_chunks: Any, layers: list[_Inflater], cap: int) -> list[bytes]:
    """The decoded body from ``raw_chunks``, stopped as soon as the raw or the decoded bytes
    pass ``cap`` (UpstreamError)."""
    chunks: list[bytes] = []
    raw_size = size = 0
    async for raw in raw_chunks:
        raw_size += len(raw)
        if raw_size > cap:
            raise UpstreamError(f"response too large (> {cap} bytes)")
        for chunk in _decoded(layers, raw):
            size += len(chunk)
            if size > cap:
                raise UpstreamError(f"response too large (> {cap} bytes)")
            chunks.append(chunk)
    for chunk in _decoded(layers, b"", final=True):
        size += len(chunk)
        if size > cap:
            raise UpstreamError(f"response too large (> {cap} bytes)")
        chunks.append(chunk)
    return chunks


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
