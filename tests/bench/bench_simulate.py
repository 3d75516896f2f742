"""Simulate: wall time of ``modeld simulate`` on a 24-hour trace of 10 models, beside the
bare core loop doing the same probes and policy ticks.

The trace (generated, seeded) has 10 models in two roles behind 5 endpoints, each with
random outages (5 s to 30 min), slow spells and degraded spells over 24 hours, and an
operator promotion and rollback; the config probes every 5 s (jittered), rechecks at 500 ms,
runs the policy every minute with ``auto_execute``. Measured, each the median of several runs:

- **simulate**: what the command does in-process: check the trace whole, then read it again
  and simulate it (``check_trace`` + ``simulate(read_trace(...))``);
- **bare core loop** (baseline): ``ModelRegistry.apply_probe`` called as many times as that
  run probed, and ``auto_upgrade_check`` as many times as it ticked, with nothing around
  them: what the core alone costs, the floor for any simulator of it;
- **parse only**: ``check_trace`` + ``list(read_trace(...))``;
- **command**: ``modeld simulate --json`` as a subprocess, beside ``modeld --version``
  (interpreter start and imports).

Target: simulate ≤ 2 s (issue 12).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from common import median, table, verdict, workdir, write_result

from daemon.config import load_config
from daemon.core.model import ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config
from daemon.sim import check_trace, read_trace, simulate
from daemon.sim.engine import EPOCH, Report

DAY = 86400.0
ENDPOINTS = 5


def write_config(path: Path) -> None:
    lines = ["[probe]", 'interval = "5s"', 'timeout = "3s"', 'recheck_interval = "500ms"', "",
             "[policy]", 'interval = "1m"', "auto_execute = true", ""]
    for n in range(10):
        role = "chat" if n < 6 else "embed"
        lines += ["[[models]]", f'id = "m{n}"', 'provider = "openai"', f'role = "{role}"',
                  f'endpoint = "http://127.0.0.1:{8000 + n % ENDPOINTS}"',
                  f"quality = {0.5 + 0.04 * n:.2f}", f"latency_estimate = {200 + 50 * n}",
                  f"primary = {'true' if n in (0, 6) else 'false'}", ""]
    path.write_text("\n".join(lines))


def write_trace(path: Path, seed: int) -> int:
    """A 24-hour trace of 10 models with random incidents; returns its number of steps."""
    rng = random.Random(seed)
    steps: list[tuple[float, int, dict[str, object]]] = []
    for n in range(10):
        model = f"m{n}"
        base = 150.0 + 40 * n
        steps.append((0.0, len(steps), {"model": model, "ok": True, "latency_ms": base}))
        t = rng.expovariate(1 / 3600)
        while t < DAY - 60:
            kind = rng.random()
            length = rng.choice([5, 12, 40, 300, 1200, 1800])
            if kind < 0.6:
                step: dict[str, object] = {"model": model, "ok": False,
                                           "reason": "connection refused"}
            elif kind < 0.8:
                step = {"model": model, "ok": True, "latency_ms": base * 15}
            else:
                step = {"model": model, "ok": "degraded", "reason": "rate limited (429)",
                        "latency_ms": base}
            steps.append((t, len(steps), step))
            steps.append((t + length, len(steps), {"model": model, "ok": True,
                                                   "latency_ms": base}))
            t += length + rng.expovariate(1 / 3600)
    steps.append((30000.0, len(steps), {"operator": "promote", "model": "m3"}))
    steps.append((40000.0, len(steps), {"operator": "rollback", "role": "chat"}))
    steps.sort(key=lambda s: (s[0], s[1]))
    with path.open("w") as out:
        for at, _, step in [s for s in steps if s[0] < DAY]:
            out.write(json.dumps({"at": round(at, 3), **step}) + "\n")
        out.write(json.dumps({"at": DAY, "end": True}) + "\n")
    return sum(1 for s in steps if s[0] < DAY) + 1


def run_simulate(config: Config, trace: Path) -> tuple[float, float, Report]:
    """(wall s, CPU s, report) of what the command does in-process."""
    started, cpu = time.perf_counter(), time.process_time()
    assert check_trace(trace, config) == []
    report = simulate(config, read_trace(trace, config))
    return time.perf_counter() - started, time.process_time() - cpu, report


def run_bare(config: Config, probes: int, ticks: int) -> tuple[float, float]:
    """The core alone: the same number of probe results and policy checks, nothing else."""
    registry = ModelRegistry(config, EPOCH)
    ids = [spec.id for spec in config.models]
    ok, failed = ProbeResult.healthy(300.0), ProbeResult.failure("connection refused")
    per_tick = max(probes // max(ticks, 1), 1)
    started, cpu = time.perf_counter(), time.process_time()
    now = EPOCH
    done = 0
    while done < probes:
        for _ in range(min(per_tick, probes - done)):
            registry.apply_probe(ids[done % len(ids)], failed if done % 97 == 0 else ok, now)
            done += 1
            now += 0.5
        registry.auto_upgrade_check(now)
    return time.perf_counter() - started, time.process_time() - cpu


def run_parse(config: Config, trace: Path) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    assert check_trace(trace, config) == []
    list(read_trace(trace, config))
    return time.perf_counter() - started, time.process_time() - cpu


def run_command(args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of ``modeld ARGS``."""
    started, before = time.perf_counter(), os.times()
    subprocess.run([sys.executable, "-m", "daemon", *args], check=True,
                   stdout=subprocess.DEVNULL)
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return time.perf_counter() - started, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    work = workdir("sim")
    config_path, trace = work / "modeld.toml", work / "day.jsonl"
    write_config(config_path)
    steps = write_trace(trace, args.seed)
    config = load_config(config_path)
    names = ["simulate", "bare core loop", "parse only", "modeld simulate --json",
             "modeld --version"]
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}

    def note(name: str, figures: tuple[float, float]) -> None:
        wall[name].append(figures[0])
        cpu[name].append(figures[1])

    report: Report | None = None
    for _ in range(runs):  # interleaved, so drift in the machine's load hits all alike
        seconds, cpu_seconds, report = run_simulate(config, trace)
        note("simulate", (seconds, cpu_seconds))
        note("bare core loop", run_bare(config, report.probes, report.policy_ticks))
        note("parse only", run_parse(config, trace))
        note("modeld simulate --json", run_command(
            ["simulate", "--config", str(config_path), "--trace", str(trace), "--json"]))
        note("modeld --version", run_command(["--version"]))
    assert report is not None
    sim, bare = median(wall["simulate"]), median(wall["bare core loop"])
    bare_cpu = median(cpu["bare core loop"])
    rows = [[name, median(wall[name]) * 1000, min(wall[name]) * 1000,
             median(cpu[name]) * 1000, median(wall[name]) / bare,
             median(cpu[name]) / bare_cpu] for name in names]
    met = sim <= 2.0
    changes = sum(role.changes for role in report.roles.values())
    md = "\n".join([
        "### Simulate (24 h trace, 10 models, interval 5 s, policy every minute)", "",
        table(["what", "median wall ms", "min wall ms", "median CPU ms", "wall × bare core",
               "CPU × bare core"], rows), "",
        f"{runs} runs of each, interleaved. Trace: {steps:,} steps; the run made "
        f"{report.probes:,} probes, {report.policy_ticks:,} policy ticks, "
        f"{len(report.decisions):,} decisions, {changes} primary changes; "
        f"{report.probes / sim:,.0f} probes/s simulated; the core alone "
        f"{bare_cpu / report.probes * 1e6:.1f} µs CPU per probe.", "",
        table(["target", "measured", "result"],
              [["simulate a 24 h trace of 10 models ≤ 2 s", f"{sim:.2f} s", verdict(met)]]),
    ])
    print(md)
    write_result("simulate", {"quick": args.quick, "runs": runs, "steps": steps,
                              "probes": report.probes, "policy_ticks": report.policy_ticks,
                              "wall_s": wall, "cpu_s": cpu,
                              "targets": {"simulate <= 2 s": met}}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
