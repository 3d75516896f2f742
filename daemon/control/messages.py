"""What the HTTP servers deal in: requests, responses, errors, the peer and the limits.

Shared by the control socket and the front door; plain data, no I/O.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket, from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int
    #: supplementary groups at connect time (SO_PEERGROUPS); None where the kernel cannot say
    groups: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost the server."""

    max_header_bytes: int = 16 * 1024  # request line + headers; more → 413
    max_body_bytes: int = 1024 * 1024  # more → 413
    read_timeout: float = 10.0  # a whole request must arrive within this → else 408 and close
    keepalive_timeout: float = 30.0  # idle time between requests before the server closes
    write_timeout: float = 10.0  # a client that stops reading is dropped after this
    max_connections: int = 1024  # more → 503 and close
    #: per-peer shares (a peer is a uid, from SO_PEERCRED); 0: no cap. Admins are held only
    #: to ``max_connections`` and alone may use the last ``admin_reserve`` connections.
    max_connections_per_peer: int = 0  # more from one uid → 429 and close
    admin_reserve: int = 0
    max_streams_per_peer: int = 0  # streaming responses one uid may hold; more → 429


class HTTPError(Exception):
    """An error answer: rendered as ``{"error": {"code", "message", **extra}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def to_response(self, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """The JSON error response."""
        return Response.json(
            error_body(self.code, self.message, **self.extra), self.status, headers=headers
        )

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.code!r}, {self.message!r})"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error document every route answers with: ``{"error": {"code", "message", ...}}``."""
    return {"error": {"code": code, "message": message, **extra}}


@dataclass(slots=True)
class Request:
    """One HTTP request, complete with its body (bodies are small and capped)."""

    method: str
    path: str  # percent-decoded, without the query string
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]  # names lower-cased, in arrival order
    body: bytes = b""
    peer: Peer | None = None  # None over TCP
    target: str = ""  # the raw request target, for logs

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def query_one(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter ``name``."""
        values = self.query.get(name)
        return values[-1] if values else default

    def json(self) -> Any:
        """The body parsed as JSON; an empty body is ``{}``. Raises ``HTTPError(400)``."""
        if not self.body.strip():
            return {}
        try:
            return jsonlib.loads(self.body)
        except UnicodeDecodeError as exc:
            raise HTTPError(400, "invalid_json", f"request body is not UTF-8: {exc}") from exc
        except ValueError as exc:
            raise HTTPError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc


@dataclass(slots=True)
class Response:
    """A complete response."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """Compact UTF-8 JSON, ``application/json``."""
        body = jsonlib.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(status, body + b"\n", "application/json", headers)

    @classmethod
    def text(
        cls,
        text: str,
        status: int = 200,
        content_type: str = "text/plain; charset=utf-8",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """A text response (``/metrics`` uses this with the Prometheus content type)."""
        return cls(status, text.encode(), content_type, headers)


@dataclass(slots=True)
class StreamingResponse:
    """A response whose body is sent chunk by chunk (chunked transfer encoding) as it comes.

    The stream ends when ``chunks`` is exhausted, when the client goes away, or when the
    server shuts down; the connection is closed after it. If ``chunks`` has ``aclose`` it is
    called in every case, so an async generator's ``finally`` runs.
    """

    chunks: AsyncIterable[bytes]
    status: int = 200
    content_type: str = "application/x-ndjson"
    headers: Sequence[tuple[str, str]] = ()


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
