"""Run every benchmark and combine their results: results/all.json and results/RESULTS.md.

``python tests/bench/run_all.py [--quick] [--only NAME ...]``. Each benchmark runs as its own
process, one after the other (never two at once: they would measure each other).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from common import BENCH_DIR, RESULTS_DIR, machine, table

BENCHMARKS = {
    "probe_sweep": "bench_probe_sweep.py",
    "failover": "bench_failover.py",
    "hang": "bench_hang.py",
    "quiet": "bench_quiet.py",
    "control_socket": "bench_control_socket.py",
    "footprint": "bench_footprint.py",
    "cli": "bench_cli.py",
    "gateway": "bench_gateway.py",
    "simulate": "bench_simulate.py",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds per benchmark")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    combined: dict[str, Any] = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    durations: list[list[Any]] = []
    failed: list[str] = []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        cmd = [sys.executable, str(BENCH_DIR / BENCHMARKS[name])]
        if args.quick:
            cmd.append("--quick")
        code = subprocess.run(cmd).returncode
        seconds = time.monotonic() - started
        durations.append([name, seconds, "ok" if code == 0 else f"exit {code}"])
        if code != 0:
            failed.append(name)
            continue
        combined["benchmarks"][name] = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    m = combined["machine"]
    parts = [
        "# modeld benchmark results" + (" (quick run)" if args.quick else ""), "",
        f"- date: {m['date']}",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}",
        f"- Python {m['python']}", "",
    ]
    for name in names:
        if name in combined["benchmarks"]:
            parts += [combined["benchmarks"][name]["markdown"], ""]
    parts += ["### Run times", "", table(["benchmark", "seconds", "status"], durations), ""]
    markdown = "\n".join(parts)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "all.json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
    (RESULTS_DIR / "RESULTS.md").write_text(markdown)
    print(markdown)
    print(f"wrote {RESULTS_DIR / 'all.json'} and {RESULTS_DIR / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
