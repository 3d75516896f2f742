"""The daemon's life under trouble: a bug during a reload, a crashing task, a slow reload when
SIGTERM comes, models a reload removes, a full systemd notify queue.

Each test reproduces a defect found by reading the code (issue 10):

- a daemon bug during a reload was reported as "config rejected" (an event blaming the file);
- a task that crashed skipped the final state flush (it ran on the clean path only);
- SIGHUP's reload ran inside the signal loop, so a SIGTERM waited behind a slow reload;
- per-model Prometheus series outlived the models a reload removed;
- READY=1, RELOADING=1 and STOPPING=1 were dropped when the notify socket's queue was full.

Real daemon subprocesses where the trouble can be made from outside (a config file that is a
FIFO nobody writes, a notify socket filled up beforehand); in process where a bug has to be
planted (a loader that raises, a task that crashes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from reliability_support import clean_env, read_valid_state
from structlog.testing import capture_logs

from daemon.config import ConfigError, parse_config
from daemon.service import reload as reload_module
from daemon.service.lifecycle import Daemon
from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config, request, wait_for


def file_models(work: Path, names: tuple[str, ...] = ("a", "b")) -> list[dict[str, Any]]:
    files = work / "files"
    files.mkdir(exist_ok=True)
    return [{"id": name, "provider": "local_file", "role": "chat", "primary": name == names[0],
             "local_path": str(write_gguf(files / f"{name}.gguf"))} for name in names]


def in_process_daemon(work: Path, **sections: dict[str, Any]) -> Daemon:
    raw = daemon_config(work, file_models(work), **sections)
    for key in ("state_file", "socket"):
        Path(raw["daemon"][key]).parent.mkdir(parents=True, exist_ok=True)
    path = work / "modeld.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    config = parse_config(raw, str(path))
    return Daemon(config, environ={})


# ----------------------------------------------------------------------------- reload errors


@pytest.mark.anyio
async def test_a_daemon_bug_during_reload_is_not_blamed_on_the_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = in_process_daemon(workdir)

    def broken_loader(path: str) -> Any:
        raise RuntimeError("a bug in the daemon, not in the file")

    monkeypatch.setattr(reload_module, "load_config", broken_loader)
    with pytest.raises(RuntimeError, match="a bug in the daemon"):
        await daemon.reload(actor="test")
    kinds = [event.kind.value for event in daemon.registry.events_since(0)]
    assert "config_reload_failed" not in kinds, kinds

    # what the loader does refuse is still a rejected config, with its event
    monkeypatch.undo()
    Path(daemon.config_path).write_text("[daemon\n")
    with pytest.raises(ConfigError):
        await daemon.reload(actor="test")
    kinds = [event.kind.value for event in daemon.registry.events_since(0)]
    assert "config_reload_failed" in kinds, kinds


@pytest.mark.anyio
async def test_a_daemon_bug_during_a_sighup_reload_is_logged_and_the_daemon_keeps_serving(
    workdir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with capture_logs() as logs:
        daemon = in_process_daemon(workdir)
        daemon.log = structlog.get_logger("modeld")
        outcome: list[int] = []

        async def run() -> None:
            outcome.append(await daemon.run())

        def broken_loader(path: str) -> Any:
            raise RuntimeError("a bug in the daemon, not in the file")

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            with anyio.fail_after(10):
                while not any(e["event"] == "daemon_started" for e in logs):
                    await anyio.sleep(0.01)
                monkeypatch.setattr(reload_module, "load_config", broken_loader)
                os.kill(os.getpid(), signal.SIGHUP)
                while not any(e["event"] == "config_reload_crashed" for e in logs):
                    await anyio.sleep(0.01)
            assert not outcome, "the daemon stopped after a bug in a SIGHUP reload"
            status, _ = await anyio.to_thread.run_sync(
                request, daemon.socket_path, "GET", "/api/v1/status")
            assert status == 200
            daemon.stop()
        assert outcome == [0]
    events = [e["event"] for e in logs]
    assert "config_reload_failed" not in events, events  # the file is not blamed


# ----------------------------------------------------------------------------- final flush


@pytest.mark.anyio
async def test_a_crashing_task_does_not_skip_the_final_flush(workdir: Path) -> None:
    # probe results reach the file only in a flush (interval 1 h): the final one must run
    daemon = in_process_daemon(workdir, daemon={"state_flush_interval": "1h"})
    real_run = daemon.scheduler.run

    async def run_then_crash() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(real_run)
            with anyio.fail_after(10):
                while daemon.scheduler.probes_total < 2:
                    await anyio.sleep(0.01)
            raise RuntimeError("a task crashed")

    daemon.scheduler.run = run_then_crash  # type: ignore[method-assign]
    with pytest.raises(BaseException) as raised:
        await daemon.run()
    assert "a task crashed" in repr(raised.value)
    state = read_valid_state(daemon.store.path)
    probed = {name: len(model.get("recent", [])) for name, model in state["models"].items()}
    assert all(probed.values()), f"the crash skipped the final flush: probes saved {probed}"


# ----------------------------------------------------------------------------- SIGHUP, SIGTERM


def test_sigterm_during_a_slow_reload_stops_the_daemon_at_once(workdir: Path) -> None:
    import tomli_w

    config = daemon_config(workdir, file_models(workdir), daemon={"shutdown_grace": "1s"})
    daemon = DaemonProcess(workdir, config, env=clean_env())
    fifo = daemon.config_path
    slow = 5.0  # the new config arrives this long after the reload began

    def write_late() -> None:
        time.sleep(slow)
        with contextlib.suppress(OSError):  # ENXIO: no reader left, the daemon has stopped
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, tomli_w.dumps(config).encode())
            finally:
                os.close(fd)

    with daemon:
        daemon.wait_health("a", "healthy")
        status, _ = daemon.request("POST", "/api/v1/models/promote",
                                   {"model_id": "b", "force": True})
        assert status == 200
        # the config file becomes a FIFO written late: reading it is slow (a slow network
        # file system, a stuck FUSE mount)
        fifo.unlink()
        os.mkfifo(fifo)
        writer = threading.Thread(target=write_late, daemon=True)
        seen = len(daemon.read_notifications())
        daemon.signal(signal.SIGHUP)
        writer.start()
        daemon.wait_notification("RELOADING=1", after=seen, timeout=5)
        time.sleep(0.2)
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait_exit(slow + 10)
        took = time.monotonic() - t0
        print(f"\n[reload] SIGTERM during a {slow:g} s reload: stopped in {took:.2f} s")
        assert code == 0, daemon.log_tail()
        # a clean stop takes a fraction of a second; behind the reload it took `slow`
        assert took < slow - 2.0, f"SIGTERM waited {took:.1f}s behind the reload (slow: " \
            f"{slow:g}s)"
        notes = daemon.read_notifications()[seen:]
        assert "STOPPING=1" in notes, notes
        assert "READY=1" not in notes[notes.index("STOPPING=1"):], notes
    assert read_valid_state(daemon.state_path)["roles"]["chat"]["primary"] == "b"
    assert daemon.log_events("daemon_stopped")


# ----------------------------------------------------------------------------- metrics


def test_a_reload_that_removes_a_model_removes_its_metric_series(workdir: Path) -> None:
    models = file_models(workdir, ("a", "b"))
    config = daemon_config(workdir, models)
    with DaemonProcess(workdir, config, env=clean_env()) as daemon:
        daemon.wait_health("b", "healthy")

        def series_of(model_id: str) -> list[str]:
            status, text = daemon.request("GET", "/metrics")
            assert status == 200
            return [line for line in text.splitlines()
                    if not line.startswith("#") and f'model_id="{model_id}"' in line]

        assert any(line.startswith("modeld_probes_total") for line in series_of("b"))
        daemon.write_config(dict(config, models=models[:1]))
        assert daemon.post("/api/v1/reload")["removed"] == ["b"]
        assert series_of("b") == [], "series of a removed model are still exported"
        assert series_of("a"), "the remaining model lost its series"


# ----------------------------------------------------------------------------- sd_notify


@contextlib.contextmanager
def full_notify_socket(daemon: DaemonProcess) -> Iterator[int]:
    """Fill the harness's notify socket's queue to EAGAIN; yields how many datagrams."""
    daemon._open_notify_socket()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sent = 0
    try:
        while True:
            try:
                sender.sendto(b"X_FILLER=1", daemon._notify_path)
            except OSError as exc:
                assert exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK), exc
                break
            sent += 1
        yield sent
    finally:
        sender.close()


def test_ready_and_stopping_reach_systemd_when_its_notify_queue_is_full_for_a_moment(
    workdir: Path,
) -> None:
    daemon = DaemonProcess(workdir, daemon_config(workdir, file_models(workdir)),
                           env=clean_env(WATCHDOG_USEC="200000"))
    try:
        daemon.start(wait=False)  # (start drains the notify socket: fill it after)
        with full_notify_socket(daemon) as filled:
            assert filled > 0
            # the manager is busy: it reads its queue only a moment after the daemon is up
            wait_for(lambda: daemon.log_events("daemon_started"), 20, what="daemon_started")
            time.sleep(0.3)
            daemon.read_notifications()  # the manager catches up
        try:
            daemon.wait_notification("READY=1", timeout=2.0)
        except TimeoutError:
            notes = [n for n in daemon.read_notifications() if n != "X_FILLER=1"]
            pytest.fail(f"READY=1 was dropped on a full queue: {notes[:10]}")

        # the same for STOPPING=1: fill again, stop, read a moment later
        with full_notify_socket(daemon):
            drained = threading.Timer(0.3, daemon.read_notifications)
            daemon.signal(signal.SIGTERM)
            drained.start()
            assert daemon.wait_exit(10) == 0
            drained.join()
        notes = [n for n in daemon.read_notifications() if n != "X_FILLER=1"]
        assert "STOPPING=1" in notes, f"STOPPING=1 was dropped on a full queue: {notes[-10:]}"
        # a watchdog ping may drop, and dropping one is logged once, not per ping
        failures = daemon.log_events("sd_notify_failed")
        assert len(failures) <= 1, json.dumps(failures)[:500]
    finally:
        daemon.close()
