"""The supervisor end to end: the real daemon as a subprocess, its real socket, fake upstreams
on 127.0.0.1. Each test names the behaviour it pins (issue 4)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.persist.codec import check_state_shape
from daemon.testing.fakes import FakeOllama, FakeOpenAI, FakeServers, write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config, wait_for

# Timings of daemon_config: interval 1s, timeout 1s, recheck 100ms, failure_threshold 3.
SLACK = 3.0


@pytest.fixture
def servers() -> Iterator[FakeServers]:
    with FakeServers() as running:
        yield running


def chat_pair(servers: FakeServers) -> tuple[FakeOpenAI, FakeOllama, list[dict[str, Any]]]:
    primary = servers.start(FakeOpenAI(["small"], flavor="vllm"))
    fallback = servers.start(FakeOllama(["backup:7b"], loaded=["backup:7b"]))
    models = [
        {"id": "small", "provider": "openai", "endpoint": primary.url, "role": "chat",
         "primary": True, "quality": 0.3},
        {"id": "backup", "provider": "ollama", "endpoint": fallback.url, "role": "chat",
         "model": "backup:7b", "quality": 0.2},
    ]
    return primary, fallback, models


def resolve(daemon: DaemonProcess, role: str = "chat") -> tuple[int, Any]:
    return daemon.request("GET", f"/api/v1/resolve?role={role}")


# ----------------------------------------------------------------------------- failover


def test_upstream_killed_fails_over_within_threshold_then_recovers(
        workdir: Path, servers: FakeServers) -> None:
    primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models, health={"failure_threshold": 3,
                                                    "success_threshold": 2})
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("small", "healthy")
        daemon.wait_health("backup", "healthy")
        assert resolve(daemon)[1]["model_id"] == "small"
        assert resolve(daemon)[1]["fallbacks"] == ["backup"]

        primary.set_mode("down")
        # interval (next probe) + failure_threshold × recheck_interval + timeout, plus slack
        deadline = 1.0 + 3 * 0.1 + 1.0 + SLACK
        view = daemon.wait_health("small", "unavailable", timeout=deadline)
        assert "refused" in view["last_probe"]["reason"]
        status, body = resolve(daemon)
        assert status == 200
        assert body["model_id"] == "backup"
        assert body["model"]["health_status"] == "healthy"

        primary.set_mode("normal")
        back = daemon.wait_health("small", "healthy", timeout=deadline)
        detail = daemon.model("small")["health"]
        assert detail["consecutive_successes"] >= 2  # success_threshold hysteresis
        assert back["primary"] is True
        assert resolve(daemon)[1]["model_id"] == "small"
        transitions = [(e["old"], e["new"]) for e in daemon.log_events("health_changed")
                       if e.get("model_id") == "small"]
        assert ("unknown", "healthy") in transitions
        assert any(new == "unavailable" for _old, new in transitions)
        assert transitions[-1][1] == "healthy"


def test_nothing_usable_answers_503_with_a_reason_per_model(
        workdir: Path, servers: FakeServers) -> None:
    primary, fallback, models = chat_pair(servers)
    with DaemonProcess(workdir, daemon_config(workdir, models)) as daemon:
        daemon.wait_health("small", "healthy")
        primary.set_mode("down")
        fallback.set_mode("down")
        daemon.wait_health("small", "unavailable", timeout=6)
        daemon.wait_health("backup", "unavailable", timeout=6)
        status, body = resolve(daemon)
        assert status == 503
        assert body["error"]["code"] == "no_usable_model"
        assert set(body["error"]["reasons"]) == {"small", "backup"}
        assert all("unavailable" in why for why in body["error"]["reasons"].values())


# ----------------------------------------------------------------------------- auto-upgrade


def upgrade_config(workdir: Path, servers: FakeServers, *, auto: bool
                   ) -> tuple[FakeOpenAI, dict[str, Any]]:
    fake = servers.start(FakeOpenAI(["small", "big"], flavor="vllm"))
    models = [
        {"id": "small", "provider": "openai", "endpoint": fake.url, "role": "chat",
         "primary": True, "quality": 0.3},
    ]
    config = daemon_config(workdir, models, policy={
        "interval": "200ms", "auto_execute": auto, "min_consecutive_healthy": 2,
        "min_margin": 0.05, "cooldown": "1h", "probation": "1h", "quarantine": "1h",
        "sustain": "400ms"})  # a lead holds two ticks before it is suggested
    return fake, config


def deploy_big(daemon: DaemonProcess, fake: FakeOpenAI) -> None:
    """A better model appears the way an operator adds one: declared, then a reload."""
    config = daemon.config
    config["models"] = [*config["models"], {"id": "big", "provider": "openai",
                                            "endpoint": fake.url, "role": "chat",
                                            "quality": 0.95}]
    daemon.write_config(config)
    assert daemon.post("/api/v1/reload")["added"] == ["big"]


def test_better_candidate_is_suggested_but_not_promoted_without_auto_execute(
        workdir: Path, servers: FakeServers) -> None:
    fake, config = upgrade_config(workdir, servers, auto=False)
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("small", "healthy")
        assert daemon.post("/api/v1/models/auto-upgrade/check")["suggestions"] == []
        deploy_big(daemon, fake)
        daemon.wait_health("big", "healthy")
        suggestions = wait_for(
            lambda: daemon.post("/api/v1/models/auto-upgrade/check")["suggestions"], 5,
            what="a suggestion")
        assert suggestions[0]["from"] == "small" and suggestions[0]["to"] == "big"
        assert suggestions[0]["score_to"] > suggestions[0]["score_from"]
        assert "min_margin" in suggestions[0]["reason"]
        wait_for(lambda: daemon.log_events("auto_upgrade_suggested"), 5, what="the log line")
        time.sleep(0.5)  # several policy ticks
        assert daemon.model("small")["primary"] is True
        assert daemon.model("big")["primary"] is False


def test_auto_upgrade_promotes_then_rolls_back_and_quarantines_during_probation(
        workdir: Path, servers: FakeServers) -> None:
    fake, config = upgrade_config(workdir, servers, auto=True)
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("small", "healthy")
        deploy_big(daemon, fake)
        wait_for(lambda: daemon.model("big")["primary"], 8, what="big promoted")
        small = daemon.model("small")
        assert small["retired"] is True and small["primary"] is False

        fake.remove_model("big")  # the new primary's upstream loses it within probation
        wait_for(lambda: daemon.model("small")["primary"], 8, what="automatic rollback")
        big = daemon.model("big")
        assert big["retired"] is True
        assert big["quarantined_until"] is not None and big["quarantined_until"] > time.time()
        assert daemon.model("small")["retired"] is False

        kinds = [e["kind"] for e in map(json.loads, daemon.request(
            "GET", "/api/v1/events")[1].splitlines())]
        promoted = kinds.index("model_promoted")
        assert kinds.index("model_rolled_back", promoted) < kinds.index("model_quarantined",
                                                                        promoted)
        history = daemon.state()["roles"]["chat"]["history"]
        assert [h["action"] for h in history][-2:] == ["promote", "rollback"]
        assert history[-2]["actor"] == "policy" and "auto-upgrade" in history[-2]["reason"]
        assert "probation" in history[-1]["reason"]

        # quarantined for policy.quarantine (1h); that a quarantined model is not suggested
        # until then is pinned by the registry's unit tests
        events = [json.loads(x)
                  for x in daemon.request("GET", "/api/v1/events")[1].splitlines()]
        quarantined = next(e for e in events if e["kind"] == "model_quarantined")
        assert quarantined["model_id"] == "big" and quarantined["actor"] == "policy"
        assert abs(quarantined["data"]["until"] - quarantined["at"] - 3600) < 1
        fake.add_model("big")
        daemon.wait_health("big", "healthy", timeout=5)
        time.sleep(0.6)  # policy ticks pass
        assert daemon.model("small")["primary"] is True


# ----------------------------------------------------------------------------- signals


def test_sighup_adds_and_removes_models_keeping_the_others_state(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("small", "healthy")
        daemon.wait_health("backup", "healthy")
        daemon.post("/api/v1/models/promote", {"model_id": "backup"})
        before = daemon.model("small")["health"]["probes_total"]

        gguf = workdir / "tiny.gguf"
        write_gguf(gguf)
        config["models"] = [models[0], {"id": "disk", "provider": "local_file",
                                        "local_path": str(gguf), "role": "chat"}]
        daemon.write_config(config)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.log_events("config_reloaded"), 5, what="config_reloaded")
        reloaded = daemon.log_events("config_reloaded")[-1]
        assert reloaded["added"] == ["disk"] and reloaded["removed"] == ["backup"]

        listed = {m["id"] for m in daemon.get("/api/v1/models/")["models"]}
        assert listed == {"small", "disk"}
        assert daemon.model("small")["health"]["probes_total"] >= before  # kept, not reset
        assert daemon.model("small")["health_status"] == "healthy"
        daemon.wait_health("disk", "healthy")
        # the removed primary left the role; resolve walks on to the others
        assert resolve(daemon)[1]["model_id"] in {"small", "disk"}
        daemon.wait_notification("RELOADING=1")
        assert "backup" not in daemon.state()["models"]


def test_broken_config_on_sighup_is_rejected_and_the_old_one_keeps_serving(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    with DaemonProcess(workdir, daemon_config(workdir, models)) as daemon:
        daemon.wait_health("small", "healthy")
        daemon.config_path.write_text("[probe]\ninterval = \"soon\"\n[[models]]\nid = 1\n")
        daemon.signal(signal.SIGHUP)
        failed = wait_for(lambda: daemon.log_events("config_reload_failed"), 5,
                          what="config_reload_failed")
        errors = "\n".join(failed[-1]["errors"])
        assert "probe.interval" in errors and "models[0].id" in errors
        assert daemon.running()
        assert {m["id"] for m in daemon.get("/api/v1/models/")["models"]} == {"small", "backup"}
        # the same through the API: 422 with the errors
        status, body = daemon.request("POST", "/api/v1/reload")
        assert status == 422 and body["error"]["code"] == "config_invalid"
        assert any("probe.interval" in e for e in body["error"]["errors"])
        assert resolve(daemon)[0] == 200


def test_a_config_that_breaks_url_parsing_is_rejected_on_sighup_and_systemd_told_ready(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    with DaemonProcess(workdir, daemon_config(workdir, models)) as daemon:
        daemon.wait_health("small", "healthy")
        broken = dict(daemon.config, models=[dict(models[0], endpoint="http://[::1:8000/")])
        daemon.write_config(broken)
        daemon.signal(signal.SIGHUP)
        failed = wait_for(lambda: daemon.log_events("config_reload_failed"), 5,
                          what="config_reload_failed")
        assert any('models[0] (id "small").endpoint' in e and "not a valid URL" in e
                   for e in failed[-1]["errors"])
        reloading = daemon.wait_notification("RELOADING=1")
        daemon.wait_notification("READY=1", after=reloading)  # not stuck "reloading"
        assert daemon.running()
        assert resolve(daemon)[1]["model_id"] == "small"
        status, body = daemon.request("POST", "/api/v1/reload")
        assert status == 422 and body["error"]["code"] == "config_invalid"


def test_sigterm_flushes_and_exits_0_with_the_last_decisions_saved(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    daemon = DaemonProcess(workdir, daemon_config(workdir, models, daemon={
        "state_flush_interval": "1h"}))  # only decisions and the final flush write
    with daemon:
        daemon.wait_health("backup", "healthy")
        daemon.post("/api/v1/models/promote", {"model_id": "backup"})
        daemon.post("/api/v1/models/offline-mode", {"enabled": True})
        assert daemon.stop() == 0
    state = daemon.state()
    assert check_state_shape(state) == []
    assert state["roles"]["chat"]["primary"] == "backup"
    assert state["models"]["small"]["retired"] is True
    assert state["offline_mode"] is True
    assert state["models"]["backup"]["status"] == "healthy"  # probe state: the final flush
    assert daemon.log_events("daemon_stopped")
    assert not Path(daemon.socket_path).exists()

    # restart on the same state: the decisions are still there
    with DaemonProcess(workdir, daemon.config) as again:
        assert again.model("backup")["primary"] is True
        assert again.get("/api/v1/models/offline-mode/status")["offline_mode"] is True


# ----------------------------------------------------------------------------- systemd


def test_sd_notify_ready_status_watchdog_reloading_stopping_in_order(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    daemon = DaemonProcess(workdir, daemon_config(workdir, models),
                           extra_env={"WATCHDOG_USEC": "200000"})  # a ping every 100 ms
    with daemon:
        ready = daemon.wait_notification("READY=1")
        watchdogs = wait_for(lambda: [n for n in daemon.read_notifications()
                                      if n == "WATCHDOG=1"][2:], 5, what="3 watchdog pings")
        assert watchdogs
        daemon.wait_health("small", "healthy")
        daemon.signal(signal.SIGHUP)
        reloading = daemon.wait_notification("RELOADING=1", after=ready + 1)
        daemon.wait_notification("READY=1", after=reloading)
        assert daemon.stop() == 0
        notes = daemon.read_notifications()
    assert notes.index("READY=1") < reloading < notes.index("STOPPING=1")
    monotonic = next(n for n in notes[reloading:] if n.startswith("MONOTONIC_USEC="))
    assert int(monotonic.split("=")[1]) > 0
    statuses = [n for n in notes if n.startswith("STATUS=")]
    assert any("2 models: 2 healthy, 0 degraded, 0 unavailable; offline=no" in s
               for s in statuses)


def test_socket_activation_serves_on_the_passed_listener(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    activated = workdir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated))
    listener.listen(16)
    daemon = DaemonProcess(workdir, config)
    # like systemd: the listener is fd 3 and LISTEN_PID names the process that will run
    wrapper = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'daemon', 'run', '--config', "
        f"{str(daemon.config_path)!r}])\n"
    )
    daemon._open_notify_socket()
    env = dict(daemon.env, NOTIFY_SOCKET=daemon._notify_path)
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen([sys.executable, "-c", wrapper], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),))
    listener.close()
    try:
        daemon.wait_ready()
        assert not Path(daemon.socket_path).exists()  # it did not bind its own
        from daemon.testing.harness import request
        status, body = request(str(activated), "GET", "/api/v1/status")
        assert status == 200 and body["socket"] == str(activated)
        assert daemon.log_events("socket_inherited")
        assert daemon.stop() == 0
    finally:
        daemon.close()


# ----------------------------------------------------------------------------- instances


def test_second_daemon_on_the_same_state_file_fails_naming_the_first_pid(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    with DaemonProcess(workdir, config) as first:
        other = dict(config, daemon=dict(config["daemon"],
                                         socket=str(workdir / "run" / "other.sock")))
        second = DaemonProcess(workdir / "second", other)
        assert second.run_to_exit() == 75
        failure = second.log_events("startup_failed")[-1]["error"]
        assert f"pid {first.pid}" in failure
        assert first.get("/api/v1/status")["pid"] == first.pid  # the first is unharmed


def test_second_daemon_on_a_live_socket_refuses_to_start(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    with DaemonProcess(workdir, config) as first:
        other = dict(config, daemon=dict(config["daemon"],
                                         state_file=str(workdir / "state2" / "s.json")))
        second = DaemonProcess(workdir / "second", other)
        assert second.run_to_exit() == 75
        assert "control socket" in second.log_events("startup_failed")[-1]["error"]
        assert first.get("/api/v1/status")["pid"] == first.pid
        assert Path(first.socket_path).exists()


def test_stale_socket_file_is_replaced(workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    stale = Path(config["daemon"]["socket"])
    stale.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # bound, never listening, closed: a stale socket file
    with DaemonProcess(workdir, config) as daemon:
        assert daemon.get("/api/v1/status")["pid"] == daemon.pid


def test_bad_config_exits_78_naming_file_and_key(workdir: Path) -> None:
    path = workdir / "bad.toml"
    path.write_text("[probe]\ntimeout = -3\n[[models]]\nid = \"promote\"\nprovider = \"x\"\n")
    run = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 78
    assert f"{path}: probe.timeout" in run.stderr
    assert f"{path}: models[0].id" in run.stderr
    check = subprocess.run([sys.executable, "-m", "daemon", "check-config", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 78 and "probe.timeout" in check.stderr


def test_unknown_provider_is_a_config_error(workdir: Path) -> None:
    config = daemon_config(workdir, [{"id": "m", "provider": "nosuch",
                                      "endpoint": "http://127.0.0.1:9"}])
    daemon = DaemonProcess(workdir, config)
    assert daemon.run_to_exit() == 78
    error = daemon.log_events("startup_failed")[-1]["error"]
    assert 'models[0] (id "m").provider: no probe plugin named "nosuch"' in error


# ----------------------------------------------------------------------------- offline


def offline_setup(workdir: Path, servers: FakeServers
                  ) -> tuple[FakeOpenAI, dict[str, Any]]:
    remote = servers.start(FakeOpenAI(["cloud"]))
    gguf = workdir / "local.gguf"
    write_gguf(gguf)
    models = [
        # local = false: this endpoint stands for a remote server
        {"id": "cloud", "provider": "openai", "endpoint": remote.url, "role": "chat",
         "primary": True, "local": False, "quality": 0.9},
        {"id": "disk", "provider": "local_file", "local_path": str(gguf), "role": "chat",
         "quality": 0.1},
    ]
    return remote, daemon_config(workdir, models)


def test_offline_mode_stops_probing_remote_models_and_resolves_local(
        workdir: Path, servers: FakeServers) -> None:
    remote, config = offline_setup(workdir, servers)
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("cloud", "healthy")
        daemon.wait_health("disk", "healthy")
        assert resolve(daemon)[1]["model_id"] == "cloud"
        remote.set_mode("down")
        body = daemon.post("/api/v1/models/offline-mode", {"enabled": True})
        assert body == {"offline_mode": True, "forced_by_env": False}
        time.sleep(0.3)  # let a probe that was in flight finish
        remote.set_mode("normal")
        remote.reset_counts()
        time.sleep(2.5)  # more than two probe intervals
        assert remote.requests_from(f"(pid {daemon.pid})") == 0
        answer = resolve(daemon)[1]
        assert answer["model_id"] == "disk"
        assert answer["fallbacks"] == []
        cloud = daemon.model("cloud")
        assert cloud["not_probed"] == "not probed: offline"
        assert cloud["eligible"] is False
        assert daemon.log_events("offline_mode_changed")

        daemon.post("/api/v1/models/offline-mode", {"enabled": False})
        wait_for(lambda: remote.requests_from(f"(pid {daemon.pid})") > 0, 5,
                 what="probing resumes")
        assert resolve(daemon)[1]["model_id"] == "cloud"


def test_daena_offline_mode_env_forces_offline_at_start(
        workdir: Path, servers: FakeServers) -> None:
    remote, config = offline_setup(workdir, servers)
    daemon = DaemonProcess(workdir, config, extra_env={"DAENA_OFFLINE_MODE": "true"})
    with daemon:
        daemon.wait_health("disk", "healthy")
        status = daemon.get("/api/v1/models/offline-mode/status")
        assert status == {"offline_mode": True, "forced_by_env": True}
        assert resolve(daemon)[1]["model_id"] == "disk"
        time.sleep(1.5)
        assert remote.requests_from(f"(pid {daemon.pid})") == 0
        assert daemon.model("cloud")["last_probe"] is None
    # the env var overrides the saved value the other way too
    assert daemon.state()["offline_mode"] is True
    with DaemonProcess(workdir, config, extra_env={"DAENA_OFFLINE_MODE": "false"}) as again:
        assert again.get("/api/v1/models/offline-mode/status")["offline_mode"] is False


def test_status_reports_uptime_counts_and_last_state_write(
        workdir: Path, servers: FakeServers) -> None:
    _primary, _fallback, models = chat_pair(servers)
    with DaemonProcess(workdir, daemon_config(workdir, models)) as daemon:
        daemon.wait_health("small", "healthy")
        status = daemon.get("/api/v1/status")
        assert status["pid"] == daemon.pid == os.getpgid(daemon.pid)
        assert status["config_path"] == str(daemon.config_path)
        assert status["models"] == 2 and status["roles"] == {"chat": "small"}
        assert status["last_state_write"]["ok"] is True
        assert status["last_sweep"]["probes_total"] >= 2
        assert status["uptime_s"] > 0


@pytest.mark.parametrize("content", [
    b'{"schema_version": 1, "models": {',  # cut off mid-write by something else
    b"\x00\x01garbage",
    # valid JSON, wrong shape: a hand edit gone wrong
    b'{"schema_version": 1, "saved_at": 1, "offline_mode": false, "models": {}, "quarantine": '
    b'{}, "event_seq": 0, "events": [], "roles": {"chat": {"primary": "small", "history": [],'
    b' "promoted_at": "yesterday"}}}',
])
def test_a_corrupt_state_file_is_kept_aside_and_the_daemon_starts_fresh(
        workdir: Path, servers: FakeServers, content: bytes) -> None:
    _primary, _fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models)
    state = Path(config["daemon"]["state_file"])
    state.parent.mkdir(parents=True)
    state.write_bytes(content)
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("small", "healthy")
        assert resolve(daemon)[1]["model_id"] == "small"
        corrupt = daemon.log_events("state_corrupt")
        assert corrupt and corrupt[0]["path"] == str(state)
        kept = Path(corrupt[0]["kept_as"])
        assert kept.read_bytes() == content and kept.name.startswith("model_registry.json.corrupt-")
        assert check_state_shape(daemon.state()) == []


SLOW_PLUGIN = '''
import anyio
from daemon import ProbeResult, hookimpl


class SlowProbe:
    async def probe(self, spec, ctx):
        await anyio.sleep(2.5)  # e.g. a deep probe generating a token on a busy server
        return ProbeResult.healthy(2500.0)


@hookimpl
def modeld_register_probes(register):
    register("slow", SlowProbe())
'''


def test_a_slow_probe_does_not_slow_its_neighbours_outage_detection(
        workdir: Path, servers: FakeServers) -> None:
    fake = servers.start(FakeOpenAI(["fast"]))
    plugins = workdir / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    models = [
        {"id": "fast", "provider": "openai", "endpoint": fake.url, "primary": True},
        {"id": "slowpoke", "provider": "slow", "endpoint": fake.url, "timeout": "5s"},
    ]
    config = daemon_config(workdir, models, daemon={"plugin_dirs": [str(plugins)]})
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("fast", "healthy")
        fake.set_mode("down")
        started = time.monotonic()
        # interval 1s + 3 x recheck 100ms (+ slack); three slow ticks would be ~7.5 s
        daemon.wait_health("fast", "unavailable", timeout=4.0)
        print(f"neighbour of a 2.5 s probe unavailable after {time.monotonic() - started:.2f}s")
        # the slow one still reports: degraded, as 2,500 ms > degraded_latency_ms
        daemon.wait_health("slowpoke", "degraded", timeout=6.0)


def test_a_second_sigterm_during_shutdown_does_not_skip_the_final_flush(
        workdir: Path, servers: FakeServers) -> None:
    _primary, fallback, models = chat_pair(servers)
    config = daemon_config(workdir, models, daemon={"state_flush_interval": "1h"})
    daemon = DaemonProcess(workdir, config)
    with daemon:
        daemon.wait_health("backup", "healthy")
        # an evaluate stuck on a hanging upstream (probe timeout 1s) holds the shutdown in
        # its grace period: time for a second signal
        fallback.set_mode("hang")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket_path)
        sock.sendall(b"POST /api/v1/models/backup/evaluate HTTP/1.1\r\nHost: m\r\n"
                     b"Content-Length: 0\r\n\r\n")
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(20) == 0
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200")  # the in-flight request was finished
    assert daemon.log_events("signal_ignored")
    assert daemon.log_events("daemon_stopped")
    # probe-driven state only reaches the file in the final flush (flush interval 1h): the
    # evaluate's timed-out probe is there
    backup = daemon.state()["models"]["backup"]
    assert backup["recent"][-1]["reason"].startswith("timed out")
