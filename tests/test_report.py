"""``POST /api/v1/models/{id}/report`` on the real daemon (issue 13, DESIGN §5): an
application's failed request is an observation that starts rechecks at once; the route is open
to every peer, so it is bounded per peer and per model, and reports alone cannot mark down a
server that answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.testing.fakes import FakeOpenAI, FakeServers
from daemon.testing.harness import DaemonProcess, UnixHTTPConnection, daemon_config, wait_for

CURL = shutil.which("curl")
SETPRIV = shutil.which("setpriv")
INTERVAL = 30.0  # no scheduled probe during a test: only reports can start the rechecks


def as_nobody(daemon: DaemonProcess, model_id: str, body: Any) -> tuple[int, Any]:
    """POST a report as uid 65534 (not an admin), with curl."""
    assert CURL and SETPRIV, "curl and setpriv are required (CI installs them)"
    cmd = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", CURL, "-sS",
           "--unix-socket", daemon.socket_path, "-X", "POST", "-o", "-", "-w",
           "\n%{http_code}", "-H", "Content-Type: application/json", "--data-binary",
           json.dumps(body), f"http://modeld/api/v1/models/{model_id}/report"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    text, _, code = run.stdout.rpartition("\n")
    return int(code), json.loads(text)


@pytest.fixture
def reporting(workdir: Path) -> Iterator[dict[str, Any]]:
    with FakeServers() as servers:
        a = servers.start(FakeOpenAI(["a"], flavor="vllm"))
        b = servers.start(FakeOpenAI(["b"], flavor="vllm"))
        models = [
            {"id": "a", "provider": "openai", "endpoint": a.url, "role": "chat",
             "primary": True},
            {"id": "b", "provider": "openai", "endpoint": b.url, "role": "chat"},
        ]
        config = daemon_config(workdir, models, probe={
            "interval": f"{INTERVAL:g}s", "timeout": "500ms", "recheck_interval": "100ms"},
            health={"failure_threshold": 3, "success_threshold": 2})
        config["daemon"]["socket_mode"] = "0666"
        with DaemonProcess(workdir, config) as daemon:
            os.chmod(workdir, 0o755)
            os.chmod(Path(daemon.socket_path).parent, 0o755)
            daemon.wait_health("a", "healthy")
            daemon.wait_health("b", "healthy")
            yield {"daemon": daemon, "a": a, "b": b}


def test_a_reported_failure_starts_rechecks_at_once_and_any_peer_may_report(
        reporting: dict[str, Any]) -> None:
    daemon, a = reporting["daemon"], reporting["a"]
    a.set_mode("down")
    started = time.monotonic()
    status, body = as_nobody(daemon, "a", {"ok": False, "reason": "HTTP 500 from a"})
    assert (status, body["observed"]) == (200, True), body
    daemon.wait_health("a", "unavailable", timeout=5)
    took = time.monotonic() - started
    # the next scheduled probe is 30 s away: the report's rechecks found the outage
    assert took < INTERVAL / 3, took
    status, answer = daemon.request("GET", "/api/v1/resolve?role=chat")
    assert (status, answer["model_id"]) == (200, "b")
    reasons = [p["reason"] for p in daemon.model("a")["recent_probes"]]
    assert any("reported by uid=65534" in r and "HTTP 500 from a" in r for r in reasons), reasons
    assert daemon.log_events("model_reported")[0]["peer"].startswith("uid=65534")


def test_reports_alone_cannot_mark_down_a_server_that_answers(
        reporting: dict[str, Any]) -> None:
    daemon = reporting["daemon"]
    counted, sent = 0, 15  # within the peer's burst of 20, as fast as a client sends them
    for _ in range(sent):
        status, body = as_nobody(daemon, "b", {"ok": False})
        assert status == 200, body
        counted += body["observed"]
        assert daemon.model("b")["health_status"] != "unavailable", counted
    # five times failure_threshold (3) were sent; at most one a recheck interval was counted,
    # and the rechecks each counted one started, answered, kept b from being marked down
    assert 1 <= counted < sent, counted
    # right after a counted one, another is acknowledged and not counted, saying why
    status, first = as_nobody(daemon, "b", {"ok": False})
    status, second = as_nobody(daemon, "b", {"ok": False})
    assert not (first["observed"] and second["observed"])
    quiet = second if not second["observed"] else first
    assert "its rechecks decide now" in quiet["why"]
    wait_for(lambda: daemon.model("b")["health_status"] == "healthy", 5, what="b healthy")
    # a success is acknowledged, not counted (generation time is not probe latency)
    status, body = as_nobody(daemon, "b", {"ok": True})
    assert (status, body["observed"]) == (200, False) and "not an observation" in body["why"]


def test_reports_are_rate_limited_per_peer_and_bad_ones_named(
        reporting: dict[str, Any]) -> None:
    daemon = reporting["daemon"]
    answers: list[tuple[int, str | None]] = []
    conn = UnixHTTPConnection(daemon.socket_path, 10.0)
    try:
        for _ in range(30):  # one keep-alive connection, as fast as it goes
            conn.request("POST", "/api/v1/models/b/report", body=b'{"ok": true}',
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            answers.append((resp.status, resp.getheader("Retry-After")))
    finally:
        conn.close()
    statuses = [s for s, _ in answers]
    assert statuses[:20] == [200] * 20  # the burst
    limited = [(s, retry) for s, retry in answers if s == 429]
    assert limited and all(retry is not None and int(retry) >= 1 for _, retry in limited)
    # another peer has its own budget
    assert as_nobody(daemon, "b", {"ok": True})[0] == 200

    status, body = daemon.request("POST", "/api/v1/models/nope/report", {"ok": False})
    assert (status, body["error"]["code"]) == (404, "unknown_model")
    status, body = as_nobody(daemon, "b", {"reason": "no ok"})
    assert (status, body["error"]["code"]) == (422, "invalid_body")
    assert 'field "ok" is required' in body["error"]["message"]
    status, body = as_nobody(daemon, "b", {"ok": "false"})
    assert status == 422 and 'field "ok" must be bool' in body["error"]["message"]
