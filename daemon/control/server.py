"""The control socket's HTTP/1.1 server: h11 framing over any anyio listener, with limits.

h11 does the HTTP framing. This module owns only what h11 leaves to a server: the connection
loop, keep-alive, the limits a local daemon needs so that no client can hurt it (header and
body size, a read deadline per request, a cap on connections, a write deadline), the shares
that keep one local user from locking out the others (connections and streams per peer uid, a
reserve for admins, idle connections of the biggest holder closed to make room), streaming
responses, and a graceful shutdown. Routing lives in the handler (``daemon.control.api``).

Usage, from a supervisor::

    listener = await create_unix_listener(cfg.daemon.socket, cfg.daemon.socket_mode)  # listeners.py
    server = HTTPServer(api.handle, Limits(max_connections=cfg.daemon.max_connections), log)
    await tg.start(server.serve, listener)
    ...
    await server.shutdown(grace=cfg.daemon.shutdown_grace)
"""

from __future__ import annotations

import errno
import json as jsonlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.stapled
import h11
import structlog

from .messages import (
    Handler,
    HTTPError,
    Limits,
    Peer,
    Request,
    Response,
    StreamingResponse,
    error_body,
)
from .sockio import receive, send_all, unix_socket

SERVER_NAME = b"modeld"
#: connections being answered "no" at once; beyond this a refused connection is closed
#: without an answer, so a client reconnecting in a loop cannot pile up descriptors
_MAX_TURNING_AWAY = 1024
#: one log line per peer and reason per this many seconds (a hog retrying floods no journal)
_REFUSAL_LOG_INTERVAL = 10.0


def peer_credentials(stream: anyio.abc.ByteStream) -> Peer | None:
    """The peer's pid, uid and gid if ``stream`` is a Unix socket, else None."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is None or raw.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid, _peer_groups(raw))


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def _peer_groups(raw: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups as the kernel recorded them at connect time: unlike
    /proc/<pid>, they cannot be swapped by a process that exits and lets its pid be reused."""
    try:
        data = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)  # up to 256 groups
    except OSError:
        return None
    count = len(data) // 4
    return tuple(struct.unpack(f"{count}I", data[: count * 4]))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# ----------------------------------------------------------------------------- the server


class _ClientGone(Exception):
    """The client closed, reset, or stopped reading; nothing more can be said to it."""


@dataclass(eq=False)
class _Connection:
    stream: anyio.abc.ByteStream
    peer: Peer | None
    h11: h11.Connection
    idle_scope: anyio.CancelScope | None = None  # set while waiting for a request's first byte
    stream_scope: anyio.CancelScope | None = None  # set while sending a streaming body
    in_flight: bool = False
    closing: bool = False
    admin: bool = False  # may use the admin reserve; held to no per-peer share
    evicted: bool = False  # closed to make room for another peer; no longer counted
    log: Any = None
    raw: socket.socket | None = None  # the Unix socket under ``stream``, looked up once


@dataclass(eq=False)
class _Serving:
    accept_scope: anyio.CancelScope
    conn_group: anyio.abc.TaskGroup
    done: anyio.Event


class HTTPServer:
    """An HTTP/1.1 server calling ``handler`` for every request.

    ``serve`` may be started once per listener (they share the limits and the shutdown).
    """

    def __init__(
        self,
        handler: Handler,
        limits: Limits | None = None,
        log: Any | None = None,
        is_admin: Callable[[Peer | None], bool] | None = None,
    ) -> None:
        self.handler = handler
        #: may be replaced while serving (a reload); each new connection reads it
        self.limits = limits or Limits()
        self.log = log if log is not None else structlog.get_logger("modeld.http")
        #: whether a peer may use the admin reserve and is exempt from the per-peer shares
        self.is_admin = is_admin or (lambda peer: False)
        self._connections: set[_Connection] = set()
        self._by_peer: Counter[int | None] = Counter()  # open connections per uid
        self._evicted = 0  # connections closing to make room, still in _connections
        self._streams_by_peer: Counter[int | None] = Counter()
        self._refusals_logged: dict[tuple[int | None, str], tuple[float, int]] = {}
        self._servings: list[_Serving] = []
        self._turning_away = 0
        self._closing = False
        self._drained = anyio.Event()

    @property
    def connections(self) -> int:
        """Connections open now (not counting ones being turned away)."""
        return len(self._connections)

    def connections_by_peer(self) -> dict[int | None, int]:
        """Open connections per peer uid (None: peers without credentials)."""
        return dict(self._by_peer)

    @property
    def in_flight(self) -> int:
        """Requests whose head has arrived and whose response is not yet complete."""
        return sum(1 for conn in self._connections if conn.in_flight)

    @property
    def closing(self) -> bool:
        """Whether shutdown has begun."""
        return self._closing

    async def serve(
        self,
        listener: anyio.abc.Listener[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections on ``listener`` until ``shutdown`` (or cancellation).

        Calls ``task_status.started()`` once accepting. Closes the listener when accepting
        stops, then returns when every connection has finished.
        """
        if self._closing:
            raise RuntimeError("this server has been shut down")
        done = anyio.Event()
        try:
            async with anyio.create_task_group() as conn_group:
                serving = _Serving(anyio.CancelScope(), conn_group, done)
                self._servings.append(serving)
                try:
                    with serving.accept_scope:
                        task_status.started()
                        await self._accept_loop(listener, conn_group)
                finally:
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()
        finally:
            done.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let in-flight requests finish within ``grace`` s, then cancel the rest.

        Idle keep-alive connections are closed at once and open streams are ended cleanly
        (their chunked body is terminated). Returns when every ``serve`` has returned.
        """
        self._closing = True
        for serving in self._servings:
            serving.accept_scope.cancel()
        for conn in list(self._connections):
            self._wind_down(conn)
        if self._connections or self._turning_away:
            with anyio.move_on_after(grace):
                await self._drained.wait()
        if self._connections:
            self.log.warning(
                "http_shutdown_cancelled_requests",
                connections=len(self._connections),
                in_flight=self.in_flight,
            )
        for serving in self._servings:
            serving.conn_group.cancel_scope.cancel()
        for serving in self._servings:
            await serving.done.wait()

    @staticmethod
    def _wind_down(conn: _Connection) -> None:
        conn.closing = True
        if conn.idle_scope is not None:
            conn.idle_scope.cancel()
        if conn.stream_scope is not None:
            conn.stream_scope.cancel()

    # ------------------------------------------------------------------ accepting

    async def _accept_loop(
        self, listener: anyio.abc.Listener[Any], conn_group: anyio.abc.TaskGroup
    ) -> None:
        if isinstance(listener, anyio.streams.stapled.MultiListener):
            async with anyio.create_task_group() as group:
                for sub in listener.listeners:
                    group.start_soon(self._accept_loop, sub, conn_group)
            return
        accept = getattr(listener, "accept", None)
        if accept is None:  # a listener we do not know: let it accept for us
            await listener.serve(self._on_connect, conn_group)
            return
        while True:
            try:
                stream = await accept()
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors: back off instead of spinning; clients wait in the backlog.
                self.log.error("http_accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            conn_group.start_soon(self._on_connect, stream)

    async def _on_connect(self, stream: anyio.abc.ByteStream) -> None:
        if self._closing:
            await self._turn_away(stream, 503, "shutting_down", "the daemon is shutting down")
            return
        peer = peer_credentials(stream)
        admin = self._admin(peer)
        refusal = self._admission(peer, admin)
        if refusal is not None:
            await self._turn_away(stream, *refusal, peer=peer)
            return
        conn = _Connection(
            stream=stream,
            peer=peer,
            h11=h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes),
            log=self.log,
            raw=unix_socket(stream),
            admin=admin,
        )
        key = _peer_key(peer)
        self._connections.add(conn)
        self._by_peer[key] += 1
        try:
            await self._serve_connection(conn)
        except _ClientGone:
            pass
        except Exception:
            # The loop already turns every request-level error into a response; reaching here
            # is a bug in this module. Log it; never let it take the server down.
            self.log.exception("http_connection_failed")
        finally:
            self._connections.discard(conn)
            _release(self._by_peer, key)
            if conn.evicted:
                self._evicted -= 1
            with anyio.CancelScope(shield=True):
                await _close(stream)
            self._check_drained()

    def _admin(self, peer: Peer | None) -> bool:
        limits = self.limits
        if not (limits.admin_reserve or limits.max_connections_per_peer
                or limits.max_streams_per_peer):
            return False  # nothing to be exempt from: spare the lookup
        try:
            return self.is_admin(peer)
        except Exception:  # a failing group lookup must not take the accept path down
            self.log.exception("http_admin_check_failed")
            return False

    def _admission(self, peer: Peer | None, admin: bool) -> tuple[int, str, str] | None:
        """Why a new connection from ``peer`` is refused (status, code, message), or None.

        The total is a hard cap for everyone. Below it, the last ``admin_reserve``
        connections are for admins only, and a peer (uid) that is not an admin may hold at
        most ``max_connections_per_peer``: one local user holding connections can lock out
        neither the admins nor the other users.

        When every connection a newcomer may use is taken, an idle keep-alive connection
        (between requests) of the peer holding the most is closed to make room, if that
        peer holds more than the newcomer's would then (any non-admin's, for an admin): so
        even several uids together cannot keep the others out with idle connections.
        """
        limits = self.limits
        sharing = bool(limits.admin_reserve or limits.max_connections_per_peer)
        key = _peer_key(peer)
        cap = limits.max_connections_per_peer
        if cap and not admin and self._by_peer[key] >= cap:
            return (429, "too_many_connections",
                    f"{_peer_name(peer)} already holds {cap} connections, the most one peer "
                    "may (control.max_connections_per_peer); close idle ones or retry later")
        total = len(self._connections) - self._evicted
        limit = limits.max_connections if admin else limits.max_connections - limits.admin_reserve
        if total < limit or (sharing and self._evict_idle(key, admin)):
            return None
        if total >= limits.max_connections:
            return (503, "too_many_connections",
                    f"too many connections (limit {limits.max_connections}); retry later")
        return (503, "too_many_connections",
                f"all {limit} connections open to every peer are in use (the other "
                f"{limits.admin_reserve} are reserved for admins); retry later")

    def _evict_idle(self, newcomer: int | None, admin: bool) -> bool:
        """Close an idle connection of the non-admin peer holding the most connections, if
        that is fairer than refusing the newcomer; whether one was closed."""
        victim: _Connection | None = None
        most = 0
        for conn in self._connections:
            if conn.admin or conn.closing or conn.idle_scope is None:
                continue
            held = self._by_peer[_peer_key(conn.peer)]
            if held > most:
                victim, most = conn, held
        if victim is None:
            return False
        if not admin and most <= self._by_peer[newcomer] + 1:
            return False  # the newcomer's peer would hold as many: already fair
        victim.evicted = True
        self._evicted += 1
        self._wind_down(victim)
        uid = _peer_key(victim.peer)
        suppressed = self._throttle(uid, "evicted")
        if suppressed is not None:
            self.log.info("http_connection_evicted", uid=uid, held=most, for_uid=newcomer,
                          reason="idle keep-alive connection closed to make room for another "
                          "peer", suppressed_since_last=suppressed)
        return True

    def _check_drained(self) -> None:
        if self._closing and not self._connections and not self._turning_away:
            self._drained.set()

    def _log_refusal(self, peer: Peer | None, code: str, message: str) -> None:
        """Warn about a refused peer, at most once per peer and reason per interval."""
        suppressed = self._throttle(_peer_key(peer), code)
        if suppressed is not None:
            self.log.warning("http_connection_refused", code=code, reason=message,
                             uid=peer.uid if peer else None, pid=peer.pid if peer else None,
                             suppressed_since_last=suppressed)

    def _throttle(self, uid: int | None, what: str) -> int | None:
        """None when a line about ``what`` for ``uid`` was logged within the interval, else
        how many were left out since the last one (a hog retrying floods no journal)."""
        key = (uid, what)
        now = time.monotonic()
        last, suppressed = self._refusals_logged.get(key, (-_REFUSAL_LOG_INTERVAL, 0))
        if now - last < _REFUSAL_LOG_INTERVAL:
            self._refusals_logged[key] = (last, suppressed + 1)
            return None
        if len(self._refusals_logged) > 4096:
            self._refusals_logged.clear()
        self._refusals_logged[key] = (now, 0)
        return suppressed

    async def _turn_away(
        self,
        stream: anyio.abc.ByteStream,
        status: int,
        code: str,
        message: str,
        peer: Peer | None = None,
    ) -> None:
        """Answer ``status`` without reading the request, then close."""
        self._log_refusal(peer, code, message)
        if self._turning_away >= _MAX_TURNING_AWAY:
            with anyio.CancelScope(shield=True):
                await _close(stream)
            return
        self._turning_away += 1
        body = jsonlib.dumps(error_body(code, message)).encode() + b"\n"
        head = (
            f"HTTP/1.1 {status} {_reason(status).decode()}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        ).encode()
        try:
            with anyio.move_on_after(1.0):
                await send_all(stream, head + body)
                await _linger(stream, 0.2)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self._turning_away -= 1
            with anyio.CancelScope(shield=True):
                await _close(stream)
            self._check_drained()

    # ------------------------------------------------------------------ one connection

    async def _serve_connection(self, conn: _Connection) -> None:
        first = True
        while not conn.closing:
            request = await self._read_request(conn, first)
            first = False
            if request is None:
                return
            conn.in_flight = True
            try:
                keep_going = await self._respond(conn, request)
            finally:
                conn.in_flight = False
            if not keep_going or conn.h11.our_state is h11.MUST_CLOSE:
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _read_request(self, conn: _Connection, first: bool) -> Request | None:
        """The next complete request, or None when the connection should just close."""
        limits = self.limits
        # Before the first byte the connection is idle: the keep-alive timeout applies (the read
        # timeout for a connection's first request: connecting and saying nothing is a slowloris
        # too). From the first byte on, the whole request must arrive within the read timeout.
        idle_deadline = anyio.current_time() + (
            limits.read_timeout if first else limits.keepalive_timeout
        )
        deadline: float | None = None
        head: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    if conn.h11.they_are_waiting_for_100_continue:
                        await self._send(
                            conn, h11.InformationalResponse(status_code=100, headers=[])
                        )
                    if deadline is None and not conn.h11.trailing_data[0]:
                        data = await self._receive_idle(conn, idle_deadline)
                        if data is None:
                            return None
                        deadline = anyio.current_time() + limits.read_timeout
                        conn.h11.receive_data(data)
                        continue
                    if deadline is None:  # pipelined bytes of this request were buffered
                        deadline = anyio.current_time() + limits.read_timeout
                    with anyio.move_on_at(deadline):
                        conn.h11.receive_data(await receive(conn.stream, conn.raw))
                        continue
                    await self._refuse(
                        conn,
                        408,
                        "request_timeout",
                        f"the request did not arrive within {limits.read_timeout:g} s",
                        linger=0,  # a slow client gets no extra time
                    )
                    return None
                elif isinstance(event, h11.Request):
                    head = event
                    if event.http_version not in (b"1.0", b"1.1"):
                        await self._refuse(
                            conn,
                            505,
                            "bad_request",
                            f"HTTP/{event.http_version.decode()} is not supported; use HTTP/1.1",
                        )
                        return None
                    length = _content_length(event)
                    if length is not None and length > limits.max_body_bytes:
                        await self._refuse(
                            conn,
                            413,
                            "body_too_large",
                            f"request body of {length} bytes is over the limit "
                            f"of {limits.max_body_bytes} bytes",
                        )
                        return None
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body_bytes:
                        await self._refuse(
                            conn,
                            413,
                            "body_too_large",
                            f"request body is over the limit of {limits.max_body_bytes} bytes",
                        )
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return _make_request(head, bytes(body), conn.peer)
                elif isinstance(event, h11.ConnectionClosed):
                    return None
                else:  # pragma: no cover - h11 yields nothing else to a server here
                    return None
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                await self._refuse(
                    conn,
                    413,
                    "headers_too_large",
                    f"request line and headers are over the limit of "
                    f"{limits.max_header_bytes} bytes",
                )
            else:
                await self._refuse(
                    conn, exc.error_status_hint, "bad_request", f"malformed HTTP request: {exc}"
                )
            return None

    async def _receive_idle(self, conn: _Connection, deadline: float) -> bytes | None:
        """The first bytes of the next request; None on timeout, shutdown or EOF."""
        if conn.closing:
            return None
        with anyio.CancelScope(deadline=deadline) as scope:
            conn.idle_scope = scope
            try:
                data = await receive(conn.stream, conn.raw)
            finally:
                conn.idle_scope = None
        if scope.cancelled_caught:
            return None
        return data or None

    async def _respond(self, conn: _Connection, request: Request) -> bool:
        """Run the handler and send its answer; whether the connection may be reused."""
        try:
            result = await self.handler(request)
            if not isinstance(result, Response | StreamingResponse):
                raise TypeError(f"handler returned {type(result).__name__}, not a Response")
        except HTTPError as exc:
            result = exc.to_response()
        except Exception:
            self.log.exception(
                "http_handler_failed",
                method=request.method,
                path=request.path,
                peer_pid=request.peer.pid if request.peer else None,
            )
            result = HTTPError(
                500,
                "internal_error",
                f"internal error while handling {request.method} {request.path}; "
                "the daemon log has the details",
            ).to_response()
        if isinstance(result, StreamingResponse):
            await self._send_stream(conn, request, result)
            return False
        await self._send_response(conn, request, result)
        return True

    def _head(
        self,
        status: int,
        content_type: str,
        extra: Sequence[tuple[str, str]],
        length: int | None,
        close: bool,
    ) -> h11.Response:
        headers: list[tuple[bytes, bytes]] = [
            (b"server", SERVER_NAME),
            (b"content-type", content_type.encode()),
        ]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        headers.extend((k.encode(), v.encode()) for k, v in extra)
        if close:
            headers.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=headers, reason=_reason(status))

    async def _send_response(self, conn: _Connection, request: Request, resp: Response) -> None:
        close = conn.closing or self._closing
        head = self._head(resp.status, resp.content_type, resp.headers, len(resp.body), close)
        events: list[h11.Event] = [head]
        if request.method != "HEAD" and resp.body:
            events.append(h11.Data(data=resp.body))
        events.append(h11.EndOfMessage())
        await self._send(conn, *events)

    async def _send_stream(
        self, conn: _Connection, request: Request, resp: StreamingResponse
    ) -> None:
        chunks = resp.chunks
        key = _peer_key(conn.peer)
        counted = False
        try:
            cap = self.limits.max_streams_per_peer
            if cap and not conn.admin and self._streams_by_peer[key] >= cap:
                message = (f"{_peer_name(conn.peer)} already holds {cap} streams, the most one "
                           "peer may (control.max_followers_per_peer); close one first")
                self._log_refusal(conn.peer, "too_many_streams", message)
                conn.closing = True
                refusal = HTTPError(429, "too_many_streams", message)
                await self._send_response(conn, request,
                                          refusal.to_response(headers=[("Retry-After", "1")]))
                return
            self._streams_by_peer[key] += 1
            counted = True
            head = self._head(resp.status, resp.content_type, resp.headers, None, True)
            await self._send(conn, head)
            if request.method == "HEAD":
                return
            conn.in_flight = False  # a stream is not a request a shutdown should wait for
            hung_up = anyio.Event()
            gone = False
            with anyio.CancelScope() as scope:
                conn.stream_scope = scope
                if conn.closing:
                    scope.cancel()
                async with anyio.create_task_group() as group:
                    group.start_soon(_watch_for_hangup, conn.stream, scope, hung_up)
                    try:
                        async for chunk in chunks:
                            if chunk:
                                await self._send(conn, h11.Data(data=chunk))
                    except _ClientGone:
                        gone = True
                    except Exception:
                        self.log.exception("http_stream_failed", path=request.path)
                    group.cancel_scope.cancel()
            conn.stream_scope = None
            if gone or hung_up.is_set():
                return
            # Ended by its source or by shutdown: terminate the chunked body properly.
            await self._send(conn, h11.EndOfMessage())
        finally:
            if counted:
                _release(self._streams_by_peer, key)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), suppress(Exception):
                    await aclose()

    async def _refuse(
        self, conn: _Connection, status: int, code: str, message: str, linger: float = 1.0
    ) -> None:
        """Answer an unusable request with an error, then close (after draining a little)."""
        self.log.info("http_request_refused", status=status, code=code, reason=message)
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        resp = HTTPError(status, code, message).to_response()
        head = self._head(resp.status, resp.content_type, (), len(resp.body), True)
        try:
            await self._send(conn, head, h11.Data(data=resp.body), h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        # Read (and drop) what the client is still sending, so it gets to read our answer
        # instead of a reset; bounded so this cannot hold a slot.
        with suppress(Exception):
            await conn.stream.send_eof()
        if conn.closing or linger <= 0:
            return
        with anyio.CancelScope() as scope:
            conn.idle_scope = scope  # shutdown cuts the lingering short
            await _linger(conn.stream, linger)
        conn.idle_scope = None

    async def _send(self, conn: _Connection, *events: h11.Event) -> None:
        data = b"".join(chunk for e in events if (chunk := conn.h11.send(e)) is not None)
        if not data:
            return
        if conn.raw is not None:
            # the common case: the kernel takes the whole answer at once, so no timeout
            # needs arming; what it does not take is sent below under the write timeout
            try:
                sent = conn.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _ClientGone(str(exc)) from exc
            if sent == len(data):
                return
            data = data[sent:]
        try:
            with anyio.fail_after(self.limits.write_timeout):
                await send_all(conn.stream, data, conn.raw)
        except TimeoutError as exc:
            raise _ClientGone("write timed out") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise _ClientGone(str(exc)) from exc




def _peer_key(peer: Peer | None) -> int | None:
    """What a per-peer share is counted by: the uid (None: a peer without credentials)."""
    return peer.uid if peer is not None else None


def _peer_name(peer: Peer | None) -> str:
    return f"uid {peer.uid}" if peer is not None else "this peer"


def _release(counts: Counter[int | None], key: int | None) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


async def _watch_for_hangup(
    stream: anyio.abc.ByteStream, scope: anyio.CancelScope, hung_up: anyio.Event
) -> None:
    """End a streaming response as soon as the client hangs up (the stream may be idle)."""
    while await receive(stream):
        pass
    hung_up.set()
    scope.cancel()


async def _linger(stream: anyio.abc.ByteStream, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        while await receive(stream):
            pass


async def _close(stream: anyio.abc.ByteStream) -> None:
    with suppress(Exception):
        await stream.aclose()


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


def _make_request(head: h11.Request, body: bytes, peer: Peer | None) -> Request:
    target = head.target.decode("ascii", "replace")
    raw_path, _, raw_query = target.partition("?")
    if raw_path.startswith(("http://", "https://")):  # absolute-form
        raw_path = "/" + raw_path.split("://", 1)[1].partition("/")[2]
    return Request(
        method=head.method.decode("ascii", "replace"),
        path=unquote(raw_path, errors="replace"),
        query=parse_qs(raw_query, keep_blank_values=True),
        headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers],
        body=body,
        peer=peer,
        target=target,
    )


