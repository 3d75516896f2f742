"""config/modeld.example.toml: parses, lists every key with a comment, and shows the defaults."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.config import (
    MODEL_FIELDS,
    SCHEMA,
    Config,
    default_value,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "modeld.example.toml"
LINES = EXAMPLE.read_text().splitlines()
DATA = tomllib.loads(EXAMPLE.read_text())
ASSIGN = re.compile(r"^(#\s*)?([a-z_0-9]+)\s*=")


def comment_above(line_no: int) -> str:
    """The comment block directly above a line (commented-out assignments excluded)."""
    block = []
    i = line_no - 1
    while i >= 0 and LINES[i].lstrip().startswith("#") and not ASSIGN.match(LINES[i].strip()):
        block.append(LINES[i].lstrip("# ").rstrip())
        i -= 1
    return " ".join(reversed(block))


def first_line_of(key: str, start: int = 0, stop: int | None = None) -> int:
    """The first line (index) at or after ``start`` that assigns ``key``, commented or not."""
    for i, line in enumerate(LINES[start:stop], start):
        match = ASSIGN.match(line.strip())
        if match and match.group(2) == key:
            return i
    raise AssertionError(f"{key} is not in {EXAMPLE.name}")


def section_span(name: str) -> tuple[int, int]:
    start = LINES.index(f"[{name}]")
    stop = next((i for i in range(start + 1, len(LINES)) if LINES[i].startswith("[")),
                len(LINES))
    return start, stop


def test_example_loads_without_errors():
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    assert [m.provider for m in config.models] == ["openai", "ollama", "local_file"]


def test_example_passes_modeld_check_config():
    done = subprocess.run([sys.executable, "-m", "daemon", "check-config", str(EXAMPLE)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("ok")
    # no errors; warnings only about what this host lacks (the group, the key, the file)
    for line in done.stderr.splitlines():
        assert line.startswith(f"warning: {EXAMPLE}: "), line
        assert any(key in line for key in ("daemon.admin_group", ".api_key_env", ".local_path"))


@pytest.mark.parametrize("section", list(SCHEMA))
def test_example_sets_every_section_key(section):
    assert set(DATA[section]) == {key.name for key in SCHEMA[section][1]}


@pytest.mark.parametrize("section", list(SCHEMA))
def test_example_section_values_are_the_defaults(section):
    cls = SCHEMA[section][0]
    assert getattr(load_config(EXAMPLE), section) == cls()
    for key in SCHEMA[section][1]:
        assert DATA[section][key.name] == default_value(section, key.name), key.name


@pytest.mark.parametrize(("section", "key"), [(s, k.name) for s in SCHEMA for k in SCHEMA[s][1]])
def test_every_section_key_has_a_comment_with_its_meaning_and_default(section, key):
    start, stop = section_span(section)
    comment = comment_above(first_line_of(key, start, stop))
    assert "Default:" in comment, f"[{section}].{key}: {comment!r}"
    assert len(comment) > len("Default: x") + 10, f"[{section}].{key} lacks a meaning"


def test_every_model_field_appears_in_the_example():
    set_somewhere = set().union(*(set(model) for model in DATA["models"]))
    models_start = LINES.index("[[models]]")
    for key in MODEL_FIELDS:
        line = LINES[first_line_of(key.name, models_start)]
        assert key.name in set_somewhere or line.lstrip().startswith("#"), key.name


def test_first_example_model_lists_every_field_with_a_comment_and_default():
    start = LINES.index("[[models]]")
    stop = LINES.index("[[models]]", start + 1)
    for key in MODEL_FIELDS:
        comment = comment_above(first_line_of(key.name, start, stop))
        assert "default" in comment.lower(), f"models.{key.name}: {comment!r}"


def test_example_has_an_openai_an_ollama_and_a_local_file_model():
    config = load_config(EXAMPLE)
    openai, ollama, local_file = config.models
    assert openai.endpoint.startswith("http") and not openai.local
    assert ollama.local  # loopback endpoint
    assert local_file.local and local_file.local_path.endswith(".gguf")


def test_commented_out_model_keys_are_valid_when_uncommented():
    # interval and timeout are shown commented out; uncommented they must still parse
    start = LINES.index("[[models]]")
    stop = LINES.index("[[models]]", start + 1)
    block = [line.lstrip("# ") if re.match(r"^#\s*(interval|timeout)\s*=", line) else line
             for line in LINES[start:stop]]
    data = tomllib.loads("\n".join(block))
    spec = parse_config(data, "example").models[0]
    assert (spec.interval, spec.timeout) == (5.0, 3.0)
