"""Configuration (daemon.config): every error names file and key path; defaults; round trip."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import (
    Config,
    ConfigError,
    DaemonConfig,
    HealthConfig,
    PolicyConfig,
    ProbeConfig,
    ScoreConfig,
    format_duration,
    is_loopback_url,
    load_config,
    parse_config,
    parse_duration,
    render_config,
)

SRC = "/etc/modeld/test.toml"


def model(model_id: str = "m1", **fields: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": model_id, "provider": "openai",
                           "endpoint": "http://10.0.0.5:8000"}
    raw.update(fields)
    return raw


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, SRC)
    return caught.value.errors


def only_error(data: dict[str, Any]) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modeld.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults


def test_empty_config_gives_every_default():
    config = parse_config({}, SRC)
    assert config == Config(path=SRC)
    assert config.daemon == DaemonConfig()
    assert config.probe.interval == 5.0 and config.probe.recheck_interval == 0.5
    assert config.health == HealthConfig(failure_threshold=3, success_threshold=2,
                                         degraded_latency_ms=2000.0, window=20)
    assert config.policy.cooldown == 1800.0 and config.policy.auto_execute is False


def test_model_defaults_are_filled():
    spec = parse_config({"models": [model("llama3-8b")]}, SRC).models[0]
    assert spec.role == "default"
    assert spec.model == "llama3-8b"  # upstream name defaults to the id
    assert spec.quality == 0.5
    assert spec.capability_tags == ()
    assert spec.local is False
    assert spec.interval is None and spec.timeout is None


def test_model_values_are_read():
    spec = parse_config({"models": [model(
        "m", role="chat", model="llama3:8b", capability_tags=["code"], cost_estimate=2,
        latency_estimate=800, quality=0.6, deep=True, interval="10s", timeout=2,
    )]}, SRC).models[0]
    assert (spec.role, spec.model, spec.capability_tags) == ("chat", "llama3:8b", ("code",))
    assert (spec.cost_estimate, spec.latency_estimate, spec.quality) == (2.0, 800.0, 0.6)
    assert (spec.deep, spec.interval, spec.timeout) == (True, 10.0, 2.0)


def test_socket_mode_is_read_as_octal():
    assert parse_config({"daemon": {"socket_mode": "0600"}}, SRC).daemon.socket_mode == 0o600


# ----------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("raw", "seconds"), [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5),
    ("2", 2.0), (7, 7.0), (0.25, 0.25), (" 10s ", 10.0),
])
def test_durations_accept_seconds_and_units(raw, seconds):
    assert parse_duration(raw) == seconds


def test_durations_in_sections_are_converted_to_seconds():
    config = parse_config({"probe": {"interval": "5m", "recheck_interval": "250ms"},
                           "policy": {"cooldown": "1h", "probation": 90}}, SRC)
    assert (config.probe.interval, config.probe.recheck_interval) == (300.0, 0.25)
    assert (config.policy.cooldown, config.policy.probation) == (3600.0, 90.0)


@pytest.mark.parametrize("raw", ["5 minutes", "ms", "-5s", "1d", "", "1h30m", True, [5]])
def test_bad_durations_are_rejected(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_negative_number_duration_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1)


def test_infinite_duration_is_rejected():
    with pytest.raises(ValueError):
        parse_duration(math.inf)


def test_bad_duration_error_names_file_and_key():
    error = only_error({"probe": {"interval": "5 minutes"}})
    assert error.startswith(f"{SRC}: probe.interval: ")
    assert '"5 minutes"' in error


def test_bad_model_duration_error_names_the_model_index():
    error = only_error({"models": [model("a"), model("b", timeout="soon")]})
    assert error.startswith(f'{SRC}: models[1] (id "b").timeout: ')


@pytest.mark.parametrize(("seconds", "text"), [
    (3600.0, "1h"), (300.0, "5m"), (30.0, "30s"), (0.5, "500ms"), (90.0, "90s"),
    (5400.0, "90m"),
])
def test_format_duration_gives_the_shortest_exact_form(seconds, text):
    assert format_duration(seconds) == text


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_format_duration_parses_back_to_the_same_seconds(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


# ----------------------------------------------------------------------------- errors


def test_unknown_section_says_did_you_mean():
    error = only_error({"helth": {"failure_threshold": 3}})
    assert error == f'{SRC}: helth: unknown section (did you mean "health"?)'


def test_unknown_key_says_did_you_mean():
    error = only_error({"probe": {"intervall": "5s"}})
    assert error == f'{SRC}: probe.intervall: unknown key (did you mean "interval"?)'


def test_unknown_model_key_names_the_model_and_says_did_you_mean():
    error = only_error({"models": [model("a"), model("b", capability_tag=["x"])]})
    assert error.startswith(f'{SRC}: models[1] (id "b").capability_tag: unknown key')
    assert 'did you mean "capability_tags"' in error


def test_unknown_key_far_from_any_name_has_no_suggestion():
    error = only_error({"daemon": {"zzzzzz": 1}})
    assert error == f"{SRC}: daemon.zzzzzz: unknown key"


@pytest.mark.parametrize(("data", "path", "words"), [
    ({"health": {"failure_threshold": "3"}}, "health.failure_threshold", "integer"),
    ({"health": {"failure_threshold": 3.5}}, "health.failure_threshold", "integer"),
    ({"policy": {"auto_execute": "yes"}}, "policy.auto_execute", "true or false"),
    ({"daemon": {"plugin_dirs": "/etc/x"}}, "daemon.plugin_dirs", "list of strings"),
    ({"daemon": {"socket_mode": 660}}, "daemon.socket_mode", "octal"),
    ({"score": {"health": "high"}}, "score.health", "number"),
    ({"models": [model(capability_tags=[1, 2])]}, 'models[0] (id "m1").capability_tags', "list"),
    ({"models": [model(primary=1)]}, 'models[0] (id "m1").primary', "true or false"),
    ({"models": [model(cost_estimate=True)]}, 'models[0] (id "m1").cost_estimate', "number"),
    ({"health": "strict"}, "health", "table"),
])
def test_wrong_types_name_the_key_path(data, path, words):
    error = only_error(data)
    assert error.startswith(f"{SRC}: {path}: ")
    assert words in error


def test_negative_cost_names_the_model_key_path():
    data = {"models": [model("a"), model("b"), model("c", cost_estimate=-1.0)]}
    assert only_error(data) == f'{SRC}: models[2] (id "c").cost_estimate: cannot be negative'


def test_quality_outside_zero_to_one_is_rejected():
    error = only_error({"models": [model(quality=1.5)]})
    assert error.startswith(f'{SRC}: models[0] (id "m1").quality:')


def test_non_positive_thresholds_are_rejected():
    error = only_error({"health": {"success_threshold": 0}})
    assert error == f"{SRC}: health.success_threshold: must be greater than 0"


def test_weights_summing_to_zero_are_rejected():
    error = only_error({"score": {"health": 0, "latency": 0, "cost": 0, "quality": 0}})
    assert error.startswith(f"{SRC}: score: ")
    assert "sum to 0" in error


def test_negative_weight_is_rejected():
    assert only_error({"score": {"cost": -0.1}}) == f"{SRC}: score.cost: cannot be negative"


@pytest.mark.parametrize("bad_id", ["-leading-dash", "has space", "", "x" * 129, "a/b", "é"])
def test_invalid_model_id_is_rejected(bad_id):
    error = only_error({"models": [model("ok"), model(bad_id)]})
    assert error.startswith(f"{SRC}: models[1].id: ")
    assert "not a valid model id" in error


def test_longest_valid_model_id_is_accepted():
    assert parse_config({"models": [model("x" * 128)]}, SRC).models[0].id == "x" * 128


def test_duplicate_model_id_names_both_places():
    error = only_error({"models": [model("dup"), model("other"), model("dup")]})
    assert error.startswith(f"{SRC}: models[2].id: ")
    assert 'duplicate model id "dup"' in error and "models[0]" in error


@pytest.mark.parametrize("word", ["promote", "rollback", "auto-upgrade", "offline-mode"])
def test_route_word_cannot_be_a_model_id(word):
    error = only_error({"models": [model(word)]})
    assert error.startswith(f"{SRC}: models[0].id: ")
    assert "route word" in error


def test_two_primaries_in_one_role_are_rejected():
    data = {"models": [model("a", role="chat", primary=True), model("b", role="code",
                       primary=True), model("c", role="chat", primary=True)]}
    error = only_error(data)
    assert error.startswith(f'{SRC}: models[2] (id "c").primary: ')
    assert 'role "chat" already has a primary (models[0] (id "a"))' in error


def test_one_primary_per_role_in_several_roles_is_fine():
    data = {"models": [model("a", role="chat", primary=True),
                       model("b", role="code", primary=True)]}
    assert [m.primary for m in parse_config(data, SRC).models] == [True, True]


def test_local_file_without_local_path_is_rejected():
    error = only_error({"models": [{"id": "gguf", "provider": "local_file"}]})
    assert error == (f'{SRC}: models[0] (id "gguf").local_path: '
                     'is required for provider "local_file"')


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_http_provider_without_endpoint_is_rejected(provider):
    error = only_error({"models": [{"id": "m", "provider": provider}]})
    assert error == f'{SRC}: models[0] (id "m").endpoint: is required for provider "{provider}"'


def test_endpoint_must_be_an_http_url():
    error = only_error({"models": [model(endpoint="ftp://10.0.0.1")]})
    assert error.startswith(f'{SRC}: models[0] (id "m1").endpoint: ')


def test_missing_id_and_provider_are_required():
    errors = errors_of({"models": [{"role": "chat"}]})
    assert errors == [f"{SRC}: models[0].id: is required",
                      f"{SRC}: models[0].provider: is required"]


def test_models_must_be_an_array_of_tables():
    assert only_error({"models": {"id": "x"}}).startswith(f"{SRC}: models: ")
    assert only_error({"models": ["x"]}).startswith(f"{SRC}: models[0]: ")


def test_bad_sha256_pin_is_rejected():
    error = only_error({"models": [{"id": "f", "provider": "local_file",
                                    "local_path": "/m.gguf", "sha256": "abc"}]})
    assert error.startswith(f'{SRC}: models[0] (id "f").sha256: ')


def test_bad_metrics_listen_and_log_format_are_rejected():
    errors = errors_of({"daemon": {"metrics_listen": "9464", "log_format": "xml"}})
    assert [e.split(": ")[1] for e in errors] == ["daemon.metrics_listen", "daemon.log_format"]


def test_all_errors_are_reported_together():
    data = {
        "helth": {},
        "probe": {"interval": "soon", "timeout": -1},
        "score": {"health": 0, "latency": 0, "cost": 0, "quality": 0},
        "models": [model("promote"), model("b", cost_estimate=-2), model("b"),
                   {"id": "f", "provider": "local_file"}],
    }
    errors = errors_of(data)
    paths = [e.split(": ")[1] for e in errors]
    # the duplicate id is found although the first "b" has a mistake of its own
    assert set(paths) == {"helth", "probe.interval", "probe.timeout", "score", "models[0].id",
                          'models[1] (id "b").cost_estimate', "models[2].id",
                          'models[3] (id "f").local_path'}
    assert all(e.startswith(f"{SRC}: ") for e in errors)
    assert str(ConfigError(errors)) == "\n".join(errors)


def test_invalid_toml_error_names_the_file(tmp_path):
    path = write(tmp_path, "[probe]\ninterval = = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith(f"{path}: invalid TOML: ")


def test_non_utf8_file_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[daemon]\nsocket = \"\xff\"\n")
    with pytest.raises(ConfigError, match=f"^{path}: not UTF-8"):
        load_config(path)


def test_missing_file_error_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f"{path}: file not found"]


def test_load_config_errors_name_the_file_path(tmp_path):
    path = write(tmp_path, '[[models]]\nid = "a"\nprovider = "openai"\n'
                           'endpoint = "http://h:1"\ncost_estimate = -3\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f'{path}: models[0] (id "a").cost_estimate: cannot be negative']


def test_load_config_reads_a_file(tmp_path):
    path = write(tmp_path, '[probe]\ninterval = "10s"\n[[models]]\nid = "a"\n'
                           'provider = "ollama"\nendpoint = "http://127.0.0.1:11434"\n')
    config = load_config(path)
    assert config.path == str(path)
    assert config.probe.interval == 10.0
    assert config.models[0].local is True


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize(("endpoint", "local"), [
    ("http://127.0.0.1:11434", True),
    ("http://127.1.2.3:8000", True),
    ("http://localhost:8000", True),
    ("http://LOCALHOST:8000", True),
    ("http://gpu.localhost:8000", True),
    ("http://[::1]:8000/v1", True),
    ("http://10.0.0.5:8000", False),
    ("https://api.example.com", False),
    ("http://localhost.example.com:8000", False),
    ("http://[::2]:8000", False),
])
def test_local_defaults_to_whether_the_endpoint_is_loopback(endpoint, local):
    spec = parse_config({"models": [model(endpoint=endpoint)]}, SRC).models[0]
    assert spec.local is local
    assert is_loopback_url(endpoint) is local


def test_local_defaults_to_true_with_a_local_path():
    spec = parse_config({"models": [{"id": "f", "provider": "local_file",
                                     "local_path": "/models/x.gguf"}]}, SRC).models[0]
    assert spec.local is True


def test_explicit_local_overrides_the_default():
    data = {"models": [model("a", endpoint="http://127.0.0.1:1", local=False),
                       model("b", local=True)]}
    assert [m.local for m in parse_config(data, SRC).models] == [False, True]


# ----------------------------------------------------------------------------- rendering


FULL: dict[str, Any] = {
    "daemon": {"state_file": "/tmp/s.json", "socket_mode": "0600", "plugin_dirs": ["/a", "/b"],
               "metrics_listen": "127.0.0.1:9464", "log_format": "json",
               "state_flush_interval": "250ms", "shutdown_grace": 2405.7},
    "probe": {"interval": "90s", "timeout": 1.5, "recheck_interval": "100ms"},
    "health": {"failure_threshold": 4, "degraded_latency_ms": 1234.5, "window": 7},
    "score": {"health": 2, "latency": 1, "cost": 0, "quality": 1, "cost_ceiling": 12.5},
    "policy": {"auto_execute": True, "min_margin": 0.1, "cooldown": "2h", "probation": 0},
    "models": [
        model("a", role="chat", primary=True, capability_tags=["code", "reasoning"],
              api_key_env="OPENAI_KEY", interval="7s", timeout="750ms"),
        {"id": "b", "provider": "ollama", "endpoint": "http://127.0.0.1:11434",
         "model": "llama3:8b", "deep": True, "quality": 0.9},
        {"id": "c", "provider": "local_file", "local_path": "/m/c.gguf", "sha256": "ab" * 32},
    ],
}


def test_render_config_parses_back_with_tomllib_to_an_equal_config():
    config = parse_config(FULL, SRC)
    text = render_config(config)
    assert parse_config(tomllib.loads(text), SRC) == config


def test_render_config_of_the_defaults_round_trips_and_shows_every_section():
    config = parse_config({}, SRC)
    data = tomllib.loads(render_config(config))
    assert set(data) == {"daemon", "control", "probe", "health", "score", "policy", "gateway",
                         "models"}
    assert data["probe"]["interval"] == "5s"
    assert data["daemon"]["socket_mode"] == "0660"
    assert parse_config(data, SRC) == config


def test_render_config_leaves_out_unset_per_model_overrides():
    data = tomllib.loads(render_config(parse_config({"models": [model("a")]}, SRC)))
    assert "interval" not in data["models"][0] and "timeout" not in data["models"][0]
    assert data["models"][0]["model"] == "a" and data["models"][0]["local"] is False


durations = st.floats(min_value=0.001, max_value=1e7, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    grace=durations, flush=durations, cooldown=durations,
    weight=st.floats(min_value=0.01, max_value=100.0),
    cost=st.floats(min_value=0.0, max_value=1e6),
    quality=st.floats(min_value=0.0, max_value=1.0),
    tags=st.lists(st.text(min_size=1, max_size=8), max_size=3),
)
def test_render_config_round_trips_arbitrary_values(grace, flush, cooldown, weight, cost,
                                                    quality, tags):
    data = {"daemon": {"shutdown_grace": grace, "state_flush_interval": flush},
            "policy": {"cooldown": cooldown}, "score": {"latency": weight},
            "models": [model("m", cost_estimate=cost, quality=quality, capability_tags=tags,
                             timeout=flush)]}
    config = parse_config(data, SRC)
    assert parse_config(tomllib.loads(render_config(config)), SRC) == config


def test_config_classes_are_frozen():
    with pytest.raises(AttributeError):
        ProbeConfig().interval = 1.0  # type: ignore[misc]
    assert ScoreConfig() == ScoreConfig() and PolicyConfig() == PolicyConfig()


@pytest.mark.parametrize(("endpoint", "words"), [
    ("http://[::1:8000/", "not a valid URL"),
    ("http://host:99999/", "not a valid URL"),
    ("https://user:token@host/", "must not carry credentials"),
])
def test_endpoints_that_break_url_parsing_or_carry_credentials_are_config_errors(
        endpoint: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [{"id": "m", "provider": "openai", "endpoint": endpoint}]}, SRC)
    message = str(caught.value)
    assert f'{SRC}: models[0] (id "m").endpoint: ' in message and words in message


# ----------------------------------------------------------------------------- [control]


def test_control_shares_are_read_and_checked_against_each_other():
    config = parse_config({"control": {"max_connections_per_peer": 10, "admin_reserve": 4,
                                       "idle_timeout": "2s", "max_followers_per_peer": 3}},
                          SRC)
    assert (config.control.max_connections_per_peer, config.control.admin_reserve,
            config.control.idle_timeout, config.control.max_followers_per_peer) == (10, 4, 2.0, 3)
    errors = errors_of({"daemon": {"max_connections": 8},
                        "control": {"admin_reserve": 8, "max_connections_per_peer": 0,
                                    "idle_timeout": "soon", "max_followers_per_peer": 200,
                                    "max_conections_per_peer": 1}})
    assert f"{SRC}: control.admin_reserve: must be less than daemon.max_connections (8), or " \
           "no other peer could connect" in errors
    assert f"{SRC}: control.max_connections_per_peer: must be greater than 0" in errors
    assert any(e.startswith(f"{SRC}: control.idle_timeout: ") for e in errors), errors
    assert any("max_conections_per_peer: unknown key" in e and "did you mean" in e
               for e in errors), errors


def test_followers_per_peer_cannot_exceed_connections_per_peer():
    errors = errors_of({"control": {"max_connections_per_peer": 4,
                                    "max_followers_per_peer": 5}})
    assert errors == [f"{SRC}: control.max_followers_per_peer: cannot exceed "
                      "control.max_connections_per_peer (4): each stream holds a connection"]


def test_a_config_nested_too_deeply_for_the_toml_parser_is_a_config_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
