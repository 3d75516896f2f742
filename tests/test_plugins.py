"""Plugin loading: built-ins, an installed entry point, drop-in files, and broken plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from fakes_fixtures import running_prober, spec

from daemon import hookimpl
from daemon.core.model import HealthStatus, ProbeResult, ProbeStatus
from daemon.probing.plugins import (
    BUILTIN_PLUGINS,
    PluginError,
    collect_probes,
    get_plugin_manager,
    notify_observers,
    plugins_report,
)
from daemon.testing.fakes import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "plugins"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


PROBE_PLUGIN = """
    from daemon import ProbeResult, hookimpl

    class {cls}:
        async def probe(self, spec, ctx):
            {body}

    @hookimpl
    def modeld_register_probes(register):
        register({name!r}, {cls}())
"""


def probe_plugin(name: str, body: str = "return ProbeResult.healthy()") -> str:
    cls = "".join(part.title() for part in name.split("_")) + "Probe"
    return PROBE_PLUGIN.format(cls=cls, name=name, body=body)


@pytest.fixture
def installed_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tiny installed distribution declaring two ``modeld`` entry points, one broken."""
    site = tmp_path / "site"
    write(site / "modeld_ep_good.py", probe_plugin("ep_probe"))
    write(site / "modeld_ep_broken.py", "raise ImportError('needs libfoo.so.3')\n")
    dist_info = site / "modeld_ep_plugins-1.2.dist-info"
    write(dist_info / "METADATA", """\
        Metadata-Version: 2.1
        Name: modeld-ep-plugins
        Version: 1.2
    """)
    write(dist_info / "entry_points.txt", """\
        [modeld]
        good = modeld_ep_good
        broken = modeld_ep_broken

        [console_scripts]
        unrelated = modeld_ep_good:main
    """)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        for name in ("modeld_ep_good", "modeld_ep_broken"):
            sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- built-ins


def test_builtins_load_through_the_common_path_and_pass_check_pending() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    pm.check_pending()
    assert sorted(collect_probes(pm)) == ["local_file", "ollama", "openai"]
    assert [pm.origins[name].source for name, _ in pm.list_name_plugin()] == ["builtin"] * 3
    assert [pm.origins[name].detail for name, _ in pm.list_name_plugin()] == \
        list(BUILTIN_PLUGINS)
    assert pm.failures == []


def test_importing_daemon_plugins_loads_nothing() -> None:
    code = "import sys, daemon.probing.plugins; print('plugins.openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- entry points


def test_entry_point_plugin_loads_and_a_broken_one_is_skipped(
    installed_distribution: Path,
) -> None:
    with structlog.testing.capture_logs() as logs:
        pm = get_plugin_manager()
    pm.check_pending()
    probes = collect_probes(pm)
    assert "ep_probe" in probes and "openai" in probes
    origin = pm.origins["entrypoint:good"]
    assert (origin.name, origin.source) == ("good", "entry point")
    assert origin.detail == "modeld_ep_good (modeld-ep-plugins 1.2)"
    failed = [e for e in logs if e["event"] == "plugin_load_failed"]
    assert len(failed) == 1
    assert failed[0]["plugin"] == "broken" and failed[0]["source"] == "entry point"
    assert failed[0]["error"] == "ImportError: needs libfoo.so.3"
    assert [f.name for f in pm.failures] == ["broken"]


def test_entry_points_can_be_left_out(installed_distribution: Path) -> None:
    pm = get_plugin_manager(load_entry_points=False)
    assert "ep_probe" not in collect_probes(pm)
    assert pm.failures == []


# ----------------------------------------------------------------------------- drop-in files


def test_drop_in_files_load_in_order_and_broken_ones_are_skipped(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugins.d"
    write(plugin_dir / "b_second.py", probe_plugin("second"))
    write(plugin_dir / "a_first.py", probe_plugin("first"))
    write(plugin_dir / "c_syntax.py", "def broken(:\n    pass\n")
    write(plugin_dir / "d_misspelt.py", """
        from daemon import hookimpl

        @hookimpl
        def modeld_register_probe(register):
            register("never", object())
    """)
    write(plugin_dir / "e_exits.py", "raise SystemExit(3)\n")
    write(plugin_dir / "notes.txt", "not python")
    with structlog.testing.capture_logs() as logs:
        pm = get_plugin_manager([str(plugin_dir), str(tmp_path / "missing.d")],
                                load_entry_points=False)
    pm.check_pending()
    files = [pm.origins[name].name for name, _ in pm.list_name_plugin()
             if pm.origins[name].source == "file"]
    assert files == ["a_first", "b_second"]
    assert {"first", "second"} <= set(collect_probes(pm))
    errors = {e["plugin"]: e["error"] for e in logs if e["event"] == "plugin_load_failed"}
    assert errors["c_syntax"].startswith("SyntaxError: ") and "(line 1)" in errors["c_syntax"]
    assert errors["d_misspelt"].startswith("unknown hook modeld_register_probe")
    assert errors["e_exits"] == "SystemExit: 3"
    assert all(e["origin"].startswith(str(plugin_dir)) for e in logs
               if e["event"] == "plugin_load_failed")


def test_two_plugins_claiming_one_probe_name_is_an_error_naming_both(tmp_path: Path) -> None:
    write(tmp_path / "my_openai.py", probe_plugin("openai"))
    pm = get_plugin_manager([str(tmp_path)], load_entry_points=False)
    with pytest.raises(PluginError) as caught:
        collect_probes(pm)
    message = str(caught.value)
    assert message.startswith('probe "openai" is registered by two plugins: ')
    assert "'openai' (builtin plugins.openai)" in message
    assert f"'my_openai' (file {tmp_path / 'my_openai.py'})" in message


def test_a_register_hook_that_raises_is_logged_and_the_rest_still_register(
    tmp_path: Path,
) -> None:
    write(tmp_path / "bad_register.py", """
        from daemon import hookimpl

        @hookimpl
        def modeld_register_probes(register):
            raise RuntimeError("cannot find my config")
    """)
    write(tmp_path / "not_a_probe.py", """
        from daemon import hookimpl

        @hookimpl
        def modeld_register_probes(register):
            register("thing", 42)
    """)
    pm = get_plugin_manager([str(tmp_path)], load_entry_points=False)
    with structlog.testing.capture_logs() as logs:
        probes = collect_probes(pm)
    assert sorted(probes) == ["local_file", "ollama", "openai"]
    errors = {e["plugin"]: e["error"] for e in logs if e["event"] == "plugin_register_failed"}
    assert errors[f"file:{tmp_path / 'bad_register.py'}"] == \
        "RuntimeError: cannot find my config"
    assert "has no probe(spec, ctx) method" in errors[f"file:{tmp_path / 'not_a_probe.py'}"]


@pytest.mark.anyio
async def test_drop_in_probes_that_raise_or_hang_fail_with_reasons(tmp_path: Path) -> None:
    write(tmp_path / "raises.py", probe_plugin("raises", "raise KeyError('models')"))
    write(tmp_path / "hangs.py", probe_plugin(
        "hangs", "import anyio; await anyio.sleep_forever()"))
    probes = collect_probes(get_plugin_manager([str(tmp_path)], load_entry_points=False))
    results: dict[str, ProbeResult] = {}
    async with FakeOpenAI(["m"]) as fake, running_prober(probes, timeout=0.3) as prober:

        async def run(provider: str) -> None:
            results[provider] = await prober.run(spec(provider=provider, endpoint=fake.url))

        async with anyio.create_task_group() as tg:
            for provider in ("raises", "hangs", "openai"):
                tg.start_soon(run, provider)
    assert results["raises"].reason == "probe raised KeyError: 'models'"
    assert results["hangs"].reason == "timed out after 0.3s"
    assert results["openai"].status is ProbeStatus.OK


# ----------------------------------------------------------------------------- observers


def test_observers_are_isolated_from_each_other() -> None:
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def modeld_health_changed(self, spec: Any, old: Any, new: Any, result: Any) -> None:
            calls.append(f"{self.name}:{spec.id}:{old}->{new}")

    class Broken:
        @hookimpl
        def modeld_health_changed(self, spec: Any, new: Any) -> None:  # a subset of args
            raise RuntimeError("observer bug")

    class PrimaryWatcher:
        @hookimpl
        def modeld_primary_changed(self, role: str, old: Any, new: str, reason: str) -> None:
            calls.append(f"primary:{role}:{old}->{new}:{reason}")

    pm = get_plugin_manager(load_entry_points=False, builtins=())
    pm.register(Recorder("first"), name="first")
    pm.register(Broken(), name="broken")
    pm.register(Recorder("last"), name="last")
    pm.register(PrimaryWatcher(), name="watcher")
    pm.check_pending()
    with structlog.testing.capture_logs() as logs:
        log = structlog.get_logger()
        notify_observers(pm, "modeld_health_changed", log, spec=spec("m1"),
                         old=HealthStatus.HEALTHY, new=HealthStatus.DEGRADED,
                         result=ProbeResult.degraded("slow"))
        notify_observers(pm, "modeld_primary_changed", log, role="chat", old=None, new="m2",
                         reason="manual")
    assert calls == ["last:m1:healthy->degraded", "first:m1:healthy->degraded",
                     "primary:chat:None->m2:manual"]
    assert [(e["event"], e["plugin"], e["error"]) for e in logs] == [
        ("observer_failed", "broken", "RuntimeError: observer bug")
    ]


# ----------------------------------------------------------------------------- report


def test_report_lists_plugins_sources_probes_and_failures(
    tmp_path: Path, installed_distribution: Path
) -> None:
    write(tmp_path / "extra.py", probe_plugin("extra"))
    write(tmp_path / "zz_broken.py", "import nonexistent_module_xyz\n")
    report = plugins_report(get_plugin_manager([str(tmp_path)]))
    lines = report.splitlines()
    assert lines[0].split() == ["PLUGIN", "SOURCE", "PROBES", "FROM"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert rows["openai"].split()[:4] == ["openai", "builtin", "openai", "plugins.openai"]
    assert "entry point" in rows["good"] and "ep_probe" in rows["good"]
    assert "modeld-ep-plugins 1.2" in rows["good"]
    assert "extra" in rows["extra"] and str(tmp_path / "extra.py") in rows["extra"]
    assert "(FAILED)" in rows["zz_broken"] and "ModuleNotFoundError" in rows["zz_broken"]
    assert "(FAILED)" in rows["broken"]
    assert lines[-1] == "2 plugin(s) failed to load and were skipped."


# ----------------------------------------------------------------------------- the example


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("flavor", "mode", "status", "reason"),
    [
        ("vllm", "normal", ProbeStatus.OK, ""),
        ("tgi", "normal", ProbeStatus.OK, ""),
        ("llamacpp", "loading", ProbeStatus.DEGRADED, "loading"),
        ("vllm", "error500", ProbeStatus.FAILED, "GET /health: HTTP 500: Internal Server Error"),
        ("llama-cpp-python", "normal", ProbeStatus.FAILED, "GET /health: HTTP 404: Not Found"),
        ("vllm", "down", ProbeStatus.FAILED, "connection refused"),
    ],
)
async def test_the_readme_example_plugin_works_as_a_drop_in(
    flavor: str, mode: str, status: ProbeStatus, reason: str
) -> None:
    pm = get_plugin_manager([str(EXAMPLES)], load_entry_points=False)
    pm.check_pending()
    assert pm.failures == []
    probes = collect_probes(pm)
    assert "http_health" in probes
    async with FakeOpenAI(["m"], flavor=flavor) as fake, running_prober(probes) as prober:
        await fake.aset_mode(mode)
        result = await prober.run(spec(provider="http_health", endpoint=fake.url))
    assert result.status is status
    assert result.reason == reason
    if mode != "down":
        assert fake.count("GET", "/health") == 1
