"""The front door's cost: the same requests through the door and straight to the upstream,
in the same run.

Three processes besides this one: the upstream (a vLLM fake, ``ChatOpenAI``, in a process of
its own so its CPU stays off the others), the real daemon (``modeld run``) with ``[gateway]``
on TCP and one model behind that upstream, and a load generator (this file with ``--loadgen``:
raw keep-alive sockets, pre-built request bytes, a ``selectors`` loop, so that it is not the
bottleneck; its CPU share is printed). The model's upstream name is ``chat`` and the role is
``chat``, so the door and the direct run send the very same bytes.

Measured: latency (p50, p99) of one non-streamed chat completion and requests/s at 1, 16 and
64 concurrent clients, door vs direct, rounds alternating (direct, door, direct, door; the
median of the rounds); 64 concurrent streams of 500 chunks each, door vs direct (chunks/s, the
daemon's CPU per chunk); the daemon's RSS with 200 streams in flight against none (per stream).
Targets (issue 14): added p50 ≤ 1 ms, ≥ 0.5 × direct req/s at 16 clients, streaming ≥ 0.9 ×
direct, ≤ 50 KB per in-flight stream.

    python tests/bench/bench_gateway.py [--seconds 3] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    median,
    percentile,
    proc_cpu_seconds,
    proc_rss_kb,
    table,
    verdict,
    workdir,
    write_result,
)

LEVELS = (1, 16, 64)
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- the upstream


def serve_upstream(tokens: int, interval: float) -> None:
    """Run a vLLM fake until killed; print its port first."""
    import anyio

    from daemon.testing.chat_fakes import ChatOpenAI

    async def main() -> None:
        fake = ChatOpenAI(["chat"], flavor="vllm", tokens=tokens, chunk_interval=interval,
                          coalesce=False)
        async with fake:
            print(fake.port, flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


def start_upstream(tokens: int, interval: float = 0.0) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(HERE), "--upstream", str(tokens),
                             str(interval)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# ----------------------------------------------------------------------------- load


def request_bytes(stream: bool) -> bytes:
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "Say hi"}],
                       "max_tokens": 16, "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def _complete(buf: bytes) -> int:
    """Length of the first complete response in ``buf`` (0: not yet): Content-Length or
    chunked."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    at = head.find(b"content-length:")
    if at >= 0:
        total = end + 4 + int(head[at + 15:].split(b"\r\n", 1)[0])
        return total if len(buf) >= total else 0
    tail = buf.find(b"\r\n0\r\n\r\n", end)
    return tail + 7 if tail >= 0 else 0


def loadgen(port: int, clients: int, seconds: float, warmup: float, stream: bool
            ) -> dict[str, Any]:
    request = request_bytes(stream)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ, [b"", time.perf_counter()])
        sock.sendall(request)
    begin = time.perf_counter()
    measure_from, end = begin + warmup, begin + warmup + seconds
    latencies: list[float] = []
    errors = events = 0
    cpu0 = 0.0
    while (now := time.perf_counter()) < end:
        if not cpu0 and now >= measure_from:
            cpu0 = time.process_time()
        for key, _ in sel.select(timeout=0.5):
            state = key.data
            data = key.fileobj.recv(262144)  # type: ignore[union-attr]
            if not data:
                raise ConnectionError("the server closed a keep-alive connection")
            if stream and now >= measure_from:
                # chunks as they arrive (not per finished stream: 64 streams of 500 chunks
                # finish only a few times in a short window); "data: " split by a read is
                # found with the tail of the previous read
                events += (state[0][-5:] + data).count(b"data: ")
            state[0] += data
            size = _complete(state[0])
            if not size:
                continue
            done = time.perf_counter()
            response, state[0] = state[0][:size], state[0][size:]
            if not response.startswith(b"HTTP/1.1 200"):
                errors += 1
            if done >= measure_from:
                latencies.append(done - state[1])
            state[1] = time.perf_counter()
            key.fileobj.sendall(request)  # type: ignore[union-attr]
    cpu = time.process_time() - (cpu0 or time.process_time())
    for sock in socks:
        sock.close()
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "errors": errors,
            "chunks_per_s": events / seconds, "loadgen_cpu_share": cpu / seconds}


def load(port: int, clients: int, seconds: float, stream: bool, watch_pid: int
         ) -> dict[str, Any]:
    cpu0 = proc_cpu_seconds(watch_pid)
    done = subprocess.run([sys.executable, str(HERE), "--loadgen", str(port), str(clients),
                           str(seconds), "0.5", "1" if stream else "0"],
                          capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    result["watched_cpu_s"] = proc_cpu_seconds(watch_pid) - cpu0
    return result


# ----------------------------------------------------------------------------- the daemon


def start_daemon(upstream_port: int, door_port: int, work: Path) -> Any:
    from daemon.testing.harness import DaemonProcess, daemon_config

    config = daemon_config(work, [{"id": "bench", "provider": "openai", "role": "chat",
                                   "endpoint": f"http://127.0.0.1:{upstream_port}",
                                   "model": "chat", "primary": True}],
                           probe={"interval": "30s", "timeout": "2s"},
                           daemon={"log_format": "json"},
                           gateway={"listen": f"127.0.0.1:{door_port}", "max_concurrent": 512})
    daemon = DaemonProcess(work, config)
    daemon.start()
    daemon.wait_health("bench", "healthy")
    return daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    work = workdir("gateway")
    rows, results = [], {}
    upstream, up_port = start_upstream(tokens=3)
    streamer, stream_port = start_upstream(tokens=500)
    slow, slow_port = start_upstream(tokens=500, interval=0.02)
    door_port, door2_port, door3_port = free_port(), free_port(), free_port()
    daemons = []
    try:
        daemon = start_daemon(up_port, door_port, work / "a")
        daemons.append(daemon)
        # --- non-streamed requests, 1 / 16 / 64 clients
        for clients in LEVELS:
            rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "door": []}
            for _ in range(args.rounds):
                rounds["direct"].append(load(up_port, clients, args.seconds, False,
                                             upstream.pid))
                rounds["door"].append(load(door_port, clients, args.seconds, False,
                                           daemon.pid))
            summary = {kind: {key: median([r[key] for r in runs]) for key in
                              ("rps", "p50_ms", "p99_ms", "errors", "loadgen_cpu_share",
                               "watched_cpu_s")} for kind, runs in rounds.items()}
            results[f"requests_{clients}"] = summary
            direct, door = summary["direct"], summary["door"]
            # CPU per request of the process serving it (door: the daemon; direct: the
            # upstream fake): robust to a shared machine, where req/s is not
            span = args.seconds + 0.5
            door_cpu = door["watched_cpu_s"] / max(1.0, door["rps"] * span) * 1000
            direct_cpu = direct["watched_cpu_s"] / max(1.0, direct["rps"] * span) * 1000
            summary["door"]["cpu_ms_per_request"] = door_cpu
            summary["direct"]["cpu_ms_per_request"] = direct_cpu
            rows.append([f"chat completion, {clients} client(s)", door["rps"], direct["rps"],
                         door["rps"] / direct["rps"], door["p50_ms"], direct["p50_ms"],
                         door["p50_ms"] - direct["p50_ms"], door["p99_ms"], direct["p99_ms"],
                         door_cpu, direct_cpu])
        # --- 64 streams of 500 chunks
        daemon2 = start_daemon(stream_port, door2_port, work / "b")
        daemons.append(daemon2)
        direct_s = load(stream_port, 64, args.seconds, True, streamer.pid)
        door_s = load(door2_port, 64, args.seconds, True, daemon2.pid)
        results["streams_64"] = {"direct": direct_s, "door": door_s}
        # --- RSS per in-flight stream: 200 slow streams (500 chunks, 20 ms apart: 10 s each)
        daemon3 = start_daemon(slow_port, door3_port, work / "c")
        daemons.append(daemon3)
        rss_idle = proc_rss_kb(daemon3.pid)[0]
        socks = []
        request = request_bytes(True)
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", door3_port))
            sock.sendall(request)
            socks.append(sock)
        time.sleep(2.0)
        rss_busy = proc_rss_kb(daemon3.pid)[0]
        for sock in socks:
            sock.recv(4096)  # each one is streaming
            sock.close()
        per_stream_kb = (rss_busy - rss_idle) / 200
        results["rss_per_stream_kb"] = {"idle_kb": rss_idle, "busy_kb": rss_busy,
                                        "per_stream_kb": per_stream_kb}
    finally:
        for daemon in daemons:
            daemon.close()
        for proc in (upstream, streamer, slow):
            proc.kill()
            proc.wait()

    added_p50 = results["requests_1"]["door"]["p50_ms"] - results["requests_1"]["direct"]["p50_ms"]
    ratio16 = results["requests_16"]["door"]["rps"] / results["requests_16"]["direct"]["rps"]
    stream_ratio = door_s["chunks_per_s"] / direct_s["chunks_per_s"]
    cpu_per_chunk_us = door_s["watched_cpu_s"] / max(1, door_s["chunks_per_s"] * args.seconds
                                                    ) * 1e6
    text = [
        "Front door vs the same requests straight to the upstream (a vLLM fake), same run:",
        "",
        table(["what", "door req/s", "direct req/s", "ratio", "door p50 ms", "direct p50 ms",
               "added p50 ms", "door p99 ms", "direct p99 ms", "daemon CPU ms/req",
               "upstream CPU ms/req"], rows),
        "",
        table(["64 streams of 500 chunks", "door", "direct", "ratio"],
              [["chunks/s", door_s["chunks_per_s"], direct_s["chunks_per_s"], stream_ratio],
               ["streams/s", door_s["rps"], direct_s["rps"], door_s["rps"] / direct_s["rps"]],
               ["daemon CPU µs per chunk", cpu_per_chunk_us, None, None]]),
        "",
        f"RSS: {rss_idle / 1024:.1f} MB idle, {rss_busy / 1024:.1f} MB with 200 streams in "
        f"flight: {per_stream_kb:.1f} KB per stream",
        "",
        table(["target", "measured", ""], [
            ["added p50 ≤ 1 ms (1 client)", f"{added_p50:.2f} ms", verdict(added_p50 <= 1.0)],
            ["≥ 0.5 × direct req/s at 16 clients", f"{ratio16:.2f} ×", verdict(ratio16 >= 0.5)],
            ["streaming ≥ 0.9 × direct", f"{stream_ratio:.2f} ×", verdict(stream_ratio >= 0.9)],
            ["≤ 50 KB per in-flight stream", f"{per_stream_kb:.1f} KB",
             verdict(per_stream_kb <= 50)]]),
        "",
        f"load generator CPU share ≤ {max(r['door']['loadgen_cpu_share'] for k, r in results.items() if k.startswith('requests')):.2f}"  # noqa: E501
        " (it was not the bottleneck when well below 1)",
    ]
    markdown = "\n".join(text)
    print(markdown)
    write_result("gateway", results, markdown)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        serve_upstream(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1:2] == ["--loadgen"]:
        port, clients, seconds, warmup, stream = sys.argv[2:7]
        print(json.dumps(loadgen(int(port), int(clients), float(seconds), float(warmup),
                                 stream == "1")))
    else:
        raise SystemExit(main(sys.argv[1:]))
