"""Upstream replies as probes see them: the reply, its error message, and one-line reasons.

Everything here turns what a server sent (or failed to send) into what an operator reads:
``UpstreamError`` for an exchange that did not complete, ``Reply`` for one that did, and the
helpers that name a failure ("connection refused", "redirected (HTTP 302) to ...",
"unauthorized (check api_key_env)").
"""

from __future__ import annotations

import errno
import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

T = TypeVar("T")

#: Longest reason kept in a result; reasons are one line for logs, tables and the API.
MAX_REASON_CHARS = 300


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
    every probe that asked for the same request, so treat it as read-only; what a probe
    derives from it once for all its sharers (an index of a model list) goes through
    :meth:`derived`, which keeps it exactly as long as the reply itself.
    """

    method: str
    url: str
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    elapsed_ms: float
    data: Any = None
    json_error: str | None = None
    _derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def derived(self, key: str, build: Callable[[Reply], T]) -> T:
        """``build(self)``, computed once per reply and shared by every probe reading it.

        The value lives on the reply, so it is gone with the reply once the probes that
        shared it are done: nothing outlives the sweep. ``key`` names what is derived
        (prefix it with the plugin's name).
        """
        try:
            value: T = self._derived[key]
        except KeyError:
            value = self._derived[key] = build(self)
        return value

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


def parse_json_body(body: bytes, headers: Mapping[str, str]) -> tuple[Any, str | None]:
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


