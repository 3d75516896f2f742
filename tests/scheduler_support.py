"""The real probe scheduler in process, against fakes on 127.0.0.1: for tests that need the
scheduler's timing (rechecks, queueing) without a daemon subprocess.

Not a test module; tests import it by name, as they import ``fakes_fixtures``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from daemon.config import parse_config
from daemon.service.lifecycle import Daemon


def in_process_daemon(tmp_path: Path, models: list[dict[str, Any]],
                      **sections: dict[str, Any]) -> Daemon:
    """A Daemon for ``models`` with its plugins loaded (built-in ones only), not serving."""
    daemon_section = {"state_file": str(tmp_path / "state.json"),
                      "socket": str(tmp_path / "s.sock"), "plugin_dirs": [],
                      **sections.pop("daemon", {})}
    config = parse_config({"daemon": daemon_section, **sections, "models": models})
    daemon = Daemon(config, environ={})
    daemon._load_plugins()
    return daemon


@asynccontextmanager
async def scheduling(daemon: Daemon) -> AsyncIterator[Daemon]:
    """Run ``daemon``'s probe scheduler for the duration of the block."""
    assert daemon.client is not None
    async with daemon.client, anyio.create_task_group() as tg:
        tg.start_soon(daemon.scheduler.run)
        try:
            yield daemon
        finally:
            tg.cancel_scope.cancel()
