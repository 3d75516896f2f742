"""The modeld command's offline helpers, run as an operator would: in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from daemon import __version__
from daemon.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "modeld.example.toml"
EXAMPLE_PLUGINS = ROOT / "examples" / "plugins"


def modeld(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_config_prints_the_effective_configuration_that_parses_back_equal() -> None:
    done = modeld("config", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    assert printed["probe"]["recheck_interval"] == "500ms"
    assert printed["daemon"]["socket_mode"] == "0660"
    reparsed = parse_config(printed, str(EXAMPLE))
    assert reparsed == load_config(EXAMPLE)


def test_config_of_an_invalid_file_exits_78_with_the_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nmin_margin = "lots"\n')
    done = modeld("config", str(bad))
    assert done.returncode == 78
    assert f"{bad}: policy.min_margin: expected a number" in done.stderr
    assert done.stdout == ""


def test_plugins_lists_builtins_and_drop_ins_with_their_probes(tmp_path: Path) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text(f'[daemon]\nplugin_dirs = ["{EXAMPLE_PLUGINS}"]\n')
    done = modeld("plugins", "--config", str(config))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    for probe in ("openai", "ollama", "local_file"):
        assert any(probe in row for row in rows.values()), probe
    drop_in = next(row for row in rows.values() if "http_health" in row)
    assert str(EXAMPLE_PLUGINS / "http_health.py") in drop_in


def test_check_config_knows_providers_from_plugin_dirs(tmp_path: Path) -> None:
    config = tmp_path / "modeld.toml"
    model = ('[[models]]\nid = "m"\nprovider = "http_health"\n'
             'endpoint = "http://127.0.0.1:8000"\n')
    config.write_text(f'[daemon]\nplugin_dirs = []\n{model}')
    refused = modeld("check-config", str(config))
    assert refused.returncode == 78
    assert 'models[0].provider: no probe plugin named "http_health"' in refused.stderr
    config.write_text(f'[daemon]\nplugin_dirs = ["{EXAMPLE_PLUGINS}"]\n{model}')
    accepted = modeld("check-config", str(config))
    assert (accepted.returncode, accepted.stdout.strip()) == (0, "ok")


def test_version_and_usage() -> None:
    assert modeld("--version").stdout.strip() == f"modeld {__version__}"
    bare = modeld()
    assert bare.returncode == 2 and "run" in bare.stderr
    wrong = modeld("frobnicate")
    assert wrong.returncode == 2


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    done = modeld("check-config", str(missing))
    assert done.returncode == 78 and f"{missing}: file not found" in done.stderr
