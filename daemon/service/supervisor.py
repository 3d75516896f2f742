"""The supervisor: the daemon's one root task group and everything that runs in it.

It holds the probe scheduler, the policy timer, the state flusher, the control server, the
signal receiver and the watchdog. It is the imperative shell around the pure core: it reads
the clock, does the I/O, and feeds results into the registry.
"""

from __future__ import annotations

import contextlib
import grp
import math
import os
import pwd
import random
import signal
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.abc
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import __version__
from ..config import ConfigError, load_config
from ..control.api import ControlAPI, StateNotSaved
from ..control.server import (
    HTTPServer,
    Limits,
    Peer,
    SocketInUseError,
    create_tcp_listener,
    create_unix_listener,
    unix_listener_from_fd,
)
from ..core.health import needs_recheck
from ..core.model import Event, EventKind, ModelSpec, ProbeResult
from ..core.registry import ModelRegistry
from ..core.settings import Config
from ..persist.codec import StateShapeError, check_state_shape, from_state, to_state
from ..persist.store import StateError, StateLocked, StateStore
from ..probing.context import make_http_client
from ..probing.plugins import PluginError, collect_probes, get_plugin_manager, notify_observers
from ..probing.prober import Prober
from .logs import get_logger
from .metrics import Metrics
from .systemd import Notifier, listen_fds, status_line, watchdog_interval

EX_OK = 0
EX_CANTCREAT = 73  # the state or socket cannot be created/used
EX_TEMPFAIL = 75  # another instance holds the state lock or the socket
EX_CONFIG = 78

EVENT_BUFFER = 1024  # events a follower may lag behind before it is dropped
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates at most
GROUP_SLACK = 0.05  # seconds: models of one endpoint due this close together share a tick

#: [daemon] keys that only take effect on restart.
RESTART_KEYS = ("state_file", "socket", "socket_mode", "plugin_dirs", "metrics_listen",
                "log_format", "max_connections", "request_timeout")


class StartupError(Exception):
    """The daemon cannot start; ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def offline_from_env(environ: Mapping[str, str]) -> bool | None:
    """The value DAENA_OFFLINE_MODE forces (True/False), or None when unset or empty."""
    raw = environ.get("DAENA_OFFLINE_MODE", "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return None


def unknown_providers(config: Config, known: Mapping[str, Any]) -> list[str]:
    """Errors for models whose provider no loaded plugin serves, naming the key path."""
    names = ", ".join(sorted(known)) or "none"
    return [
        f"{config.path}: models[{i}].provider: no probe plugin named \"{spec.provider}\" "
        f"(loaded: {names})"
        for i, spec in enumerate(config.models)
        if spec.provider not in known
    ]


@dataclass(slots=True)
class WriteRecord:
    at: float | None = None
    ok: bool = True
    error: str = ""
    bytes: int = 0
    seconds: float = 0.0


class Daemon:
    """A running modeld: call ``await run()``; it returns the exit status."""

    def __init__(self, config: Config, *, environ: MutableMapping[str, str] | None = None,
                 log: Any = None) -> None:
        self.config = config
        self.config_path = config.path
        self.environ = environ if environ is not None else os.environ
        self.log = log if log is not None else get_logger("modeld")
        self.notifier = Notifier.from_env(self.environ)
        self.store = StateStore(config.daemon.state_file)
        forced = offline_from_env(self.environ)
        self.offline_forced_by_env = forced is not None
        self._offline_override = forced
        self.metrics = Metrics(lambda: self.registry)
        self.registry: ModelRegistry = ModelRegistry(config, time.time())
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()
        self._write_lock = anyio.Lock()
        self._reload_lock = anyio.Lock()
        self._saved_version = -1
        self._next_due: dict[str, float] = {}
        self._reschedule = anyio.Event()
        self._stop = anyio.Event()
        self.last_write = WriteRecord()
        self._persisted_decisions = 0
        self._status_dirty = False
        self._admin_gid_for: str | None = None
        self._admin_gid_cached: int | None = None
        self.probes_total = 0
        self.last_probe_at: float | None = None
        self.api = ControlAPI(self, self.log.bind(component="api"))
        limits = Limits(max_connections=config.daemon.max_connections,
                        read_timeout=config.daemon.request_timeout)
        self.server = HTTPServer(self.api.handle, limits, self.log.bind(component="http"))
        self.metrics_server = HTTPServer(self.api.handle_metrics_only,
                                         Limits(max_connections=64),
                                         self.log.bind(component="metrics"))
        self.pm: Any = None
        self.prober: Prober | None = None
        self.client: httpx.AsyncClient | None = None
        self.socket_path = config.daemon.socket

    # ------------------------------------------------------------------ services for the API

    def now(self) -> float:
        return time.time()

    def admin_check(self, peer: Peer | None) -> str | None:
        """None when the peer may change things, else why it may not."""
        if peer is None:
            return "requests over TCP may only read"
        if peer.uid in (0, os.getuid()):
            return None
        group = self.config.daemon.admin_group
        if not group:
            return (f"uid {peer.uid} is neither root nor the daemon's uid ({os.getuid()}) "
                    "and no admin_group is configured")
        gid = self._admin_gid()
        if gid is None:
            return f'uid {peer.uid} is not root and admin group "{group}" does not exist'
        if gid in _peer_groups(peer):
            return None
        return (f"uid {peer.uid} is neither root, the daemon's uid ({os.getuid()}), "
                f'nor a member of group "{group}"')

    def _admin_gid(self) -> int | None:
        """The admin group's gid, looked up once per start or reload (an NSS lookup may go to
        LDAP; it must not run on the event loop for every request)."""
        group = self.config.daemon.admin_group
        if self._admin_gid_for != group:
            try:
                self._admin_gid_cached = grp.getgrnam(group).gr_gid
            except KeyError:
                self._admin_gid_cached = None
            self._admin_gid_for = group
        return self._admin_gid_cached

    async def persist(self) -> None:
        """Write the state durably if it changed; raises StateNotSaved when the write fails."""
        async with self._write_lock:
            version = self.registry.version
            if version == self._saved_version:
                return
            # the snapshot is taken on the loop (registry operations are atomic there); the
            # encoding and the write happen in a worker thread, and both are timed
            started = time.perf_counter()
            snapshot = to_state(self.registry)
            try:
                size = await anyio.to_thread.run_sync(self.store.write, snapshot)
            except Exception as exc:  # OSError (disk), or anything the encoder refuses
                reason = (exc.strerror if isinstance(exc, OSError) else None) or repr(exc)
                self.last_write = WriteRecord(time.time(), False, reason)
                self.metrics.state_write_failures.inc()
                self.log.error("state_write_failed", path=str(self.store.path), error=reason,
                               errno=getattr(exc, "errno", None))
                raise StateNotSaved(reason) from None
            seconds = time.perf_counter() - started
            if not self.last_write.ok:
                self.log.info("state_write_recovered", path=str(self.store.path))
            self.last_write = WriteRecord(time.time(), True, "", size, seconds)
            self.metrics.state_write_seconds.observe(seconds)
            self._saved_version = version

    async def evaluate(self, model_id: str) -> ProbeResult:
        """Probe one model now and fold the result in."""
        spec = self.registry.entry(model_id).spec
        assert self.prober is not None
        result = await self.prober.run(spec)
        self._apply(spec, result)
        return result

    async def reload(self, actor: str = "signal") -> dict[str, Any]:
        """Re-read the configuration. Raises ConfigError, keeping the old one, when the new
        one is invalid; StateNotSaved when it took effect but could not be written."""
        async with self._reload_lock:
            self.notifier.reloading("reloading configuration")
            try:
                return await self._reload(actor)
            finally:
                # whatever happened, systemd must not be left thinking we are reloading
                self.notifier.ready(self._status_line())

    async def _reload(self, actor: str) -> dict[str, Any]:
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
            errors = unknown_providers(new, self.prober.probes if self.prober else {})
            if errors:
                raise ConfigError(errors)
        except ConfigError as exc:
            self.log.error("config_reload_failed", path=self.config_path, actor=actor,
                           errors=exc.errors)
            raise
        except Exception as exc:  # a config that breaks the loader is a rejected config
            self.log.exception("config_reload_failed", path=self.config_path, actor=actor)
            raise ConfigError([f"{self.config_path}: cannot load: {exc!r}"]) from exc
        restart = [f"daemon.{key}" for key in RESTART_KEYS
                   if getattr(new.daemon, key) != getattr(self.config.daemon, key)]
        if new.probe.max_concurrent != self.config.probe.max_concurrent:
            # the HTTP client's connection pool is sized at start; keep the limiter matching
            restart.append("probe.max_concurrent")
            new = replace(new, probe=replace(new.probe,
                                             max_concurrent=self.config.probe.max_concurrent))
        diff = self.registry.apply_config(new, time.time(), actor=actor)
        self.config = new
        self._admin_gid_for = None  # look the admin group up again: it may have been created
        if self.prober is not None:
            self.prober.config = new.probe
        for model_id in diff.removed:
            self._next_due.pop(model_id, None)
        self._reschedule.set()
        self.log.info("config_reloaded", path=self.config_path, actor=actor,
                      added=list(diff.added), removed=list(diff.removed),
                      changed=list(diff.changed), restart_required=restart)
        await self.persist()  # a reload is a decision: durable before it is acknowledged
        return {"added": list(diff.added), "removed": list(diff.removed),
                "changed": list(diff.changed), "restart_required": restart}

    def status(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "config_path": self.config_path,
            "state_file": str(self.store.path),
            "socket": self.socket_path,
            "models": len(registry.models),
            "health": registry.health_counts(),
            "roles": {name: state.primary for name, state in sorted(registry.roles.items())},
            "offline_mode": registry.offline_mode,
            "forced_by_env": self.offline_forced_by_env,
            "auto_execute": self.config.policy.auto_execute,
            "last_sweep": {"last_probe_at": self.last_probe_at, "probes_total": self.probes_total,
                           "requests_in_flight": self._requests_in_flight()},
            "last_state_write": {"at": self.last_write.at, "ok": self.last_write.ok,
                                 "error": self.last_write.error, "bytes": self.last_write.bytes,
                                 "seconds": round(self.last_write.seconds, 6)},
            "event_seq": registry.event_seq,
            "summary": self._status_line(),
        }

    def _requests_in_flight(self) -> int:
        return int(self.prober.limiter.borrowed_tokens) if self.prober is not None else 0

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    # ------------------------------------------------------------------ events

    def _on_event(self, event: Event) -> None:
        """Every registry event: log it, count it, tell observers and followers."""
        fields = {"role": event.role, "model_id": event.model_id, "from_id": event.from_id,
                  "to_id": event.to_id, **event.data}
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        self.log.info(event.kind.value, seq=event.seq, reason=event.reason, actor=event.actor,
                      **fields)
        if event.kind in (EventKind.MODEL_PROMOTED, EventKind.MODEL_ROLLED_BACK):
            automatic = "true" if event.actor == "policy" else "false"
            if event.kind is EventKind.MODEL_PROMOTED:
                self.metrics.promotions.labels(event.role, automatic).inc()
            else:
                self.metrics.rollbacks.labels(event.role, automatic).inc()
            if self.pm is not None:
                notify_observers(self.pm, "modeld_primary_changed", self.log, role=event.role,
                                 old=event.from_id or None, new=event.to_id, reason=event.reason)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                # a follower that stopped reading is cut off rather than allowed to stall us
                self._subscribers.discard(send)
                send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(send)

    def _status_line(self) -> str:
        return status_line(self.registry.health_counts(), self.registry.offline_mode)

    # ------------------------------------------------------------------ probing

    def _apply(self, spec: ModelSpec, result: ProbeResult) -> None:
        if spec.id not in self.registry.models:
            return  # removed by a reload while the probe ran
        self.probes_total += 1
        self.last_probe_at = time.time()
        self.metrics.probes.labels(spec.id, result.status.value).inc()
        if result.latency_ms is not None:
            self.metrics.probe_seconds.observe(result.latency_ms / 1000.0)
        applied = self.registry.apply_probe(spec.id, result, time.time())
        if applied.event is not None:
            self.metrics.health_changes.labels(applied.new.value).inc()
            if self.pm is not None:
                notify_observers(self.pm, "modeld_health_changed", self.log, spec=spec,
                                 old=applied.old, new=applied.new, result=result)
            # counted and sent by _status_updater: counting every model on every transition
            # made a start with 10,000 models quadratic
            self._status_dirty = True

    async def _probe(self, model_id: str, tick: float, jitter: float) -> None:
        entry = self.registry.models.get(model_id)
        if entry is None:
            return
        spec = entry.spec
        interval = spec.interval or self.config.probe.interval
        if not self.registry.eligible(entry):
            self.registry.mark_not_probed(model_id, "not probed: offline")
            self._next_due[model_id] = tick + interval * jitter
            return
        assert self.prober is not None
        # no limiter here: the prober bounds upstream requests (max_concurrent), and a probe
        # waiting on another's shared request must not hold a slot while it waits
        result = await self.prober.run(spec)
        self._apply(spec, result)
        changed_decisions = self.registry.decision_version
        entry = self.registry.models.get(model_id)
        if entry is None:
            return
        if needs_recheck(entry.health):
            self._next_due[model_id] = time.monotonic() + self.config.probe.recheck_interval
        else:
            self._next_due[model_id] = tick + interval * jitter
        if changed_decisions != self._persisted_decisions:
            await self._persist_decisions()

    async def _persist_decisions(self) -> None:
        """A probe triggered a decision (probation rollback): make it durable now."""
        self._persisted_decisions = self.registry.decision_version
        with contextlib.suppress(StateNotSaved):
            await self.persist()

    async def _group_loop(self, model_ids: list[str]) -> None:
        """Probe the models behind one endpoint on shared ticks, so their requests coalesce.

        A probe still running does not hold the others back: a deep probe or a long
        per-model timeout must not slow its neighbours' rechecks after a failure.
        """
        in_flight: set[str] = set()
        wake = anyio.Event()
        waiting_until = math.inf

        async def probe(model_id: str, tick: float, jitter: float) -> None:
            try:
                await self._probe(model_id, tick, jitter)
            finally:
                in_flight.discard(model_id)
                # wake the loop only when this model is due sooner than it planned to wake:
                # a sweep's models all finish due at the same time, and waking the loop for
                # each of them would rescan the group once per model
                if self._next_due.get(model_id, 0.0) < waiting_until:
                    wake.set()

        async with anyio.create_task_group() as tg:
            while True:
                wake = anyio.Event()
                tick = time.monotonic()
                due = [m for m in model_ids if m not in in_flight
                       and self._next_due.get(m, 0.0) <= tick + GROUP_SLACK]
                if due:
                    jitter = random.uniform(0.9, 1.1)
                    for model_id in due:
                        in_flight.add(model_id)
                        tg.start_soon(probe, model_id, tick, jitter)
                waiting_until = min((self._next_due.get(m, tick) for m in model_ids
                                     if m not in in_flight), default=math.inf)
                with anyio.move_on_after(max(waiting_until - time.monotonic(), 0.0)):
                    await wake.wait()

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for model_id, entry in self.registry.models.items():
            groups.setdefault(entry.spec.endpoint_key, []).append(model_id)
        return groups

    async def _scheduler(self) -> None:
        """Run one loop per endpoint; start over with the new groups after a reload."""
        while True:
            self._reschedule = anyio.Event()
            async with anyio.create_task_group() as tg:
                for model_ids in self._groups().values():
                    tg.start_soon(self._group_loop, model_ids)
                await self._reschedule.wait()
                tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ timers

    async def _policy_timer(self) -> None:
        while True:
            await anyio.sleep(self.config.policy.interval)
            self.policy_tick()
            await self._persist_quietly()

    def policy_tick(self) -> None:
        """Check for upgrades; with auto_execute, act (cooldown per role)."""
        now = time.time()
        suggestions = self.registry.auto_upgrade_check(now)
        self.registry.note_suggestions(suggestions, now)
        if self.config.policy.auto_execute and suggestions:
            self.registry.auto_upgrade_execute(now, actor="policy")

    async def _persist_quietly(self) -> None:
        with contextlib.suppress(StateNotSaved):
            await self.persist()

    async def _flusher(self) -> None:
        while True:
            await anyio.sleep(self.config.daemon.state_flush_interval)
            if self.registry.version != self._saved_version:
                await self._persist_quietly()

    async def _status_updater(self) -> None:
        """Send systemd's STATUS= line when health changed, at most once a second."""
        while True:
            await anyio.sleep(STATUS_INTERVAL)
            if self._status_dirty:
                self._status_dirty = False
                self.notifier.status(self._status_line())

    async def _watchdog(self, interval: float) -> None:
        # sent from the event loop itself, so a loop that is stuck stops the pings
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    async def _signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Handle signals for the daemon's whole life, shutdown and final flush included: a
        second SIGTERM must not skip the flush, one during start-up must not kill us."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if self._stop.is_set():
                    self.log.info("signal_ignored", signal=signal.Signals(signum).name,
                                  reason="already stopping")
                elif signum == signal.SIGHUP:
                    # failures are logged by reload(); a signal has nobody to answer to
                    with contextlib.suppress(ConfigError, StateNotSaved):
                        await self.reload(actor="SIGHUP")
                else:
                    self.log.info("stop_requested", signal=signal.Signals(signum).name)
                    self._stop.set()

    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Begin a clean shutdown (as SIGTERM does)."""
        self._stop.set()

    # ------------------------------------------------------------------ start and stop

    def _load_state(self) -> None:
        try:
            self.store.check_writable()
            self.store.lock()
        except StateLocked as exc:
            raise StartupError(str(exc), EX_TEMPFAIL) from None
        except StateError as exc:
            raise StartupError(str(exc), EX_CANTCREAT) from None
        try:
            stale = self.store.remove_stale_temps()
        except OSError as exc:
            self.log.warning("state_temp_cleanup_failed", path=str(self.store.path),
                             error=exc.strerror or str(exc))
        else:
            if stale:
                self.log.warning("state_temp_removed", path=str(self.store.path), files=stale)
        try:
            loaded = self.store.load()
        except StateError as exc:
            raise StartupError(str(exc), EX_CANTCREAT) from None
        if loaded.corrupt_copy:
            self.log.error("state_corrupt", path=str(self.store.path), problem=loaded.problem,
                           kept_as=loaded.corrupt_copy, action="starting from fresh state")
        now = time.time()
        if loaded.data is None:
            self.registry = ModelRegistry(self.config, now,
                                          offline_mode=bool(self._offline_override))
            self.log.info("state_fresh", path=str(self.store.path))
        else:
            try:
                problems = check_state_shape(loaded.data)
                if problems:
                    raise StateShapeError("; ".join(problems[:5]))
                self.registry = from_state(
                    self.config, loaded.data, now, offline_override=self._offline_override)
            except StateShapeError as exc:
                aside = self.store.set_aside(str(exc))
                self.log.error("state_corrupt", path=str(self.store.path), problem=str(exc),
                               kept_as=aside.corrupt_copy, action="starting from fresh state")
                self.registry = ModelRegistry(self.config, now,
                                              offline_mode=bool(self._offline_override))
            else:
                self.log.info("state_loaded", path=str(self.store.path),
                              models=len(self.registry.models), migrated_from=loaded.migrated_from)
        if self.offline_forced_by_env:
            self.log.info("offline_mode_forced", enabled=self.registry.offline_mode,
                          by="DAENA_OFFLINE_MODE")
        self.registry.listeners.append(self._on_event)
        self._persisted_decisions = self.registry.decision_version

    def _load_plugins(self) -> None:
        try:
            self.pm = get_plugin_manager(self.config.daemon.plugin_dirs, log=self.log)
            probes = collect_probes(self.pm, self.log)
        except PluginError as exc:
            raise StartupError(f"plugins: {exc}", EX_CONFIG) from None
        errors = unknown_providers(self.config, probes)
        if errors:
            raise StartupError("\n".join(errors), EX_CONFIG)
        self.client = make_http_client(self.config.probe)
        self.prober = Prober(probes, self.client, self.config.probe,
                             self.log.bind(component="prober"))

    async def _open_listener(self) -> anyio.abc.Listener[Any]:
        try:
            fds = listen_fds(self.environ)
        except ValueError as exc:
            raise StartupError(f"socket activation: {exc}", EX_CANTCREAT) from None
        if fds:
            try:
                listener = await unix_listener_from_fd(fds[0])
            except (OSError, ValueError) as exc:
                raise StartupError(f"socket activation: {exc}", EX_CANTCREAT) from None
            self.socket_path = listener.path
            self.log.info("socket_inherited", fd=fds[0], path=listener.path)
            return listener
        path = self.config.daemon.socket
        try:
            listener = await create_unix_listener(path, self.config.daemon.socket_mode)
        except SocketInUseError as exc:
            raise StartupError(f"control socket {path}: {exc}", EX_TEMPFAIL) from None
        except OSError as exc:
            hint = ""
            if not os.path.isdir(os.path.dirname(path) or "."):
                hint = " (its directory does not exist; systemd: RuntimeDirectory=modeld)"
            raise StartupError(f"control socket {path}: {exc.strerror or exc}{hint}",
                               EX_CANTCREAT) from None
        return listener

    async def _open_metrics_listener(self) -> anyio.abc.Listener[Any] | None:
        spec = self.config.daemon.metrics_listen
        if not spec:
            return None
        host, _, port = spec.rpartition(":")
        try:
            return await create_tcp_listener(host.strip("[]"), int(port))
        except OSError as exc:
            raise StartupError(f"metrics_listen {spec}: {exc.strerror or exc}",
                               EX_CANTCREAT) from None

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; returns the exit status."""
        try:
            self._load_plugins()
            self._load_state()
        except StartupError as exc:
            self.log.error("startup_failed", error=str(exc), exit_code=exc.code)
            await self._close_client()
            self.store.unlock()
            return exc.code
        try:
            return await self._serve()
        finally:
            await self._close_client()
            self.store.unlock()

    async def _close_client(self) -> None:
        if self.client is not None:
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    async def _serve(self) -> int:
        try:
            listener = await self._open_listener()
            metrics_listener = await self._open_metrics_listener()
        except StartupError as exc:
            self.log.error("startup_failed", error=str(exc), exit_code=exc.code)
            return exc.code
        async with anyio.create_task_group() as root:
            await root.start(self._signals)
            await root.start(self.server.serve, listener)
            if metrics_listener is not None:
                await root.start(self.metrics_server.serve, metrics_listener)
            try:
                await self.persist()
            except StateNotSaved as exc:
                self.log.error("startup_failed", error=f"cannot write state: {exc}",
                               exit_code=EX_CANTCREAT)
                await self._shutdown_servers(0.0)
                root.cancel_scope.cancel()
                return EX_CANTCREAT
            async with anyio.create_task_group() as workers:
                workers.start_soon(self._scheduler)
                workers.start_soon(self._policy_timer)
                workers.start_soon(self._flusher)
                workers.start_soon(self._status_updater)
                watchdog = watchdog_interval(self.environ)
                if watchdog:
                    workers.start_soon(self._watchdog, watchdog)
                self.log.info("daemon_started", version=__version__, pid=os.getpid(),
                              socket=self.socket_path, state_file=str(self.store.path),
                              config=self.config_path, models=len(self.registry.models),
                              offline_mode=self.registry.offline_mode)
                self.notifier.ready(self._status_line())
                await self._stop.wait()
                self.notifier.stopping("stopping")
                workers.cancel_scope.cancel()
            await self._shutdown_servers(self.config.daemon.shutdown_grace)
            with anyio.CancelScope(shield=True):
                for subscriber in list(self._subscribers):
                    subscriber.close()
                try:
                    await self.persist()
                except StateNotSaved:
                    self.log.error("final_flush_failed", path=str(self.store.path))
            root.cancel_scope.cancel()
        self.log.info("daemon_stopped", probes_total=self.probes_total)
        return EX_OK

    async def _shutdown_servers(self, grace: float) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.server.shutdown, grace)
                tg.start_soon(self.metrics_server.shutdown, min(grace, 1.0))


def _peer_groups(peer: Peer) -> set[int]:
    """The peer's groups: as the kernel recorded them at connect time (SO_PEERGROUPS), or,
    where it cannot say, from the group database for the peer's user."""
    groups = {peer.gid}
    if peer.groups is not None:
        return groups | set(peer.groups)
    try:
        user = pwd.getpwuid(peer.uid)
        groups.update(os.getgrouplist(user.pw_name, user.pw_gid))
    except KeyError:
        pass
    return groups
