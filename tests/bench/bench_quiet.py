"""A quiet host: state writes, CPU and upstream requests while nothing changes.

The real daemon runs as a subprocess (``daemon.testing.harness.DaemonProcess``) with N models
behind E fake servers (``daemon.testing.fakes.FakeOpenAI``, flavour ``vllm``, ``server =
"auto"``: a listing and ``/health`` per endpoint per sweep), every model healthy and staying
so; interval 5 s, the shipped ``state_flush_interval`` (2 s). After every model is healthy and
a settling sweep, the window is measured: state writes (``modeld_state_write_duration_seconds``
count, from ``/metrics``), the daemon's CPU seconds (``/proc``), and requests per endpoint per
sweep (the fakes count them).

Baseline, in the same run and the same setup: ``state_checkpoint = "0s"``, which writes on
every flush where anything changed: the behaviour before checkpoints (issue 13: 8 writes in
30 s at 40 models / 4 servers).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from common import proc_cpu_seconds, table, verdict, workdir, write_result

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config

INTERVAL = 5.0


def state_writes(daemon: DaemonProcess) -> int:
    status, text = daemon.request("GET", "/metrics")
    assert status == 200, status
    for line in str(text).splitlines():
        if line.startswith("modeld_state_write_duration_seconds_count"):
            return int(float(line.rpartition(" ")[2]))
    return 0


def run(models: int, endpoints: int, checkpoint: str, window: float) -> dict[str, Any]:
    per = models // endpoints
    work = workdir("quiet")
    with FakeServers() as servers:
        fakes = [servers.start(FakeOpenAI([f"m{e}-{n}" for n in range(per)], flavor="vllm"))
                 for e in range(endpoints)]
        declared = [{"id": f"m{e}-{n}", "provider": "openai", "endpoint": fake.url,
                     "role": f"r{e}"} for e, fake in enumerate(fakes) for n in range(per)]
        config = daemon_config(work, declared,
                               daemon={"state_flush_interval": "2s",
                                       "state_checkpoint": checkpoint},
                               probe={"interval": f"{INTERVAL:g}s", "timeout": "3s",
                                      "recheck_interval": "500ms"})
        with DaemonProcess(work, config) as daemon:
            for entry in declared[:: max(1, per)]:
                daemon.wait_health(entry["id"], "healthy", timeout=60)
            time.sleep(INTERVAL + 2.5)  # every model healthy, a sweep and a flush after it
            writes0, cpu0 = state_writes(daemon), proc_cpu_seconds(daemon.pid)
            for fake in fakes:
                fake.reset_counts()
            started = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - started
            writes1, cpu1 = state_writes(daemon), proc_cpu_seconds(daemon.pid)
            requests = sum(fake.total_requests for fake in fakes)
    cpu = cpu1 - cpu0
    sweeps = elapsed / INTERVAL
    probed = models * sweeps
    return {
        "models": models, "endpoints": endpoints, "state_checkpoint": checkpoint,
        "window_s": elapsed, "state_writes": writes1 - writes0,
        "writes_per_hour": (writes1 - writes0) * 3600.0 / elapsed,
        "cpu_share_pct": 100.0 * cpu / elapsed,
        "cpu_ms_per_model_probed": 1000.0 * cpu / probed if probed else float("nan"),
        "requests_per_endpoint_per_sweep": requests / endpoints / sweeps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 s windows, 40 models only")
    parser.add_argument("--window", type=float, default=None)
    args = parser.parse_args()
    window = args.window or (15.0 if args.quick else 30.0)
    plan = [(40, 4)] if args.quick else [(40, 4), (1000, 10)]
    runs = []
    for models, endpoints in plan:
        for checkpoint in ("0s", "5m"):
            runs.append(run(models, endpoints, checkpoint, window))
            r = runs[-1]
            print(f"  {models} models, state_checkpoint {checkpoint}: {r['state_writes']} "
                  f"writes, {r['cpu_share_pct']:.2f} % CPU", file=sys.stderr, flush=True)
    rows = [[f"{r['models']} / {r['endpoints']}",
             "before (0s)" if r["state_checkpoint"] == "0s" else "5m (default)",
             f"{r['window_s']:.0f} s", r["state_writes"], r["writes_per_hour"],
             r["cpu_share_pct"], r["cpu_ms_per_model_probed"],
             r["requests_per_endpoint_per_sweep"]] for r in runs]
    quiet = next(r for r in runs if r["models"] == 40 and r["state_checkpoint"] == "5m")
    # ≤ 1 write per 5 min: in a window shorter than that, at most one
    writes_met = quiet["state_writes"] <= max(1, round(quiet["window_s"] / 300))
    cpu_met = quiet["cpu_share_pct"] <= 0.25
    requests_met = all(r["requests_per_endpoint_per_sweep"] <= 2.05 for r in runs)
    md = "\n".join([
        f"### A quiet host (interval {INTERVAL:g} s, nothing changing; vLLM fakes, listing + "
        "/health per endpoint)", "",
        table(["models / servers", "state_checkpoint", "window", "state writes",
               "writes per hour", "CPU % of a core", "CPU ms per model probed",
               "requests per endpoint per sweep"], rows), "",
        "Baseline: state_checkpoint 0s, the behaviour before checkpoints (issue 13: 8 writes "
        "in 30 s and 0.73 % of a core at 40 models / 4 servers).", "",
        table(["target", "measured", "result"], [
            ["≤ 1 state write per 5 min at 40 models", f"{quiet['state_writes']} in "
             f"{quiet['window_s']:.0f} s", verdict(writes_met)],
            ["≤ 0.25 % of a core at 40 models / 5 s", f"{quiet['cpu_share_pct']:.2f} %",
             verdict(cpu_met)],
            ["≤ 2 requests per endpoint per sweep", ", ".join(
                f"{r['requests_per_endpoint_per_sweep']:.2f}" for r in runs),
             verdict(requests_met)],
        ]),
    ])
    print(md)
    write_result("quiet", {"quick": args.quick, "runs": runs,
                           "targets": {"writes": writes_met, "cpu": cpu_met,
                                       "requests": requests_met}}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
