"""The front door's client for upstreams: HTTP/1.1 on h11 and anyio, with a keep-alive pool.

Why not httpx, the daemon's client for probes: measured with tests/bench/bench_gateway.py,
the door on httpx (with httpcore) spent 1.3 ms of CPU per relayed request at one client and
2.2 ms at 16, and served 223 req/s at 64 clients — its pool checks every idle connection for
readability on every request (a ``select`` call each), so the cost grows with the number of
connections. On this client: 0.6 ms, flat, 3-6 times the throughput. The door needs only
one thing done well: one request, its answer relayed chunk by chunk. This client does that with
the same h11 the servers use: the request (head and body) in one write, the answer read only
as fast as the caller consumes it (back-pressure), a connection returned to its origin's pool
only when its answer was read to the end and the server did not ask to close, idle
connections dropped after ``idle_expiry`` (below the 5 s after which uvicorn and llama.cpp's
cpp-httplib close them), and a request that finds a pooled connection closed by the server
before any answer retried once on a new connection (the server never saw it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11

_RECEIVE_SIZE = 65536
MAX_RESPONSE_HEAD = 64 * 1024


class TransportError(Exception):
    """No usable answer: ``reason`` is one line ("connection refused", ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def split_url(url: str) -> tuple[Origin, str, bytes]:
    """(origin, target, Host header) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(f"bad upstream URL scheme or host: {parts.scheme}://")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = port == (443 if parts.scheme == "https" else 80)
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return (Origin(parts.scheme, parts.hostname, port), target,
            (host if default else f"{host}:{port}").encode())


@dataclass(eq=False)
class _Conn:
    origin: Origin
    stream: anyio.abc.ByteStream
    h11: h11.Connection
    idle_since: float = 0.0
    reused: bool = False
    direct: DirectWrite | None = None

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                await self.stream.aclose()


@dataclass(eq=False)
class UpstreamResponse:
    """An answer whose head has arrived; read the body with :meth:`chunks`, then
    :meth:`aclose` (always)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    _conn: _Conn | None
    _pool: UpstreamPool
    _done: bool = False
    _broken: TransportError | None = None

    async def next_chunk(self, idle_timeout: float | None = None) -> bytes | None:
        """What of the body has arrived, None at its end: every piece already received, at
        once (one write for the caller when it lags behind; one piece each when it keeps
        up); waits only when nothing is there. Raises TransportError when the upstream
        breaks off, TimeoutError when it pauses longer than ``idle_timeout``."""
        conn = self._conn
        if self._broken is not None:
            raise self._broken
        if conn is None or self._done:
            return None
        parts: list[bytes] = []
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._broken = TransportError(_protocol_reason(exc))
                if parts:  # relay what came before the break; the break comes next call
                    return b"".join(parts)
                raise self._broken from None
            if event is h11.NEED_DATA:
                if parts:
                    return b"".join(parts)
                if idle_timeout is None:
                    data = await _receive(conn.stream)
                else:
                    # a bare scope: fail_after's context manager costs 1.4 µs more, per chunk
                    with anyio.CancelScope(deadline=anyio.current_time() + idle_timeout
                                           ) as idle:
                        data = await _receive(conn.stream)
                    if idle.cancelled_caught:
                        raise TimeoutError
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                self._done = True
                return b"".join(parts) if parts else None
            if isinstance(event, h11.ConnectionClosed):
                self._broken = TransportError(
                    "server closed the connection before the reply was complete")
                if parts:
                    return b"".join(parts)
                raise self._broken
            raise TransportError(  # pragma: no cover - h11 yields nothing else here
                f"unexpected HTTP event {type(event).__name__}")

    async def aclose(self) -> None:
        """Give the connection back to the pool if the answer was read to its end, else
        close it (an upstream still generating stops)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if (self._done and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE):
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                await conn.aclose()
                return
            await self._pool._release(conn)
        else:
            await conn.aclose()


@dataclass(eq=False)
class UpstreamPool:
    """Keep-alive connections per origin; ``request`` gives the answer once its head is in."""

    idle_expiry: float = 4.0
    max_idle_per_origin: int = 256
    #: a server that does not accept a connection within this is failed over at once: a dead
    #: host whose packets are dropped (no refusal) would otherwise hold every request for the
    #: whole first_byte_timeout (60 s by default) before the next model is tried
    connect_timeout: float = 5.0
    user_agent: bytes = b"modeld"
    _idle: dict[Origin, list[_Conn]] = field(default_factory=dict)
    _ssl: ssl.SSLContext | None = None
    closed: bool = False

    async def request(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> UpstreamResponse:
        """Send one request; returns when the answer's head has arrived. Raises
        TransportError. Deadlines are the caller's (``anyio.fail_after``)."""
        origin, target, host = split_url(url)
        head = h11.Request(method=method, target=target, headers=[
            (b"host", host), (b"user-agent", self.user_agent),
            (b"content-length", str(len(body)).encode()), *headers])
        for _attempt in range(2):
            conn = await self._take(origin) or await self._connect(origin)
            try:
                data = (conn.h11.send(head) or b"") + (conn.h11.send(h11.Data(data=body))
                                                       if body else b"") + (
                    conn.h11.send(h11.EndOfMessage()) or b"")
                try:
                    written = conn.direct.write(data) if conn.direct is not None else None
                    if written is not True:
                        await conn.stream.send(b"" if written is False else data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    if conn.reused:
                        raise _StaleConnection from None
                    raise TransportError("connection broken while sending the request"
                                         ) from None
                return await self._read_head(conn)
            except _StaleConnection:
                await conn.aclose()
                continue  # the server had closed it while idle: it never saw this request
            except BaseException:
                await conn.aclose()
                raise
        raise TransportError("server closed the connection before the reply was complete")

    async def _read_head(self, conn: _Conn) -> UpstreamResponse:
        received_any = False
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise TransportError(_protocol_reason(exc)) from None
            if event is h11.NEED_DATA:
                try:
                    data = await _receive(conn.stream)
                except TransportError:
                    if conn.reused and not received_any:
                        raise _StaleConnection from None
                    raise
                if not data and conn.reused and not received_any:
                    raise _StaleConnection
                received_any = True
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return UpstreamResponse(event.status_code, list(event.headers), conn, self)
            raise TransportError("server closed the connection without sending a reply")

    async def _take(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if now - conn.idle_since < self.idle_expiry:
                conn.reused = True
                return conn
            await conn.aclose()
        return None

    async def _release(self, conn: _Conn) -> None:
        if self.closed:
            await conn.aclose()
            return
        idle = self._idle.setdefault(conn.origin, [])
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if len(idle) > self.max_idle_per_origin:
            await idle.pop(0).aclose()

    async def _connect(self, origin: Origin) -> _Conn:
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await self._open(origin)
        except TimeoutError:
            raise TransportError(f"connect timed out ({self.connect_timeout:g}s)") from None
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if raw is not None:
            # the request goes out in one write, but an SSE relay must never wait for Nagle
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(origin, stream, h11.Connection(h11.CLIENT,
                                                    max_incomplete_event_size=MAX_RESPONSE_HEAD),
                     direct=DirectWrite.of(stream))

    async def _open(self, origin: Origin) -> anyio.abc.ByteStream:
        try:
            if origin.tls:
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                    origin.host, origin.port, tls=True, ssl_context=self._ssl,
                    tls_standard_compatible=False)
            else:
                stream = await anyio.connect_tcp(origin.host, origin.port)
        except OSError as exc:
            raise TransportError(_connect_reason(exc)) from None
        return stream

    async def aclose(self) -> None:
        """Close every idle connection."""
        self.closed = True
        for idle in self._idle.values():
            for conn in idle:
                await conn.aclose()
        self._idle.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class DirectWrite:
    """Writes into an anyio TCP stream's asyncio transport without anyio's ``send``.

    ``SocketStream.send`` yields to the event loop after every write (a shielded checkpoint)
    and its caller's write deadline costs a timer, about 13 µs of a relayed request's 400 here
    (each request makes two writes). A write the kernel takes whole needs neither; ordering
    and back-pressure stay the transport's own (anyio sets its high-water mark to 0: what the
    kernel does not take at once is buffered there, in order, and pauses the writer, and the
    caller then waits for the drain as anyio's ``send`` would).
    Built only over anyio's asyncio stream (``of`` gives None otherwise: Unix sockets, TLS,
    another backend — callers keep their ``send``).
    """

    __slots__ = ("_protocol", "_transport")

    def __init__(self, transport: asyncio.WriteTransport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    def of(cls, stream: anyio.abc.ByteStream) -> DirectWrite | None:
        transport = getattr(stream, "_transport", None)
        protocol = getattr(stream, "_protocol", None)
        if (not isinstance(transport, asyncio.WriteTransport)
                or not isinstance(getattr(protocol, "write_event", None), asyncio.Event)
                or not hasattr(protocol, "exception")):
            return None
        return cls(transport, protocol)

    def write(self, data: bytes) -> bool | None:
        """True: handed over, nothing to wait for. False: handed over, but the transport is
        over its high-water mark: the caller waits for it to drain (its ``send(b"")``).
        None: not written (paused, broken or closing): the caller sends ``data`` its usual
        way, which waits or raises as it should."""
        protocol = self._protocol
        if (not protocol.write_event.is_set() or protocol.exception is not None
                or self._transport.is_closing()):
            return None
        self._transport.write(data)
        return bool(protocol.write_event.is_set())


class _StaleConnection(Exception):
    """A pooled connection the server had closed: try again on a new one."""


async def _receive(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive(_RECEIVE_SIZE)
    except anyio.EndOfStream:
        return b""
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        if isinstance(cause, OSError) and cause.errno == errno.ECONNRESET:
            raise TransportError("connection reset by peer") from None
        raise TransportError(f"connection broken: {type(cause).__name__}") from None


def _protocol_reason(exc: h11.RemoteProtocolError) -> str:
    text = str(exc)
    if "peer closed connection" in text or "incomplete" in text:
        return "server closed the connection before the reply was complete"
    return f"HTTP protocol error: {text}"


def _connect_reason(exc: OSError) -> str:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:  # anyio: "All connection attempts failed"
        chain.append(current)
        chain.extend(getattr(current, "exceptions", ()))
        current = current.__cause__ or current.__context__
    errnos = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if errno.ECONNREFUSED in errnos or "refused" in text:
        return "connection refused"
    if isinstance(exc, socket.gaierror) or "name or service not known" in text:
        return "cannot resolve host name"
    return f"cannot connect: {exc.strerror or exc}"
