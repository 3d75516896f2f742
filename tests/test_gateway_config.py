"""[gateway]: the front door's keys, their defaults and the rules across them."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, parse_config, parse_listen
from daemon.core.settings import GatewayConfig


def test_the_door_is_off_by_default():
    config = parse_config({}, "t.toml")
    assert config.gateway == GatewayConfig()
    assert not config.gateway.enabled


def test_every_key_is_read_with_its_kind():
    config = parse_config({"gateway": {
        "listen": "127.0.0.1:8088", "clients_key_env": "MODELD_CLIENTS_KEY",
        "first_byte_timeout": "2s", "stream_idle_timeout": "500ms", "max_attempts": 2,
        "max_request_bytes": 1024, "max_concurrent": 8}}, "t.toml")
    assert config.gateway == GatewayConfig(
        listen="127.0.0.1:8088", clients_key_env="MODELD_CLIENTS_KEY", first_byte_timeout=2.0,
        stream_idle_timeout=0.5, max_attempts=2, max_request_bytes=1024, max_concurrent=8)
    assert config.gateway.enabled


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:8088", True), ("[::1]:8088", True), ("localhost:8088", True),
    ("unix:/run/modeld/gateway.sock", True), ("0.0.0.0:8088", False),
    ("192.168.1.5:8088", False), ("[::]:8088", False)])
def test_loopback_is_told_apart_from_the_network(listen, loopback):
    assert parse_listen(listen).loopback is loopback


def test_a_door_off_loopback_without_a_key_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_config({"gateway": {"listen": "0.0.0.0:8088"}}, "t.toml")
    (line,) = caught.value.errors
    assert line.startswith("t.toml: gateway.clients_key_env: is required when gateway.listen")
    assert '"0.0.0.0:8088"' in line
    parse_config({"gateway": {"listen": "0.0.0.0:8088", "clients_key_env": "K"}}, "t.toml")


@pytest.mark.parametrize(("table", "key", "says"), [
    ({"listen": "8088"}, "gateway.listen", "is not \"HOST:PORT\""),
    ({"listen": "127.0.0.1:99999"}, "gateway.listen", "is not \"HOST:PORT\""),
    ({"listen": "unix:relative.sock"}, "gateway.listen", "absolute path"),
    ({"clients_key_env": "sk-abc def"}, "gateway.clients_key_env", "never the key itself"),
    ({"max_attempts": 0}, "gateway.max_attempts", "greater than 0"),
    ({"max_concurrent": -1}, "gateway.max_concurrent", "greater than 0"),
    ({"first_byte_timeout": "soon"}, "gateway.first_byte_timeout", "bad duration"),
    ({"max_inflight": 3}, "gateway.max_inflight", "unknown key"),
])
def test_bad_values_name_the_key_and_what_is_wrong(table, key, says):
    with pytest.raises(ConfigError) as caught:
        parse_config({"gateway": table}, "t.toml")
    assert any(line.startswith(f"t.toml: {key}: ") and says in line
               for line in caught.value.errors), caught.value.errors


def test_check_config_warns_when_the_client_key_is_not_in_the_environment():
    from daemon.config import runtime_warnings

    config = parse_config({"gateway": {"listen": "0.0.0.0:8088", "clients_key_env": "K"}},
                          "t.toml")
    warnings = [w for w in runtime_warnings(config, {}) if "gateway" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith("t.toml: gateway.clients_key_env: $K is not set")
    assert "exit 78" in warnings[0]
    assert not [w for w in runtime_warnings(config, {"K": "s3cret"}) if "gateway" in w]
