"""Failover: time from a primary's upstream dying to ``resolve`` naming the fallback.

The real daemon runs as a subprocess (``daemon.testing.harness.DaemonProcess``) with two fake
OpenAI-compatible upstreams from ``daemon.testing.fakes.FakeServers``: ``a`` (primary of role
``chat``) and ``b``. Default health and probe settings (failure_threshold 3, recheck 500 ms,
timeout 3 s) with ``interval`` 5 s, then 1 s. Each trial waits a random time in
[0, interval) — so the death falls at a random phase of the probe schedule — then kills
``a``'s listener (``down``: connections refused, as when the server process dies) and polls
``GET /api/v1/resolve?role=chat`` every 20 ms until it answers ``b``. Between trials ``a``
comes back and is re-probed at once (two ``evaluate`` calls), so trials do not wait out a
recovery interval; trials share one daemon.

Baseline, in the same run: the detection model ``U(0, interval ± 10 %) + (failure_threshold
− 1) × recheck_interval`` (a probe must come due, fail, and be confirmed by the rechecks),
whose median is about ``interval / 2 + 1 s``. The daemon's own ``health_changed`` log lines
split each measured time into "first failed probe" and "declared unavailable".
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime
from typing import Any

from common import median, percentile, table, verdict, workdir, write_result

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

POLL = 0.020
FAILURE_THRESHOLD = 3
RECHECK = 0.5


def resolve_id(daemon: DaemonProcess) -> str | None:
    status, body = daemon.request("GET", "/api/v1/resolve?role=chat", timeout=5.0)
    return body.get("model_id") if status == 200 and isinstance(body, dict) else None


def log_time(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def trial(daemon: DaemonProcess, fake: FakeOpenAI, interval: float,
          rng: random.Random) -> dict[str, float]:
    """One kill → failover measurement; leaves ``a`` healthy and primary again."""
    time.sleep(rng.uniform(0.0, interval))
    seen = len(daemon.log_events("health_changed"))
    killed_wall = time.time()
    fake.set_mode("down")
    t0 = time.monotonic()
    while resolve_id(daemon) != "b":
        if time.monotonic() - t0 > 60:
            raise TimeoutError("no failover within 60 s")
        time.sleep(POLL)
    failover = time.monotonic() - t0
    fake.set_mode("normal")
    # back at once: two successes leave "unavailable" (success_threshold 2)
    for _ in range(2):
        daemon.post("/api/v1/models/a/evaluate")
    wait_for(lambda: resolve_id(daemon) == "a", 30, what="a back as the answer")
    daemon.wait_health("a", "healthy", timeout=30)
    first_failure = unavailable = float("nan")
    for entry in daemon.log_events("health_changed")[seen:]:
        if entry.get("model_id") != "a":
            continue
        at = log_time(entry) - killed_wall
        if entry.get("new") in ("degraded", "unavailable") and first_failure != first_failure:
            first_failure = at
        if entry.get("new") == "unavailable":
            unavailable = at
            break
    return {"failover_s": failover, "first_failure_s": first_failure,
            "unavailable_s": unavailable}


def run_interval(interval: float, trials: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    work = workdir("failover")
    with FakeServers() as servers:
        a = servers.start(FakeOpenAI(["a"], flavor="vllm"))
        b = servers.start(FakeOpenAI(["b"], flavor="vllm"))
        config = daemon_config(work, [
            {"id": "a", "provider": "openai", "endpoint": a.url, "role": "chat",
             "primary": True},
            {"id": "b", "provider": "openai", "endpoint": b.url, "role": "chat"},
        ], probe={"interval": f"{interval:g}s", "timeout": "3s",
                  "recheck_interval": f"{int(RECHECK * 1000)}ms"},
            health={"failure_threshold": FAILURE_THRESHOLD})
        with DaemonProcess(work, config) as daemon:
            daemon.wait_health("a", "healthy", timeout=30)
            daemon.wait_health("b", "healthy", timeout=30)
            assert resolve_id(daemon) == "a"
            results = []
            for n in range(trials):
                results.append(trial(daemon, a, interval, rng))
                print(f"  interval {interval:g}s trial {n + 1}/{trials}: "
                      f"{results[-1]['failover_s']:.3f} s", file=sys.stderr, flush=True)
    # the detection model, sampled: due at U(0, interval × U(0.9, 1.1)), then the rechecks
    model = sorted(rng.uniform(0.0, interval * rng.uniform(0.9, 1.1))
                   + (FAILURE_THRESHOLD - 1) * RECHECK for _ in range(10000))
    times = [r["failover_s"] for r in results]
    return {
        "interval_s": interval, "trials": trials, "results": results,
        "median_s": median(times), "p90_s": percentile(times, 90), "min_s": min(times),
        "max_s": max(times),
        "model_median_s": median(model), "model_p90_s": percentile(model, 90),
        "first_failure_median_s": median([r["first_failure_s"] for r in results]),
        "unavailable_median_s": median([r["unavailable_s"] for r in results]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-3 trials per interval")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=6)
    args = parser.parse_args()
    plan = [(5.0, 2), (1.0, 3)] if args.quick else [(5.0, 20), (1.0, 20)]
    if args.trials:
        plan = [(interval, args.trials) for interval, _ in plan]
    runs = [run_interval(interval, trials, args.seed) for interval, trials in plan]
    rows = [[f"{r['interval_s']:g} s", r["trials"], r["median_s"], r["p90_s"], r["min_s"],
             r["max_s"], r["first_failure_median_s"], r["unavailable_median_s"],
             r["model_median_s"], r["model_p90_s"]] for r in runs]
    five = next(r for r in runs if r["interval_s"] == 5.0)
    met = five["median_s"] <= 4.0
    md = "\n".join([
        "### Failover (upstream killed → resolve names the fallback; threshold 3, "
        "recheck 500 ms, timeout 3 s)", "",
        table(["interval", "trials", "median s", "p90 s", "min s", "max s",
               "first failed probe s (median)", "unavailable s (median)",
               "model median s", "model p90 s"], rows), "",
        "Model = the detection model U(0, interval ± 10 %) + 2 × 500 ms, sampled. "
        "References: Kubernetes' default readiness probe (period 10 s × failureThreshold 3) "
        "≈ 30 s; LiteLLM's background health check every 300 s.", "",
        table(["target", "measured", "result"],
              [["median ≤ 4 s at interval 5 s", f"{five['median_s']:.2f} s", verdict(met)]]),
    ])
    print(md)
    write_result("failover", {"quick": args.quick, "runs": runs,
                              "targets": {"median <= 4 s at interval 5 s": met}}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
