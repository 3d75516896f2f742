"""Hostile upstreams: servers that hang, drip, flood, reset, lie about JSON, loop, or are gone.

Several models sit behind each hostile fake (OpenAI-compatible, and Ollama for some modes), with
a short probe interval so that the daemon runs well over a thousand failing probes. Asserted:

- every hostile model's last probe failed with the reason its mode calls for, and took no longer
  than the probe timeout (plus the prober's grace and some scheduling slack);
- the healthy control models stay healthy all along (a hostile server harms only its models);
- the control socket keeps answering promptly while the probes fail (worst ``resolve`` latency);
- memory is bounded: VmRSS growth from after a warm-up to after 1,000 more hostile probes stays
  under 30 MB (a 100 MB body is never held, slow bodies are abandoned at the deadline);
- CPU is bounded: the daemon does not spin (CPU seconds per wall second well under one core).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_support import clean_env, cpu_seconds, metric_values, proc_status_kb

from daemon.testing.fakes import FakeOllama, FakeOpenAI, FakeServers, FakeUpstream, write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

TIMEOUT_S = 1.0
GRACE_S = 0.1  # the prober's grace: min(0.25, timeout × 0.1)
SLACK_S = 0.5  # scheduling on a loaded 2-core box
RSS_GROWTH_LIMIT_KB = 30 * 1024
CPU_SHARE_LIMIT = 0.8  # of one core, averaged over the measurement

#: mode → what the failure reason must say
REASONS: dict[str, str] = {
    "hang": r"timed out",
    "drip": r"timed out",
    "huge": r"too large",
    "reset": r"reset|closed|incomplete|peer|disconnect|protocol",
    "html": r"HTML",
    "badjson": r"JSON",
    "redirect": r"redirect",
    "down": r"refused",
}
OPENAI_PER_MODE = 5
OLLAMA_MODES = ("huge", "badjson", "reset", "hang")
OLLAMA_PER_MODE = 3


def hostile_setup(servers: FakeServers, work: Path) -> tuple[list[dict[str, Any]],
                                                              dict[str, str]]:
    """Declarations for every hostile model plus healthy controls; and model id → mode."""
    models: list[dict[str, Any]] = []
    modes: dict[str, str] = {}
    fakes: list[tuple[str, FakeUpstream, str, list[str]]] = []
    for mode in REASONS:
        names = [f"oa-{mode}-{i}" for i in range(OPENAI_PER_MODE)]
        fakes.append((mode, servers.start(FakeOpenAI(names, flavor="vllm")), "openai", names))
    for mode in OLLAMA_MODES:
        names = [f"ol-{mode}-{i}" for i in range(OLLAMA_PER_MODE)]
        fake = servers.start(FakeOllama([f"{n}:latest" for n in names], loaded=[]))
        fakes.append((mode, fake, "ollama", names))
    for mode, fake, provider, names in fakes:
        fake.set_mode(mode)
        for name in names:
            upstream = name if provider == "openai" else f"{name}:latest"
            models.append({"id": name, "provider": provider, "endpoint": fake.url,
                           "model": upstream, "role": "hostile"})
            modes[name] = mode
    control = servers.start(FakeOpenAI(["ok-0", "ok-1", "ok-2"], flavor="vllm"))
    for i in range(3):
        models.append({"id": f"ok-{i}", "provider": "openai", "endpoint": control.url,
                       "role": "chat", "primary": i == 0})
    models.append({"id": "ok-file", "provider": "local_file", "role": "chat",
                   "local_path": str(write_gguf(work / "ok.gguf"))})
    return models, modes


def hostile_probes(daemon: DaemonProcess, modes: dict[str, str]) -> int:
    """Probes run so far on hostile models, from the daemon's own counter."""
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    samples = metric_values(text, "modeld_probes_total")
    total = 0.0
    for labels, value in samples.items():
        match = re.search(r'model_id="([^"]+)"', labels)
        if match and match[1] in modes:
            total += value
    return int(total)


def run_hostile(work: Path, probes_wanted: int) -> None:
    with FakeServers() as servers:
        models, modes = hostile_setup(servers, work)
        config = daemon_config(work, models, probe={
            "interval": "200ms", "timeout": f"{TIMEOUT_S}s", "recheck_interval": "100ms"})
        with DaemonProcess(work, config, env=clean_env()) as daemon:
            # warm-up: every hostile model has failed at least once, the pools are in use
            wait_for(lambda: all(daemon.model(m)["health_status"] == "unavailable"
                                 for m in modes), 20.0, interval=0.2,
                     what="every hostile model unavailable")
            wait_for(lambda: hostile_probes(daemon, modes) >= 300, 30.0, interval=0.2,
                     what="300 warm-up probes")
            pid = daemon.pid
            rss_start, cpu_start = proc_status_kb(pid), cpu_seconds(pid)
            probes_start, wall_start = hostile_probes(daemon, modes), time.monotonic()
            latencies: list[float] = []
            peak_rss = rss_start
            deadline = wall_start + max(60.0, probes_wanted / 20)
            while hostile_probes(daemon, modes) < probes_start + probes_wanted:
                assert time.monotonic() < deadline, "the probes are far slower than expected"
                t0 = time.perf_counter()
                resolved = daemon.get("/api/v1/resolve?role=chat")
                latencies.append(time.perf_counter() - t0)
                assert resolved["model_id"] == "ok-0"
                peak_rss = max(peak_rss, proc_status_kb(pid))
                time.sleep(0.05)
            wall = time.monotonic() - wall_start
            probes = hostile_probes(daemon, modes) - probes_start
            rss_end, cpu_end = proc_status_kb(pid), cpu_seconds(pid)
            cpu_share = (cpu_end - cpu_start) / wall
            latencies.sort()
            views = {m: daemon.model(m) for m in (*modes, "ok-0", "ok-1", "ok-2", "ok-file")}
            print(f"\n[hostile upstreams] {probes} hostile probes in {wall:.1f}s; VmRSS "
                  f"{rss_start} kB after warm-up → {rss_end} kB (peak {peak_rss} kB, growth "
                  f"{rss_end - rss_start} kB, limit {RSS_GROWTH_LIMIT_KB} kB); CPU "
                  f"{cpu_end - cpu_start:.2f}s = {cpu_share:.2f} core; resolve p50 "
                  f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max "
                  f"{latencies[-1] * 1000:.1f} ms over {len(latencies)} requests")
            for model_id in sorted(modes):
                print(f"  {model_id:16} {views[model_id]['last_probe']['reason']}")

        wrong = []
        for model_id, mode in modes.items():
            last = views[model_id]["last_probe"]
            if last is None or last["ok"] or not re.search(REASONS[mode], last["reason"],
                                                           re.IGNORECASE):
                wrong.append(f"{model_id} ({mode}): {last}")
            elif last["latency_ms"] > (TIMEOUT_S + GRACE_S + SLACK_S) * 1000:
                wrong.append(f"{model_id} ({mode}) took {last['latency_ms']} ms")
            if views[model_id]["health_status"] != "unavailable":
                wrong.append(f"{model_id} ({mode}) is {views[model_id]['health_status']}")
        assert not wrong, "\n".join(wrong)
        for control in ("ok-0", "ok-1", "ok-2", "ok-file"):
            assert views[control]["health_status"] == "healthy", views[control]
        assert probes >= probes_wanted
        assert latencies[-1] < 1.0, f"resolve took {latencies[-1]:.3f}s while probes failed"
        assert rss_end - rss_start < RSS_GROWTH_LIMIT_KB, (
            f"VmRSS grew {rss_end - rss_start} kB over {probes} hostile probes")
        assert cpu_share < CPU_SHARE_LIMIT, f"the daemon used {cpu_share:.2f} of a core"


def test_hostile_upstreams_fail_with_reasons_in_time_and_memory_and_cpu_stay_bounded(
    workdir: Path,
) -> None:
    run_hostile(workdir, 1000)


@pytest.mark.long
def test_hostile_upstreams_long_10000_probes(workdir: Path) -> None:
    run_hostile(workdir, 10000)
