"""Logs: one format per stream, stdlib loggers through the same renderer, no secrets."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import structlog

from daemon.service.logs import configure_logging, get_logger
from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, daemon_config


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def teardown_function() -> None:
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_json_lines_when_not_a_tty_with_event_and_context_keys() -> None:
    out = io.StringIO()
    assert configure_logging("auto", stream=out) == "json"
    get_logger("modeld").info("health_changed", model_id="m1", role="chat", new="healthy")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "health_changed"
    assert (line["model_id"], line["role"], line["level"]) == ("m1", "chat", "info")
    assert line["timestamp"].endswith("Z")


def test_console_rendering_on_a_tty() -> None:
    out = _Tty()
    assert configure_logging("auto", stream=out) == "console"
    get_logger("modeld").warning("state_write_failed", path="/x")
    text = out.getvalue()
    assert "state_write_failed" in text and "path" in text
    assert not text.lstrip().startswith("{")


def test_stdlib_loggers_go_through_the_same_json_renderer() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    logging.getLogger("httpx").warning("upstream said %s", "no")
    logging.getLogger("httpx").info("HTTP Request: GET ...")  # below httpx's level: dropped
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["upstream said no"]
    assert lines[0]["logger"] == "httpx"


def test_keys_named_like_secrets_are_redacted_but_env_var_names_are_kept() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    get_logger().info("probe", authorization="Bearer sk-live", api_key="sk-live",
                      api_key_env="OPENAI_KEY")
    line = json.loads(out.getvalue())
    assert line["authorization"] == line["api_key"] == "[redacted]"
    assert line["api_key_env"] == "OPENAI_KEY"


def test_the_api_key_never_reaches_logs_state_or_the_api(workdir: Path) -> None:
    secret = "sk-test-0123456789-do-not-leak"
    with FakeServers() as servers:
        fake = servers.start(FakeOpenAI(["m"], api_key=secret))
        wrong = servers.start(FakeOpenAI(["w"], api_key="another-key"))
        config = daemon_config(workdir, [
            {"id": "m", "provider": "openai", "endpoint": fake.url, "api_key_env": "M_KEY"},
            {"id": "w", "provider": "openai", "endpoint": wrong.url, "api_key_env": "M_KEY"},
        ])
        with DaemonProcess(workdir, config, extra_env={"M_KEY": secret}) as daemon:
            daemon.wait_health("m", "healthy")
            failed = daemon.wait_health("w", "unavailable", timeout=8)
            assert "unauthorized (check api_key_env)" in failed["last_probe"]["reason"]
            views = json.dumps([daemon.model("m"), daemon.model("w"),
                                daemon.post("/api/v1/models/w/evaluate")])
            events = daemon.request("GET", "/api/v1/events")[1]
            metrics = daemon.request("GET", "/metrics")[1]
            assert daemon.stop() == 0
        for text in (views, events, metrics, daemon.log_path.read_text(),
                     daemon.state_path.read_text()):
            assert secret not in text
        assert "M_KEY" in views  # the variable's name is fine to show
