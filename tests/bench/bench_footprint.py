"""Footprint: daemon RSS and CPU at 100, 1,000 and 10,000 models; state write time and size.

RSS: the real daemon as a subprocess, its models spread over 10 fake OpenAI-compatible
endpoints (``fleet.py``, a separate process), default probe settings (interval 5 s). Once
every model is healthy and two more sweeps have run, VmRSS and VmHWM are read from /proc, and
the daemon's CPU share over one further interval shows what steady probing costs. Baselines
in the same run: an idle interpreter that has imported what the daemon imports, and a bare
``python -c`` interpreter.

State write: in this process, a registry of N models with a full latency window each (what a
long-running daemon holds) is timed through what ``Daemon.persist`` does — ``to_state()`` on
the event loop, then ``StateStore.encode`` and ``StateStore.write_bytes`` (temp file, fsync,
rename, fsync dir) in a worker thread — beside a plain write + fsync of the same bytes. The
daemon's own ``last_state_write`` (bytes, and seconds of the whole write: snapshot, encoding
and write) from ``GET /api/v1/status`` is shown too; it runs while the daemon probes, so it
is noisier.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from common import (
    FakeFleet,
    median,
    proc_cpu_seconds,
    proc_rss_kb,
    table,
    verdict,
    workdir,
    write_result,
)

from daemon.config import parse_config
from daemon.core.model import ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.persist.codec import to_state
from daemon.persist.store import StateStore
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

ENDPOINTS = 10
IMPORTS = ("import time, daemon.service.lifecycle, daemon.service.cli, plugins.openai, "
           "plugins.ollama, plugins.local_file; print('ready', flush=True); time.sleep(3600)")


def idle_rss(code: str) -> int:
    """VmRSS (KiB) of ``python -c code`` once it prints ready."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc_rss_kb(proc.pid)[0]
    finally:
        proc.kill()
        proc.wait()


def daemon_footprint(count: int, settle_sweeps: int) -> dict[str, Any]:
    per = count // ENDPOINTS
    work = workdir("foot")
    with FakeFleet(ENDPOINTS, per, 0.0) as fleet:
        models = [{"id": FakeFleet.model_name(e, n), "provider": "openai", "endpoint": url,
                   "role": f"r{e}", "primary": n == 0}
                  for e, url in enumerate(fleet.urls) for n in range(per)]
        config = daemon_config(work, models, probe={"interval": "5s", "timeout": "3s",
                                                    "recheck_interval": "500ms"},
                               daemon={"state_flush_interval": "2s"})
        with DaemonProcess(work, config) as daemon:
            started = time.monotonic()
            ready_rss = proc_rss_kb(daemon.pid)[0]
            wait_for(lambda: daemon.get("/api/v1/status")["health"].get("healthy") == count,
                     120, interval=0.5, what=f"{count} models healthy")
            all_healthy_s = time.monotonic() - started
            time.sleep(5.0 * settle_sweeps)
            cpu0, wall0 = proc_cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(5.0)
            cpu_share = (proc_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - wall0)
            rss, hwm = proc_rss_kb(daemon.pid)
            write = daemon.get("/api/v1/status")["last_state_write"]
            requests = fleet.total_requests()
    return {"models": count, "ready_rss_kb": ready_rss, "rss_kb": rss, "hwm_kb": hwm,
            "cpu_share": cpu_share, "all_healthy_s": all_healthy_s,
            "daemon_write_seconds": write.get("seconds"), "daemon_write_bytes": write.get("bytes"),
            "upstream_requests": requests}


def state_write(count: int, repeats: int) -> dict[str, Any]:
    work = workdir("state")
    models = [{"id": f"m{n}", "provider": "openai", "endpoint": f"http://127.0.0.1:{9000 + n % 10}",
               "role": f"r{n % 10}", "primary": n < 10} for n in range(count)]
    config = parse_config({"daemon": {"state_file": str(work / "state.json")},
                           "models": models}, "<bench>")
    now = time.time()
    registry = ModelRegistry(config, now)
    for step in range(config.health.window):
        for n in range(count):
            registry.apply_probe(f"m{n}", ProbeResult.healthy(12.5 + step, listed=count),
                                 now + step * 5)
    store = StateStore(work / "state.json")
    snapshot, encode, write, plain = [], [], [], []
    content = b""
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = to_state(registry)
        t1 = time.perf_counter()
        content = store.encode(data)
        t2 = time.perf_counter()
        store.write_bytes(content)
        t3 = time.perf_counter()
        fd = os.open(work / "plain.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        t4 = time.perf_counter()
        snapshot.append(t1 - t0)
        encode.append(t2 - t1)
        write.append(t3 - t2)
        plain.append(t4 - t3)
    ms = 1000.0
    return {"models": count, "bytes": len(content), "to_state_ms": median(snapshot) * ms,
            "encode_ms": median(encode) * ms, "write_bytes_ms": median(write) * ms,
            "total_ms": (median(snapshot) + median(encode) + median(write)) * ms,
            "loop_blocked_ms": (median(snapshot) + median(encode)) * ms,
            "plain_write_fsync_ms": median(plain) * ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 models, short")
    args = parser.parse_args()
    counts = (100, 1000) if args.quick else (100, 1000, 10000)
    settle = 0 if args.quick else 2
    base_imports = idle_rss(IMPORTS)
    base_bare = idle_rss("import time; print('ready', flush=True); time.sleep(3600)")
    writes = [state_write(n, 3 if args.quick else 5) for n in counts]
    daemons = []
    for n in counts:
        print(f"… daemon with {n} models", file=sys.stderr, flush=True)
        daemons.append(daemon_footprint(n, settle))
    mb = 1024.0
    rss_rows = [["bare `python -c`", base_bare / mb, None, None, None, None]]
    rss_rows.append(["python + the daemon's imports, idle", base_imports / mb, None, None, None,
                     None])
    for d in daemons:
        rss_rows.append([f"modeld, {d['models']:,} models", d["rss_kb"] / mb, d["hwm_kb"] / mb,
                         (d["rss_kb"] - base_imports) / d["models"], d["cpu_share"] * 100.0,
                         d["all_healthy_s"]])
    write_rows = [[w["models"], w["bytes"] / 1024.0, w["to_state_ms"], w["encode_ms"],
                   w["write_bytes_ms"], w["total_ms"], w["plain_write_fsync_ms"],
                   next((d["daemon_write_seconds"] for d in daemons if d["models"] == w["models"]),
                        None)]
                  for w in writes]
    for row in write_rows:
        if row[-1] is not None:
            row[-1] = row[-1] * 1000.0
    d1k = next(d for d in daemons if d["models"] == 1000)
    w1k = next(w for w in writes if w["models"] == 1000)
    targets = {"RSS <= 60 MB at 1,000 models": d1k["hwm_kb"] / mb <= 60.0,
               "one state write <= 50 ms at 1,000 models": w1k["total_ms"] <= 50.0}
    md = "\n".join([
        "### Footprint (models over 10 fake endpoints, interval 5 s)", "",
        table(["process", "RSS MB", "peak RSS MB", "KiB/model over imports",
               "CPU % (steady probing)", "s to all healthy"], rss_rows), "",
        "### State write", "",
        table(["models", "file KiB", "to_state ms", "encode ms", "write_bytes ms",
               "one write ms", "plain write+fsync ms", "daemon's last write ms"], write_rows), "",
        "One write = to_state (event loop) + encode and write_bytes (worker thread: temp file, "
        "fsync, rename, fsync dir); registry with a full 20-probe window per model. Daemon's "
        "last write = `last_state_write.seconds` from /api/v1/status (the whole write, while "
        "probing).", "",
        table(["target", "result"], [[t, verdict(ok)] for t, ok in targets.items()]),
    ])
    print(md)
    write_result("footprint", {"quick": args.quick, "baseline_rss_kb": {
        "bare": base_bare, "imports": base_imports}, "daemons": daemons, "state_writes": writes,
        "targets": targets}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
