"""Every control route against the real daemon, through modelctl and through
``curl --unix-socket``; authorization with a real unprivileged peer; the event stream; the
socket's mode; bad input (issue 5)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.testing.fakes import FakeOllama, FakeOpenAI, FakeServers, write_gguf
from daemon.testing.harness import DaemonProcess, UnixHTTPConnection, daemon_config, wait_for

CURL = shutil.which("curl")
SETPRIV = shutil.which("setpriv")


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    """One daemon for the read-mostly route tests: chat (openai + ollama) and embed (file)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="md-", dir="/tmp"))
    with FakeServers() as servers:
        openai = servers.start(FakeOpenAI(["small", "big"], flavor="vllm"))
        ollama = servers.start(FakeOllama(["backup:7b"], loaded=["backup:7b"]))
        gguf = work / "embed.gguf"
        write_gguf(gguf)
        models = [
            {"id": "small", "provider": "openai", "endpoint": openai.url, "role": "chat",
             "primary": True, "capability_tags": ["chat"], "quality": 0.3},
            {"id": "big", "provider": "openai", "endpoint": openai.url, "role": "chat",
             "capability_tags": ["chat", "code"], "quality": 0.95, "cost_estimate": 1.0},
            {"id": "backup", "provider": "ollama", "endpoint": ollama.url, "model": "backup:7b",
             "role": "chat", "capability_tags": ["chat"], "quality": 0.2},
            {"id": "embedder", "provider": "local_file", "local_path": str(gguf),
             "role": "embed", "primary": True},
        ]
        # sustain 0s: the route tests see a suggestion at once (tests/test_policy_rules.py
        # pins sustain)
        config = daemon_config(work, models, policy={"min_consecutive_healthy": 1,
                                                     "sustain": "0s"})
        # reachable by an unprivileged peer, for the authorization tests
        config["daemon"]["socket_mode"] = "0666"
        config["daemon"]["admin_group"] = "daemon"
        with DaemonProcess(work, config) as daemon:
            os.chmod(work, 0o755)
            os.chmod(Path(daemon.socket_path).parent, 0o755)
            for model_id in ("small", "big", "backup", "embedder"):
                daemon.wait_health(model_id, "healthy")
            wait_for(lambda: daemon.model("big")["health"]["consecutive_successes"] >= 2, 5)
            yield {"daemon": daemon, "openai": openai, "ollama": ollama, "work": work}
    shutil.rmtree(work, ignore_errors=True)


def modelctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "daemon.control.ctl", "--socket", daemon.socket_path, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def curl(daemon: DaemonProcess, method: str, path: str, body: Any = None,
         as_nobody: bool = False, groups: str = "") -> tuple[int, Any]:
    assert CURL, "curl is required (CI installs it)"
    cmd = [CURL, "-sS", "--unix-socket", daemon.socket_path, "-X", method,
           "-o", "-", "-w", "\n%{http_code}", f"http://modeld{path}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    if as_nobody:
        assert SETPRIV, "setpriv is required (util-linux; CI installs it)"
        ids = ["--reuid=65534", "--regid=65534"]
        ids += [f"--groups={groups}"] if groups else ["--clear-groups"]
        cmd = [SETPRIV, *ids, *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    text, _, code = run.stdout.rpartition("\n")
    try:
        return int(code), json.loads(text)
    except ValueError:
        return int(code), text


# ----------------------------------------------------------------------------- reads


def test_list_through_curl_and_modelctl(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/models/")
    assert status == 200 and body["offline_mode"] is False
    views = {m["id"]: m for m in body["models"]}
    assert list(views) == ["small", "big", "backup", "embedder"]  # config order
    small = views["small"]
    for key in ("id", "role", "provider", "primary", "local", "capability_tags",
                "cost_estimate", "latency_estimate", "health_status", "score", "retired",
                "local_path", "last_probe"):
        assert key in small, key
    assert set(small["last_probe"]) >= {"at", "ok", "reason", "latency_ms"}
    assert small["primary"] is True and views["big"]["primary"] is False
    assert views["embedder"]["local_path"].endswith("embed.gguf")

    table = modelctl(daemon, "list")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["ID", "ROLE", "PROVIDER", "HEALTH"]
    assert any(r.split()[:4] == ["small", "chat", "openai", "healthy"] for r in rows)
    as_json = json.loads(modelctl(daemon, "--json", "list").stdout)
    assert [m["id"] for m in as_json["models"]] == list(views)


def test_show_one_model_with_score_parts_and_recent_probes(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/models/big")
    assert status == 200
    parts = body["score_parts"]["parts"]
    assert set(parts) == {"health", "latency", "cost", "quality"}
    total = sum(p["contribution"] for p in parts.values())
    assert abs(total - body["score"]) < 1e-3
    assert body["recent_probes"] and body["recent_probes"][0]["ok"] is True
    shown = modelctl(daemon, "show", "big")
    assert shown.returncode == 0 and "health:       healthy since " in shown.stdout
    missing = modelctl(daemon, "show", "nope")
    assert missing.returncode == 1 and "unknown model" in missing.stderr
    status, body = curl(daemon, "GET", "/api/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "unknown_model"


def test_resolve_with_role_and_capability(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/resolve?role=chat")
    assert status == 200
    assert body["model_id"] == "small" and body["role"] == "chat"
    assert body["model"]["id"] == "small"
    assert body["fallbacks"][0] == "big"  # better score than backup
    assert set(body["fallbacks"]) == {"big", "backup"}
    status, body = curl(daemon, "GET", "/api/v1/resolve?role=chat&capability=code")
    assert status == 200 and body["model_id"] == "big" and body["fallbacks"] == []
    status, body = curl(daemon, "GET", "/api/v1/resolve?role=chat&capability=vision")
    assert status == 503 and body["error"]["code"] == "no_usable_model"
    assert body["error"]["reasons"]["small"] == "lacks capability vision"
    status, body = curl(daemon, "GET", "/api/v1/resolve?role=nope")
    assert status == 404 and body["error"]["code"] == "unknown_role"

    first = modelctl(daemon, "resolve", "--role", "chat")
    assert first.returncode == 0 and first.stdout.splitlines()[0] == "small"
    coded = modelctl(daemon, "resolve", "--role", "chat", "--capability", "code")
    assert coded.stdout.splitlines() == ["big"]
    none = modelctl(daemon, "resolve", "--role", "chat", "--capability", "vision")
    assert none.returncode == 1 and none.stdout == "" and "vision" in none.stderr


def test_status_offline_status_and_metrics(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/status")
    assert status == 200 and body["models"] == 4 and body["pid"] == daemon.pid
    assert body["roles"] == {"chat": "small", "embed": "embedder"}
    assert modelctl(daemon, "status").returncode == 0
    status, body = curl(daemon, "GET", "/api/v1/models/offline-mode/status")
    assert (status, body) == (200, {"offline_mode": False, "forced_by_env": False})
    assert modelctl(daemon, "offline", "status").stdout.strip() == "offline mode: off"
    status, text = curl(daemon, "GET", "/metrics")
    assert status == 200
    for name in ("modeld_model_health{", "modeld_model_score{", "modeld_probes_total{",
                 "modeld_role_primary{", "modeld_state_write_duration_seconds_bucket",
                 "modeld_model_latency_seconds{", "modeld_role_usable_models{"):
        assert name in text, name
    assert 'modeld_role_primary{model_id="small",role="chat"} 1.0' in text


def test_upgrade_check_suggests_and_changes_nothing(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "POST", "/api/v1/models/auto-upgrade/check")
    assert status == 200
    suggestion = body["suggestions"][0]
    assert set(suggestion) == {"role", "from", "to", "reason", "score_from", "score_to",
                               "kind", "urgent"}
    assert (suggestion["kind"], body["roles"]["chat"]["suggested"]) == ("upgrade", True)
    assert body["roles"]["embed"] == {"role": "embed", "suggested": False,
                                      "why": "no other model in the role"}
    assert (suggestion["role"], suggestion["from"], suggestion["to"]) == ("chat", "small", "big")
    assert daemon.model("small")["primary"] is True  # nothing changed
    out = modelctl(daemon, "upgrade", "check")
    assert out.returncode == 0 and "big" in out.stdout


def test_unknown_route_and_wrong_method(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/nothing")
    assert status == 404 and "/api/v1/nothing" in body["error"]["message"]
    status, body = curl(daemon, "DELETE", "/api/v1/models/promote")
    assert status == 405 and body["error"]["allow"] == "POST"
    status, body = curl(daemon, "GET", "/api/v1/models/promote")
    assert status == 405


# ----------------------------------------------------------------------------- changes


def test_promote_rollback_execute_offline_evaluate_reload(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    # promote through curl
    status, body = curl(daemon, "POST", "/api/v1/models/promote", {"model_id": "backup"})
    assert status == 200
    change = body["changes"][0]
    assert (change["role"], change["from"], change["to"]) == ("chat", "small", "backup")
    assert daemon.model("small")["retired"] is True
    # durable before the answer: the state file already has it
    assert daemon.state()["roles"]["chat"]["primary"] == "backup"
    # resolve answers are cached per registry version: never stale after a change
    assert curl(daemon, "GET", "/api/v1/resolve?role=chat")[1]["model_id"] == "backup"
    # rollback through modelctl
    out = modelctl(daemon, "rollback", "--role", "chat")
    assert out.returncode == 0 and "backup" in out.stdout and "small" in out.stdout
    assert daemon.state()["roles"]["chat"]["primary"] == "small"
    assert curl(daemon, "GET", "/api/v1/resolve?role=chat")[1]["model_id"] == "small"
    # the operator's promote and rollback hold the role: the policy suggests nothing there
    held = daemon.state()["roles"]["chat"]["hold"]
    assert held["by"].startswith("uid=0 pid=") and held["until"] > time.time() + 23 * 3600
    check = curl(daemon, "POST", "/api/v1/models/auto-upgrade/check")[1]
    assert check["suggestions"] == [] and "role held by uid=0" in check["roles"]["chat"]["why"]
    out = modelctl(daemon, "release", "chat", "--reason", "done testing")
    assert out.returncode == 0 and out.stdout.startswith("role chat released"), out
    assert daemon.state()["roles"]["chat"]["hold"] is None
    # execute through curl: acts on the suggestion (big beats small)
    status, body = curl(daemon, "POST", "/api/v1/models/auto-upgrade/execute")
    assert status == 200 and body["changes"][0]["to"] == "big"
    assert "auto-upgrade" in body["changes"][0]["reason"]
    # ... and rollback through curl with the role in the body
    status, body = curl(daemon, "POST", "/api/v1/models/rollback", {"role": "chat"})
    assert status == 200 and body["changes"][0]["to"] == "small"
    status, body = curl(daemon, "POST", "/api/v1/models/rollback", {"role": "embed"})
    assert status == 409 and body["error"]["code"] == "nothing_to_roll_back"
    # promoting the primary changes nothing
    status, body = curl(daemon, "POST", "/api/v1/models/promote", {"model_id": "small"})
    assert (status, body) == (200, {"changes": []})
    # offline on and off
    out = modelctl(daemon, "offline", "on")
    assert out.returncode == 0
    assert daemon.state()["offline_mode"] is True
    status, body = curl(daemon, "POST", "/api/v1/models/offline-mode", {"enabled": False})
    assert (status, body) == (200, {"offline_mode": False, "forced_by_env": False})
    # evaluate probes now
    status, body = curl(daemon, "POST", "/api/v1/models/big/evaluate")
    assert status == 200 and body["result"]["ok"] is True and body["model_id"] == "big"
    assert body["health_status"] == "healthy" and 0 < body["score"] <= 1
    out = modelctl(daemon, "evaluate", "embedder")
    assert out.returncode == 0 and "gguf" in out.stdout
    # reload: nothing changed on disk
    status, body = curl(daemon, "POST", "/api/v1/reload")
    assert status == 200 and body["added"] == [] and body["removed"] == []
    assert modelctl(daemon, "reload").returncode == 0
    # every change is recorded with its actor
    events = [json.loads(line) for line in modelctl(daemon, "events", "--json").stdout.splitlines()]
    promoted = [e for e in events if e["kind"] == "model_promoted"]
    assert promoted and all(e["actor"].startswith("uid=0 pid=") for e in promoted)


def test_promoting_an_unavailable_model_needs_force(env: dict[str, Any]) -> None:
    daemon, ollama = env["daemon"], env["ollama"]
    ollama.set_mode("down")
    try:
        daemon.wait_health("backup", "unavailable", timeout=8)
        status, body = curl(daemon, "POST", "/api/v1/models/promote", {"model_id": "backup"})
        assert status == 409 and body["error"]["code"] == "model_unavailable"
        assert "force" in body["error"]["message"]
        refused = modelctl(daemon, "promote", "backup")
        assert refused.returncode == 1 and "409" in refused.stderr
        forced = modelctl(daemon, "promote", "backup", "--force")
        assert forced.returncode == 0
        assert daemon.model("backup")["primary"] is True
        assert daemon.post("/api/v1/models/rollback", {"role": "chat"})["changes"]
    finally:
        ollama.set_mode("normal")
    daemon.wait_health("backup", "healthy", timeout=8)


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/api/v1/models/promote", b"{not json", 400, "invalid_json"),
    ("/api/v1/models/promote", b"[1, 2]", 422, "invalid_body"),
    ("/api/v1/models/promote", b'{"model_id": 7}', 422, "invalid_body"),
    ("/api/v1/models/promote", b'{"model_id": "big", "force": "yes"}', 422, "invalid_body"),
    ("/api/v1/models/promote", b'{"model": "big"}', 422, "invalid_body"),
    ("/api/v1/models/promote", b"{}", 422, "invalid_body"),
    ("/api/v1/models/offline-mode", b'{"enabled": 1}', 422, "invalid_body"),
    ("/api/v1/models/rollback", b'{"role": ["chat"]}', 422, "invalid_body"),
    ("/api/v1/models/promote", b'{"model_id": "nope"}', 404, "unknown_model"),
    ("/api/v1/models/nope/evaluate", b"", 404, "unknown_model"),
])
def test_bad_bodies_get_a_clear_4xx_and_change_nothing(
        env: dict[str, Any], path: str, body: bytes, status: int, code: str) -> None:
    daemon = env["daemon"]
    before = daemon.state()["roles"]
    conn = UnixHTTPConnection(daemon.socket_path)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == status
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    assert daemon.state()["roles"] == before
    assert daemon.get("/api/v1/status")["pid"] == daemon.pid


def test_oversized_body_is_413_and_the_daemon_keeps_serving(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    conn = UnixHTTPConnection(daemon.socket_path)
    conn.putrequest("POST", "/api/v1/models/promote")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    with contextlib.suppress(OSError):  # the daemon may already have answered and closed
        conn.send(b"x" * (1024 * 1024))
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert daemon.get("/api/v1/status")["pid"] == daemon.pid


# ----------------------------------------------------------------------------- authorization


MUTATIONS: list[tuple[str, Any]] = [
    ("/api/v1/models/promote", {"model_id": "big"}),
    ("/api/v1/models/rollback", {"role": "chat"}),
    ("/api/v1/models/auto-upgrade/execute", None),
    ("/api/v1/models/offline-mode", {"enabled": True}),
    ("/api/v1/models/big/evaluate", None),
    ("/api/v1/reload", None),
    ("/api/v1/roles/chat/hold", {"for": "1h"}),
    ("/api/v1/roles/chat/release", None),
]


def test_unprivileged_peer_reads_but_every_change_is_403(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    status, body = curl(daemon, "GET", "/api/v1/models/", as_nobody=True)
    assert status == 200 and len(body["models"]) == 4
    status, _ = curl(daemon, "GET", "/api/v1/resolve?role=chat", as_nobody=True)
    assert status == 200
    before = daemon.state()["roles"]
    for path, body in MUTATIONS:
        status, answer = curl(daemon, "POST", path, body, as_nobody=True)
        assert status == 403, path
        assert answer["error"]["code"] == "forbidden"
        assert "uid 65534" in answer["error"]["message"]
    assert daemon.state()["roles"] == before
    refusals = daemon.log_events("request_forbidden")
    assert len(refusals) >= len(MUTATIONS)
    assert all(r["peer"].startswith("uid=65534 pid=") for r in refusals)


def test_member_of_the_admin_group_may_change_things(env: dict[str, Any]) -> None:
    import grp

    daemon = env["daemon"]
    gid = grp.getgrnam("daemon").gr_gid  # the admin_group of this daemon
    for enabled in (True, False):
        status, body = curl(daemon, "POST", "/api/v1/models/offline-mode",
                            {"enabled": enabled}, as_nobody=True, groups=str(gid))
        assert status == 200, body
        assert body["offline_mode"] is enabled
    events = [json.loads(x) for x in modelctl(daemon, "events", "--json").stdout.splitlines()]
    toggles = [e for e in events if e["kind"] == "offline_mode_changed"][-2:]
    assert [e["data"]["enabled"] for e in toggles] == [True, False]
    assert all(e["actor"].startswith("uid=65534 pid=") for e in toggles)


# ----------------------------------------------------------------------------- events


def _read_lines(sock: socket.socket, out: list[tuple[float, dict[str, Any]]],
                stop: threading.Event) -> None:
    """Read a chunked NDJSON response, appending (arrival time, event) per line."""
    raw = b""
    sock.settimeout(0.2)
    headers_done = False
    payload = b""
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        raw += data
        if not headers_done:
            if b"\r\n\r\n" not in raw:
                continue
            head, raw = raw.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert b"chunked" in head.lower()
            headers_done = True
        while b"\r\n" in raw:  # whole chunks: size line, data, CRLF
            size_line, rest = raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            payload += rest[:size]
            raw = rest[size + 2:]
            if size == 0:
                return
        now = time.monotonic()
        *lines, payload = payload.split(b"\n")
        out.extend((now, json.loads(line)) for line in lines if line.strip())


def test_follower_receives_a_promotion_within_100ms_and_since_replays(
        env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.socket_path)
    sock.sendall(b"GET /api/v1/events?follow=1 HTTP/1.1\r\nHost: modeld\r\n\r\n")
    received: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(sock, received, stop), daemon=True)
    reader.start()
    try:
        time.sleep(0.2)  # the stream is open and waiting
        before_seq = daemon.get("/api/v1/status")["event_seq"]
        daemon.post("/api/v1/models/promote", {"model_id": "backup"})
        acknowledged = time.monotonic()
        wait_for(lambda: any(e["kind"] == "model_promoted" for _, e in received), 2,
                 what="the promotion on the stream")
        at, event = next((t, e) for t, e in received if e["kind"] == "model_promoted")
        assert event["to"] == "backup" and event["seq"] > before_seq
        delay_ms = (at - acknowledged) * 1000
        print(f"promotion reached the follower {delay_ms:.1f} ms after the reply")
        assert delay_ms <= 100
    finally:
        stop.set()
        sock.close()
        reader.join(2)
        daemon.post("/api/v1/models/rollback", {"role": "chat"})
    # since= replays everything after a sequence number, without follow
    status, text = curl(daemon, "GET", f"/api/v1/events?since={before_seq}")
    replayed = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and replayed[0]["seq"] == before_seq + 1
    # each operator change is followed by the hold it starts, after the change itself
    assert [e["kind"] for e in replayed][:5] == [
        "model_promoted", "role_held", "model_rolled_back", "model_quarantined", "role_held"]
    since = modelctl(daemon, "events", "--json", "--since", str(before_seq))
    assert next(json.loads(x)["seq"] for x in since.stdout.splitlines()) == before_seq + 1
    status, _body = curl(daemon, "GET", "/api/v1/events?since=soon")
    assert status == 400


def test_follow_with_since_replays_then_streams(env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    seq = daemon.get("/api/v1/status")["event_seq"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.socket_path)
    sock.sendall(f"GET /api/v1/events?follow=1&since={max(seq - 2, 0)} HTTP/1.1\r\n"
                 "Host: modeld\r\n\r\n".encode())
    received: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(sock, received, stop), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(received) >= min(seq, 2), 3, what="the replay")
        daemon.post("/api/v1/models/offline-mode", {"enabled": True})
        wait_for(lambda: any(e["kind"] == "offline_mode_changed" and e["seq"] > seq
                             for _, e in received), 3, what="the live event")
        seqs = [e["seq"] for _, e in received]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    finally:
        stop.set()
        sock.close()
        reader.join(2)
        daemon.post("/api/v1/models/offline-mode", {"enabled": False})


# ----------------------------------------------------------------------------- the socket


def test_socket_mode_is_0660_from_the_moment_it_exists(workdir: Path) -> None:
    gguf = workdir / "m.gguf"
    write_gguf(gguf)
    config = daemon_config(workdir, [{"id": "m", "provider": "local_file",
                                      "local_path": str(gguf)}])
    daemon = DaemonProcess(workdir, config)
    path = Path(daemon.socket_path)
    try:
        daemon.start(wait=False)
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and daemon.running():
            try:
                seen.append(stat.S_IMODE(os.lstat(path).st_mode))
            except FileNotFoundError:
                if seen:
                    break
            if len(seen) > 50:
                break
        assert seen, "the socket never appeared"
        assert set(seen) == {0o660}, [oct(m) for m in seen]
        daemon.wait_ready()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        daemon.close()


def test_metrics_port_serves_only_get_metrics(workdir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gguf = workdir / "m.gguf"
    write_gguf(gguf)
    config = daemon_config(workdir, [{"id": "m", "provider": "local_file",
                                      "local_path": str(gguf)}],
                           daemon={"metrics_listen": f"127.0.0.1:{port}"})
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("m", "healthy")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert resp.status == 200 and "modeld_model_health" in text
        for method, path, expected in (("GET", "/api/v1/status", 404),
                                       ("POST", "/api/v1/models/promote", 404),
                                       ("POST", "/metrics", 405)):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(req, timeout=5)
            assert caught.value.code == expected


def test_hold_and_release_through_modelctl_are_saved_shown_and_audited(
        env: dict[str, Any]) -> None:
    daemon = env["daemon"]
    primary = daemon.get("/api/v1/status")["role_details"]["chat"]["primary"]
    out = modelctl(daemon, "hold", "chat", "--for", "2h", "--reason", "vendor outage")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("role chat held until ") and "vendor outage" in out.stdout
    # durable before the answer, with the wall time it ends at
    hold = daemon.state()["roles"]["chat"]["hold"]
    assert hold["reason"] == "vendor outage" and 7190 < hold["until"] - time.time() <= 7200
    assert daemon.model(primary)["primary"] is True  # a hold promotes nothing
    status_text = modelctl(daemon, "status").stdout
    assert "HOLD" in status_text and "vendor outage" in status_text
    assert "role chat: held until " in modelctl(daemon, "list").stdout
    why = curl(daemon, "POST", "/api/v1/models/auto-upgrade/check")[1]["roles"]["chat"]["why"]
    assert "role held by uid=0" in why and "vendor outage" in why
    # bad durations and unknown roles are refused, naming what is wrong; nothing changes
    status, body = curl(daemon, "POST", "/api/v1/roles/chat/hold", {"for": "soon"})
    assert (status, body["error"]["code"]) == (422, "invalid_body")
    assert 'field "for"' in body["error"]["message"]
    status, body = curl(daemon, "POST", "/api/v1/roles/chat/hold", {"for": 0})
    assert (status, body["error"]["code"]) == (422, "invalid_hold")
    status, body = curl(daemon, "POST", "/api/v1/roles/nope/hold", {})
    assert (status, body["error"]["code"]) == (404, "unknown_role")
    assert daemon.state()["roles"]["chat"]["hold"]["reason"] == "vendor outage"
    out = modelctl(daemon, "release", "chat")
    assert out.returncode == 0 and out.stdout.startswith("role chat released")
    again = modelctl(daemon, "release", "chat")
    assert again.stdout.strip() == "role chat was not held: nothing changed"
    assert daemon.state()["roles"]["chat"]["hold"] is None
    history = daemon.get("/api/v1/roles/chat/history")["history"]
    assert [h["action"] for h in history[-2:]] == ["hold", "release"]
    assert history[-2]["reason"] == "held for 7200s: vendor outage"
    kinds = [json.loads(line)["kind"] for line in
             modelctl(daemon, "events", "--json").stdout.splitlines()]
    assert kinds[-2:] == ["role_held", "role_released"]


def test_modelctl_names_the_socket_when_the_daemon_is_not_running(workdir: Path) -> None:
    path = workdir / "absent.sock"
    run = subprocess.run([sys.executable, "-m", "daemon.control.ctl", "--socket", str(path),
                          "status"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 3
    assert str(path) in run.stderr and "running" in run.stderr




def test_python_client_against_the_real_daemon(env: dict[str, Any]) -> None:
    import anyio

    from daemon.control.client import ModeldClient, ModeldError

    daemon = env["daemon"]

    async def scenario() -> None:
        async with ModeldClient(daemon.socket_path) as client:
            answer = await client.resolve(role="chat", capabilities=["code"])
            assert answer["model_id"] == "big"
            seq = (await client.status())["event_seq"]
            seen: list[dict[str, Any]] = []

            async def follow() -> None:
                async for event in client.events(follow=True, since=seq):
                    seen.append(event)
                    if event["kind"] == "model_rolled_back":
                        return

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    await anyio.sleep(0.2)
                    await client.promote("backup")
                    await client.rollback(role="chat")
            assert [e["kind"] for e in seen] == ["model_promoted", "role_held",
                                                 "model_rolled_back"]
            released = await client.release("chat")
            assert released["released"] is True and released["hold"]["by"].startswith("uid=")
            try:
                await client.promote("nope")
            except ModeldError as exc:
                assert (exc.status, exc.code) == (404, "unknown_model")
            else:
                raise AssertionError("promoting an unknown model must fail")

    anyio.run(scenario)
