"""Control socket: ``resolve`` throughput and latency beside a bare h11 server, same run.

The real daemon runs as a subprocess (5 healthy models of role ``chat`` behind a fake
upstream); the baseline, ``hello_server.py``, is another subprocess with the same anyio + h11
stack on the same kind of Unix socket. The load generator, ``loadgen.py``, is a third process:
``CLIENTS`` keep-alive connections, one request in flight on each, pre-built request bytes.
Levels 1, 16 and 64 clients; each level runs bare, daemon, bare, daemon (rounds alternate so
drift on a noisy machine hits both) and the table shows the median of the rounds. The server's
CPU share during the run (from /proc) shows whether it was CPU-bound; the generator's shows it
was not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    median,
    proc_cpu_seconds,
    table,
    verdict,
    workdir,
    write_result,
)

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config

LEVELS = (1, 16, 64)
RESOLVE = "/api/v1/resolve?role=chat"


def load(path: str, server_pid: int, clients: int, seconds: float, warmup: float,
         target: str) -> dict[str, Any]:
    cpu0 = proc_cpu_seconds(server_pid)
    wall0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), path, str(clients), str(seconds),
         str(warmup), target], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    result["server_cpu_share"] = (proc_cpu_seconds(server_pid) - cpu0) / (
        time.perf_counter() - wall0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s per level, one round")
    args = parser.parse_args()
    seconds, warmup, rounds = (0.5, 0.2, 1) if args.quick else (3.0, 0.5, 2)
    work = workdir("socket")
    bare_path = str(work / "hello.sock")
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with FakeServers() as servers:
        fake = servers.start(FakeOpenAI([f"c{n}" for n in range(5)]))
        models = [{"id": f"c{n}", "provider": "openai", "endpoint": fake.url, "role": "chat",
                   "primary": n == 0} for n in range(5)]
        config = daemon_config(work / "d", models, probe={"interval": "5s"},
                               daemon={"log_format": "json"})
        bare = subprocess.Popen([sys.executable, str(BENCH_DIR / "hello_server.py"), bare_path],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
            with DaemonProcess(work / "d", config) as daemon:
                for n in range(5):
                    daemon.wait_health(f"c{n}", "healthy", timeout=30)
                status, body = daemon.request("GET", RESOLVE)
                assert status == 200, body
                response_bytes = len(json.dumps(body))
                for round_ in range(rounds):
                    for clients in LEVELS:
                        order = [("bare", bare_path, bare.pid, "/"),
                                 ("daemon", daemon.socket_path, daemon.pid, RESOLVE)]
                        if round_ % 2:
                            order.reverse()
                        for name, path, pid, target in order:
                            result = load(path, pid, clients, seconds, warmup, target)
                            samples.setdefault((name, clients), []).append(result)
                            print(f"  {name} {clients} clients: {result['rps']:.0f} req/s "
                                  f"p99 {result['p99_ms']:.2f} ms", file=sys.stderr, flush=True)
                daemon_rss = Path(f"/proc/{daemon.pid}/status").read_text()
        finally:
            bare.kill()
            bare.wait()

    def summary(name: str, clients: int) -> dict[str, float]:
        runs = samples[(name, clients)]
        return {key: median([r[key] for r in runs]) for key in
                ("rps", "p50_ms", "p99_ms", "max_ms", "server_cpu_share", "loadgen_cpu_share")}

    rows = []
    levels: dict[str, Any] = {}
    for clients in LEVELS:
        b, d = summary("bare", clients), summary("daemon", clients)
        ratio = d["rps"] / b["rps"]
        levels[str(clients)] = {"bare": b, "daemon": d, "ratio": ratio}
        rows.append([clients, b["rps"], d["rps"], ratio, b["p50_ms"], d["p50_ms"], b["p99_ms"],
                     d["p99_ms"], d["server_cpu_share"], d["loadgen_cpu_share"]])
    at16 = levels["16"]
    targets = {"throughput >= 0.8 x bare (16 clients)": at16["ratio"] >= 0.8,
               "p99 <= 10 ms at 16 clients": at16["daemon"]["p99_ms"] <= 10.0}
    for clients in (1, 64):
        targets[f"throughput >= 0.8 x bare ({clients} clients)"] = (
            levels[str(clients)]["ratio"] >= 0.8)
    md = "\n".join([
        "### Control socket (`GET /api/v1/resolve?role=chat`, keep-alive, closed loop)", "",
        table(["clients", "bare req/s", "daemon req/s", "daemon ÷ bare", "bare p50 ms",
               "daemon p50 ms", "bare p99 ms", "daemon p99 ms", "daemon CPU share",
               "loadgen CPU share"], rows), "",
        f"Bare = h11 + anyio \"hello\" server (17-byte body); the daemon's resolve answer is "
        f"{response_bytes} bytes. Median of {rounds} alternating round(s) of {seconds:g} s "
        "per level. CPU share 1.0 = one core busy.", "",
        table(["target", "result"], [[t, verdict(ok)] for t, ok in targets.items()]),
    ])
    print(md)
    rss = [line for line in daemon_rss.splitlines() if line.startswith(("VmRSS", "VmHWM"))]
    write_result("control_socket", {"quick": args.quick, "levels": levels,
                                    "samples": {f"{k[0]}-{k[1]}": v for k, v in samples.items()},
                                    "response_bytes": response_bytes, "daemon_rss": rss,
                                    "targets": targets}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
