"""Shared pieces of the benchmarks: machine facts, tables, JSON results, a fake fleet.

Not a test module and not a benchmark: ``bench_*.py`` import it as a sibling (each script
is run as ``python tests/bench/bench_x.py``, so its directory is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent.parent


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, CPU model, Python, kernel."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def workdir(prefix: str) -> Path:
    """A short directory under /tmp (Unix socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"mdb-{prefix}-", dir="/tmp"))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (also readable on a terminal)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     + " |")
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def write_result(name: str, data: dict[str, Any], markdown: str) -> Path:
    """Save ``data`` (plus the machine) as results/<name>.json and the tables as .md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), **data, "markdown": markdown}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown + "\n")
    return path


def proc_rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc/<pid>/status."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


class FakeFleet:
    """Fake OpenAI-compatible upstreams served by ``fleet.py`` in a separate process.

    A separate process keeps the fakes' CPU out of the measured process (and off its GIL).
    ``endpoints`` servers, each listing ``models_per_endpoint`` models named
    ``m<endpoint>-<n>`` and answering after ``latency`` seconds.
    """

    def __init__(self, endpoints: int, models_per_endpoint: int, latency: float,
                 flavor: str = "openai") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "fleet.py"), str(endpoints),
             str(models_per_endpoint), str(latency), flavor],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        hello = self._read()
        self.urls: list[str] = hello["urls"]

    @staticmethod
    def model_name(endpoint: int, n: int) -> str:
        return f"m{endpoint}-{n}"

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fake fleet exited with {self.proc.wait()}")
        return json.loads(line)

    def command(self, *words: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def total_requests(self) -> int:
        return int(self.command("total"))

    def per_endpoint(self) -> list[int]:
        return list(self.command("counts"))

    def reset(self) -> None:
        self.command("reset")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.command("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> FakeFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
