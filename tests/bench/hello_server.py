"""The control-socket baseline: a bare h11 "hello" server on anyio over a Unix socket.

``python hello_server.py SOCKET_PATH`` listens, prints ``ready``, and answers every request
on every keep-alive connection with a small JSON body until killed. The same stack as the
daemon's control socket (anyio listener and streams, h11 framing) with nothing else: no
routing, limits, peer credentials, logging or registry.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.abc
import h11

BODY = b'{"hello":"world"}'
HEADERS = [(b"server", b"hello"), (b"content-type", b"application/json"),
           (b"content-length", str(len(BODY)).encode())]


async def converse(stream: anyio.abc.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive(65536))
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                continue
            if isinstance(event, h11.Request):
                continue
            if isinstance(event, h11.EndOfMessage):
                data = conn.send(h11.Response(status_code=200, headers=HEADERS))
                data = (data or b"") + (conn.send(h11.Data(data=BODY)) or b"")
                data += conn.send(h11.EndOfMessage()) or b""
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, OSError):
                    return
                conn.start_next_cycle()
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return


async def main(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    listener = await anyio.create_unix_listener(path)
    print("ready", flush=True)
    await listener.serve(converse)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
