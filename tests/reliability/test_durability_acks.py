"""Acknowledged means saved: a retried decision on a full disk, and a start on a full disk.

- A decision that could not be written answers 503 ``state_write_failed`` and stays in effect
  in memory. Sending the same decision again changes nothing, but its answer must not be 200
  while the saved state lags the state it reports: a client that retries after a 503 and gets
  200 believes the decision is durable. The daemon is then killed with SIGKILL and the disk
  freed: everything that was answered 200 must be in the file.
- Starting on a full disk with no lock file yet must be the clear exit 73 of an unusable
  state directory, not a traceback.

The full disk is a real 1 MB tmpfs filled to the last byte when mount(2) is allowed (root),
else the injected ENOSPC of ``reliability_support.fault_injection_env``; the read-only one is
the injected EROFS (a file system with files open for writing cannot be remounted read-only).
Each test prints which ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    clean_env,
    fault_injection_env,
    fill_disk,
    mount_tmpfs,
    read_valid_state,
    unmount,
)

from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config

EX_CANTCREAT = 73


class FullDisk:
    """The state directory's file system, filled on demand (tmpfs, or injected ENOSPC)."""

    def __init__(self, work: Path, state_dir: Path, trouble: str = "full") -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.trouble = trouble  # "full", or "read-only"
        self.filler: Path | None = None
        self.flag: Path | None = None
        # a running daemon holds its lock file open for writing, so a real file system cannot
        # be remounted read-only under it (EBUSY): a read-only disk is always the injected one
        why = (mount_tmpfs(state_dir, "1m") if trouble == "full"
               else "a mounted file system busy with open files cannot be remounted read-only")
        self.mounted = why is None
        if self.mounted:
            self.env = clean_env()
            self.note = "a real 1 MB tmpfs on the state directory, filled"
        else:
            self.env, self.flag = fault_injection_env(work, state_dir)
            errno_name = "EROFS" if trouble == "read-only" else "ENOSPC"
            self.note = f"injected {errno_name} ({why})"
        print(f"\n[full disk] {self.note}")

    def fill(self) -> None:
        """Break the disk: fill it (or make it read-only)."""
        if self.mounted:
            self.filler = fill_disk(self.state_dir)
        else:
            assert self.flag is not None
            self.flag.write_text("EROFS" if self.trouble == "read-only" else "ENOSPC")

    def free(self) -> None:
        """Repair the disk."""
        if self.mounted:
            assert self.filler is not None
            self.filler.unlink()
        else:
            assert self.flag is not None
            self.flag.unlink()

    def close(self) -> None:
        if self.mounted:
            unmount(self.state_dir)


@contextlib.contextmanager
def full_disk(work: Path, state_dir: Path, trouble: str = "full") -> Iterator[FullDisk]:
    disk = FullDisk(work, state_dir, trouble)
    try:
        yield disk
    finally:
        disk.close()


def models(work: Path) -> list[dict[str, Any]]:
    files = work / "files"
    files.mkdir(exist_ok=True)
    return [{"id": name, "provider": "local_file", "role": "chat", "primary": name == "a",
             "local_path": str(write_gguf(files / f"{name}.gguf"))} for name in ("a", "b")]


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_a_retried_decision_on_a_broken_disk_is_never_acknowledged_unsaved(
    workdir: Path, trouble: str, record_property: Any,
) -> None:
    # the flusher must not rescue the state between the requests: make it slow
    config = daemon_config(workdir, models(workdir), daemon={"state_flush_interval": "1h"})
    state_dir = Path(config["daemon"]["state_file"]).parent
    with full_disk(workdir, state_dir, trouble) as disk:
        record_property("disk", disk.note)
        daemon = DaemonProcess(workdir, config, env=disk.env)
        acknowledged: dict[str, Any] = {}
        with daemon:
            disk.fill()
            retries = [
                ("offline on", "/api/v1/models/offline-mode", {"enabled": True}),
                ("promote b", "/api/v1/models/promote", {"model_id": "b", "force": True}),
            ]
            answers = []
            for what, path, body in retries:
                for attempt in (1, 2, 3):
                    status, reply = daemon.request("POST", path, body)
                    code = reply.get("error", {}).get("code") if status != 200 else None
                    answers.append(f"{what} #{attempt}: {status} {code or ''}".strip())
                    if status == 200:
                        acknowledged[what] = reply
            # the second and third are no-ops (already offline, already primary): retries
            assert answers == [
                "offline on #1: 503 state_write_failed",
                "offline on #2: 503 state_write_failed",
                "offline on #3: 503 state_write_failed",
                "promote b #1: 503 state_write_failed",
                "promote b #2: 503 state_write_failed",
                "promote b #3: 503 state_write_failed",
            ], answers
            # reads still say what is in effect
            assert daemon.get("/api/v1/models/offline-mode/status")["offline_mode"] is True
            daemon.kill()
        disk.free()
        saved = read_valid_state(daemon.state_path)
        # nothing was acknowledged, so nothing acknowledged was lost; the file is the old one
        assert not acknowledged
        assert saved["offline_mode"] is False
        assert saved["roles"]["chat"]["primary"] == "a"

        # once space is back, the same retry is acknowledged because it is saved now
        again = DaemonProcess(workdir, config, env=disk.env)
        with again:
            disk.fill()
            status, _ = again.request("POST", "/api/v1/models/offline-mode", {"enabled": True})
            assert status == 503
            disk.free()
            status, reply = again.request("POST", "/api/v1/models/offline-mode",
                                          {"enabled": True})
            assert status == 200, reply
            assert read_valid_state(again.state_path)["offline_mode"] is True
            again.kill()
        assert read_valid_state(again.state_path)["offline_mode"] is True


def test_a_request_that_changes_nothing_still_waits_for_the_write_in_progress(
    workdir: Path,
) -> None:
    """A request that finds nothing to do (auto-upgrade execute, release without a hold) is
    answered 200 only once the decisions in effect are saved: its success never outruns an
    earlier failed write."""
    config = daemon_config(workdir, models(workdir), daemon={"state_flush_interval": "1h"})
    state_dir = Path(config["daemon"]["state_file"]).parent
    with full_disk(workdir, state_dir) as disk, DaemonProcess(workdir, config,
                                                              env=disk.env) as daemon:
        disk.fill()
        status, _ = daemon.request("POST", "/api/v1/models/promote",
                                   {"model_id": "b", "force": True})
        assert status == 503
        # the auto-upgrade execute finds nothing to do, a release finds no hold: still not a
        # 200 over unsaved state
        status, reply = daemon.request("POST", "/api/v1/models/auto-upgrade/execute", {})
        assert (status, reply.get("error", {}).get("code")) == (503, "state_write_failed"), reply
        for _ in range(2):  # the first ends the hold the manual promotion set; then none
            status, reply = daemon.request("POST", "/api/v1/roles/chat/release", {})
            assert (status, reply.get("error", {}).get("code")) == (503, "state_write_failed"), (
                reply)
        disk.free()
        status, reply = daemon.request("POST", "/api/v1/models/auto-upgrade/execute", {})
        assert status == 200, reply
        assert read_valid_state(daemon.state_path)["roles"]["chat"]["primary"] == "b"


@pytest.mark.parametrize("lock_file", ["absent", "present"])
def test_start_on_a_full_disk_exits_73_with_a_clear_error(
    workdir: Path, lock_file: str, record_property: Any,
) -> None:
    config = daemon_config(workdir, models(workdir))
    state_dir = Path(config["daemon"]["state_file"]).parent
    with full_disk(workdir, state_dir) as disk:
        record_property("disk", disk.note)
        if lock_file == "present":
            (state_dir / "model_registry.json.lock").write_text("1\n")
        disk.fill()
        daemon = DaemonProcess(workdir, config, env=disk.env)
        code = daemon.run_to_exit()
        log = daemon.log_path.read_text()
        assert code == EX_CANTCREAT, log[-2000:]
        assert "Traceback" not in log, log[-2000:]
        failed = daemon.log_events("startup_failed")
        assert failed, log[-2000:]
        error = failed[-1]["error"]
        assert str(state_dir) in error and "space" in error.lower(), error
