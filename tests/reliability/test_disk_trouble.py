"""Disk trouble: the state directory fills up, or is read-only at start.

Two ways to make the disk fail, and each test says which one ran:

- ``tmpfs``: a real 1 MB tmpfs mounted on the state directory and filled to the last byte (or
  remounted read-only). Needs root and mount(2); when mounting is refused (an unprivileged CI
  container), the test falls back to the injected variant and prints that it did.
- ``injected``: a ``sitecustomize`` in the daemon subprocess replaces the ``os`` module that
  ``daemon.persist.store`` sees by a proxy that fails ``os.write`` with ENOSPC (or ``os.open``
  of files in the state directory with EROFS) while a flag file exists. The daemon's own error
  paths run.

Both variants always run here, so the injected fallback is itself tested.
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
    remount,
    temp_files,
    unmount,
    wait_until,
)

from daemon.persist.store import SCHEMA_VERSION
from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config

EX_CANTCREAT = 73


class StateDisk:
    """The state directory's file system, broken on demand in one of the two ways."""

    def __init__(self, work: Path, state_dir: Path, variant: str) -> None:
        self.work = work
        self.state_dir = state_dir
        self.variant = variant
        self.mounted = False
        self.filler: Path | None = None
        self.env = clean_env()
        self.flag: Path | None = None
        self.note = ""
        if variant == "tmpfs":
            why = mount_tmpfs(state_dir, "1m")
            if why is None:
                self.mounted = True
                self.note = "ran the tmpfs variant (a real 1 MB tmpfs on the state directory)"
            else:
                self.variant = "injected"
                self.note = f"tmpfs mount refused ({why}); fell back to the injected variant"
        if self.variant == "injected":
            self.env, self.flag = fault_injection_env(work, state_dir)
            self.note = self.note or "ran the injected variant (ENOSPC/EROFS from a proxy os)"

    def fill(self) -> None:
        if self.mounted:
            self.filler = fill_disk(self.state_dir)
        else:
            assert self.flag is not None
            self.flag.write_text("ENOSPC")

    def free(self) -> None:
        if self.mounted:
            assert self.filler is not None
            self.filler.unlink()
        else:
            assert self.flag is not None
            self.flag.unlink()

    def make_read_only(self) -> None:
        if self.mounted:
            remount(self.state_dir, "ro")
        else:
            assert self.flag is not None
            self.flag.write_text("EROFS")

    def close(self) -> None:
        if self.mounted:
            unmount(self.state_dir)


@contextlib.contextmanager
def state_disk(work: Path, state_dir: Path, variant: str) -> Iterator[StateDisk]:
    state_dir.mkdir(parents=True, exist_ok=True)
    disk = StateDisk(work, state_dir, variant)
    print(f"\n[disk trouble] {disk.note}")
    try:
        yield disk
    finally:
        disk.close()


def file_models(work: Path) -> list[dict[str, Any]]:
    files = work / "files"
    files.mkdir(exist_ok=True)
    return [
        {"id": name, "provider": "local_file", "role": "chat", "primary": name == "a",
         "local_path": str(write_gguf(files / f"{name}.gguf"))}
        for name in ("a", "b", "c")
    ]


@pytest.mark.parametrize("variant", ["tmpfs", "injected"])
def test_full_state_disk_keeps_old_state_serves_answers_503_and_writes_again_when_space_returns(
    workdir: Path, variant: str, record_property: Any,
) -> None:
    config = daemon_config(workdir, file_models(workdir))
    state_dir = Path(config["daemon"]["state_file"]).parent
    with state_disk(workdir, state_dir, variant) as disk:
        record_property("disk_variant", disk.variant)
        daemon = DaemonProcess(workdir, config, env=disk.env)
        with daemon:
            for name in ("a", "b", "c"):
                daemon.wait_health(name, "healthy")
            daemon.post("/api/v1/models/promote", {"model_id": "b"})
            before = daemon.state_path.read_bytes()
            assert read_valid_state(daemon.state_path)["roles"]["chat"]["primary"] == "b"

            disk.fill()
            status, body = daemon.request("POST", "/api/v1/models/promote", {"model_id": "c"})
            assert status == 503, body
            assert body["error"]["code"] == "state_write_failed", body
            assert "could not be saved" in body["error"]["message"]
            status, body = daemon.request("POST", "/api/v1/models/offline-mode",
                                          {"enabled": True})
            assert (status, body["error"]["code"]) == (503, "state_write_failed"), body

            # the old state is intact, byte for byte, and no temp file is left over
            assert daemon.state_path.read_bytes() == before
            assert not temp_files(daemon.state_path)
            failures = daemon.log_events("state_write_failed")
            assert failures, daemon.log_tail()
            assert failures[0]["errno"] == 28 and failures[0]["path"] == str(daemon.state_path)

            # it keeps serving: reads, resolve (the unsaved change is in effect, as it says)
            resolved = daemon.get("/api/v1/resolve?role=chat")
            assert resolved["model_id"] == "c"
            status_view = daemon.get("/api/v1/status")
            assert status_view["last_state_write"]["ok"] is False
            assert "space" in status_view["last_state_write"]["error"].lower()
            assert len(daemon.get("/api/v1/models")["models"]) == 3

            disk.free()
            # the flusher retries on its own: the decisions made during the outage land
            saved = wait_until(lambda: _saved_if(daemon, primary="c", offline=True), 5.0)
            assert saved, f"state not rewritten after space returned: {daemon.state()}"
            assert daemon.log_events("state_write_recovered"), daemon.log_tail()
            rolled = daemon.post("/api/v1/models/rollback", {"role": "chat"})
            assert rolled["changes"][0]["to"] == "b"
            after = read_valid_state(daemon.state_path)
            assert after["roles"]["chat"]["primary"] == "b"
            assert after["schema_version"] == SCHEMA_VERSION
            assert daemon.stop() == 0
        assert read_valid_state(daemon.state_path)["roles"]["chat"]["primary"] == "b"
        assert not temp_files(daemon.state_path)


def _saved_if(daemon: DaemonProcess, *, primary: str, offline: bool) -> bool:
    state = read_valid_state(daemon.state_path)
    return bool(state["roles"]["chat"]["primary"] == primary
                and state["offline_mode"] is offline)


@pytest.mark.parametrize("variant", ["tmpfs", "injected"])
def test_read_only_state_directory_at_start_is_a_clear_error_and_exit_73(
    workdir: Path, variant: str, record_property: Any,
) -> None:
    config = daemon_config(workdir, file_models(workdir))
    state_dir = Path(config["daemon"]["state_file"]).parent
    with state_disk(workdir, state_dir, variant) as disk:
        record_property("disk_variant", disk.variant)
        daemon = DaemonProcess(workdir, config, env=disk.env)
        with daemon:
            daemon.post("/api/v1/models/promote", {"model_id": "b", "force": True})
        saved = daemon.state_path.read_bytes()
        disk.make_read_only()

        again = DaemonProcess(workdir, config, env=disk.env)
        try:
            again.start(wait=False)
            code = again.wait_exit(20.0)
            failed = again.log_events("startup_failed")
        finally:
            again.close()
        assert code == EX_CANTCREAT, again.log_tail()
        assert "READY=1" not in again.read_notifications()
        assert failed, again.log_tail()
        error = failed[-1]["error"]
        assert str(state_dir) in error, error
        assert "read-only" in error.lower(), (
            f"the error does not say the file system is read-only: {error}")
        assert daemon.state_path.read_bytes() == saved  # untouched
