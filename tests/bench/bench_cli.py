"""CLI: wall time of ``modelctl resolve`` beside ``curl --unix-socket`` and an empty Python.

The real daemon runs as a subprocess (5 healthy models of role ``chat``). Each round runs,
in rotating order, ``modelctl resolve --role chat`` (the installed console script), ``curl
--unix-socket … /api/v1/resolve?role=chat`` (the floor for the same request from a native
client) and ``python -c pass`` with the same interpreter (the floor for any Python CLI), and
times each with ``time.perf_counter`` around ``subprocess.run``. ``python -X importtime``
of modelctl is kept in the JSON to show where its start-up goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import median, percentile, table, verdict, workdir, write_result

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def import_times(env: dict[str, str]) -> list[tuple[int, str]]:
    """The 15 slowest imports (cumulative µs) of ``modelctl resolve``, from -X importtime."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import sys; from daemon.control.ctl import main; "
                          "sys.argv = ['modelctl', 'resolve', '--role', 'chat']; main()"],
                         capture_output=True, text=True, env=env)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line[len("import time:"):].split("|", 2)
        rows.append((int(cumulative), name.rstrip()))
    return sorted(rows, reverse=True)[:15]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 runs of each")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 30)
    curl = shutil.which("curl")
    modelctl = shutil.which("modelctl") or str(Path(sys.executable).parent / "modelctl")
    work = workdir("cli")
    with FakeServers() as servers:
        fake = servers.start(FakeOpenAI([f"c{n}" for n in range(5)]))
        models = [{"id": f"c{n}", "provider": "openai", "endpoint": fake.url, "role": "chat",
                   "primary": n == 0} for n in range(5)]
        config = daemon_config(work, models, probe={"interval": "5s"})
        with DaemonProcess(work, config) as daemon:
            for n in range(5):
                daemon.wait_health(f"c{n}", "healthy", timeout=30)
            sock = daemon.socket_path
            env = dict(os.environ, MODELD_SOCKET=sock)
            commands: dict[str, list[str]] = {
                "modelctl resolve": [modelctl, "resolve", "--role", "chat"],
                "python -c pass": [sys.executable, "-c", "pass"],
            }
            if curl:
                commands["curl --unix-socket"] = [
                    curl, "-sf", "--unix-socket", sock, "http://modeld/api/v1/resolve?role=chat"]
            for cmd in commands.values():  # warm the page cache
                timed(cmd, env)
            times: dict[str, list[float]] = {name: [] for name in commands}
            names = list(commands)
            for n in range(runs):
                for name in names[n % len(names):] + names[:n % len(names)]:
                    times[name].append(timed(commands[name], env) * 1000.0)
            imports = import_times(env)
    rows = [[name, median(ts), percentile(ts, 90), min(ts), max(ts)] for name, ts in times.items()]
    ctl = median(times["modelctl resolve"])
    met = ctl <= 80.0
    md = "\n".join([
        "### CLI (`modelctl resolve --role chat`, wall time per invocation)", "",
        table(["command", "median ms", "p90 ms", "min ms", "max ms"], rows), "",
        f"{runs} runs of each, interleaved; same interpreter for modelctl and "
        "`python -c pass`.", "",
        table(["target", "measured", "result"],
              [["modelctl resolve median ≤ 80 ms", f"{ctl:.1f} ms", verdict(met)]]),
    ])
    print(md)
    write_result("cli", {"quick": args.quick, "runs": runs, "times_ms": times,
                         "slowest_imports_us": imports,
                         "targets": {"modelctl resolve median <= 80 ms": met}}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
