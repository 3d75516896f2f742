"""Reloading the configuration (SIGHUP, ``POST /api/v1/reload``): models added, removed or
changed without losing the state of the unchanged ones; a bad new configuration is rejected
and the old one kept."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio

from ..config import ConfigError, load_config
from ..control.auth import Authorizer
from ..core.settings import Config
from ..probing.plugins import unknown_providers

if TYPE_CHECKING:
    from .lifecycle import Daemon

#: [daemon] keys that only take effect on restart.
RESTART_KEYS = ("state_file", "socket", "socket_mode", "plugin_dirs", "metrics_listen",
                "log_format", "max_connections", "request_timeout")


async def read_config(path: str) -> Config:
    """``load_config(path)`` in a thread of its own that a cancelled caller leaves behind.

    A config file on a hung network file system (or a FIFO nobody writes) blocks its read
    for as long as it likes; the reload waiting for it must stay cancellable, so that a
    SIGTERM stops the daemon at once and the process can exit: the reader is a daemon thread,
    which, unlike a worker of anyio's pool, nothing waits for at exit.
    """
    done = threading.Event()
    outcome: list[Any] = []

    def read() -> None:
        try:
            outcome.append(load_config(path))
        except BaseException as exc:  # handed to the caller, re-raised there
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=read, name="modeld-config-reader", daemon=True).start()
    while not done.is_set():  # a reload is rare: polling costs nothing that matters
        await anyio.sleep(0.01)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, Config)
    return result


async def reload(daemon: Daemon, actor: str) -> dict[str, Any]:
    """Re-read the configuration. Raises ConfigError, keeping the old one, when the new one
    is invalid; StateNotSaved when it took effect but could not be written."""
    # Only the loader's verdict on the file is a rejected config. Anything else raised here
    # is a daemon bug: it propagates (a 500 for the API, logged with its traceback), and
    # the file is not blamed in an event.
    try:
        new = await read_config(daemon.config_path)
        errors = unknown_providers(new, daemon.prober.probes if daemon.prober else {})
        if errors:
            raise ConfigError(errors)
    except ConfigError as exc:
        # an event (logged as an error, streamed, kept in the state), not only a log line
        daemon.registry.note_config_rejected(time.time(), actor=actor, errors=exc.errors)
        raise
    from .lifecycle import control_limits  # lifecycle imports this module

    restart = [f"daemon.{key}" for key in RESTART_KEYS
               if getattr(new.daemon, key) != getattr(daemon.config.daemon, key)]
    if new.probe.max_concurrent != daemon.config.probe.max_concurrent:
        # the HTTP client's connection pool is sized at start; keep the limiter matching
        restart.append("probe.max_concurrent")
        new = replace(new, probe=replace(new.probe,
                                         max_concurrent=daemon.config.probe.max_concurrent))
    if new.gateway.listen != daemon.config.gateway.listen:
        # the door's listener is opened at start; until a restart it keeps its address and,
        # so that a door open to the network never loses its key, its clients_key_env
        restart.append("gateway.listen")
        new = replace(new, gateway=replace(new.gateway, listen=daemon.config.gateway.listen,
                                           clients_key_env=daemon.config.gateway.clients_key_env))
    diff = daemon.registry.apply_config(new, time.time(), actor=actor)
    daemon.config = new
    # look the admin group up again: it may have been created since
    daemon.authorizer = Authorizer(new.daemon.admin_group)
    # [control] shares apply to connections made from now on; the [daemon] sizes need a
    # restart (RESTART_KEYS)
    current = daemon.server.limits
    daemon.server.limits = replace(control_limits(new), max_connections=current.max_connections,
                                   read_timeout=current.read_timeout)
    if daemon.prober is not None:
        daemon.prober.config = new.probe
    for model_id in diff.removed:
        daemon.scheduler.forget(model_id)
        daemon.metrics.forget_model(model_id)
    daemon.scheduler.reschedule.set()
    daemon.log.info("config_reloaded", path=daemon.config_path, actor=actor,
                    added=list(diff.added), removed=list(diff.removed),
                    changed=list(diff.changed), restart_required=restart)
    await daemon.saver.persist()  # a reload is a decision: durable before it is acknowledged
    return {"added": list(diff.added), "removed": list(diff.removed),
            "changed": list(diff.changed), "restart_required": restart}
