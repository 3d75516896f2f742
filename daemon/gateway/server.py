"""The front door's HTTP/1.1 server: h11 framing, keep-alive, limits, streamed answers.

The control socket's server (``daemon.control.server``) answers small requests with complete
responses; the door relays answers of any size and length as they arrive, so it has its own
loop with the same habits (h11 for the framing, a deadline on every read and write, a cap on
header and body size) and two more: the answer goes out through a :class:`Reply` chunk by
chunk, each ``write`` waiting for the client to take the bytes (back-pressure all the way to
the upstream), and while a request is served the connection is watched, so a client that
hangs up cancels the handler at once — and with it the upstream request.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import h11

from ..control.sockio import receive, send_all
from .upstream import DirectWrite

MAX_HEADER_BYTES = 64 * 1024
READ_TIMEOUT = 60.0  # a whole request (head and body) must arrive within this
KEEPALIVE_TIMEOUT = 30.0  # an idle keep-alive connection is closed after this
WRITE_TIMEOUT = 30.0  # a client that takes nothing for this long is dropped


@dataclass(slots=True)
class DoorRequest:
    """One request, its body complete (bodies are capped)."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ClientGone(Exception):
    """The client hung up, reset, or stopped reading."""


@dataclass(eq=False)
class Reply:
    """Where a handler writes its answer: ``start`` (status and headers), ``write`` (body
    chunks, each sent before it returns), ``finish``; or ``abort`` to cut the answer off, so
    the client sees it end as the upstream's ended."""

    _conn: _Connection
    started: bool = False
    finished: bool = False
    aborted: bool = False
    status: int = 0
    served_by: str = ""  # the model whose answer this is (set by the door)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]],
                    first: bytes = b"") -> None:
        """Send the status line and headers, and the body's first chunk with them (one write:
        on loopback each write costs a wake-up of the reader). Without a Content-Length
        the body is chunked (HTTP/1.1)."""
        self.started = True
        self.status = status
        head = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        if first:
            await self._conn.send(head, h11.Data(data=first))
        else:
            await self._conn.send(head)

    async def write(self, data: bytes) -> None:
        """Send one body chunk; returns once the kernel has taken it."""
        if data:
            await self._conn.send(h11.Data(data=data))

    async def finish(self) -> None:
        """End the body properly."""
        self.finished = True
        await self._conn.send(h11.EndOfMessage())

    def abort(self) -> None:
        """Cut the answer off: the connection closes without ending the body."""
        self.aborted = True

    async def complete(self, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes) -> None:
        """A whole answer at once, with its Content-Length."""
        self.started = self.finished = True
        self.status = status
        head = h11.Response(status_code=status, reason=_reason(status),
                            headers=[*headers, (b"content-length", str(len(body)).encode())])
        await self._conn.send(head, h11.Data(data=body), h11.EndOfMessage())


Handler = Callable[[DoorRequest, Reply], Awaitable[None]]
Refusal = Callable[[int, str, str], tuple[list[tuple[bytes, bytes]], bytes]]
#: an answer given at the head, before the body is read: (status, headers, body)
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
Admit = Callable[[DoorRequest], "Answer | None"]


@dataclass(eq=False)
class _Connection:
    stream: anyio.abc.ByteStream
    h11: h11.Connection
    raw: socket.socket | None
    closing: bool = False
    idle_scope: anyio.CancelScope | None = None
    # one reader task per connection feeds h11 (a task per request cost more than the rest
    # of the door's work on a request); it wakes whoever waits for data, and cancels the
    # request being served when the client hangs up
    arrived: anyio.Event = field(default_factory=anyio.Event)
    consumed: anyio.Event = field(default_factory=anyio.Event)
    eof: bool = False
    handler_scope: anyio.CancelScope | None = None
    direct: DirectWrite | None = None  # TCP: writes that need no wait skip anyio's send

    async def more(self) -> None:
        """Wait until the reader has fed h11 more bytes (or the end of the stream)."""
        if self.eof:
            return
        self.arrived = anyio.Event()
        self.consumed.set()
        await self.arrived.wait()

    async def send(self, *events: Any) -> None:
        data = b"".join([chunk for e in events if (chunk := self.h11.send(e)) is not None])
        if not data:
            return
        if self.direct is not None:
            try:
                written = self.direct.write(data)
            except (RuntimeError, OSError) as exc:
                raise ClientGone(str(exc)) from exc
            if written:
                return
            if written is False:
                data = b""  # handed over: wait below until the transport has drained
        try:
            with anyio.fail_after(WRITE_TIMEOUT):
                await send_all(self.stream, data, self.raw)
        except TimeoutError as exc:
            raise ClientGone("write timed out") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ClientGone(str(exc)) from exc


@dataclass(eq=False)
class DoorServer:
    """Serves ``handler`` on listeners; ``max_body`` gives the body cap at each request (it
    may change on reload); ``refusal`` renders the server's own errors (413, 408, ...)."""

    handler: Handler
    max_body: Callable[[], int]
    refusal: Refusal
    log: Any
    #: connections served at once (idle keep-alive ones included); more are answered 503
    max_connections: Callable[[], int] = lambda: 4096
    #: looks at each request's head (its body empty) before the body is read: an answer
    #: refuses it there (a client without the door's key cannot make it hold a body)
    admit: Admit | None = None
    _connections: set[_Connection] = field(default_factory=set)
    _group: anyio.abc.TaskGroup | None = None
    _accepting: anyio.CancelScope | None = None
    _closing: bool = False
    _drained: anyio.Event = field(default_factory=anyio.Event)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    async def serve(self, listener: anyio.abc.Listener[Any], *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept until ``shutdown``; returns once every connection is closed."""
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                with anyio.CancelScope() as self._accepting:
                    task_status.started()
                    await listener.serve(self._on_connect, group)
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, give requests ``grace`` s, then cancel."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        for conn in list(self._connections):
            conn.closing = True
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()
        if self._connections:
            with anyio.move_on_after(grace):
                await self._drained.wait()
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def _on_connect(self, stream: anyio.abc.ByteStream) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            # SSE chunks are small and must leave at once, not wait for Nagle
            with suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        unix = raw if raw is not None and raw.family == socket.AF_UNIX else None
        if len(self._connections) >= self.max_connections() or self._closing:
            await self._turn_away(stream, unix)
            return
        conn = _Connection(stream, h11.Connection(h11.SERVER,
                                                  max_incomplete_event_size=MAX_HEADER_BYTES),
                           unix, direct=None if unix is not None else DirectWrite.of(stream))
        self._connections.add(conn)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._reader, conn)
                try:
                    await self._serve_connection(conn)
                finally:
                    group.cancel_scope.cancel()
        except ClientGone:
            pass
        except Exception:
            self.log.exception("gateway_connection_failed")
        finally:
            self._connections.discard(conn)
            with anyio.CancelScope(shield=True), suppress(Exception):
                await stream.aclose()
            if self._closing and not self._connections:
                self._drained.set()

    async def _turn_away(self, stream: anyio.abc.ByteStream, raw: socket.socket | None) -> None:
        """503 without reading the request, then close: too many connections, or closing."""
        limit = self.max_connections()
        message = ("the daemon is shutting down" if self._closing else
                   f"too many connections to the front door (limit {limit}); retry later")
        self.log.warning("gateway_connection_refused", reason=message)
        headers, body = self.refusal(503, "too_many_connections", message)
        head = b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers) + (
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
            .encode())
        with suppress(Exception), anyio.move_on_after(1.0):
            await send_all(stream, head + body, raw)
        with anyio.CancelScope(shield=True), suppress(Exception):
            await stream.aclose()

    async def _serve_connection(self, conn: _Connection) -> None:
        first = True
        while not conn.closing and not self._closing:
            request = await self._read_request(conn, first)
            first = False
            if request is None:
                return
            reply = Reply(conn)
            await self._run_handler(conn, request, reply)
            if not reply.finished or reply.aborted:
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _reader(self, conn: _Connection) -> None:
        """Read the client's bytes into h11 for the connection's whole life, a bounded amount
        ahead of what the requests have used; at the end of the stream, cancel the request
        being served (the client hung up)."""
        while True:
            while len(conn.h11.trailing_data[0]) > MAX_HEADER_BYTES + self.max_body():
                conn.consumed = anyio.Event()
                await conn.consumed.wait()
            data = await receive(conn.stream, conn.raw)
            if not data:
                conn.eof = True
                with suppress(RuntimeError):
                    conn.h11.receive_data(b"")
                if conn.handler_scope is not None:
                    conn.handler_scope.cancel()
                conn.arrived.set()
                return
            conn.h11.receive_data(data)
            conn.arrived.set()

    async def _run_handler(self, conn: _Connection, request: DoorRequest, reply: Reply) -> None:
        """Run the handler; a hang-up (seen by the reader) cancels it at once."""
        with anyio.CancelScope() as scope:
            conn.handler_scope = scope
            if conn.eof:
                scope.cancel()
            try:
                await self.handler(request, reply)
            except ClientGone:
                reply.abort()
            except Exception:
                self.log.exception("gateway_handler_failed", method=request.method,
                                   path=request.path)
                if not reply.started:
                    headers, body = self.refusal(500, "internal_error",
                                                 "internal error in the front door; the "
                                                 "daemon log has the details")
                    with suppress(ClientGone):
                        await reply.complete(500, headers, body)
                else:
                    reply.abort()
        conn.handler_scope = None
        if scope.cancelled_caught:
            reply.abort()

    async def _read_request(self, conn: _Connection, first: bool) -> DoorRequest | None:
        idle = READ_TIMEOUT if first else KEEPALIVE_TIMEOUT
        deadline: float | None = None
        request: DoorRequest | None = None
        body = bytearray()
        limit = self.max_body()
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    if conn.h11.they_are_waiting_for_100_continue:
                        await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                    if deadline is None:
                        with anyio.CancelScope(deadline=anyio.current_time() + idle) as scope:
                            conn.idle_scope = scope
                            await conn.more()
                        conn.idle_scope = None
                        if scope.cancelled_caught:
                            return None
                        deadline = anyio.current_time() + READ_TIMEOUT
                        continue
                    with anyio.move_on_at(deadline):
                        await conn.more()
                        continue
                    await self._refuse(conn, 408, "request_timeout",
                                       f"the request did not arrive within {READ_TIMEOUT:g} s")
                    return None
                if isinstance(event, h11.Request):
                    # h11 bounds a head still arriving; one that came whole in a read or two
                    # is measured here, so the cap holds however the bytes were split
                    size = len(event.target) + sum(len(k) + len(v) + 4
                                                   for k, v in event.headers)
                    if size > MAX_HEADER_BYTES:
                        await self._refuse(conn, 413, "request_too_large",
                                           f"request head of about {size} bytes is over the "
                                           f"limit of {MAX_HEADER_BYTES} bytes")
                        return None
                    length = _content_length(event)
                    if length is not None and length > limit:
                        await self._refuse(conn, 413, "request_too_large",
                                           f"request body of {length} bytes is over the limit "
                                           f"of {limit} bytes (gateway.max_request_bytes)")
                        return None
                    request = _head(event)
                    if self.admit is not None:
                        refused = self.admit(request)
                        if refused is not None:
                            await self._close_with(conn, *refused)
                            return None
                    deadline = deadline or anyio.current_time() + READ_TIMEOUT
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        await self._refuse(conn, 413, "request_too_large",
                                           f"request body is over the limit of {limit} bytes "
                                           "(gateway.max_request_bytes)")
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    request.body = bytes(body)
                    return request
                else:  # ConnectionClosed, PAUSED
                    return None
        except h11.RemoteProtocolError as exc:
            status = 413 if exc.error_status_hint == 431 else exc.error_status_hint
            await self._refuse(conn, status, "bad_request", f"malformed HTTP request: {exc}")
            return None

    async def _refuse(self, conn: _Connection, status: int, code: str, message: str) -> None:
        self.log.info("gateway_request_refused", status=status, code=code, reason=message)
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers, body = self.refusal(status, code, message)
        await self._close_with(conn, status, headers, body)

    async def _close_with(self, conn: _Connection, status: int,
                          headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Answer, then close the connection (what the client still sends is dropped)."""
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        head = h11.Response(status_code=status, reason=_reason(status),
                            headers=[*headers, (b"content-length", str(len(body)).encode()),
                                     (b"connection", b"close")])
        with suppress(ClientGone, h11.LocalProtocolError):
            await conn.send(head, h11.Data(data=body), h11.EndOfMessage())
            # let the client read the answer rather than a reset: the reader drains the rest
            # of what it sends for a moment, until it closes
            with suppress(Exception), anyio.move_on_after(0.5):
                await conn.stream.send_eof()
                while not conn.eof:
                    conn.h11 = h11.Connection(h11.SERVER)  # what arrives now is dropped
                    await conn.more()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _head(event: h11.Request) -> DoorRequest:
    target = event.target.decode("ascii", "replace")
    return DoorRequest(method=event.method.decode("ascii", "replace"),
                       path=target.partition("?")[0],
                       headers=[(k.decode("latin-1").lower(), v.decode("latin-1"))
                                for k, v in event.headers])


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


