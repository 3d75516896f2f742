"""``modeld``: the daemon (``run``) and its offline helpers (check-config, config, plugins, demo).

Exit codes: 0 ok; 2 usage; 65 bad trace (simulate); 66 trace file cannot be read (simulate);
73 state or socket cannot be used; 75 another instance is running; 78 bad configuration
(EX_CONFIG, which systemd is told not to restart on).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from collections.abc import Collection, Sequence

from ..config import DEFAULT_CONFIG_PATH, EX_CONFIG, ConfigError, load_config


def _default_config() -> str:
    return os.environ.get("MODELD_CONFIG") or DEFAULT_CONFIG_PATH


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeld",
        description="Model-registry daemon for LLM inference hosts: probes models, scores "
        "them, promotes and rolls back primaries, and answers which model to use now.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", default=None, help="config file (default: $MODELD_CONFIG, "
                     f"then {DEFAULT_CONFIG_PATH})")
    check = sub.add_parser("check-config", help='validate a config file: "ok", or every '
                           "error and warning (exit 78 on an error)")
    check.add_argument("path", nargs="?", default=None)
    check.add_argument("--strict", action="store_true", help="warnings (what will fail at run "
                       "time: a missing admin group, API key variable or model file) exit 78 too")
    show = sub.add_parser("config", help="print the effective configuration, defaults "
                          "included, as TOML")
    show.add_argument("path", nargs="?", default=None)
    plugins = sub.add_parser("plugins", help="list plugins, where each came from, and the "
                             "probes it registers")
    plugins.add_argument("--config", default=None)
    demo = sub.add_parser("demo", help="run the daemon on fake upstreams and play a narrated "
                          "scenario (no root, nothing left behind)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the daemon and the fakes up afterwards until Ctrl-C")
    _add_simulate(sub)
    return parser


EX_DATAERR = 65  # a trace that cannot be simulated
EX_NOINPUT = 66  # a trace file that cannot be read

SIMULATE_HELP = """\
Run the daemon's real core (health, scoring, policy, registry) on a virtual clock against a
trace of what your models did, with your configuration's probe schedule (interval, jitter,
rechecks) and policy timer, and report what the daemon would have decided: every promotion,
rollback, quarantine and failback with its time and reason, and per role the time on each
primary, the number of primary changes and the time with no usable model.

Test a policy this way before you set auto_execute = true: write a trace of an incident you
had (or take one from examples/traces/), run it with --auto-execute, and read the timeline.

A trace is JSON lines, one step each, holding from "at" (seconds) on:
  {"at": 0, "model": "qwen2.5-14b", "ok": true, "latency_ms": 300}
  {"at": 600, "model": "qwen2.5-14b", "ok": false, "reason": "connection refused"}
  {"at": 612, "model": "qwen2.5-14b", "ok": "degraded", "latency_ms": 2500}
  {"at": 900, "operator": "promote", "model": "llama3-8b", "force": false}
  {"at": 950, "operator": "rollback", "role": "chat"}
  {"at": 960, "operator": "offline", "enabled": true}
  {"at": 970, "operator": "hold", "role": "chat", "for": "2h"}
  {"at": 980, "operator": "release", "role": "chat"}
  {"at": 7200, "end": true}
A model with no step yet fails its probes; a latency at or above the probe timeout is a
timeout. Blank lines and lines starting with # are comments.

Exit status: 0 done; 2 usage; 65 bad trace (every problem named with its line); 66 trace
file not readable; 78 bad configuration.
"""


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser(
        "simulate", help="replay a trace through the real policy on a virtual clock and "
        "report every decision (test a policy before auto_execute)",
        description=SIMULATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--config", default=None, help="config file (default: $MODELD_CONFIG, "
                     f"then {DEFAULT_CONFIG_PATH})")
    sim.add_argument("--trace", required=True, help="the trace: JSON lines (see above)")
    sim.add_argument("--json", action="store_true", help="print the report as JSON for scripts")
    sim.add_argument("--seed", type=int, default=0,
                     help="seed of the probe jitter (default 0); the same seed, the same run")
    sim.add_argument("--auto-execute", action="store_true", default=None,
                     help="act on suggestions as with auto_execute = true, whatever the "
                     "config says (to see what turning it on would do)")
    sim.add_argument("--decisions-only", action="store_true",
                     help="leave the health changes out of the timeline")
    sim.add_argument("--max-probes", type=int, default=None, metavar="N",
                     help="refuse runs that take more probes than this (default 20,000,000)")


def cmd_simulate(config_path: str, trace_path: str, *, as_json: bool, seed: int,
                 auto_execute: bool | None, decisions_only: bool,
                 max_probes: int | None) -> int:
    """Check the trace whole (every problem, with its line), then simulate it."""
    import json

    from ..sim import TraceError, read_trace, simulate
    from ..sim.engine import MAX_PROBES, estimated_probes
    from ..sim.report import render_text
    from ..sim.trace import inspect_trace, open_trace

    config = _load_or_report(config_path)
    if config is None:
        return EX_CONFIG
    try:
        open_trace(trace_path).close()
    except TraceError as exc:
        print(exc, file=sys.stderr)
        return EX_NOINPUT
    errors, end = inspect_trace(trace_path, config)
    limit = MAX_PROBES if max_probes is None else max_probes
    if not errors and end is not None and estimated_probes(config, end) > limit:
        errors = [f"{trace_path}: the trace lasts {end:g} s: about "
                  f"{estimated_probes(config, end):,.0f} probes at the configured intervals, "
                  f"more than the {limit:,} simulated at most (shorten the trace, or raise "
                  "--max-probes)"]
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return EX_DATAERR
    try:
        report = simulate(config, read_trace(trace_path, config), seed=seed,
                          auto_execute=auto_execute, max_probes=limit)
    except TraceError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EX_DATAERR
    try:
        if as_json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            sys.stdout.write(render_text(report, config_path=config_path,
                                         trace_path=trace_path, with_health=not decisions_only))
        sys.stdout.flush()
    except BrokenPipeError:
        # `modeld simulate ... | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _load_or_report(path: str):  # type: ignore[no-untyped-def]
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def cmd_check_config(path: str, strict: bool = False) -> int:
    """Every error of the file in one run (keys, types, duplicate ids, unknown providers),
    then the warnings about what will fail at run time on this host."""
    from ..config import parse_config, plugin_dirs_of, read_toml, runtime_warnings
    from ..probing.plugins import PluginError, collect_probes, get_plugin_manager

    try:
        data = read_toml(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EX_CONFIG
    errors: list[str] = []
    known: Collection[str] | None = None
    try:
        known = collect_probes(get_plugin_manager(plugin_dirs_of(data)))
    except PluginError as exc:
        errors.append(f"{path}: plugins: {exc}")
    try:
        config = parse_config(data, path, known)
    except ConfigError as exc:
        errors = [*exc.errors, *errors]
        config = None
    for line in errors:
        print(line, file=sys.stderr)
    if config is None or errors:
        return EX_CONFIG
    warnings = runtime_warnings(config, os.environ)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not warnings:
        print("ok")
        return 0
    count = f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}"
    if strict:
        print(f"modeld check-config: {count}, and --strict counts them as errors",
              file=sys.stderr)
        return EX_CONFIG
    print(f"ok, with {count}")
    return 0


def cmd_config(path: str) -> int:
    from ..config import render_config

    config = _load_or_report(path)
    if config is None:
        return EX_CONFIG
    sys.stdout.write(render_config(config))
    return 0


def cmd_plugins(path: str) -> int:
    from ..probing.plugins import get_plugin_manager, plugins_report

    plugin_dirs: Sequence[str] = ()
    if os.path.exists(path):
        config = _load_or_report(path)
        if config is None:
            return EX_CONFIG
        plugin_dirs = config.daemon.plugin_dirs
    print(plugins_report(get_plugin_manager(plugin_dirs)))
    return 0


def cmd_run(path: str) -> int:
    import anyio

    from .lifecycle import Daemon
    from .logs import configure_logging, get_logger

    try:
        config = load_config(path)
    except ConfigError as exc:
        configure_logging("auto", stream=sys.stderr)
        get_logger("modeld").error("config_invalid", path=path, errors=exc.errors,
                                   exit_code=EX_CONFIG)
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.daemon.log_format)
    # a watchdog kill (SIGABRT) then shows where the event loop was stuck
    faulthandler.enable()
    daemon = Daemon(config)
    return anyio.run(daemon.run)


def _quiet_logging() -> None:
    """The offline helpers print results on stdout; their logs are warnings on stderr."""
    import logging

    from .logs import configure_logging

    configure_logging("auto", level=logging.WARNING, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``modeld`` command."""
    args = _parser().parse_args(argv)
    if args.command in ("check-config", "config", "plugins", "simulate"):
        _quiet_logging()
    if args.version:
        from .. import __version__

        print(f"modeld {__version__}")
        return 0
    if args.command == "run":
        return cmd_run(args.config or _default_config())
    if args.command == "check-config":
        return cmd_check_config(args.path or _default_config(), args.strict)
    if args.command == "config":
        return cmd_config(args.path or _default_config())
    if args.command == "plugins":
        return cmd_plugins(args.config or _default_config())
    if args.command == "simulate":
        return cmd_simulate(args.config or _default_config(), args.trace, as_json=args.json,
                            seed=args.seed, auto_execute=args.auto_execute,
                            decisions_only=args.decisions_only, max_probes=args.max_probes)
    if args.command == "demo":
        from ..demo import main as demo_main

        return demo_main(keep_running=args.keep_running)
    _parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
