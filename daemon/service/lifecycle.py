"""The daemon's life: start (plugins, state, listeners), serve until told to stop, stop
cleanly. One root task group holds everything that runs: the control server, the probe
scheduler, the timers and the signal handler. This is the imperative shell around the pure
core: it reads the clock, does the I/O and feeds results into the registry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.abc
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import __version__
from ..config import parse_listen
from ..control.api import ControlAPI, StateNotSaved
from ..control.auth import Authorizer
from ..control.listeners import (
    SocketInUseError,
    create_tcp_listener,
    create_unix_listener,
    unix_listener_from_fd,
)
from ..control.messages import Limits, Peer
from ..control.server import HTTPServer
from ..control.views import role_summary
from ..core.clock import Instant
from ..core.model import Event, ProbeResult
from ..core.registry import ModelRegistry
from ..core.settings import Config
from ..gateway import DoorServer, Gateway, UpstreamPool, make_upstream_client, refusal
from ..persist.codec import StateShapeError, check_state_shape, from_state
from ..persist.store import StateError, StateLocked, StateStore
from ..probing.context import make_http_client
from ..probing.plugins import (
    PluginError,
    collect_probes,
    get_plugin_manager,
    unknown_providers,
)
from ..probing.prober import Prober
from . import timers
from .clock import instant
from .events import EventFanout
from .logs import get_logger
from .metrics import Metrics
from .reload import reload
from .saving import StateSaver
from .scheduler import ProbeScheduler
from .systemd import Notifier, listen_fds, status_line, watchdog_interval

EX_OK = 0
EX_CANTCREAT = 73  # the state or socket cannot be created/used
EX_TEMPFAIL = 75  # another instance holds the state lock or the socket
EX_CONFIG = 78


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


def control_limits(config: Config) -> Limits:
    """The control socket's limits: [daemon] sizes it, [control] shares it out per peer."""
    control = config.control
    return Limits(max_connections=config.daemon.max_connections,
                  read_timeout=config.daemon.request_timeout,
                  keepalive_timeout=control.idle_timeout,
                  max_connections_per_peer=control.max_connections_per_peer,
                  admin_reserve=control.admin_reserve,
                  max_streams_per_peer=control.max_followers_per_peer)


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
        self._reload_lock = anyio.Lock()
        self._stop = anyio.Event()
        self.authorizer = Authorizer(config.daemon.admin_group)
        self.saver = StateSaver(self.store, lambda: self.registry, self.metrics, self.log)
        self.events = EventFanout(self.log, self.metrics, lambda: self.pm)
        self.scheduler = ProbeScheduler(self)
        self.api = ControlAPI(self, self.log.bind(component="api"))
        self.server = HTTPServer(self.api.handle, control_limits(config),
                                 self.log.bind(component="http"),
                                 is_admin=lambda peer: self.authorizer.check(peer) is None)
        self.metrics_server = HTTPServer(self.api.handle_metrics_only,
                                         Limits(max_connections=64),
                                         self.log.bind(component="metrics"))
        self.pm: Any = None
        self.prober: Prober | None = None
        # the front door (daemon/gateway/), built in _open_gateway when [gateway] listen is set
        self.gateway: Gateway | None = None
        self.door_server: DoorServer | None = None
        self.gateway_client: UpstreamPool | None = None
        self.client: httpx.AsyncClient | None = None
        self.socket_path = config.daemon.socket

    # ------------------------------------------------------------------ services for the API

    def now(self) -> float:
        return time.time()

    def instant(self) -> Instant:
        """Now for the registry: wall and steady time, so a step of the wall clock neither
        stretches nor cuts a cooldown, probation, quarantine, hold or sustain."""
        return instant()

    def admin_check(self, peer: Peer | None) -> str | None:
        """None when the peer may change things, else why it may not."""
        return self.authorizer.check(peer)

    async def persist(self) -> None:
        """Write the state durably if it changed; raises StateNotSaved when the write fails."""
        await self.saver.persist()

    async def persist_decisions(self) -> None:
        """Return once every decision in effect is saved; raises StateNotSaved."""
        await self.saver.persist_decisions()

    def observe(self, model_id: str, result: ProbeResult) -> None:
        """An outcome seen outside the probes (an application's report)."""
        self.scheduler.observe(model_id, result)

    def recheck_interval(self) -> float:
        return self.config.probe.recheck_interval

    async def evaluate(self, model_id: str) -> ProbeResult:
        """Probe one model now and fold the result in."""
        spec = self.registry.entry(model_id).spec
        assert self.prober is not None
        result = await self.prober.run(spec)
        self.scheduler.apply(spec, result)
        return result

    async def reload(self, actor: str = "signal") -> dict[str, Any]:
        """Re-read the configuration (:func:`daemon.service.reload.reload`)."""
        async with self._reload_lock:
            await self.notifier.reloading_reliably("reloading configuration")
            try:
                return await reload(self, actor)
            finally:
                # whatever happened, systemd must not be left thinking we are reloading
                # (unless we are stopping: STOPPING=1 has been said, or is about to be)
                if not self.stopping():
                    with anyio.CancelScope(shield=True):
                        await self.notifier.ready_reliably(self.status_line())

    def status(self) -> dict[str, Any]:
        registry = self.registry
        last_write = self.saver.last_write
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
            "role_details": {name: role_summary(registry, name)
                             for name in sorted(registry.roles)},
            "offline_mode": registry.offline_mode,
            "forced_by_env": self.offline_forced_by_env,
            "auto_execute": self.config.policy.auto_execute,
            "last_sweep": {"last_probe_at": self.scheduler.last_probe_at,
                           "probes_total": self.scheduler.probes_total,
                           "requests_in_flight": self._requests_in_flight()},
            "last_state_write": {"at": last_write.at, "ok": last_write.ok,
                                 "error": last_write.error, "bytes": last_write.bytes,
                                 "seconds": round(last_write.seconds, 6)},
            "event_seq": registry.event_seq,
            "gateway": ({"listen": self.config.gateway.listen,
                         "in_flight": self.gateway.in_flight,
                         "connections": self.door_server.connections}
                        if self.gateway is not None and self.door_server is not None
                        else None),
            "connections": {"open": self.server.connections, "in_flight": self.server.in_flight,
                            "by_uid": {str(uid): n for uid, n in sorted(
                                self.server.connections_by_peer().items(),
                                key=lambda item: -item[1])}},
            "summary": self.status_line(),
        }

    def _requests_in_flight(self) -> int:
        return int(self.prober.limiter.borrowed_tokens) if self.prober is not None else 0

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def subscribe(self) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Event]]:
        return self.events.subscribe()

    def status_line(self) -> str:
        return status_line(self.registry.health_counts(), self.registry.offline_mode)

    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stop.is_set()

    def stop(self) -> None:
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
        now = instant()
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
        self.registry.listeners.append(self.events)
        self.scheduler.note_decisions_saved()

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

    async def _open_gateway(self) -> anyio.abc.Listener[Any] | None:
        """The front door's listener (None when [gateway] listen is empty), its Gateway and
        server built; a door without its client key refuses to start (exit 78)."""
        config = self.config.gateway
        if not config.enabled:
            return None
        if config.clients_key_env and not self.environ.get(config.clients_key_env, "").strip():
            raise StartupError(
                f"gateway.clients_key_env: ${config.clients_key_env} is not set or empty, and "
                f"the front door ({config.listen}) would refuse every client; set it (systemd: "
                "Environment= or EnvironmentFile= in a drop-in)", EX_CONFIG)
        address = parse_listen(config.listen)
        try:
            if address.path:
                listener: anyio.abc.Listener[Any] = await create_unix_listener(
                    address.path, self.config.daemon.socket_mode)
            else:
                listener = await create_tcp_listener(address.host, address.port)
        except SocketInUseError as exc:
            raise StartupError(f"gateway.listen {config.listen}: {exc}", EX_TEMPFAIL) from None
        except OSError as exc:
            raise StartupError(f"gateway.listen {config.listen}: {exc.strerror or exc}",
                               EX_CANTCREAT) from None
        client = self.gateway_client = make_upstream_client()
        log = self.log.bind(component="gateway")
        self.gateway = Gateway(config=lambda: self.config.gateway, registry=lambda: self.registry,
                               observe=self.scheduler.observe,
                               recheck=self.scheduler.recheck, client=client,
                               log=log, metrics=self.metrics, environ=self.environ)
        self.door_server = DoorServer(
            self.gateway.handle, lambda: self.config.gateway.max_request_bytes, refusal, log,
            max_connections=lambda: max(1024, 4 * self.config.gateway.max_concurrent),
            admit=self.gateway.admit)
        return listener

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
        for client in (self.client, self.gateway_client):
            if client is not None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    async def _serve(self) -> int:
        try:
            listener = await self._open_listener()
            metrics_listener = await self._open_metrics_listener()
            gateway_listener = await self._open_gateway()
        except StartupError as exc:
            self.log.error("startup_failed", error=str(exc), exit_code=exc.code)
            return exc.code
        async with anyio.create_task_group() as root:
            await root.start(timers.signals, self)
            await root.start(self.server.serve, listener)
            if metrics_listener is not None:
                await root.start(self.metrics_server.serve, metrics_listener)
            if gateway_listener is not None and self.door_server is not None:
                await root.start(self.door_server.serve, gateway_listener)
            try:
                await self.persist()
            except StateNotSaved as exc:
                self.log.error("startup_failed",
                               error=f"cannot write state file {self.store.path}: {exc}",
                               exit_code=EX_CANTCREAT)
                await self._shutdown_servers(0.0)
                root.cancel_scope.cancel()
                return EX_CANTCREAT
            try:
                async with anyio.create_task_group() as workers:
                    workers.start_soon(self.scheduler.run)
                    workers.start_soon(timers.policy_timer, self)
                    workers.start_soon(timers.flusher, self)
                    workers.start_soon(timers.status_updater, self)
                    watchdog = watchdog_interval(self.environ)
                    if watchdog:
                        workers.start_soon(timers.watchdog, self, watchdog)
                    self.log.info("daemon_started", version=__version__, pid=os.getpid(),
                                  socket=self.socket_path, state_file=str(self.store.path),
                                  config=self.config_path, models=len(self.registry.models),
                                  offline_mode=self.registry.offline_mode,
                                  gateway=self.config.gateway.listen or None)
                    await self.notifier.ready_reliably(self.status_line())
                    await self._stop.wait()
                    workers.cancel_scope.cancel()
            except Exception:
                # a task crashed: a daemon bug. Say so, then stop as cleanly as a SIGTERM
                # would (below), and let the crash propagate (exit status 1)
                self.log.exception("daemon_crashed")
                self.stop()
                raise
            finally:
                # whatever ended the work, crash included: stop serving, then the final flush
                with anyio.CancelScope(shield=True):
                    await self.notifier.stopping_reliably("stopping")
                    await self._shutdown_servers(self.config.daemon.shutdown_grace)
                    self.events.close_all()
                    try:
                        await self.persist()
                    except StateNotSaved:
                        self.log.error("final_flush_failed", path=str(self.store.path))
                root.cancel_scope.cancel()
        self.log.info("daemon_stopped", probes_total=self.scheduler.probes_total)
        return EX_OK

    async def _shutdown_servers(self, grace: float) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.server.shutdown, grace)
                tg.start_soon(self.metrics_server.shutdown, min(grace, 1.0))
                if self.door_server is not None:
                    tg.start_soon(self.door_server.shutdown, grace)
