"""A closed-loop HTTP/1.1 load generator on keep-alive Unix-socket connections.

``python loadgen.py SOCKET_PATH CLIENTS SECONDS WARMUP REQUEST_TARGET`` opens ``CLIENTS``
connections, keeps one request in flight on each (pre-built bytes, no HTTP library), and
prints one JSON line: requests completed, seconds, requests/s, latency percentiles (ms), and
this process's CPU use, which shows the generator is not the bottleneck. One thread and a
``selectors`` loop: a response costs it a recv and a header scan.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1))))]


class Client:
    __slots__ = ("buf", "sock", "started")

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""
        self.started = 0.0


def complete(buf: bytes) -> int:
    """Length of the first complete response in ``buf`` (0: not complete yet)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    at = head.find(b"content-length:")
    if at < 0:
        raise ValueError(f"response without content-length: {buf[:200]!r}")
    length = int(head[at + 15:].split(b"\r\n", 1)[0])
    total = end + 4 + length
    return total if len(buf) >= total else 0


def run(path: str, clients: int, seconds: float, warmup: float, target: str) -> dict[str, float]:
    request = f"GET {target} HTTP/1.1\r\nHost: modeld\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    conns = [Client(path) for _ in range(clients)]
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.started = time.perf_counter()
        c.sock.sendall(request)
    begin = time.perf_counter()
    measure_from = begin + warmup
    end = measure_from + seconds
    latencies: list[float] = []
    errors = 0
    cpu0 = 0.0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if not cpu0 and now >= measure_from:
            cpu0 = time.process_time()
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            data = c.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed a keep-alive connection")
            c.buf += data
            size = complete(c.buf)
            if not size:
                continue
            done = time.perf_counter()
            if not c.buf.startswith(b"HTTP/1.1 200"):
                errors += 1
            c.buf = c.buf[size:]
            if done >= measure_from:
                latencies.append(done - c.started)
            c.started = time.perf_counter()
            c.sock.sendall(request)
    cpu = time.process_time() - (cpu0 or time.process_time())
    for c in conns:
        c.sock.close()
    return {"clients": clients, "requests": len(latencies), "seconds": seconds,
            "rps": len(latencies) / seconds, "errors": errors,
            "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies) * 1000,
            "loadgen_cpu_share": cpu / seconds}


if __name__ == "__main__":
    path, clients, seconds, warmup, target = sys.argv[1:6]
    print(json.dumps(run(path, int(clients), float(seconds), float(warmup), target)))
