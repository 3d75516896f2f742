"""Hostile input, measured: what an attack costs the daemon's process, beside the old way.

Each case runs in a fresh interpreter (peak RSS is per process) and prints peak RSS growth,
the longest event-loop stall seen by a 5 ms ticker, and the wall time:

- ``bomb``: a 1 GB double-gzip bomb (``Content-Encoding: gzip, gzip``, 1.8 kB on the wire)
  served on 127.0.0.1 and fetched with ``ProbeContext.get_json`` (the daemon's path),
  beside the same fetch done the old way (httpx decoding, cap checked on decoded chunks) in
  the same run.

- ``header``: a safetensors file with a 90 MB JSON header (under the format's 100 MB limit),
  probed with the default 3 s timeout every 500 ms (the recheck pace of a failing model), each
  probe not holding the next back, for 8 s: peak RSS growth, threads alive at most, the worst
  loop stall. The baseline is the local_file plugin as it was before issue 10 (read from git,
  ``--old-rev``), in the same run.
- ``strings``: 30 models whose server sends a 900 kB ``owned_by``: the state file's size and
  the time to encode it (what every flush costs, on the event loop), with the results as the
  plugins built them (before) and as the prober now bounds them.

    python tests/bench/bench_input_attacks.py [--size-mb 1024] [--only bomb header strings]
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
import httpx

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
        if way == "old":  # a plain httpx client, as the daemon's was: httpx decodes
            async with httpx.AsyncClient(trust_env=False, timeout=30.0) as plain:
                outcome = await old_way(plain, url, config.max_response_bytes)
        else:
            async with make_http_client(config) as client:
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


OLD_REV = "3134f3f"  # main before issue 10's input hardening


def local_file_module(way: str, old_rev: str) -> Any:
    """The local_file plugin: today's, or the one at ``old_rev`` (loaded from git)."""
    if way == "new":
        import plugins.local_file as module
        return module
    import importlib.util
    import tempfile
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{old_rev}:plugins/local_file.py"],
                            capture_output=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "local_file_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("local_file_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_header_file(path: Path, header_bytes: int) -> None:
    entry = '"t%08d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    count = header_bytes // (len(entry % 0) + 1)
    with open(path, "wb") as out:
        body = ("{" + ",".join(entry % i for i in range(count)) + "}").encode()
        out.write(len(body).to_bytes(8, "little") + body)


async def header_case(way: str, old_rev: str, seconds: float = 8.0) -> dict[str, Any]:
    import tempfile
    import threading

    from daemon.core.model import ModelSpec
    from daemon.core.settings import ProbeConfig
    from daemon.probing.context import make_http_client
    from daemon.probing.prober import Prober

    module = local_file_module(way, old_rev)
    path = Path(tempfile.mkdtemp()) / "hostile.safetensors"
    write_header_file(path, 90_000_000)
    worst = 0.0
    running = True
    threads_peak = threading.active_count()
    outcomes: dict[str, int] = {}

    async def ticker() -> None:
        nonlocal worst, threads_peak
        last = time.perf_counter()
        while running:
            await anyio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.005)
            last = now
            threads_peak = max(threads_peak, threading.active_count())

    config = ProbeConfig(timeout=3.0)
    spec = ModelSpec(id="hostile", provider="local_file", local_path=str(path))
    base_threads = threading.active_count()
    base = rss_peak_kb()
    async with make_http_client(config) as client, anyio.create_task_group() as tg:
        prober = Prober({"local_file": module.LocalFileProbe()}, client, config)
        tg.start_soon(ticker)

        async def one() -> None:
            result = await prober.run(spec)
            key = result.reason[:60] or result.status.value
            outcomes[key] = outcomes.get(key, 0) + 1

        started = time.perf_counter()
        async with anyio.create_task_group() as probes:
            while time.perf_counter() - started < seconds:
                probes.start_soon(one)
                await anyio.sleep(0.5)
        running = False
    return {"case": f"header-{way}", "rss_growth_mb": (rss_peak_kb() - base) / 1024,
            "threads_peak": threads_peak - base_threads + 1, "loop_stall_ms": worst * 1000,
            "outcomes": outcomes}


def strings_case() -> list[dict[str, Any]]:
    from daemon.config import parse_config
    from daemon.core.model import ProbeResult
    from daemon.core.registry import ModelRegistry
    from daemon.persist.codec import to_state
    from daemon.persist.store import StateStore
    from daemon.probing.limits import bounded_result

    config = parse_config({"models": [
        {"id": f"m{i}", "provider": "openai", "endpoint": f"http://10.0.0.{i}:8000"}
        for i in range(30)]}, "bench.toml")
    raw = ProbeResult.healthy(12.0, http_status=200, listed=1, owned_by="x" * 900_000)
    rows = []
    for way, result in (("before", raw), ("after", bounded_result(raw))):
        registry = ModelRegistry(config, 1_700_000_000.0)
        for i in range(30):
            registry.apply_probe(f"m{i}", result, 1_700_000_000.0 + i)
        store = StateStore("/tmp/unused-state.json")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            content = store.encode(to_state(registry))
            times.append(time.perf_counter() - t0)
        rows.append({"case": f"strings-{way}", "state_bytes": len(content),
                     "encode_ms": sorted(times)[2] * 1000})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--only", nargs="*", default=["bomb", "header", "strings"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, way = args.case.split("-", 1)
        if kind == "bomb":
            print(json.dumps(anyio.run(bomb_case, way, args.size_mb)))
        else:
            print(json.dumps(anyio.run(header_case, way, args.old_rev)))
        return

    def fresh(case: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, __file__, "--case", case, "--size-mb",
                               str(args.size_mb), "--old-rev", args.old_rev],
                              capture_output=True, text=True, check=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    if "bomb" in args.only:
        rows = [fresh("bomb-old"), fresh("bomb-new")]
        print("| case | wire bytes | decoded | peak RSS growth | worst loop stall | wall | "
              "outcome |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['wire_bytes']:,} | {r['decoded_mb']} MB | "
                  f"{r['rss_growth_mb']:.1f} MB | {r['loop_stall_ms']:.0f} ms | "
                  f"{r['wall_s']:.2f} s | {r['outcome']} |")
        print()
    if "header" in args.only:
        rows = [fresh("header-old"), fresh("header-new")]
        print("| case | peak RSS growth | threads alive at most | worst loop stall | outcomes |")
        print("|---|---|---|---|---|")
        for r in rows:
            outcomes = "; ".join(f"{n}× {k}" for k, n in r["outcomes"].items())
            print(f"| {r['case']} | {r['rss_growth_mb']:.0f} MB | {r['threads_peak']} | "
                  f"{r['loop_stall_ms']:.0f} ms | {outcomes} |")
        print()
    if "strings" in args.only:
        print("| case | state file | encode (median of 5) |")
        print("|---|---|---|")
        for r in strings_case():
            print(f"| {r['case']} | {r['state_bytes']:,} bytes | {r['encode_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
