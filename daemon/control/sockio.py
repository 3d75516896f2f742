"""Reading and writing a connection's bytes, shared by the control server and the front door.

Over a Unix socket the raw socket is read and written directly: anyio's asyncio
``UNIXSocketStream`` leaves its reader registered for a moment after a cancelled receive, and
if the socket turns readable in that moment the loop logs InvalidStateError
(agronholm/anyio#1267 is the aclose() side of it). Timeouts and shutdown cancel receives and
sends all the time in these servers, so they wait with ``anyio.wait_readable`` /
``wait_writable``, which tolerate that race. TCP streams go through anyio as usual.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

RECEIVE_SIZE = 65536
LOOK_UP: Any = object()  # "find the Unix socket under the stream yourself"


def unix_socket(stream: anyio.abc.ByteStream) -> socket.socket | None:
    """The Unix socket under ``stream``, or None (TCP, or not a socket at all)."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    return raw if raw is not None and raw.family == socket.AF_UNIX else None


async def receive(stream: anyio.abc.ByteStream, raw: Any = LOOK_UP) -> bytes:
    """Up to 64 KiB; b"" at end of stream or when the connection broke.

    ``raw`` is the Unix socket under ``stream`` (or None) when the caller has looked it up.
    """
    if raw is LOOK_UP:
        raw = unix_socket(stream)
    try:
        if raw is not None:
            await anyio.lowlevel.checkpoint()
            while True:
                try:
                    data: bytes = raw.recv(RECEIVE_SIZE)
                    return data
                except BlockingIOError:
                    await anyio.wait_readable(raw)
        return await stream.receive(RECEIVE_SIZE)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return b""


async def send_all(stream: anyio.abc.ByteStream, data: bytes, raw: Any = LOOK_UP) -> None:
    """Send every byte; raises OSError or anyio's stream errors when the peer is gone."""
    if raw is LOOK_UP:
        raw = unix_socket(stream)
    if raw is None:
        await stream.send(data)
        return
    await anyio.lowlevel.checkpoint()  # a cancelled send is cancelled here, before any byte
    view = memoryview(data)
    while view:
        try:
            sent = raw.send(view)
        except BlockingIOError:
            await anyio.wait_writable(raw)
            continue
        view = view[sent:]
