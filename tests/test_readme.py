"""The README stays true: its generated parts match the code, its Quick start matches CI."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.control import routes
from daemon.core.registry import ModelRegistry
from daemon.core.settings import Config
from daemon.docs import render_readme
from daemon.service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_generated_blocks_are_up_to_date() -> None:
    # if this fails: python -m daemon.docs --write README.md
    assert render_readme(README, ROOT) == README


def test_quick_start_has_the_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick.splitlines()
                if line.startswith("python3.11 -m venv .venv")]
    assert len(commands) == 2
    assert commands[0].endswith("pip install . && modeld demo")
    assert commands[1].endswith("pip install -e '.[test]' && pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]'" in ci and "python -m pytest" in ci


def test_every_route_is_documented_with_a_curl_example() -> None:
    for route in routes.ROUTES:
        template = route.template
        assert f"`{route.method} {template}" in README, template
        # a curl example with the params filled in: {model_id} stands for any id
        example = re.escape(template).replace(r"\{model_id\}", r"[\w.:-]+").replace(
            r"\{role\}", r"[\w.:-]+")
        assert re.search(rf"curl --unix-socket \$S .*http://modeld{example}", README), template


def test_every_metric_is_documented() -> None:
    metrics = Metrics(lambda: ModelRegistry(Config(), 0.0))
    names = {m.name for m in metrics.registry.collect()}
    assert any(name.startswith("process_") for name in names)
    assert "`process_*` metrics" in README
    for name in names - {n for n in names if n.startswith("process_")}:
        assert name in README, name


LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_event_names() -> set[str]:
    """Every event name the daemon logs: literal first arguments of log calls in daemon/ and
    plugins/ (not the test helpers), and every event kind (the event listener logs those)."""
    import ast

    from daemon.core.model import EventKind

    names = {kind.value for kind in EventKind}
    sources = [p for p in [*ROOT.glob("daemon/**/*.py"), *ROOT.glob("plugins/*.py")]
               if "testing" not in p.parts]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and re.fullmatch(r"[a-z]+(_[a-z]+)+", node.args[0].value)):
                names.add(node.args[0].value)
    return names


def test_every_logged_event_is_in_the_readmes_list() -> None:
    logs = README.split("**Logs.**", 1)[1].split("API keys are never logged", 1)[0]
    listed = set(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", logs))
    names = logged_event_names()
    assert {"health_changed", "config_reload_failed", "state_write_failed"} <= names
    assert names - listed == set(), "add them to the README's Logs paragraph"


def test_every_event_kind_is_in_the_event_streams_list() -> None:
    from daemon.core.model import EventKind

    kinds = README.split("### The event stream", 1)[1].split("Kinds:", 1)[1].split("\n\n", 1)[0]
    assert {kind.value for kind in EventKind} - set(re.findall(r"`(\w+)`", kinds)) == set()
