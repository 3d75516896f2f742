"""Fake inference servers that answer the OpenAI API's generation routes, for the front door.

:class:`ChatOpenAI` is a :class:`~daemon.testing.fakes.FakeOpenAI` (so probes see the server
they expect, quirks included) that also answers ``POST /v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``, streaming or not, in the shapes of vLLM
(``flavor="vllm"``), llama.cpp's ``llama-server`` (``"llamacpp"``) or OpenAI. :class:`ChatOllama`
is a :class:`~daemon.testing.fakes.FakeOllama` with Ollama's OpenAI-compatible ``/v1``.

What real servers send, reproduced here (so the door is tried against it):

- vLLM (``vllm/entrypoints/openai/serving_chat.py``, ``chat_completion_stream_generator``):
  each chunk ``data: {chunk.model_dump_json(exclude_unset=True)}\\n\\n``, the first one
  the role alone, ``delta: {"role": "assistant", "content": ""}`` (sent once the first output
  is in, i.e. after prefill; an engine error then comes as an event of the 200 stream), then
  one per token, then ``data: [DONE]\\n\\n``; FastAPI's
  ``StreamingResponse`` under uvicorn: ``content-type: text/event-stream; charset=utf-8``,
  ``Transfer-Encoding: chunked``; errors ``{"object": "error", "message", "type", "param",
  "code"}`` with a ``Content-Length``.
- llama.cpp (``tools/server/server-common.cpp``, ``format_oai_sse``): ``"data: " +
  compact JSON + "\\n\\n"`` per event, keys in its own order (``choices`` first), the first
  delta ``{"role": "assistant", "content": null}``, the last ``"delta": {}`` with ``usage`` and
  ``timings``, then ``data: [DONE]``; cpp-httplib sends ``Keep-Alive: timeout=5, max=100`` and
  chunked SSE; errors ``{"error": {"code", "message", "type"}}``.
- Ollama (``openai/openai.go``): ``system_fingerprint: "fp_ollama"``, ``text/event-stream``,
  chunked, ``data: [DONE]``; errors ``{"error": {"message", "type": "api_error", "param",
  "code"}}``.

Faults for the generation routes only (``fake.set_chat_fault(...)``; probes keep working, so
only the door's own observations can notice): :data:`CHAT_FAULTS`. Connection-level faults
(refused: ``set_mode("down")``, hang before the headers: ``set_mode("hang")``) are the base
fakes' modes. ``fake.streams_closed_by_client`` counts streams whose client hung up mid-way.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import h11

from .fakes import FakeOllama, FakeOpenAI, FakeResponse, json_response, ollama_name

__all__ = ["CHAT_FAULTS", "ChatOllama", "ChatOpenAI"]

#: Faults of the generation routes (``set_chat_fault``).
CHAT_FAULTS: frozenset[str] = frozenset({
    "none",
    "error503",            # 503 in the server's error shape, with a Content-Length
    "ratelimited",         # 429 with Retry-After
    "hang",                # read the request, never answer (no headers)
    "stall",               # 200 and the headers, then nothing (a wedged engine)
    "die_midstream",       # half the chunks, then a TCP reset
})

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
EMBEDDING_SIZE = 8


@dataclass(frozen=True, slots=True)
class _Stream(FakeResponse):
    """An SSE answer: ``events`` are sent one chunk each."""

    events: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class _Generation(FakeResponse):
    """A non-streamed answer of a generation route (faults apply to it)."""


class _ChatMixin:
    """The generation routes and their faults, on top of a fake server."""

    flavor: str
    server_header: str | None  # None: no Server header (llama.cpp, TGI, Ollama send none)
    #: tokens per answer (streamed: one chunk each)
    tokens: int
    #: seconds between two streamed chunks
    chunk_interval: float

    def _chat_init(self, tokens: int, chunk_interval: float, coalesce: bool = True) -> None:
        self.tokens = tokens
        self.chunk_interval = chunk_interval
        #: without a chunk interval, send a stream in one write (False: one write per event)
        self.coalesce = coalesce
        self._chat_fault = "none"
        self._chat_lock = threading.Lock()
        self.streams_closed_by_client = 0
        self.streams_completed = 0
        self.generations = 0  # generation requests answered (or faulted)

    def set_chat_fault(self, fault: str) -> None:
        """Switch the generation routes' fault. Any thread; takes effect at the next request."""
        if fault not in CHAT_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(sorted(CHAT_FAULTS))}")
        self._chat_fault = fault

    @property
    def chat_fault(self) -> str:
        return self._chat_fault

    # ------------------------------------------------------------------ shapes

    def _served_name(self, requested: str) -> str:
        return requested

    def _generate(self, path: str, body: bytes) -> FakeResponse:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self._bad_request("could not parse the JSON body")
        if not isinstance(request, dict):
            return self._bad_request("the JSON body must be an object")
        name = self._served_name(str(request.get("model") or ""))
        if path == "/v1/embeddings":
            if "input" not in request:
                return self._bad_request("'input' is a required property")
            return _Generation(*_as_tuple(self._embeddings(name, request)))
        if path == "/v1/chat/completions" and not isinstance(request.get("messages"), list):
            return self._bad_request("'messages' is a required property")
        if path == "/v1/completions" and "prompt" not in request:
            return self._bad_request("'prompt' is a required property")
        chat = path == "/v1/chat/completions"
        if request.get("stream"):
            options = request.get("stream_options") or {}
            events = self._stream_events(name, chat, bool(options.get("include_usage")))
            events.append(b"data: [DONE]\n\n")
            return _Stream(200, b"", self._sse_type(), self._sse_headers(), tuple(events))
        return _Generation(*_as_tuple(json_response(200, self._complete_body(name, chat))))

    def _gen_error(self, status: int, message: str) -> FakeResponse:
        """An error of the generation routes, in the server's shape."""
        response = self.error_response(status, message)  # type: ignore[attr-defined]
        assert isinstance(response, FakeResponse)
        return response

    def _bad_request(self, message: str) -> FakeResponse:
        return self._gen_error(400, message)

    def _sse_type(self) -> str:
        return "text/event-stream"

    def _sse_headers(self) -> tuple[tuple[str, str], ...]:
        return ()

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": 12, "completion_tokens": self.tokens,
                "total_tokens": 12 + self.tokens}

    def _text(self) -> list[str]:
        return ["Hi" if i == 0 else f" t{i}" for i in range(self.tokens)]

    def _complete_body(self, name: str, chat: bool) -> dict[str, Any]:
        now = int(time.time())
        text = "".join(self._text())
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text},
                                      "logprobs": None, "finish_reason": "length"}
            return {"id": "chatcmpl-fake", "object": "chat.completion", "created": now,
                    "model": name, "choices": [choice], "usage": self._usage()}
        return {"id": "cmpl-fake", "object": "text_completion", "created": now, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "length"}], "usage": self._usage()}

    def _stream_events(self, name: str, chat: bool, usage: bool) -> list[bytes]:
        now = int(time.time())
        out = []
        if chat:  # the role comes alone first, with empty content (vLLM: first_iteration)
            out.append(_sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                             "created": now, "model": name, "choices": [{
                                 "index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]}))
        for piece in self._text():
            if chat:
                delta: dict[str, Any] = {"content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": None}
                doc = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                       "created": now, "model": name, "choices": [choice]}
            else:
                doc = {"id": "cmpl-fake", "object": "text_completion", "created": now,
                       "model": name, "choices": [{"index": 0, "text": piece,
                                                   "logprobs": None, "finish_reason": None}]}
            out.append(_sse(doc))
        final_choice: dict[str, Any] = (
            {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "length"}
            if chat else {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"})
        out.append(_sse({"id": "chatcmpl-fake" if chat else "cmpl-fake",
                         "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": now, "model": name, "choices": [final_choice]}))
        if usage:
            out.append(_sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                             "created": now, "model": name, "choices": [],
                             "usage": self._usage()}))
        return out

    def _embeddings(self, name: str, request: Mapping[str, Any]) -> FakeResponse:
        inputs = request["input"]
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [{"index": i, "object": "embedding",
                 "embedding": [round(0.01 * (i + j), 4) for j in range(EMBEDDING_SIZE)]}
                for i in range(len(items))]
        return json_response(200, {"id": "embd-fake", "object": "list",
                                   "created": int(time.time()), "model": name, "data": data,
                                   "usage": {"prompt_tokens": 4 * len(items),
                                             "total_tokens": 4 * len(items),
                                             "completion_tokens": 0,
                                             "prompt_tokens_details": None}})

    # ------------------------------------------------------------------ delivery

    async def _deliver_generation(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                                  response: FakeResponse) -> bool | None:
        """Deliver a generation answer with the current fault; None: not ours to deliver."""
        if not isinstance(response, _Stream | _Generation):
            return None
        with self._chat_lock:
            self.generations += 1
        fault = self._chat_fault
        if fault == "hang":
            await anyio.sleep_forever()
        if fault in ("error503", "ratelimited"):
            status = 503 if fault == "error503" else 429
            error = self._gen_error(
                status, "Service Unavailable" if status == 503 else "Rate limit exceeded")
            extra = (("retry-after", "1"),) if status == 429 else ()
            await self._send(conn, stream, FakeResponse(error.status, error.body,
                                                        error.content_type,
                                                        (*error.headers, *extra)))
            return True
        if fault == "stall":
            await self._send_head(conn, stream, response, chunked=True)
            await anyio.sleep_forever()
        if isinstance(response, _Generation):
            if fault == "die_midstream":
                await self._send_head(conn, stream, response, chunked=False)
                data = conn.send(h11.Data(data=response.body[: len(response.body) // 2]))
                assert data is not None
                await stream.send(data)
                await _reset(stream)
                return False
            await self._send(conn, stream, response)
            return True
        return await self._stream(conn, stream, response, fault == "die_midstream")

    async def _send_head(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                         response: FakeResponse, *, chunked: bool) -> None:
        headers = [("server", self.server_header)] if self.server_header else []
        if response.content_type:
            headers.append(("content-type", response.content_type))
        headers.extend(response.headers)
        if not chunked:
            headers.append(("content-length", str(len(response.body))))
        head = conn.send(h11.Response(status_code=response.status, headers=headers))
        assert head is not None
        await stream.send(head)

    async def _send(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                    response: FakeResponse) -> None:
        await self._send_head(conn, stream, response, chunked=False)
        data = conn.send(h11.Data(data=response.body)) if response.body else b""
        end = conn.send(h11.EndOfMessage())
        assert data is not None and end is not None
        await stream.send(data + end)

    async def _stream(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                      response: _Stream, die: bool) -> bool:
        await self._send_head(conn, stream, response, chunked=True)
        events = response.events
        cut = len(events) // 2 if die else None
        closed = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                # the client hanging up is seen at once, not at the next write
                nonlocal closed
                try:
                    while await stream.receive(65536):
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError,
                        anyio.ClosedResourceError, OSError):
                    pass
                closed = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                if not self.chunk_interval and self.coalesce and cut is None:
                    # no pause between tokens: one write, as a fast server's kernel coalesces
                    # them (and a kill cannot land between two of them)
                    data = b"".join(conn.send(h11.Data(data=e)) or b"" for e in events)
                    await stream.send(data + (conn.send(h11.EndOfMessage()) or b""))
                    events = ()
                for index, event in enumerate(events):
                    if index == cut:
                        await _reset(stream)
                        group.cancel_scope.cancel()
                        return False
                    if index and self.chunk_interval:
                        await anyio.sleep(self.chunk_interval)
                    data = conn.send(h11.Data(data=event))
                    assert data is not None
                    await stream.send(data)
                if events:
                    end = conn.send(h11.EndOfMessage())
                    assert end is not None
                    await stream.send(end)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                closed = True
            group.cancel_scope.cancel()
        with self._chat_lock:
            if closed:
                self.streams_closed_by_client += 1
            else:
                self.streams_completed += 1
        return not closed


class ChatOpenAI(_ChatMixin, FakeOpenAI):
    """A :class:`FakeOpenAI` that also generates: chat, completions, embeddings, streamed
    or not, in the flavor's shapes (``vllm``, ``llamacpp``, ``openai``)."""

    def __init__(self, models: Any = ("gpt-4o-mini",), *, tokens: int = 3,
                 chunk_interval: float = 0.0, coalesce: bool = True, **kwargs: Any) -> None:
        super().__init__(models, **kwargs)
        self._chat_init(tokens, chunk_interval, coalesce)

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytes) -> FakeResponse:
        clean = path.rstrip("/") or "/"
        if clean in GENERATION_PATHS and method == "POST" and self._authorized(clean, headers):
            if self.flavor in ("openai", "vllm"):
                name = str((_loads(body) or {}).get("model") or "")
                if name not in self._models:
                    return self.error_response(404, f"The model `{name}` does not exist.")
            return self._generate(clean, body)
        return super().route(method, path, headers, body)

    def _served_name(self, requested: str) -> str:
        # llama-server answers with the name it loaded, whatever the request said
        if self.flavor == "llamacpp" and self._models:
            return self._models[0]
        return requested

    def _sse_type(self) -> str:
        return "text/event-stream; charset=utf-8" if self.flavor == "vllm" else (
            "text/event-stream")

    def _sse_headers(self) -> tuple[tuple[str, str], ...]:
        if self.flavor == "llamacpp":
            return (("keep-alive", "timeout=5, max=100"),
                    ("access-control-allow-origin", ""))
        return ()

    def _stream_events(self, name: str, chat: bool, usage: bool) -> list[bytes]:
        if self.flavor != "llamacpp" or not chat:
            return super()._stream_events(name, chat, usage)
        now = int(time.time())
        common = {"created": now, "id": "chatcmpl-Fake0123456789", "model": name,
                  "system_fingerprint": "b6881-8b11deea4", "object": "chat.completion.chunk"}
        out = []
        for index, piece in enumerate(self._text()):
            delta: dict[str, Any] = {"content": piece}
            if index == 0:
                out.append(_sse({"choices": [{"finish_reason": None, "index": 0,
                                              "delta": {"role": "assistant", "content": None}}],
                                 **common}))
            out.append(_sse({"choices": [{"finish_reason": None, "index": 0, "delta": delta}],
                             **common}))
        out.append(_sse({"choices": [{"finish_reason": "length", "index": 0, "delta": {}}],
                         **common, "usage": self._usage(),
                         "timings": {"prompt_n": 12, "prompt_ms": 20.1,
                                     "predicted_n": self.tokens, "predicted_ms": 40.2}}))
        return out

    def _embeddings(self, name: str, request: Mapping[str, Any]) -> FakeResponse:
        if self.flavor != "llamacpp":
            return super()._embeddings(name, request)
        inputs = request["input"]
        items = inputs if isinstance(inputs, list) else [inputs]
        return json_response(200, {
            "model": name, "object": "list",
            "usage": {"prompt_tokens": 4 * len(items), "total_tokens": 4 * len(items)},
            "data": [{"embedding": [round(0.01 * (i + j), 4) for j in range(EMBEDDING_SIZE)],
                      "index": i, "object": "embedding"} for i in range(len(items))]})

    async def _deliver(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                       response: FakeResponse, mode: str) -> bool:
        delivered = await self._deliver_generation(conn, stream, response)
        if delivered is None:
            return await super()._deliver(conn, stream, response, mode)
        return delivered


class ChatOllama(_ChatMixin, FakeOllama):
    """A :class:`FakeOllama` that also serves Ollama's OpenAI-compatible ``/v1``."""

    flavor = "ollama"

    def __init__(self, models: Any = ("llama3:8b",), *, tokens: int = 3,
                 chunk_interval: float = 0.0, **kwargs: Any) -> None:
        super().__init__(models, **kwargs)
        self._chat_init(tokens, chunk_interval)

    def route(self, method: str, path: str, headers: Mapping[str, str],
              body: bytes) -> FakeResponse:
        clean = path.rstrip("/") or "/"
        if clean in GENERATION_PATHS and method == "POST":
            raw = str((_loads(body) or {}).get("model") or "")
            if ollama_name(raw) not in self._models:
                return self._gen_error(
                    404, f'model "{raw}" not found, try pulling it first')
            return self._generate(clean, body)
        return super().route(method, path, headers, body)

    def _gen_error(self, status: int, message: str) -> FakeResponse:
        """Ollama's /v1 errors are OpenAI-shaped; its native API's are ``{"error": "..."}``."""
        return json_response(status, {"error": {"message": message, "type": "api_error",
                                                "param": None, "code": None}})

    def _stream_events(self, name: str, chat: bool, usage: bool) -> list[bytes]:
        if not chat:
            return super()._stream_events(name, chat, usage)
        now = int(time.time())
        out = []
        for piece in self._text():
            out.append(_sse({"id": "chatcmpl-123", "object": "chat.completion.chunk",
                             "created": now, "model": name, "system_fingerprint": "fp_ollama",
                             "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                 "content": piece},
                                          "finish_reason": None}]}))
        out.append(_sse({"id": "chatcmpl-123", "object": "chat.completion.chunk",
                         "created": now, "model": name, "system_fingerprint": "fp_ollama",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": "length"}]}))
        return out

    async def _deliver(self, conn: h11.Connection, stream: anyio.abc.SocketStream,
                       response: FakeResponse, mode: str) -> bool:
        delivered = await self._deliver_generation(conn, stream, response)
        if delivered is None:
            return await super()._deliver(conn, stream, response, mode)
        return delivered


def _sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def _loads(body: bytes) -> Any:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _as_tuple(response: FakeResponse) -> tuple[int, bytes, str | None,
                                               tuple[tuple[str, str], ...]]:
    return response.status, response.body, response.content_type, response.headers


async def _reset(stream: anyio.abc.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server's kernel does."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
