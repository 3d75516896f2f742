"""Hostile input, measured: what an attack costs the daemon's process, beside the old way.

Each case runs in a fresh interpreter (peak RSS is per process) and prints peak RSS growth,
the longest event-loop stall seen by a 5 ms ticker, and the wall time:

- ``bomb``: a 1 GB double-gzip bomb (``Content-Encoding: gzip, gzip``, 1.8 kB on the wire)
  served on 127.0.0.1 and fetched with ``ProbeContext.get_json`` (the daemon's path),
  beside the same fetch done the old way (httpx decoding, cap checked on decoded chunks) in
  the same run.

    python tests/bench/bench_input_attacks.py [--size-mb 1024]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def zeros_gzip(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    parts.append(packer.flush())
    return b"".join(parts)


def rss_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def serve_bomb(body: bytes, task_status: Any) -> None:
    async def answer(stream: Any) -> None:
        try:
            async with stream:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += await stream.receive(65536)
                await stream.send((
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    f"content-encoding: gzip, gzip\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n").encode() + body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
    await listener.serve(answer)


async def old_way(client: Any, url: str, cap: int) -> str:
    """What ProbeContext did before: httpx decodes, the cap is checked per decoded chunk."""
    size = 0
    async with client.stream("GET", url, headers={"Accept-Encoding": "gzip, deflate"}) as r:
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            if size > cap:
                return f"response too large (> {cap} bytes)"
    return "accepted"


async def bomb_case(way: str, size_mb: int) -> dict[str, Any]:
    from daemon.core.settings import ProbeConfig
    from daemon.probing.context import ProbeContext, make_http_client
    from daemon.probing.replies import UpstreamError

    body = gzip.compress(zeros_gzip(size_mb << 20), 9)
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await anyio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.005)
            last = now

    base = rss_peak_kb()
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_bomb, body)
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/models"
        started = time.perf_counter()
        config = ProbeConfig()
        async with make_http_client(config) as client:
            if way == "old":
                outcome = await old_way(client, url, config.max_response_bytes)
            else:
                try:
                    await ProbeContext(client, timeout=30.0).get_json(url)
                    outcome = "accepted"
                except UpstreamError as exc:
                    outcome = exc.reason
        wall = time.perf_counter() - started
        running = False
        tg.cancel_scope.cancel()
    return {"case": f"bomb-{way}", "wire_bytes": len(body), "decoded_mb": size_mb,
            "rss_growth_mb": (rss_peak_kb() - base) / 1024, "loop_stall_ms": worst * 1000,
            "wall_s": wall, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        way = args.case.split("-", 1)[1]
        print(json.dumps(anyio.run(bomb_case, way, args.size_mb)))
        return
    rows = []
    for case in ("bomb-old", "bomb-new"):
        done = subprocess.run([sys.executable, __file__, "--case", case, "--size-mb",
                               str(args.size_mb)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| case | wire bytes | decoded | peak RSS growth | worst loop stall | wall | outcome |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['wire_bytes']:,} | {r['decoded_mb']} MB | "
              f"{r['rss_growth_mb']:.1f} MB | {r['loop_stall_ms']:.0f} ms | {r['wall_s']:.2f} s | "
              f"{r['outcome']} |")


if __name__ == "__main__":
    main()
