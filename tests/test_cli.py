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
    assert 'models[0] (id "m").provider: no probe plugin named "http_health"' in refused.stderr
    config.write_text(f'[daemon]\nplugin_dirs = ["{EXAMPLE_PLUGINS}"]\nadmin_group = "root"\n'
                      f'{model}')
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


FOUR_MISTAKES = """\
[daemon]
plugin_dirs = []
[probe]
intervall = "5s"
[[models]]
id = "qwen"
provider = "openai"
endpoint = "http://127.0.0.1:8000"
cost_estimate = "cheap"
[[models]]
id = "llama"
provider = "ollama"
endpoint = "http://127.0.0.1:11434"
[[models]]
id = "qwen"
provider = "vllm"
endpoint = "http://127.0.0.1:8001"
"""


def test_check_config_reports_every_mistake_in_one_run_naming_models_by_id(
        tmp_path: Path) -> None:
    # a key error, a type error, a duplicate id and an unknown provider: one run, not three
    config = tmp_path / "modeld.toml"
    config.write_text(FOUR_MISTAKES)
    done = modeld("check-config", str(config))
    assert done.returncode == 78
    assert done.stdout == ""
    assert sorted(done.stderr.splitlines()) == sorted([
        f'{config}: probe.intervall: unknown key (did you mean "interval"?)',
        f'{config}: models[0] (id "qwen").cost_estimate: expected a number, got a string',
        f'{config}: models[2] (id "qwen").provider: no probe plugin named "vllm" '
        "(loaded: local_file, ollama, openai)",
        f'{config}: models[2].id: duplicate model id "qwen" (first declared at models[0])',
    ])


def check_config(path: Path, strict: bool = False) -> int:
    """``modeld check-config`` in-process (its plugin loading logs kept out of the output)."""
    from structlog.testing import capture_logs

    from daemon.service.cli import cmd_check_config

    with capture_logs():
        return cmd_check_config(str(path), strict)


def test_check_config_warns_about_what_will_fail_at_run_time_and_strict_refuses(
        tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MODELD_TEST_NO_SUCH_KEY", raising=False)
    config = tmp_path / "modeld.toml"
    config.write_text(
        '[daemon]\nplugin_dirs = []\nadmin_group = "modeld-test-no-such-group"\n'
        '[[models]]\nid = "gpt"\nprovider = "openai"\nendpoint = "https://api.example"\n'
        'api_key_env = "MODELD_TEST_NO_SUCH_KEY"\n'
        f'[[models]]\nid = "tiny"\nprovider = "local_file"\n'
        f'local_path = "{tmp_path}/tiny.gguf"\n')
    warnings = [
        f'warning: {config}: daemon.admin_group: group "modeld-test-no-such-group" does not '
        "exist on this host, so only root and the daemon's own uid may change things (create "
        "it: groupadd --system modeld-test-no-such-group)",
        f'warning: {config}: models[0] (id "gpt").api_key_env: $MODELD_TEST_NO_SUCH_KEY is not '
        "set (or empty) in this environment, so probes send no key; under systemd set it with "
        "Environment= or EnvironmentFile= in a drop-in",
        f'warning: {config}: models[1] (id "tiny").local_path: "{tmp_path}/tiny.gguf" does '
        "not exist, so the model will be unavailable",
    ]
    assert check_config(config) == 0
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("ok, with 3 warnings\n", warnings)
    assert check_config(config, strict=True) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [*warnings, "modeld check-config: 3 warnings, and --strict "
                                "counts them as errors"]
    # each fixed, the warnings go: the variable set, the file there, the group known
    monkeypatch.setenv("MODELD_TEST_NO_SUCH_KEY", "sk-x")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    config.write_text(config.read_text().replace("modeld-test-no-such-group", "root"))
    assert check_config(config, strict=True) == 0
    assert capsys.readouterr().out == "ok\n"


def test_check_config_warns_about_a_file_with_no_models(tmp_path: Path, capsys) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text('[daemon]\nplugin_dirs = []\nadmin_group = ""\n')
    assert check_config(config) == 0
    out, err = capsys.readouterr()
    assert out == "ok, with 1 warning\n"
    assert err == (f"warning: {config}: models: no [[models]] declared: the daemon starts, "
                   "but resolve has nothing to answer with\n")
