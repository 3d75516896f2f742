"""The daemon's timers and its signal handler: the policy tick, the state flush, systemd's
STATUS= line and watchdog, and SIGTERM / SIGINT / SIGHUP."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..config import ConfigError
from ..control.api import StateNotSaved

if TYPE_CHECKING:
    from .lifecycle import Daemon

STATUS_INTERVAL = 1.0  # seconds between STATUS= updates at most


def policy_tick(daemon: Daemon) -> None:
    """Check for upgrades; with auto_execute, act (cooldown per role)."""
    now = daemon.instant()
    suggestions = daemon.registry.auto_upgrade_check(now)
    daemon.registry.note_suggestions(suggestions, now)
    if daemon.config.policy.auto_execute and suggestions:
        daemon.registry.auto_upgrade_execute(now, actor="policy")


async def policy_timer(daemon: Daemon) -> None:
    """The auto-upgrade timer: a policy tick every ``policy.interval``, its decisions saved."""
    while True:
        await anyio.sleep(daemon.config.policy.interval)
        policy_tick(daemon)
        await daemon.saver.persist_quietly()


async def flusher(daemon: Daemon) -> None:
    """Save what probes changed: a verdict change (any change but latencies and counters)
    within ``state_flush_interval``, observations alone at most every ``state_checkpoint``.

    A quiet host so stays quiet: 40 models probed every 5 s rewrote and fsynced the state
    file on nearly every flush, because every probe moves a latency window.
    """
    saver = daemon.saver
    written = saver.saved_version
    last_write = time.monotonic()
    while True:
        await anyio.sleep(daemon.config.daemon.state_flush_interval)
        if saver.saved_version != written:  # written by someone else (a decision, the API)
            written, last_write = saver.saved_version, time.monotonic()
        if not saver.dirty:
            continue
        material = daemon.registry.material_version > saver.saved_version
        due = time.monotonic() - last_write >= daemon.config.daemon.state_checkpoint
        if material or due:
            await saver.persist_quietly()
            if saver.saved_version != written:
                written, last_write = saver.saved_version, time.monotonic()


async def status_updater(daemon: Daemon) -> None:
    """Send systemd's STATUS= line when health changed, at most once a second."""
    while True:
        await anyio.sleep(STATUS_INTERVAL)
        if daemon.scheduler.health_changed:
            daemon.scheduler.health_changed = False
            daemon.notifier.status(daemon.status_line())


async def watchdog(daemon: Daemon, interval: float) -> None:
    """``WATCHDOG=1`` every ``interval``; sent from the event loop itself, so a loop that is
    stuck stops the pings."""
    while True:
        daemon.notifier.watchdog()
        await anyio.sleep(interval)


async def signals(
    daemon: Daemon, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Handle signals for the daemon's whole life, shutdown and final flush included: a
    second SIGTERM must not skip the flush, one during start-up must not kill us."""
    reloads = _SignalReloads(daemon)
    async with anyio.create_task_group() as group:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                        signal.SIGHUP) as received:
            task_status.started()
            async for signum in received:
                if daemon.stopping():
                    daemon.log.info("signal_ignored", signal=signal.Signals(signum).name,
                                    reason="already stopping")
                elif signum == signal.SIGHUP:
                    # in a task of its own: a slow reload must not hold up a SIGTERM
                    reloads.request(group)
                else:
                    daemon.log.info("stop_requested", signal=signal.Signals(signum).name)
                    daemon.stop()
                    reloads.cancel()


class _SignalReloads:
    """SIGHUP's reloads: one at a time, one more queued at most (it reads the newest file
    anyway), all cancelled when the daemon stops."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.pending = 0
        self.scopes: set[anyio.CancelScope] = set()
        self.cancelled = False

    def request(self, group: anyio.abc.TaskGroup) -> None:
        if self.pending >= 2:
            self.daemon.log.info("signal_ignored", signal="SIGHUP",
                                 reason="a reload is already queued")
            return
        self.pending += 1
        group.start_soon(self._reload)

    def cancel(self) -> None:
        self.cancelled = True
        for scope in self.scopes:
            scope.cancel()

    async def _reload(self) -> None:
        scope = anyio.CancelScope()
        if self.cancelled:
            scope.cancel()
        self.scopes.add(scope)
        try:
            with scope:
                await self.daemon.reload(actor="SIGHUP")
        except (ConfigError, StateNotSaved):
            pass  # logged by reload(); a signal has nobody to answer to
        except Exception:
            # a daemon bug, not the file's fault: logged with its traceback, the old
            # configuration stays, and the daemon keeps serving
            self.daemon.log.exception("config_reload_crashed", actor="SIGHUP")
        finally:
            self.scopes.discard(scope)
            self.pending -= 1
