"""Probe sweep: how long a sweep of every model takes, how many requests, how much CPU.

The daemon's own scheduler, prober, probe plugins and registry run in this process (a
``daemon.service.lifecycle.Daemon`` whose scheduler is started without the control socket);
the fake upstreams run in a separate process (``fleet.py``). In-process, so that CPU time is the
daemon's alone (``time.process_time`` of this process, which hosts nothing else while a sweep
runs) and the baseline — a bare ``httpx`` GET loop — runs in the very same interpreter and
run. The real daemon's /proc CPU time would also count its control socket, flusher and
start-up; its scheduling code is the same code as here.

A sweep is started by marking every model due (as at start-up) and waking the scheduler; it
ends when the last model's result has been applied to the registry. The first sweep is cold
(new connections, every model goes unknown → healthy and is logged); the reported figures
are the median of the warm sweeps after it.

Baseline: the same number of ``GET /v1/models`` as the ideal daemon would send (one per
endpoint, repeated to at least 640 requests so CPU is measurable) through one
``httpx.AsyncClient`` with the daemon's pool limits, 64 at a time.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from common import FakeFleet, median, table, verdict, workdir, write_result

from daemon.config import parse_config
from daemon.core.model import ModelSpec, ProbeResult
from daemon.service.lifecycle import Daemon
from daemon.service.logs import configure_logging, get_logger
from daemon.service.scheduler import ProbeScheduler

LATENCY = 0.020
MAX_CONCURRENT = 64


class SweepScheduler(ProbeScheduler):
    """The daemon's scheduler, saying when a given number of probe results has been applied."""

    target = 0
    done: anyio.Event | None = None

    def apply(self, spec: ModelSpec, result: ProbeResult) -> None:
        super().apply(spec, result)
        if self.probes_total >= self.target and self.done is not None:
            self.done.set()


@dataclass
class Sweep:
    wall_s: float
    cpu_s: float
    requests: int
    healthy: int


@dataclass
class CaseResult:
    name: str
    models: int
    endpoints: int
    cold: Sweep | None = None
    warm: list[Sweep] = field(default_factory=list)
    #: a sequential GET loop: the intrinsic CPU cost of one request
    baseline_cpu_per_get_ms: list[float] = field(default_factory=list)
    #: the same GETs 64 in flight, like a sweep: its wall time and CPU per GET
    concurrent_cpu_per_get_ms: list[float] = field(default_factory=list)
    baseline_wall_s: list[float] = field(default_factory=list)
    baseline_gets: int = 0


def make_config(work: str, urls: list[str], per_endpoint: int) -> Any:
    models = []
    for e, url in enumerate(urls):
        for n in range(per_endpoint):
            models.append({"id": FakeFleet.model_name(e, n), "provider": "openai",
                           "endpoint": url, "role": f"r{e}", "primary": n == 0})
    return parse_config({
        "daemon": {"state_file": f"{work}/state/model_registry.json",
                   "socket": f"{work}/control.sock", "plugin_dirs": [],
                   "log_format": "json"},
        # a long interval: sweeps happen only when the benchmark starts them
        "probe": {"interval": "1h", "timeout": "3s", "max_concurrent": MAX_CONCURRENT},
        "policy": {"interval": "1h"},
        "models": models,
    }, "<bench>")


async def bare_httpx(urls: list[str], total: int, concurrency: int) -> tuple[float, float]:
    """(CPU ms per GET, wall s) for ``total`` GETs spread over ``urls``, ``concurrency`` in
    flight, through one client with the daemon's pool limits."""
    limits = httpx.Limits(max_connections=MAX_CONCURRENT,
                          max_keepalive_connections=MAX_CONCURRENT, keepalive_expiry=30.0)
    targets = [f"{urls[i % len(urls)]}/v1/models" for i in range(total)]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3.0),
                                 trust_env=False) as client:
        # warm the pool the way the daemon's warm sweeps have it warm
        async def fetch_all(batch: list[str]) -> None:
            it = iter(batch)

            async def worker() -> None:
                for url in it:
                    response = await client.get(url)
                    response.raise_for_status()

            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker)

        await fetch_all(targets[:MAX_CONCURRENT])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await fetch_all(targets)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu * 1000.0 / total, wall


async def sweep(daemon: Daemon, fleet: FakeFleet, models: int) -> Sweep:
    scheduler = daemon.scheduler
    assert isinstance(scheduler, SweepScheduler)
    scheduler.next_due.clear()
    scheduler.target = scheduler.probes_total + models
    scheduler.done = anyio.Event()
    requests0 = fleet.total_requests()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    scheduler.reschedule.set()
    await scheduler.done.wait()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    requests = fleet.total_requests() - requests0
    healthy = daemon.registry.health_counts().get("healthy", 0)
    return Sweep(wall, cpu, requests, healthy)


async def run_case(name: str, endpoints: int, per_endpoint: int, warm_sweeps: int,
                   baseline_gets: int) -> CaseResult:
    models = endpoints * per_endpoint
    result = CaseResult(name, models, endpoints)
    work = workdir("sweep")
    (work / "state").mkdir()
    with FakeFleet(endpoints, per_endpoint, LATENCY) as fleet:
        result.baseline_gets = baseline_gets
        await baselines(result, fleet.urls, baseline_gets)

        config = make_config(str(work), fleet.urls, per_endpoint)
        daemon = Daemon(config, environ={}, log=get_logger("modeld"))
        scheduler = daemon.scheduler = SweepScheduler(daemon)
        daemon._load_plugins()
        daemon._load_state()
        try:
            async with anyio.create_task_group() as tg:
                scheduler.target = models
                scheduler.done = anyio.Event()
                requests0 = fleet.total_requests()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                tg.start_soon(scheduler.run)
                await scheduler.done.wait()
                result.cold = Sweep(time.perf_counter() - wall0, time.process_time() - cpu0,
                                    fleet.total_requests() - requests0,
                                    daemon.registry.health_counts().get("healthy", 0))
                for _ in range(warm_sweeps):
                    result.warm.append(await sweep(daemon, fleet, models))
                tg.cancel_scope.cancel()
        finally:
            await daemon._close_client()
            daemon.store.unlock()

        await baselines(result, fleet.urls, baseline_gets)
    return result


async def baselines(result: CaseResult, urls: list[str], gets: int) -> None:
    cpu_ms, _ = await bare_httpx(urls, min(gets, 200), 1)
    result.baseline_cpu_per_get_ms.append(cpu_ms)
    cpu_ms, wall = await bare_httpx(urls, gets, MAX_CONCURRENT)
    result.concurrent_cpu_per_get_ms.append(cpu_ms)
    result.baseline_wall_s.append(wall)


def summarise(case: CaseResult) -> dict[str, Any]:
    warm = case.warm or ([case.cold] if case.cold else [])
    ideal_requests = case.endpoints
    ideal_s = math.ceil(ideal_requests / MAX_CONCURRENT) * LATENCY
    wall = median([s.wall_s for s in warm])
    cpu_per_model_ms = median([s.cpu_s * 1000.0 / case.models for s in warm])
    requests = median([float(s.requests) for s in warm])
    bare_get_ms = median(case.baseline_cpu_per_get_ms)
    per_endpoint = requests / case.endpoints
    shared = case.models > case.endpoints
    out: dict[str, Any] = {
        "case": case.name, "models": case.models, "endpoints": case.endpoints,
        "ideal_ms": ideal_s * 1000.0, "wall_ms": wall * 1000.0, "wall_x_ideal": wall / ideal_s,
        "cold_wall_ms": case.cold.wall_s * 1000.0 if case.cold else None,
        "requests_per_sweep": requests, "requests_per_endpoint": per_endpoint,
        "cold_requests": case.cold.requests if case.cold else None,
        "cpu_ms_per_model": cpu_per_model_ms,
        "cpu_ms_per_sweep": median([s.cpu_s * 1000.0 for s in warm]),
        "bare_get_cpu_ms": bare_get_ms,
        "cpu_ratio": cpu_per_model_ms / bare_get_ms,
        "bare_wall_ms": median(case.baseline_wall_s) * 1000.0,
        "bare_get_cpu_ms_64": median(case.concurrent_cpu_per_get_ms),
        "bare_gets": case.baseline_gets,
        "healthy_after": warm[-1].healthy if warm else 0,
        "warm_sweeps": [vars(s) for s in case.warm],
        "cold_sweep": vars(case.cold) if case.cold else None,
        "baseline_cpu_per_get_ms": case.baseline_cpu_per_get_ms,
        "baseline_wall_s": case.baseline_wall_s,
        "concurrent_cpu_per_get_ms": case.concurrent_cpu_per_get_ms,
        "targets": {
            "wall <= 1.25 x ideal": wall / ideal_s <= 1.25,
        },
    }
    if shared:
        out["targets"]["<= 1 request per endpoint per sweep"] = per_endpoint <= 1.0
        if case.models // case.endpoints >= 100:
            out["targets"]["CPU per model <= 0.1 x bare GET"] = (
                cpu_per_model_ms <= 0.1 * bare_get_ms)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small fleets, one warm sweep")
    parser.add_argument("--case", type=int, default=None,
                        help="run only this case (0-based index), e.g. under a profiler")
    parser.add_argument("--warm", type=int, default=None, help="warm sweeps per case")
    args = parser.parse_args()
    log_path = workdir("sweeplog") / "daemon.log"
    with open(log_path, "w") as log_stream:
        configure_logging("json", logging.INFO, log_stream)
        if args.quick:
            cases = [("100 models / 1 endpoint", 1, 100, 1, 128),
                     ("100 models / 100 endpoints", 100, 1, 1, 128)]
        else:
            cases = [("1,000 models / 10 endpoints", 10, 100, 5, 640),
                     ("1,000 models / 1,000 endpoints", 1000, 1, 3, 1000)]
        if args.case is not None:
            cases = [cases[args.case]]
        if args.warm is not None:
            cases = [(name, e, per, args.warm, gets) for name, e, per, _, gets in cases]
        results = []
        for name, endpoints, per, warm, gets in cases:
            print(f"… {name}", file=sys.stderr, flush=True)
            results.append(summarise(anyio.run(run_case, name, endpoints, per, warm, gets)))

    wall_rows = [[r["case"], r["ideal_ms"], r["wall_ms"], r["wall_x_ideal"], r["bare_wall_ms"],
                  r["cold_wall_ms"], r["requests_per_sweep"], r["requests_per_endpoint"],
                  r["cold_requests"]] for r in results]
    cpu_rows = [[r["case"], r["cpu_ms_per_sweep"], r["cpu_ms_per_model"], r["bare_get_cpu_ms"],
                 r["bare_get_cpu_ms_64"], r["cpu_ratio"]] for r in results]
    md = ["### Probe sweep (max_concurrent = 64, every endpoint answers in 20 ms)", "",
          table(["case", "ideal ms", "sweep ms", "× ideal", "bare httpx ms", "cold sweep ms",
                 "requests/sweep", "req/endpoint", "cold requests"], wall_rows), "",
          table(["case", "CPU ms/sweep", "CPU ms/model", "bare GET CPU ms (loop)",
                 "bare GET CPU ms (64 in flight)", "CPU ratio"], cpu_rows), "",
          "Warm sweeps (median of the sweeps after the first); ideal = ceil(endpoints / 64) × "
          "20 ms; bare httpx ms = the baseline GETs (one per endpoint, at least 640) through "
          "one httpx client with the daemon's pool limits, 64 in flight; bare GET CPU = CPU "
          "per GET of a sequential loop (the cost of one request) and of the 64-in-flight "
          "loop; CPU ratio = daemon CPU per model ÷ sequential bare GET CPU.", ""]
    target_rows = [[r["case"], t, verdict(ok)] for r in results for t, ok in r["targets"].items()]
    md += [table(["case", "target", "result"], target_rows)]
    markdown = "\n".join(md)
    print(markdown)
    write_result("probe_sweep", {"quick": args.quick, "log": str(log_path),
                                 "cases": results}, markdown)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
