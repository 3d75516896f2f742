"""What the HTTP servers deal in: requests, responses, errors, the peer and the limits.

Shared by the control socket and the front door; plain data, no I/O.
"""

from __future__ import annotations

import json as jsonlib
import math
import re
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.model import encodable


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
        self.headers: tuple[tuple[str, str], ...] = ()  # e.g. Retry-After on a 429

    def to_response(self, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """The JSON error response."""
        return Response.json(
            error_body(self.code, self.message, **self.extra), self.status,
            headers=[*self.headers, *headers],
        )

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.code!r}, {self.message!r})"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error document every route answers with: ``{"error": {"code", "message", ...}}``."""
    return {"error": {"code": code, "message": message, **extra}}


#: Deepest nesting of arrays and objects a JSON body may have: far beyond any request the
#: daemon takes, far below what would exhaust the interpreter's recursion limit.
MAX_JSON_DEPTH = 64
# a lone surrogate can only come from a \uD800-\uDFFF escape or from the bytes ED A0..BF
# (which json.loads lets through with "surrogatepass"); a body without either has none
_SURROGATE_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class _BadNumber(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:40]} is out of range (not a finite double)")
    return value


def _no_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON number")


def parse_json(body: bytes, what: str) -> Any:
    """``body`` parsed as strict JSON, or ``HTTPError(400, "invalid_json")`` saying why not.

    Beyond the JSON grammar it refuses what would break the daemon later: nesting deeper than
    ``MAX_JSON_DEPTH`` (a RecursionError, or an error reply that cannot be written),
    ``NaN``/``Infinity`` and numbers out of range (``1e999``; integers past Python's limit
    of 4,300 digits), and strings holding a lone surrogate (``"\\ud800"``: valid JSON
    syntax, but no UTF-8 encoding exists for it, so it could not be logged, saved or echoed
    back). The checks cost little beyond the parse itself: a body of a million integers
    is not walked in Python.
    """
    try:
        data = jsonlib.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise HTTPError(400, "invalid_json", f"{what} is not UTF-8: {exc}") from None
    except _BadNumber as exc:
        raise HTTPError(400, "invalid_json", f"{what} is not usable JSON: {exc}") from None
    except RecursionError:
        raise HTTPError(400, "invalid_json", f"{what} is nested too deeply (more than "
                        f"{MAX_JSON_DEPTH} levels of arrays and objects)") from None
    except ValueError as exc:
        raise HTTPError(400, "invalid_json", f"{what} is not valid JSON: {exc}") from None
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(data, MAX_JSON_DEPTH):
        raise HTTPError(400, "invalid_json", f"{what} is nested too deeply (more than "
                        f"{MAX_JSON_DEPTH} levels of arrays and objects)")
    if (b"\\u" in body or b"\xed" in body) and _SURROGATE_RE.search(body):
        problem = _json_problem(data)
        if problem:
            raise HTTPError(400, "invalid_json", f"{what} is not usable JSON: {problem}")
    return data


def _too_deep(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects more than ``limit`` deep. Level by level,
    containers only: a chat body of long strings costs a few item checks per message."""
    level = [data]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner: list[Any] = []
        for value in level:
            items = list(value.values()) if type(value) is dict else value
            kinds = set(map(type, items))  # no Python-level step per item: a list of a
            if dict in kinds or list in kinds:  # million numbers is looked at in C
                inner.extend(item for item in items if type(item) in (dict, list))
        level = inner
    return False


def _json_problem(data: Any) -> str:
    """What makes parsed JSON unusable (too deep, a lone surrogate), with where; or ""."""
    stack: list[tuple[Any, str, int]] = [(data, "$", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if not encodable(value):
                return f"the string at {where} holds a lone surrogate (not valid Unicode)"
            continue
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth >= MAX_JSON_DEPTH:
            return (f"nested too deeply at {where} (more than {MAX_JSON_DEPTH} levels of "
                    "arrays and objects)")
        for key, item in items:
            if isinstance(key, str):
                if not encodable(key):
                    return f"a key in {where} holds a lone surrogate (not valid Unicode)"
                inner = f"{where}.{key}" if len(where) < 200 else where
            else:
                inner = f"{where}[{key}]" if len(where) < 200 else where
            stack.append((item, inner, depth + 1))
    return ""


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
        """The body parsed as JSON; an empty body is ``{}``. Raises ``HTTPError(400)``
        naming what is wrong (see :func:`parse_json`)."""
        if not self.body.strip():
            return {}
        return parse_json(self.body, "request body")


@dataclass(slots=True)
class Response:
    """A complete response."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """Compact UTF-8 JSON, ``application/json``.

        A lone surrogate that reached a reply anyway (from a path, a probe, a saved state) is
        written as its JSON escape (``\\ud800``) instead of failing the whole reply."""
        body = jsonlib.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "backslashreplace")
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
