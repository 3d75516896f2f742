"""Fake upstream servers and model files, for tests, benchmarks and ``modeld demo``.

:class:`FakeOpenAI` speaks the OpenAI-compatible API as OpenAI, vLLM, SGLang, llama.cpp
server, llama-cpp-python or TGI do (``flavor=``), quirks, readiness routes and their failure
states included (a dead vLLM engine, a warming SGLang, a loading llama.cpp: see ``dead`` and
``loading`` in :data:`MODES`); :class:`FakeOllama` speaks Ollama's API. Both are written
on anyio and h11 directly so they can misbehave on purpose: see
:data:`MODES` (refuse connections, hang, drip the body, send 100 MB, reset mid-body, answer
with an HTML error page or broken JSON, redirect in a loop, 500, loading, 401, 429).

In an async test::

    async with FakeOllama(["llama3:8b"], loaded=["llama3:8b"]) as fake:
        ...  # fake.url, fake.count("GET", "/api/tags"), fake.set_mode("down")

From synchronous code (the daemon under test is a subprocess, a benchmark, the demo), run any
number of fakes on one background event loop::

    with FakeServers() as servers:
        fake = servers.start(FakeOpenAI(["qwen2.5-7b"], flavor="vllm"))
        fake.set_mode("hang")  # controls are safe to call from any thread

Every fake binds 127.0.0.1 on an ephemeral port (or the ``port`` given); ``down`` closes the
listener so connections are refused, and leaving ``down`` binds the same port again.

:func:`write_gguf` and :func:`write_safetensors` write small, valid model files.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import h11

__all__ = [
    "FLAVORS",
    "MODES",
    "FakeOllama",
    "FakeOpenAI",
    "FakeResponse",
    "FakeServers",
    "FakeUpstream",
    "write_gguf",
    "write_safetensors",
]

#: How a fake behaves; set with ``fake.set_mode(...)``.
MODES: frozenset[str] = frozenset({
    "normal",        # answer as the real server would
    "down",          # listener closed: connection refused (same port again when back)
    "hang",          # read the request, never answer
    "drip",          # send the headers, then one body byte per ``drip_interval`` seconds
    "huge",          # a 200 whose body is ``huge_size`` bytes (100 MB), chunked, streamed
    "reset",         # headers and half the body, then a TCP reset
    "html",          # 500 with an HTML error page
    "badjson",       # 200, Content-Type JSON, body that is not JSON
    "redirect",      # 302 to the same URL: a redirect loop
    "error500",      # 500 with the flavor's JSON error body
    "loading",       # still starting: llama.cpp's 503 "Loading model" (meta: null in its
                     # list), SGLang's warm-up (/health 503, the rest answers)
    "dead",          # up but cannot serve: vLLM's dead engine (lists, /health 503, chat 500),
                     # TGI unhealthy (/health 503), SGLang's stuck scheduler (/health hangs)
    "unauthorized",  # 401 with the flavor's error body
    "ratelimited",   # 429 with Retry-After
})

#: The OpenAI-compatible servers :class:`FakeOpenAI` can imitate.
FLAVORS: tuple[str, ...] = ("openai", "vllm", "sglang", "llamacpp", "llama-cpp-python", "tgi")

MAX_REQUEST_BODY = 1 << 20
_HUGE_CHUNK = 1 << 16

F = TypeVar("F", bound="FakeUpstream")


@dataclass(frozen=True, slots=True)
class FakeResponse:
    """What a fake answers to one request (before its mode shapes the delivery)."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


#: A response that never comes: the fake reads the request and waits forever.
HANG = FakeResponse(0)


def json_response(
    status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()
) -> FakeResponse:
    """A JSON response, serialised compactly as most servers do."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return FakeResponse(status, body, "application/json", tuple(headers))


def text_response(status: int, text: str, content_type: str = "text/plain") -> FakeResponse:
    """A plain-text (or other textual) response."""
    return FakeResponse(status, text.encode(), f"{content_type}; charset=utf-8")


_HTML_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head><title>500 Internal Server Error</title></head>\n"
    "<body>\n<center><h1>500 Internal Server Error</h1></center>\n"
    "<hr><center>nginx/1.24.0</center>\n</body>\n</html>\n"
)


def _stable_int(text: str, low: int, high: int) -> int:
    """A number in [low, high) derived from ``text``: fake sizes that do not change per run."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return low + digest % (high - low)


class FakeUpstream:
    """The HTTP machinery shared by the fakes: listener, modes, latency, request counts.

    Subclasses implement :meth:`route` (the normal answers) and may refine
    :meth:`error_response` and :meth:`loading_response` for their flavor.
    """

    #: The ``Server`` header sent with every response (None: none, as many servers do).
    server_header: str | None = "fake"

    def __init__(self, *, port: int = 0, latency: float = 0.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self._port = port
        self._latency = float(latency)
        self._mode = "normal"
        #: Seconds between body bytes in ``drip`` mode.
        self.drip_interval = 1.0
        #: Body size in ``huge`` mode.
        self.huge_size = 100 * 1024 * 1024
        self._counts: Counter[tuple[str, str]] = Counter()
        self._arrivals: deque[tuple[float, str, str]] = deque(maxlen=10_000)
        self._agents: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._last_bodies: dict[tuple[str, str], bytes] = {}
        self._last_headers: dict[tuple[str, str], dict[str, str]] = {}
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self._serve_scope: anyio.CancelScope | None = None
        self._accept_scope: anyio.CancelScope | None = None
        self._connection_scopes: set[anyio.CancelScope] = set()
        self._wake: anyio.Event | None = None
        self._settled: Any = None  # anyio.Event, created on the loop
        self._listening = False
        self._owned_tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ addresses, counters

    @property
    def port(self) -> int:
        """The TCP port (known once started)."""
        if not self._port:
            raise RuntimeError("the fake is not started yet: its port is not known")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    def count(self, method: str, path: str) -> int:
        """How many ``method path`` requests arrived (query strings ignored)."""
        with self._counts_lock:
            return self._counts[(method.upper(), path)]

    @property
    def total_requests(self) -> int:
        """How many requests arrived, all paths together."""
        with self._counts_lock:
            return sum(self._counts.values())

    def requests_from(self, user_agent_part: str) -> int:
        """How many requests came with a User-Agent containing ``user_agent_part``.

        modeld's User-Agent carries its pid (``modeld/0.1.0 (pid 1234)``), so a test can count
        one daemon's requests even when another process on the host reuses a freed port.
        """
        with self._counts_lock:
            return sum(n for agent, n in self._agents.items() if user_agent_part in agent)

    def requests(self) -> dict[tuple[str, str], int]:
        """A copy of the counters: (method, path) → requests."""
        with self._counts_lock:
            return dict(self._counts)

    def last_body(self, method: str, path: str) -> bytes | None:
        """The body of the latest ``method path`` request (None if there was none)."""
        with self._counts_lock:
            return self._last_bodies.get((method.upper(), path))

    def last_headers(self, method: str, path: str) -> dict[str, str] | None:
        """The headers (names lower-cased) of the latest ``method path`` request."""
        with self._counts_lock:
            return self._last_headers.get((method.upper(), path))

    def last_json(self, method: str, path: str) -> Any:
        """The latest ``method path`` request body, parsed as JSON."""
        body = self.last_body(method, path)
        return None if body is None else json.loads(body)

    def reset_counts(self) -> None:
        """Zero the request counters."""
        with self._counts_lock:
            self._counts.clear()
            self._arrivals.clear()
            self._agents.clear()
            self._last_bodies.clear()
            self._last_headers.clear()

    def arrivals(self, method: str, path: str) -> list[float]:
        """When each ``method path`` request arrived (``time.monotonic()``), oldest first;
        the latest 10,000 requests are kept."""
        with self._counts_lock:
            return [at for at, m, p in self._arrivals if (m, p) == (method.upper(), path)]

    # ------------------------------------------------------------------ controls

    @property
    def mode(self) -> str:
        """The current mode (one of :data:`MODES`)."""
        return self._mode

    @property
    def latency(self) -> float:
        """Seconds each response waits before it is sent."""
        return self._latency

    def set_mode(self, mode: str) -> None:
        """Switch mode, from any thread; returns once it is in force.

        From another thread this blocks until the listener is closed (``down``, with every
        open connection dropped) or bound again. Called on the fake's own event loop it
        cannot wait: use ``await fake.aset_mode(mode)`` there for ``down`` and back.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(sorted(MODES))}")
        token = self._token
        if token is None or threading.get_ident() == self._loop_thread:
            self._apply_mode(mode)
        else:
            anyio.from_thread.run(self.aset_mode, mode, token=token)

    async def aset_mode(self, mode: str) -> None:
        """Switch mode from the fake's event loop; returns once it is in force."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(sorted(MODES))}")
        self._apply_mode(mode)
        if self._token is None:
            return
        want_listening = mode != "down"
        while self._listening != want_listening or (
            not want_listening and self._connection_scopes
        ):
            await self._settled.wait()

    def set_latency(self, seconds: float) -> None:
        """Delay every response by ``seconds``. Any thread."""
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self._in_loop(setattr, self, "_latency", float(seconds))

    def stop(self) -> None:
        """Stop serving (connections are closed). Any thread."""
        self._in_loop(self._cancel_serve)

    def _in_loop(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func`` on the fake's event loop thread, or now when not started."""
        token = self._token
        if token is None or threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            anyio.from_thread.run_sync(func, *args, token=token)

    def _apply_mode(self, mode: str) -> None:
        self._mode = mode
        if mode == "down":
            if self._accept_scope is not None:
                self._accept_scope.cancel()
            for scope in list(self._connection_scopes):
                scope.cancel()
        if self._wake is not None:
            self._wake.set()

    def _changed(self) -> None:
        """Wake everyone waiting in :meth:`aset_mode` (the listener or connections changed)."""
        settled, self._settled = self._settled, anyio.Event()
        settled.set()

    def _cancel_serve(self) -> None:
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.serve)
        except BaseException as exc:
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._owned_tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._owned_tg = self._owned_tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve until cancelled or :meth:`stop`; reports started once the port is bound."""
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._wake = anyio.Event()
        self._settled = anyio.Event()
        listener: anyio.abc.SocketListener | None = None
        try:
            with anyio.CancelScope() as self._serve_scope:
                async with anyio.create_task_group() as tg:
                    listener = await self._bind()
                    task_status.started(self)
                    while True:
                        if self._mode == "down":
                            if listener is not None:
                                await listener.aclose()
                                listener = None
                                self._listening = False
                                self._changed()
                            await self._wake.wait()
                            self._wake = anyio.Event()
                            continue
                        if listener is None:
                            listener = await self._bind()
                        await self._accept_until_down(listener, tg)
        finally:
            self._listening = False
            self._token = None
            self._loop_thread = None
            self._serve_scope = None
            if listener is not None:  # last: in a cancelled scope this re-raises
                await anyio.aclose_forcefully(listener)

    async def _bind(self) -> anyio.abc.SocketListener:
        # Rebinding the same port right after closing it can briefly fail; try for a second.
        for attempt in range(50):
            try:
                multi = await anyio.create_tcp_listener(
                    local_host=self.host, local_port=self._port
                )
            except OSError:
                if not self._port or attempt == 49:
                    raise
                await anyio.sleep(0.02)
                continue
            listener = multi.listeners[0]
            assert isinstance(listener, anyio.abc.SocketListener)
            self._port = listener.extra(anyio.abc.SocketAttribute.local_port)
            self._listening = True
            self._changed()
            return listener
        raise AssertionError("unreachable")

    async def _accept_until_down(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        with anyio.CancelScope() as self._accept_scope:
            while self._mode != "down":
                try:
                    stream = await listener.accept()
                except OSError:  # EMFILE and friends: back off, do not die
                    await anyio.sleep(0.05)
                    continue
                tg.start_soon(self._connection, stream)
        self._accept_scope = None

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._connection_scopes.add(scope)
            try:
                await self._converse(stream)
            except (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                OSError,
                h11.ProtocolError,
            ):
                pass
            finally:
                self._connection_scopes.discard(scope)
                self._changed()
                # in a cancelled scope this re-raises the cancellation: keep it last
                await anyio.aclose_forcefully(stream)

    async def _converse(self, stream: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            request, body = await self._read_request(conn, stream)
            if request is None:
                return
            method = request.method.decode("ascii", "replace").upper()
            target = request.target.decode("ascii", "replace")
            path = target.split("?", 1)[0]
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            with self._counts_lock:
                self._counts[(method, path)] += 1
                self._arrivals.append((time.monotonic(), method, path))
                self._agents[headers.get("user-agent", "")] += 1
                if body:
                    self._last_bodies[(method, path)] = body
                self._last_headers[(method, path)] = dict(headers)
            mode = self._mode
            if mode == "hang":
                await anyio.sleep_forever()
            if self._latency:
                await anyio.sleep(self._latency)
            if body is None:
                response = json_response(413, {"error": "request body too large"})
            else:
                response = self._respond(mode, method, target, path, headers, body)
            if response is HANG:
                await anyio.sleep_forever()
            delay = self.extra_delay(path)
            if delay:
                await anyio.sleep(delay)
            keep_open = await self._deliver(conn, stream, response, mode)
            if not keep_open or conn.our_state is not h11.DONE:
                return
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, stream: anyio.abc.SocketStream
    ) -> tuple[h11.Request | None, bytes | None]:
        request: h11.Request | None = None
        body = bytearray()
        too_big = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                if len(body) + len(event.data) > MAX_REQUEST_BODY:
                    too_big = True
                else:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, None if too_big else bytes(body)
            else:  # ConnectionClosed, PAUSED
                return None, None

    def _respond(
        self,
        mode: str,
        method: str,
        target: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> FakeResponse:
        if mode == "html":
            return text_response(500, _HTML_PAGE, "text/html")
        if mode == "badjson":
            return FakeResponse(200, b'{"object": "list", "data": [{"id": "tru', "application/json")
        if mode == "redirect":
            return FakeResponse(302, b"", None, (("location", target),))
        if mode == "error500":
            return self.error_response(500, "Internal Server Error")
        if mode == "unauthorized":
            return self.error_response(401, "Unauthorized")
        if mode == "ratelimited":
            response = self.error_response(429, "Rate limit reached, please retry later")
            return FakeResponse(
                response.status,
                response.body,
                response.content_type,
                (*response.headers, ("retry-after", "1")),
            )
        if mode == "loading":
            loading = self.loading_response(method, path)
            if loading is not None:
                return loading
        if mode == "dead":
            dead = self.dead_response(method, path)
            if dead is not None:
                return dead
        try:
            return self.route(method, path, headers, body)
        except Exception as exc:  # a bug in a fake must show, not hang the client
            return text_response(500, f"fake server error: {type(exc).__name__}: {exc}")

    async def _deliver(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        response: FakeResponse,
        mode: str,
    ) -> bool:
        """Send ``response`` shaped by ``mode``; whether the connection may be reused."""
        headers: list[tuple[str, str]] = []
        if self.server_header:
            headers.append(("server", self.server_header))
        if response.content_type:
            headers.append(("content-type", response.content_type))
        headers.extend(response.headers)
        if mode == "huge":
            return await self._send_huge(conn, stream, headers)
        body = response.body
        headers.append(("content-length", str(len(body))))
        head = conn.send(h11.Response(status_code=response.status, headers=headers))
        assert head is not None
        if mode == "drip":
            await stream.send(head)
            for index in range(len(body)):
                await anyio.sleep(self.drip_interval)
                data = conn.send(h11.Data(data=body[index : index + 1]))
                assert data is not None
                await stream.send(data)
            end = conn.send(h11.EndOfMessage())
            assert end is not None
            await stream.send(end)
            return True
        if mode == "reset":
            data = conn.send(h11.Data(data=body[: len(body) // 2]))
            assert data is not None
            await stream.send(head + data)
            await anyio.sleep(0.05)  # let the client read the start, then pull the rug
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return False
        data = conn.send(h11.Data(data=body)) if body else b""
        end = conn.send(h11.EndOfMessage())
        assert data is not None and end is not None
        await stream.send(head + data + end)
        return True

    async def _send_huge(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        headers: list[tuple[str, str]],
    ) -> bool:
        headers = [(k, v) for k, v in headers if k != "content-type"]
        headers.append(("content-type", "application/json"))
        head = conn.send(h11.Response(status_code=200, headers=headers))  # chunked
        assert head is not None
        await stream.send(head)
        prefix = b'{"object":"list","data":['
        item = b'{"id":"filler","object":"model"},'
        filler = item * (_HUGE_CHUNK // len(item))
        sent = 0
        first = prefix + filler[len(prefix):]
        while sent < self.huge_size:
            chunk = first if sent == 0 else filler
            chunk = chunk[: self.huge_size - sent]
            data = conn.send(h11.Data(data=chunk))
            assert data is not None
            await stream.send(data)
            sent += len(chunk)
        tail = conn.send(h11.Data(data=b'{"id":"end"}]}'))
        end = conn.send(h11.EndOfMessage())
        assert tail is not None and end is not None
        await stream.send(tail + end)
        return True

    # ------------------------------------------------------------------ for subclasses

    def route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        """The normal answer to a request."""
        return text_response(404, "404 page not found")

    def error_response(self, status: int, message: str) -> FakeResponse:
        """An error in this server's own JSON shape."""
        return json_response(status, {"error": message})

    def loading_response(self, method: str, path: str) -> FakeResponse | None:
        """The answer while a model loads (None: answer normally)."""
        return json_response(
            503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        )

    def dead_response(self, method: str, path: str) -> FakeResponse | None:
        """The answer while the server is up but cannot serve (None: answer normally)."""
        return self.error_response(500, "Internal Server Error")

    def extra_delay(self, path: str) -> float:
        """Seconds a response to ``path`` takes beyond ``latency`` (a slow health route)."""
        return 0.0


# ----------------------------------------------------------------------------- OpenAI


class FakeOpenAI(FakeUpstream):
    """An OpenAI-compatible server: ``/v1/models``, ``/v1/chat/completions`` and friends.

    ``flavor`` picks whose quirks to reproduce (:data:`FLAVORS`): the list shape (vLLM's and
    SGLang's extra fields, llama.cpp's ``meta`` and Ollama-style ``models`` key,
    llama-cpp-python without ``created``, TGI's single model owned by itself), the error shape,
    the ``Server`` header, the readiness routes (``/health``, vLLM's ``/version``, TGI's
    ``/info``, SGLang's ``/get_model_info``) and what each says in the ``loading`` and ``dead``
    modes. With ``api_key``, ``/v1/*`` requests need ``Authorization: Bearer <api_key>``. With
    ``null_when_empty`` an empty server sends ``"data": null``. ``reasoning`` makes the model
    a reasoning one whose 1-token budget is spent before any visible output: ``"empty"``
    answers 200 with no content and ``finish_reason: "length"`` (vLLM, Ollama, OpenRouter),
    ``"limit_error"`` answers OpenAI's 400 "max_tokens or model output limit was reached".
    ``health_delay`` delays ``/health`` (SGLang's runs a 1-token generation and takes ≥ 1 s).

    Each shape below names the source file it follows (upstream repositories, recent main).
    """

    def __init__(
        self,
        models: Iterable[str] = ("gpt-4o-mini",),
        *,
        flavor: str = "openai",
        api_key: str | None = None,
        latency: float = 0.0,
        port: int = 0,
        host: str = "127.0.0.1",
        null_when_empty: bool = False,
        reasoning: str | None = None,
        health_delay: float = 0.0,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; one of {', '.join(FLAVORS)}")
        if reasoning not in (None, "empty", "limit_error"):
            raise ValueError(f"unknown reasoning {reasoning!r}; one of empty, limit_error")
        super().__init__(port=port, latency=latency, host=host)
        self.flavor = flavor
        self.api_key = api_key
        self.null_when_empty = null_when_empty
        self.reasoning = reasoning
        self.health_delay = health_delay
        self._models: list[str] = list(dict.fromkeys(models))
        self.created = 1715000000
        # FastAPI apps (vLLM, SGLang, llama-cpp-python) run under uvicorn, which sends
        # "server: uvicorn"; llama.cpp (cpp-httplib) and TGI (axum/hyper) send none.
        self.server_header = {
            "openai": "cloudflare",
            "vllm": "uvicorn",
            "sglang": "uvicorn",
            "llamacpp": None,
            "llama-cpp-python": "uvicorn",
            "tgi": None,
        }[flavor]

    # controls

    @property
    def models(self) -> list[str]:
        """The model ids served, in order."""
        return list(self._models)

    def add_model(self, name: str) -> None:
        """Serve one more model. Any thread."""
        self._in_loop(lambda: self._models.append(name) if name not in self._models else None)

    def remove_model(self, name: str) -> None:
        """Stop listing a model. Any thread."""
        self._in_loop(lambda: self._models.remove(name) if name in self._models else None)

    def set_models(self, names: Iterable[str]) -> None:
        """Replace the served models. Any thread."""
        new = list(dict.fromkeys(names))
        self._in_loop(setattr, self, "_models", new)

    # shapes

    def _entry(self, name: str, *, loading: bool = False) -> dict[str, Any]:
        if self.flavor == "vllm":
            # vllm/entrypoints/openai/protocol.py: ModelCard (owned_by "vllm", root, parent,
            # max_model_len, permission: [ModelPermission])
            return {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": 8192,
                "permission": [{
                    "id": f"modelperm-{hashlib.md5(name.encode()).hexdigest()}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }],
            }
        if self.flavor == "sglang":
            # python/sglang/srt/entrypoints/openai/protocol.py: ModelCard (owned_by "sglang")
            return {"id": name, "object": "model", "created": self.created,
                    "owned_by": "sglang", "root": name, "parent": None,
                    "max_model_len": 32768}
        if self.flavor == "llamacpp":
            # tools/server/server.cpp, handle_models: owned_by "llamacpp", meta (null until
            # the model is loaded; the route answers during loading)
            meta = None if loading else {
                "vocab_type": 2,
                "n_vocab": 128256,
                "n_ctx_train": 131072,
                "n_embd": 4096,
                "n_params": 8030261248,
                "size": _stable_int(name, 1 << 30, 8 << 30),
            }
            return {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "llamacpp",
                "meta": meta,
            }
        if self.flavor == "llama-cpp-python":
            # llama_cpp/server/app.py, get_models: owned_by "me", no created
            return {"id": name, "object": "model", "owned_by": "me", "permissions": []}
        if self.flavor == "tgi":
            # router/src/server.rs, openai_get_model_info: owned_by is the model id
            return {"id": name, "object": "model", "created": self.created, "owned_by": name}
        return {"id": name, "object": "model", "created": self.created, "owned_by": "system"}

    def _model_list(self, *, loading: bool = False) -> dict[str, Any]:
        names = self._models[:1] if self.flavor == "tgi" else self._models
        data: list[dict[str, Any]] | None = [self._entry(n, loading=loading) for n in names]
        if not names and self.null_when_empty:
            data = None
        payload: dict[str, Any] = {"object": "list", "data": data}
        if self.flavor == "llamacpp":
            # tools/server/server.cpp, handle_models: one body with Ollama-style "models" and
            # OpenAI-style "object"/"data"
            payload = {
                "models": [
                    {"name": n, "model": n, "modified_at": "", "size": "", "digest": "",
                     "type": "model", "description": "", "tags": [""],
                     "capabilities": ["completion"], "parameters": "",
                     "details": {"parent_model": "", "format": "gguf", "family": "",
                                 "families": [""], "parameter_size": "",
                                 "quantization_level": ""}}
                    for n in names
                ],
                **payload,
            }
        return payload

    def error_response(self, status: int, message: str) -> FakeResponse:
        """An error in the flavor's shape."""
        kind = {
            400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError",
        }.get(status, "Error")
        if self.flavor == "vllm":
            if status == 401:
                # vllm/entrypoints/openai/api_server.py, the --api-key middleware
                return json_response(401, {"error": "Unauthorized"})
            # vllm/entrypoints/openai/protocol.py: ErrorResponse{error: ErrorInfo} (v0.10.2+)
            return json_response(status, {"error": {
                "message": message, "type": kind, "param": None, "code": status,
            }})
        if self.flavor == "sglang":
            # python/sglang/srt/entrypoints/openai/protocol.py: ErrorResponse (flat)
            return json_response(status, {
                "object": "error", "message": message, "type": kind, "param": None,
                "code": status,
            })
        if self.flavor == "llamacpp":
            # tools/server/utils.hpp, format_error_response
            llama_type = {
                401: "authentication_error", 404: "not_found_error", 400: "invalid_request_error",
                503: "unavailable_error", 501: "not_supported_error",
            }.get(status, "server_error")
            return json_response(
                status, {"error": {"code": status, "message": message, "type": llama_type}}
            )
        if self.flavor == "tgi":
            # router/src/lib.rs: ErrorResponse {error, error_type}
            return json_response(status, {"error": message, "error_type": kind.lower()})
        openai_type = {
            400: "invalid_request_error", 401: "invalid_request_error",
            404: "invalid_request_error", 429: "requests",
        }.get(status, "server_error")
        code = {401: "invalid_api_key", 404: "model_not_found"}.get(status)
        return json_response(status, {
            "error": {"message": message, "type": openai_type, "param": None, "code": code}
        })

    def loading_response(self, method: str, path: str) -> FakeResponse | None:
        """Still starting. llama.cpp lists the model with ``meta: null`` and answers 503
        "Loading model" elsewhere; SGLang answers everything but ``/health``, which is an empty
        503 until its warm-up request is done; the others answer 503."""
        if self.flavor == "sglang":
            # python/sglang/srt/entrypoints/http_server.py, health_generate: while
            # server_status is Starting, Response(status_code=503)
            return FakeResponse(503, b"", None) if path == "/health" else None
        if self.flavor == "llamacpp" and method == "GET" and path in ("/v1/models", "/models"):
            # tools/server/server.cpp, middleware_server_state: the models routes are let
            # through during SERVER_STATE_LOADING_MODEL
            return json_response(200, self._model_list(loading=True))
        return json_response(
            503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        ) if self.flavor in ("llamacpp", "openai", "llama-cpp-python") else self.error_response(
            503, "Loading model"
        )

    def dead_response(self, method: str, path: str) -> FakeResponse | None:
        """Up but unable to serve: the listing still answers, readiness tells the truth."""
        if self.flavor == "vllm":
            if path == "/health":
                # vllm/entrypoints/serve/instrumentator/health.py: EngineDeadError →
                # Response(status_code=503), empty
                return FakeResponse(503, b"", None)
            if path in ("/v1/chat/completions", "/v1/completions"):
                # vllm/v1/engine/exceptions.py: EngineDeadError, served as a 500
                return self.error_response(500, "EngineCore encountered an issue. See stack "
                                                "trace (above) for the root cause.")
            return None
        if self.flavor == "tgi":
            if path == "/health":
                # router/src/server.rs, health: 503 ErrorResponse "unhealthy" / "healthcheck"
                return json_response(503, {"error": "unhealthy", "error_type": "healthcheck"})
            if path in ("/v1/chat/completions", "/v1/completions", "/generate"):
                # router/src/server.rs: 424 "Request failed during generation"
                return json_response(424, {"error": "Request failed during generation",
                                           "error_type": "generation"})
            return None
        if self.flavor == "sglang":
            # python/sglang/srt/entrypoints/http_server.py, health_generate: a stuck scheduler
            # leaves the health request waiting HEALTH_CHECK_TIMEOUT (20 s) before its 503
            return HANG if path in ("/health", "/v1/chat/completions") else None
        if path in ("/v1/chat/completions", "/v1/completions"):
            return self.error_response(500, "Internal Server Error")
        return None

    def extra_delay(self, path: str) -> float:
        """``health_delay`` for ``/health``."""
        return self.health_delay if path == "/health" else 0.0

    def _authorized(self, path: str, headers: Mapping[str, str]) -> bool:
        if not self.api_key:
            return True
        if self.flavor in ("llamacpp", "vllm", "tgi", "sglang") and path in (
                "/health", "/info", "/version"):
            return True  # these servers keep their health routes public
        return headers.get("authorization", "") == f"Bearer {self.api_key}"

    def route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        """The flavor's normal answers."""
        path = path.rstrip("/") or "/"
        if not self._authorized(path, headers):
            if self.flavor == "llamacpp":
                return self.error_response(401, "Invalid API Key")
            return self.error_response(
                401, "Incorrect API key provided. You can find your API key in your settings."
            )
        list_paths = ("/v1/models", "/models") if self.flavor == "llamacpp" else ("/v1/models",)
        if path in list_paths:
            if method != "GET":
                return self._method_not_allowed()
            return json_response(200, self._model_list())
        if path.startswith("/v1/models/") and method == "GET":
            name = path[len("/v1/models/"):]
            if name in self._models:
                return json_response(200, self._entry(name))
            return self.error_response(404, f"The model `{name}` does not exist.")
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                return self._method_not_allowed()
            return self._complete(path, body)
        if path == "/health" and method == "GET":
            if self.flavor == "llamacpp":
                # tools/server/server.cpp, handle_health
                return json_response(200, {"status": "ok"})
            if self.flavor in ("vllm", "tgi", "sglang"):
                # vLLM: Response(status_code=200); TGI: Ok(()); SGLang: Response(200)
                return FakeResponse(200, b"", None)
        if path == "/info" and method == "GET" and self.flavor == "tgi":
            return json_response(200, self._tgi_info())
        if path == "/version" and method == "GET" and self.flavor == "vllm":
            # vllm/entrypoints/openai/api_server.py, show_version
            return json_response(200, {"version": "0.11.0"})
        if path == "/get_model_info" and method == "GET" and self.flavor == "sglang":
            # python/sglang/srt/entrypoints/http_server.py, get_model_info
            model = self._models[0] if self._models else ""
            return json_response(200, {"model_path": model, "tokenizer_path": model,
                                       "is_generation": True,
                                       "preferred_sampling_params": None,
                                       "weight_version": "default"})
        return self._not_found(method, path)

    def _complete(self, path: str, body: bytes) -> FakeResponse:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self.error_response(400, "could not parse the JSON body")
        if not isinstance(request, dict):
            return self.error_response(400, "the JSON body must be an object")
        name = str(request.get("model") or "")
        checks_name = self.flavor in ("openai", "vllm", "sglang")
        if checks_name and name not in self._models:
            message = (
                f"The model `{name}` does not exist."
                if self.flavor in ("vllm", "sglang")
                else f"The model `{name}` does not exist or you do not have access to it."
            )
            return self.error_response(404, message)
        served = name if checks_name else (self._models[0] if self._models else name)
        if self.flavor == "tgi":
            served = "tgi"
        budget = request.get("max_tokens", request.get("max_completion_tokens"))
        cut = isinstance(budget, int) and budget <= 4
        if self.reasoning == "limit_error" and cut:
            # what OpenAI answers when max_tokens fits no visible token on a reasoning model
            # (BerriAI/litellm issues 26987, PR 36859)
            return self.error_response(400, "Could not finish the message because max_tokens "
                                            "or model output limit was reached. Please try "
                                            "again with higher max_tokens.")
        prompt_tokens = max(1, len(body) // 16)
        completion = budget if isinstance(budget, int) and budget > 0 and cut else 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        now = int(time.time())
        if path == "/v1/completions":
            return json_response(200, {
                "id": "cmpl-fake", "object": "text_completion", "created": now, "model": served,
                "choices": [{"index": 0, "text": "Hi", "logprobs": None,
                             "finish_reason": "length"}],
                "usage": usage,
            })
        reply: dict[str, Any] = {"role": "assistant", "content": "Hi"}
        if self.reasoning == "empty" and cut:
            # vLLM with a reasoning parser: the budget went on reasoning_content
            reply = {"role": "assistant", "content": None, "reasoning_content": "Okay"}
        return json_response(200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": now, "model": served,
            "choices": [{"index": 0, "message": reply,
                         "logprobs": None, "finish_reason": "length"}],
            "usage": usage,
        })

    def _tgi_info(self) -> dict[str, Any]:
        # router/src/lib.rs: Info
        model_id = self._models[0] if self._models else ""
        return {
            "model_id": model_id, "model_sha": None, "model_dtype": "torch.float16",
            "model_device_type": "cuda", "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
            "max_input_tokens": 4095, "max_total_tokens": 4096, "validation_workers": 2,
            "max_client_batch_size": 4, "router": "text-generation-router",
            "version": "2.4.0", "sha": None, "docker_label": None,
        }

    def _method_not_allowed(self) -> FakeResponse:
        if self.flavor in ("vllm", "sglang", "llama-cpp-python"):
            return json_response(405, {"detail": "Method Not Allowed"})  # FastAPI's
        return self.error_response(405, "Method Not Allowed")

    def _not_found(self, method: str, path: str) -> FakeResponse:
        if self.flavor in ("vllm", "sglang", "llama-cpp-python"):
            return json_response(404, {"detail": "Not Found"})  # FastAPI's
        if self.flavor == "llamacpp":
            return text_response(404, "File Not Found")
        if self.flavor == "tgi":
            return FakeResponse(404, b"", None)
        return self.error_response(404, f"Invalid URL ({method} {path})")


# ----------------------------------------------------------------------------- Ollama


def ollama_name(name: str) -> str:
    """``name`` with Ollama's implicit ``:latest`` tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class FakeOllama(FakeUpstream):
    """An Ollama server: ``/api/tags``, ``/api/ps``, ``/api/generate``, ``/api/chat``, ...

    ``models`` are the pulled models, ``loaded`` the ones in memory (``/api/ps``); a generate
    or chat request loads its model, as Ollama does. Unknown models get Ollama's 404
    ``{"error": "model 'x' not found"}``.
    """

    server_header: str | None = None  # Go's net/http sends no Server header
    keep_alive = timedelta(minutes=5)

    def __init__(
        self,
        models: Iterable[str] = ("llama3:8b",),
        *,
        loaded: Iterable[str] = (),
        latency: float = 0.0,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(port=port, latency=latency, host=host)
        self._models: list[str] = list(dict.fromkeys(ollama_name(m) for m in models))
        self._loaded: dict[str, datetime] = {}
        for name in loaded:
            self._load_now(ollama_name(name))

    # controls

    @property
    def models(self) -> list[str]:
        """The pulled models (canonical names)."""
        return list(self._models)

    @property
    def loaded(self) -> list[str]:
        """The models in memory."""
        return list(self._loaded)

    def add_model(self, name: str) -> None:
        """Pull a model. Any thread."""
        canonical = ollama_name(name)
        self._in_loop(
            lambda: self._models.append(canonical) if canonical not in self._models else None
        )

    def remove_model(self, name: str) -> None:
        """Delete a model (and unload it). Any thread."""
        canonical = ollama_name(name)

        def remove() -> None:
            if canonical in self._models:
                self._models.remove(canonical)
            self._loaded.pop(canonical, None)

        self._in_loop(remove)

    def load(self, name: str) -> None:
        """Load a pulled model into memory. Any thread."""
        self._in_loop(self._load_now, ollama_name(name))

    def unload(self, name: str) -> None:
        """Unload a model. Any thread."""
        canonical = ollama_name(name)
        self._in_loop(lambda: self._loaded.pop(canonical, None))

    def _load_now(self, canonical: str) -> None:
        self._loaded[canonical] = datetime.now(UTC) + self.keep_alive

    # shapes

    def _details(self, name: str) -> dict[str, Any]:
        family = name.split(":")[0].split("/")[-1].rstrip("0123456789.") or "llama"
        return {
            "parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "8.0B", "quantization_level": "Q4_0",
        }

    def _tag_entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2024-05-20T10:11:12.123456789Z",
            "size": _stable_int(name, 1 << 30, 8 << 30),
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": self._details(name),
        }

    def _ps_entry(self, name: str, expires: datetime) -> dict[str, Any]:
        size = _stable_int(name, 1 << 30, 8 << 30) + (512 << 20)
        return {
            "name": name,
            "model": name,
            "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": self._details(name),
            "expires_at": expires.astimezone().isoformat(),
            "size_vram": size,
        }

    def error_response(self, status: int, message: str) -> FakeResponse:
        """Ollama's ``{"error": "..."}``, with its real 500 text."""
        if status == 500:
            message = "llama runner process has terminated: signal: killed"
        return json_response(status, {"error": message})

    def loading_response(self, method: str, path: str) -> FakeResponse | None:
        """Ollama's answer when its queue is full."""
        return json_response(
            503, {"error": "server busy, please try again.  maximum pending requests exceeded"}
        )

    def route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> FakeResponse:
        """Ollama's normal answers."""
        path = path.rstrip("/") or "/"
        if path == "/" and method in ("GET", "HEAD"):
            return text_response(200, "Ollama is running")
        if path == "/api/version" and method == "GET":
            return json_response(200, {"version": "0.5.7"})
        if path == "/api/tags" and method == "GET":
            return json_response(200, {"models": [self._tag_entry(m) for m in self._models]})
        if path == "/api/ps" and method == "GET":
            now = datetime.now(UTC)
            for name, expires in list(self._loaded.items()):
                if expires <= now:
                    del self._loaded[name]
            return json_response(200, {
                "models": [self._ps_entry(n, e) for n, e in self._loaded.items()]
            })
        if path in ("/api/generate", "/api/chat", "/api/show") and method == "POST":
            return self._run(path, body)
        return text_response(404, "404 page not found")

    def _run(self, path: str, body: bytes) -> FakeResponse:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return json_response(400, {"error": "invalid character in request body"})
        if not isinstance(request, dict):
            return json_response(400, {"error": "request body must be a JSON object"})
        raw = request.get("model") or request.get("name")
        if not raw:
            return json_response(400, {"error": "model is required"})
        name = ollama_name(str(raw))
        if name not in self._models:
            return json_response(404, {"error": f"model '{raw}' not found"})
        if path == "/api/show":
            return json_response(200, {"details": self._details(name), "modelfile": "",
                                       "parameters": "", "template": "{{ .Prompt }}"})
        was_loaded = name in self._loaded
        self._load_now(name)
        final: dict[str, Any] = {
            "model": str(raw),
            "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "done": True,
            "done_reason": "length",
            "total_duration": 25_000_000,
            "load_duration": 1_000_000 if was_loaded else 2_000_000_000,
            "prompt_eval_count": 8,
            "prompt_eval_duration": 10_000_000,
            "eval_count": 1,
            "eval_duration": 5_000_000,
        }
        if path == "/api/chat":
            final["message"] = {"role": "assistant", "content": "Hi"}
        else:
            final["response"] = "Hi"
            final["context"] = [1, 2, 3]
        if request.get("stream", True) is False:
            return json_response(200, final)
        token = {"model": final["model"], "created_at": final["created_at"], "done": False}
        if path == "/api/chat":
            token["message"] = {"role": "assistant", "content": "Hi"}
            final["message"] = {"role": "assistant", "content": ""}
        else:
            token["response"] = "Hi"
            final["response"] = ""
        lines = json.dumps(token) + "\n" + json.dumps(final) + "\n"
        return FakeResponse(200, lines.encode(), "application/x-ndjson")


# ----------------------------------------------------------------------------- threads


class FakeServers:
    """Runs fakes on a background thread's event loop, for synchronous callers.

    ``with FakeServers() as servers: fake = servers.start(FakeOpenAI(...))``. Any number of
    fakes share the one loop (a benchmark runs a thousand); their controls may be called from
    any thread. Leaving the block stops them all.
    """

    def __init__(self) -> None:
        self._portal_cm: Any = None
        self.portal: anyio.from_thread.BlockingPortal | None = None
        self._tasks: dict[int, tuple[FakeUpstream, Future[Any]]] = {}

    def __enter__(self) -> Self:
        self._portal_cm = anyio.from_thread.start_blocking_portal(name="modeld-fakes")
        self.portal = self._portal_cm.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for _fake, future in self._tasks.values():
            future.cancel()
        self._tasks.clear()
        cm, self._portal_cm, self.portal = self._portal_cm, None, None
        if cm is not None:
            cm.__exit__(exc_type, exc, tb)

    def start(self, fake: F) -> F:
        """Start ``fake`` on the background loop; returns it once its port is bound."""
        if self.portal is None:
            raise RuntimeError("use FakeServers in a with block")
        future, _ = self.portal.start_task(fake.serve, name=f"{type(fake).__name__} fake")
        self._tasks[id(fake)] = (fake, future)
        return fake

    def start_many(self, fakes: Sequence[F]) -> list[F]:
        """Start several fakes; returns them in order."""
        return [self.start(fake) for fake in fakes]

    def stop(self, fake: FakeUpstream) -> None:
        """Stop one fake (its port is released)."""
        entry = self._tasks.pop(id(fake), None)
        if entry is not None:
            entry[1].cancel()


# ----------------------------------------------------------------------------- model files

_GGUF_TYPES = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "array": 9, "i64": 11}


def _gguf_string(text: str, *, length_format: str = "<Q") -> bytes:
    raw = text.encode()
    return struct.pack(length_format, len(raw)) + raw


def _gguf_kv(key: str, value: Any, length_format: str) -> bytes:
    out = _gguf_string(key, length_format=length_format)
    if isinstance(value, bool):
        return out + struct.pack("<IB", _GGUF_TYPES["bool"], int(value))
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return out + struct.pack("<II", _GGUF_TYPES["u32"], value)
        return out + struct.pack("<Iq", _GGUF_TYPES["i64"], value)
    if isinstance(value, float):
        return out + struct.pack("<If", _GGUF_TYPES["f32"], value)
    if isinstance(value, str):
        return out + struct.pack("<I", _GGUF_TYPES["str"]) + _gguf_string(
            value, length_format=length_format
        )
    if isinstance(value, list | tuple):
        items = list(value)
        if all(isinstance(v, str) for v in items):
            packed = b"".join(_gguf_string(v, length_format=length_format) for v in items)
            item_type = _GGUF_TYPES["str"]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            packed = b"".join(struct.pack("<i", v) for v in items)
            item_type = _GGUF_TYPES["i32"]
        else:
            packed = b"".join(struct.pack("<f", float(v)) for v in items)
            item_type = _GGUF_TYPES["f32"]
        count = struct.pack(length_format, len(items))
        return out + struct.pack("<II", _GGUF_TYPES["array"], item_type) + count + packed
    raise TypeError(f"cannot write GGUF metadata of type {type(value).__name__}")


def write_gguf(
    path: str | Path,
    *,
    version: int = 3,
    tensors: Mapping[str, Sequence[int]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    alignment: int = 32,
) -> Path:
    """Write a small valid GGUF file (F32 tensors of zeros); returns its path.

    ``tensors`` maps names to shapes; ``metadata`` values may be str, int, float, bool or
    lists of those. ``version=1`` writes the old layout (32-bit counts) that probes refuse.
    """
    path = Path(path)
    tensors = {"token_embd.weight": (4, 8), "output.weight": (4, 8)} if tensors is None else (
        dict(tensors)
    )
    metadata = dict(
        {"general.architecture": "llama", "general.name": "modeld-test"}
        if metadata is None else metadata
    )
    if alignment != 32:
        metadata["general.alignment"] = alignment
    wide = "<I" if version == 1 else "<Q"
    out = bytearray(b"GGUF")
    out += struct.pack("<I", version)
    out += struct.pack(wide + wide[1], len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _gguf_kv(key, value, wide)
    offset = 0
    sizes: list[int] = []
    for name, shape in tensors.items():
        out += _gguf_string(name, length_format=wide)
        out += struct.pack("<I", len(shape))
        for dim in shape:
            out += struct.pack(wide, dim)
        out += struct.pack("<I", 0)  # F32
        out += struct.pack("<Q", offset)
        elements = 1
        for dim in shape:
            elements *= dim
        size = elements * 4
        sizes.append(size)
        offset += (size + alignment - 1) // alignment * alignment
    out += b"\0" * (-len(out) % alignment)
    for size in sizes:
        out += b"\0" * size
        out += b"\0" * (-size % alignment)
    path.write_bytes(bytes(out))
    return path


_SAFETENSORS_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1,
                     "U8": 1, "BOOL": 1}


def write_safetensors(
    path: str | Path,
    *,
    tensors: Mapping[str, Sequence[int]] | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: str = "F32",
) -> Path:
    """Write a small valid safetensors file (tensors of zeros); returns its path."""
    path = Path(path)
    tensors = {"embed.weight": (4, 8), "lm_head.weight": (4, 8)} if tensors is None else (
        dict(tensors)
    )
    item = _SAFETENSORS_ITEM[dtype]
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape in tensors.items():
        elements = 1
        for dim in shape:
            elements *= dim
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + elements * item]}
        offset += elements * item
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path
