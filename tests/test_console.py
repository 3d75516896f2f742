"""The operator's console against the real daemon (issue 15): the audit trail, an outage made
visible (list, status, metrics, a warning in the log), a rejected reload that says why, and the
event stream's backlog hint. One daemon for the module; the outage comes last."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.control import ctl
from daemon.testing.fakes import FakeOpenAI, FakeServers, write_gguf
from daemon.testing.harness import DaemonProcess, UnixHTTPConnection, daemon_config, wait_for

ME = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"


@pytest.fixture(scope="module")
def console() -> Iterator[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="md-", dir="/tmp"))
    with FakeServers() as servers:
        vllm = servers.start(FakeOpenAI(["primary-7b"], flavor="vllm"))
        gguf = work / "backup.gguf"
        write_gguf(gguf)
        models = [
            {"id": "primary-7b", "provider": "openai", "endpoint": vllm.url, "role": "chat",
             "primary": True, "quality": 0.8},
            {"id": "backup", "provider": "local_file", "local_path": str(gguf), "role": "chat",
             "quality": 0.3},
        ]
        config = daemon_config(work, models, health={"failure_threshold": 2})
        with DaemonProcess(work, config) as daemon:
            daemon.wait_health("primary-7b", "healthy")
            daemon.wait_health("backup", "healthy")
            yield {"daemon": daemon, "vllm": vllm, "config": config}
    shutil.rmtree(work, ignore_errors=True)


def text_of(daemon: DaemonProcess, path: str) -> str:
    status, body = daemon.request("GET", path)
    assert status == 200 and isinstance(body, str), (status, body)
    return body


def modelctl(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str],
             *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--socket", daemon.socket_path, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_history_shows_who_made_which_model_primary_when_and_why(
        console: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    daemon = console["daemon"]
    code, _, err = modelctl(daemon, capsys, "promote", "backup", "--reason",
                            "primary-7b is being upgraded to v0.7")
    assert code == 0, err
    code, _, err = modelctl(daemon, capsys, "rollback", "--role", "chat", "--reason",
                            "the upgrade is done")
    assert code == 0, err

    status, body = daemon.request("GET", "/api/v1/roles/chat/history")
    assert status == 200
    assert (body["role"], body["primary"]) == ("chat", "primary-7b")
    history = body["history"]
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("initial", None, "primary-7b"), ("promote", "primary-7b", "backup"),
        ("rollback", "backup", "primary-7b")]
    assert history[1]["reason"] == "primary-7b is being upgraded to v0.7"
    assert re.fullmatch(rf"uid={os.getuid()} pid=\d+", history[1]["actor"])
    assert history[0]["actor"] == "config"
    assert history[0]["at"] <= history[1]["at"] <= history[2]["at"] <= time.time()
    status, body = daemon.request("GET", "/api/v1/roles/chat/history?limit=1")
    assert [h["action"] for h in body["history"]] == ["rollback"]
    status, body = daemon.request("GET", "/api/v1/roles/nope/history")
    assert (status, body["error"]["code"]) == (404, "unknown_role")
    assert "roles: chat" in body["error"]["message"]
    status, body = daemon.request("GET", "/api/v1/roles/chat/history?limit=0")
    assert (status, body["error"]["code"]) == (400, "invalid_query")

    code, out, _ = modelctl(daemon, capsys, "history", "--role", "chat")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["WHEN", f"({time.strftime('%Z')})", "ACTION", "FROM"]
    promote = next(line for line in lines if " promote " in line)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(history[1]["at"]))
    assert promote.startswith(f"{when}  promote   primary-7b  backup ")
    assert f"  {ME}  " in promote  # the user by name, beside the uid
    assert [h["automatic"] for h in history] == [False, False, False]
    assert re.search(r"  no +primary-7b is being upgraded", promote)  # AUTOMATIC: no
    assert promote.endswith("primary-7b is being upgraded to v0.7")


def test_a_rejected_reload_prints_every_error_and_is_an_event(
        console: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    daemon = console["daemon"]
    good = console["config"]
    bad = json.loads(json.dumps(good))
    bad["probe"]["intervall"] = "5s"
    bad["models"][1]["cost_estimate"] = -1.0
    daemon.write_config(bad)
    try:
        code, out, err = modelctl(daemon, capsys, "reload")
    finally:
        daemon.write_config(good)
    path = daemon.config_path
    errors = [f'{path}: probe.intervall: unknown key (did you mean "interval"?)',
              f'{path}: models[1] (id "backup").cost_estimate: cannot be negative']
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "modelctl: reload refused (422 config_invalid): the new configuration was rejected; "
        "the old one stays in effect", *(f"  {e}" for e in errors)]
    events = [json.loads(line) for line in text_of(daemon, "/api/v1/events").splitlines()]
    rejected = [e for e in events if e["kind"] == "config_reload_failed"]
    assert len(rejected) == 1 and rejected[0]["data"]["errors"] == errors
    assert rejected[0]["actor"].startswith(f"uid={os.getuid()} ")
    logged = wait_for(lambda: daemon.log_events("config_reload_failed"), 5)
    assert logged[-1]["level"] == "error" and logged[-1]["errors"] == errors
    code, out, err = modelctl(daemon, capsys, "events", "--since", str(rejected[0]["seq"] - 1))
    assert out.splitlines()[0].endswith(
        f"#{rejected[0]['seq']}  config_reload_failed    new configuration rejected by {ME}, "
        f"the old one stays in effect: {errors[0]}; {errors[1]}")
    assert modelctl(daemon, capsys, "reload")[0] == 0  # the good file again


def test_following_without_since_says_how_to_get_the_backlog(console: dict[str, Any]) -> None:
    daemon = console["daemon"]
    conn = UnixHTTPConnection(daemon.socket_path, timeout=5)
    try:
        conn.request("GET", "/api/v1/events?follow=1")
        response = conn.getresponse()
        backlog = response.getheader("X-Modeld-Backlog")
    finally:
        conn.close()
    assert response.status == 200
    assert backlog is not None and "since=0" in backlog
    seq = daemon.get("/api/v1/status")["event_seq"]
    assert re.fullmatch(r"events up to seq (\d+) are not replayed; add since=0 \(or since=N\) "
                        r"to get them first", backlog)
    assert int(backlog.split()[4]) <= seq
    conn = UnixHTTPConnection(daemon.socket_path, timeout=5)
    try:
        conn.request("GET", f"/api/v1/events?follow=1&since={seq}")
        assert conn.getresponse().getheader("X-Modeld-Backlog") is None
    finally:
        conn.close()


def test_an_outage_shows_what_resolve_answers_and_is_logged_as_a_warning(
        console: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    daemon, vllm = console["daemon"], console["vllm"]
    vllm.set_mode("down")
    daemon.wait_health("primary-7b", "unavailable", timeout=10)

    code, out, _ = modelctl(daemon, capsys, "list")
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isalnum()}
    assert rows["primary-7b"].split()[3] == "unavailable"
    assert "primary" in rows["primary-7b"].split()[7].split(",")
    assert "serving" in rows["backup"].split()[7].split(",")  # resolve answers with it
    assert ("role chat: resolve answers backup, not the primary primary-7b (modelctl resolve "
            "--role chat)") in out.splitlines()
    assert any(line.startswith("primary-7b: last probe failed: ") for line in out.splitlines())

    code, out, _ = modelctl(daemon, capsys, "status")
    lines = out.splitlines()
    # the operator's rollback in the history test above holds the role: a HOLD column
    roles = next(i for i, line in enumerate(lines) if line.startswith("ROLE  PRIMARY  "))
    assert lines[roles].split()[-1] == "HOLD", lines[roles]
    assert lines[roles + 1].startswith("chat  primary-7b  backup (a fallback: ")
    assert lines[roles + 1].endswith(f"by {ME}: the upgrade is done")
    assert "chat: primary-7b" not in out and "roles.chat" not in out
    details = daemon.get("/api/v1/status")["role_details"]["chat"]
    assert (details["primary"], details["resolves_to"]) == ("primary-7b", "backup")

    code, out, _ = modelctl(daemon, capsys, "resolve", "--role", "chat", "--first")
    assert (code, out) == (0, "backup\n")

    metrics = text_of(daemon, "/metrics")
    assert 'modeld_role_usable_models{role="chat"} 1.0' in metrics
    assert 'modeld_role_resolves_to{model_id="backup",role="chat"} 1.0' in metrics

    # journalctl -p warning shows the outage; the log speaks the event stream's words
    down = wait_for(lambda: [e for e in daemon.log_events("health_changed")
                             if e.get("new") == "unavailable"], 5)
    assert down[-1]["level"] == "warning" and down[-1]["model_id"] == "primary-7b"
    recovered = [e for e in daemon.log_events("health_changed") if e.get("new") == "healthy"]
    assert recovered and all(e["level"] == "info" for e in recovered)
    for entry in daemon.log_events("health_changed"):
        latency = entry.get("latency_ms")
        assert latency is None or round(latency, 1) == latency  # rounded, not 15 decimals
    promoted = daemon.log_events("model_promoted")[-1]
    assert (promoted["from"], promoted["to"]) == ("primary-7b", "backup")
    assert "from_id" not in promoted and "to_id" not in promoted
