"""The control API: routes → registry calls, JSON in and out, authorization.

The handler does no I/O of its own beyond what the daemon it is given does (probe now,
persist, reload). Every mutating route is refused with 403 unless the peer is an admin, and
is made durable before the reply is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..config import ConfigError, parse_duration
from ..core.clock import Instant
from ..core.model import Event, ProbeResult
from ..core.registry import ModelRegistry, NoUsableModel, RegistryError, UnknownRole
from . import routes
from .messages import HTTPError, Peer, Request, Response, StreamingResponse
from .routes import API
from .views import model_view, role_summary

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESOLVE_CACHE_SIZE = 256  # distinct (role, capabilities) questions remembered
MAX_BODY_TEXT = 1000  # characters of a string field of a request body (a reason, a model id)


class StateNotSaved(Exception):
    """A change is in effect in memory but could not be written to disk."""


class DaemonServices(Protocol):
    """What the API needs from the running daemon."""

    registry: ModelRegistry
    offline_forced_by_env: bool

    def now(self) -> float: ...

    def instant(self) -> Instant:
        """Now for the registry (wall and steady time)."""

    def admin_check(self, peer: Peer | None) -> str | None:
        """None when the peer may change things, else why not."""

    async def persist(self) -> None:
        """Write the state durably; raises StateNotSaved."""

    async def persist_decisions(self) -> None:
        """Return once every decision in effect is saved; raises StateNotSaved."""

    async def evaluate(self, model_id: str) -> ProbeResult: ...

    def observe(self, model_id: str, result: ProbeResult) -> None:
        """Fold in an outcome seen outside the probes; a failure starts rechecks at once."""

    def recheck_interval(self) -> float:
        """The probes' recheck interval now (seconds)."""

    async def reload(self, actor: str) -> dict[str, Any]:
        """Re-read the configuration; raises ConfigError."""

    def status(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...

    def subscribe(self) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Event]]: ...

    def stopping(self) -> bool:
        """Whether shutdown has begun (it ends every event stream)."""


Handler = Callable[["ControlAPI", Request, dict[str, str]],
                  Awaitable[Response | StreamingResponse]]


def actor_of(peer: Peer | None) -> str:
    """How a peer is named in events and logs."""
    if peer is None:
        return "tcp"
    return f"uid={peer.uid} pid={peer.pid}"


REPORT_BURST = 20  # reports a peer may send at once ...
REPORT_RATE = 5.0  # ... and then a second
REPORT_MODELS_KEPT = 4096
REPORT_PEERS_KEPT = 4096


class TokenBuckets:
    """A token bucket per key (a peer's uid): ``take`` spends one token, or says how many
    seconds until one is there. Memory is bounded: past ``REPORT_PEERS_KEPT`` keys the full
    buckets (peers quiet for a while) are forgotten."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self._buckets: dict[int, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: int) -> float:
        now = anyio.current_time()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= REPORT_PEERS_KEPT:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for k in full or list(self._buckets):
            del self._buckets[k]


def _body_object(request: Request, allowed: Mapping[str, tuple[type, ...]],
                 required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request's JSON object, with its keys and types checked (400/422 naming them)."""
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(422, "invalid_body", f"{request.method} {request.path} expects a JSON "
                        f"object, got {type(data).__name__}")
    for key, value in data.items():
        if key not in allowed:
            raise HTTPError(422, "invalid_body", f'unknown field "{key[:60]}" '
                            f"(expected: {', '.join(allowed) or 'none'})")
        kinds = allowed[key]
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            shown = value[:60] if isinstance(value, str) else value
            raise HTTPError(422, "invalid_body", f'field "{key}" must be {names}, '
                            f"got {json.dumps(shown)[:60]}")
        if isinstance(value, str) and len(value) > MAX_BODY_TEXT:
            # a reason is kept in the history and saved with every state write after it
            raise HTTPError(422, "invalid_body", f'field "{key}" is {len(value)} characters '
                            f"long; at most {MAX_BODY_TEXT}")
    for key in required:
        if key not in data:
            raise HTTPError(422, "invalid_body", f'field "{key}" is required')
    return data


def _registry_error(exc: RegistryError) -> HTTPError:
    extra = dict(exc.details)
    return HTTPError(exc.status, exc.code, exc.message, **extra)


class ControlAPI:
    """The request handler of the control socket (and, restricted, of the metrics port)."""

    def __init__(self, daemon: DaemonServices, log: Any) -> None:
        self.daemon = daemon
        self.log = log
        # resolve is the hot route (applications may ask on every request): its answer is
        # kept per (role, capabilities) until the registry's version moves
        self._resolved: dict[tuple[str, tuple[str, ...]], tuple[int, bytes]] = {}
        self._reports = TokenBuckets(REPORT_BURST, REPORT_RATE)
        self._reported_at: dict[str, float] = {}  # model id -> when a failure last counted

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: Request) -> Response | StreamingResponse:
        """Route a request from the control socket."""
        handler, params = self._match(request)
        try:
            return await handler(self, request, params)
        except RegistryError as exc:
            raise _registry_error(exc) from None

    async def handle_metrics_only(self, request: Request) -> Response | StreamingResponse:
        """The TCP listener's handler: ``GET /metrics`` and nothing else."""
        if request.path != "/metrics":
            raise HTTPError(404, "not_found", f"no route {request.path} here: this port serves "
                            "only GET /metrics; the control API is on the Unix socket")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", "/metrics allows GET only")
        return await self.metrics(request, {})

    def _match(self, request: Request) -> tuple[Handler, dict[str, str]]:
        path = request.path
        found = routes.match(path)
        if found is None:
            raise HTTPError(404, "not_found", f"no route {request.method} {path}; "
                            f"see GET {API}/status and the README for the routes")
        methods, params = found
        route = methods.get(request.method)
        if route is None and request.method == "HEAD":
            route = methods.get("GET")
        if route is None:
            allowed = ", ".join(sorted(methods))
            raise HTTPError(405, "method_not_allowed",
                            f"{path} allows {allowed}, not {request.method}", allow=allowed)
        return _HANDLERS[route.name], params

    def _require_admin(self, request: Request) -> str:
        why = self.daemon.admin_check(request.peer)
        actor = actor_of(request.peer)
        if why is not None:
            self.log.warning("request_forbidden", path=request.path, method=request.method,
                             peer=actor, reason=why)
            raise HTTPError(403, "forbidden", f"{request.method} {request.path} changes the "
                            f"daemon and needs an admin peer: {why}")
        return actor

    async def _persist(self) -> None:
        try:
            await self.daemon.persist()
        except StateNotSaved as exc:
            raise HTTPError(503, "state_write_failed", f"the change is in effect but could "
                            f"not be saved: {exc}; it will be retried") from None

    async def _confirm_saved(self) -> None:
        """For a request that changed nothing: succeed only once the decisions in effect,
        which its answer reports, are saved (a retry after a 503 is not acknowledged while
        the decision it retries is unsaved)."""
        try:
            await self.daemon.persist_decisions()
        except StateNotSaved as exc:
            raise HTTPError(503, "state_write_failed", f"nothing changed, but decisions in "
                            f"effect are not saved yet: {exc}; retry once the state can be "
                            "written") from None

    # ------------------------------------------------------------------ reads

    async def list_models(self, request: Request, params: dict[str, str]) -> Response:
        registry = self.daemon.registry
        return Response.json({
            "models": [model_view(registry, m) for m in registry.models],
            "offline_mode": registry.offline_mode,
            "roles": {name: role_summary(registry, name) for name in sorted(registry.roles)},
        })

    async def show(self, request: Request, params: dict[str, str]) -> Response:
        return Response.json(model_view(self.daemon.registry, params["model_id"], detail=True))

    async def offline_status(self, request: Request, params: dict[str, str]) -> Response:
        return Response.json({"offline_mode": self.daemon.registry.offline_mode,
                              "forced_by_env": self.daemon.offline_forced_by_env})

    async def resolve(self, request: Request, params: dict[str, str]) -> Response:
        role = request.query_one("role") or "default"
        capabilities = [tag.strip() for value in request.query.get("capability", [])
                        for tag in value.split(",") if tag.strip()]
        registry = self.daemon.registry
        key = (role, tuple(capabilities))
        cached = self._resolved.get(key)
        if cached is not None and cached[0] == registry.version:
            return Response(200, cached[1], "application/json")
        try:
            answer = registry.get_model_for_use(role, capabilities)
        except NoUsableModel as exc:
            raise HTTPError(503, exc.code, exc.message, reasons=exc.reasons) from None
        response = Response.json({
            "role": answer.role,
            "model_id": answer.model_id,
            "model": model_view(registry, answer.model_id),
            "fallbacks": list(answer.fallbacks),
        })
        if len(self._resolved) >= RESOLVE_CACHE_SIZE:
            self._resolved.clear()
        self._resolved[key] = (registry.version, response.body)
        return response

    async def status(self, request: Request, params: dict[str, str]) -> Response:
        return Response.json(self.daemon.status())

    async def history(self, request: Request, params: dict[str, str]) -> Response:
        registry = self.daemon.registry
        role = params["role"]
        state = registry.roles.get(role)
        if state is None:
            roles = ", ".join(sorted(registry.roles)) or "none"
            raise UnknownRole(f'no role "{role}" (roles: {roles})', role=role)
        entries = [entry.to_json() for entry in state.history]
        limit_raw = request.query_one("limit")
        if limit_raw is not None:
            if not limit_raw.isdigit() or int(limit_raw) < 1:
                raise HTTPError(400, "invalid_query", f"limit must be a whole number of entries, "
                                f'at least 1, got "{limit_raw[:40]}"')
            entries = entries[-int(limit_raw):]
        return Response.json({"role": role, "primary": state.primary, "history": entries})

    async def metrics(self, request: Request, params: dict[str, str]) -> Response:
        return Response(200, self.daemon.metrics_text(), METRICS_CONTENT_TYPE)

    async def events(
        self, request: Request, params: dict[str, str]
    ) -> Response | StreamingResponse:
        follow = (request.query_one("follow") or "0").lower() in ("1", "true", "yes")
        since_raw = request.query_one("since")
        since: int | None = None
        if since_raw is not None:
            try:
                since = int(since_raw)
            except ValueError:
                raise HTTPError(400, "invalid_query", f'since must be an event sequence number, '
                                f'got "{since_raw[:40]}"') from None
        registry = self.daemon.registry
        if not follow:
            events = registry.events_since(since if since is not None else 0)
            body = b"".join(_ndjson(e) for e in events)
            return Response(200, body, "application/x-ndjson")
        headers: list[tuple[str, str]] = []
        if since is None:
            # a follower without since sees only what comes next: say how to get what came before
            headers.append(("X-Modeld-Backlog", f"events up to seq {registry.event_seq} are not "
                            "replayed; add since=0 (or since=N) to get them first"))
        return StreamingResponse(self._follow(since), headers=headers)

    async def _follow(self, since: int | None) -> AsyncIterator[bytes]:
        async with self.daemon.subscribe() as receive:
            last = self.daemon.registry.event_seq
            if since is not None:
                replay = self.daemon.registry.events_since(since)
                if replay:
                    yield b"".join(_ndjson(e) for e in replay)
            delivered = last
            async for event in receive:
                if event.seq <= last:
                    continue  # emitted before the snapshot above: replayed or not wanted
                delivered = event.seq
                yield _ndjson(event)
            if not self.daemon.stopping():
                # the daemon cut this follower off for falling behind: say so, so the client
                # can reconnect with since= instead of silently missing events
                yield json.dumps({"kind": "stream_dropped", "last_seq": delivered,
                                  "reason": "the client fell too far behind; reconnect "
                                  f"with since={delivered}"}).encode() + b"\n"

    # ------------------------------------------------------------------ changes

    async def evaluate(self, request: Request, params: dict[str, str]) -> Response:
        self._require_admin(request)
        registry = self.daemon.registry
        model_id = params["model_id"]
        registry.entry(model_id)  # 404 before any probing
        result = await self.daemon.evaluate(model_id)
        await self._persist()
        view = model_view(registry, model_id, detail=True)
        return Response.json({"model_id": model_id, "result": result.to_json(),
                              "score": view["score"], "score_parts": view["score_parts"],
                              "health_status": view["health_status"], "model": view})

    async def report(self, request: Request, params: dict[str, str]) -> Response:
        """An application's outcome of a real request. Open to every peer that may read, so
        it is bounded twice: per peer (a token bucket) and per model (at most one counted
        failure a recheck interval). A reported failure is an observation that starts the
        rechecks at once; reports alone cannot outvote a server that answers those rechecks.
        A success is not an observation: generation time is not probe latency, and recovery
        is the probes' to confirm."""
        registry = self.daemon.registry
        model_id = params["model_id"]
        registry.entry(model_id)  # 404 naming the known ids
        data = _body_object(request, {"ok": (bool,), "reason": (str,)}, required=("ok",))
        actor = actor_of(request.peer)
        wait = self._reports.take(request.peer.uid if request.peer is not None else -1)
        if wait > 0:
            error = HTTPError(429, "rate_limited", f"too many reports from {actor}: at most "
                              f"{REPORT_BURST} at once and {REPORT_RATE:g} a second; retry "
                              f"in {wait:.1f} s")
            error.headers = (("Retry-After", str(max(1, math.ceil(wait)))),)
            raise error
        if data["ok"]:
            return Response.json({"model_id": model_id, "observed": False,
                                  "why": "a success is not an observation: the probes measure "
                                         "latency and confirm recovery"})
        now = anyio.current_time()
        last = self._reported_at.get(model_id)
        interval = self.daemon.recheck_interval()
        if last is not None and now - last < interval:
            return Response.json({"model_id": model_id, "observed": False,
                                  "why": f"a failure of {model_id} was counted "
                                         f"{now - last:.2f} s ago; its rechecks decide now "
                                         f"(one report a recheck interval, {interval:g} s)"})
        if len(self._reported_at) >= REPORT_MODELS_KEPT:
            self._reported_at.clear()
        self._reported_at[model_id] = now
        reason = str(data.get("reason") or "a request failed")
        self.daemon.observe(model_id, ProbeResult.failure(f"reported by {actor}: {reason}"))
        self.log.info("model_reported", model_id=model_id, peer=actor, reason=reason[:200])
        return Response.json({"model_id": model_id, "observed": True,
                              "health_status": registry.models[model_id].health.status.value})

    async def promote(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        body = _body_object(request, {"model_id": (str,), "force": (bool,),
                                      "reason": (str,)}, required=("model_id",))
        changes = self.daemon.registry.promote_model(
            body["model_id"], now=self.daemon.instant(), actor=actor,
            force=body.get("force", False), reason=body.get("reason", ""))
        return await self._changed(changes, actor)

    async def rollback(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        body = _body_object(request, {"role": (str, type(None)), "reason": (str,)})
        changes = self.daemon.registry.rollback_model(
            body.get("role"), now=self.daemon.instant(), actor=actor, reason=body.get("reason", ""))
        return await self._changed(changes, actor)

    async def upgrade_check(self, request: Request, params: dict[str, str]) -> Response:
        decisions = self.daemon.registry.auto_upgrade_decisions(self.daemon.instant())
        return Response.json({
            "suggestions": [d.suggestion.to_json() for d in decisions if d.suggestion],
            # per role: what the policy makes of it, and why nothing is suggested where
            # nothing is (within margin, lead not sustained yet, quarantined, held, ...)
            "roles": {d.role: d.to_json() for d in decisions},
        })

    async def upgrade_execute(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        changes = self.daemon.registry.auto_upgrade_execute(self.daemon.instant(), actor=actor,
                                                            respect_cooldown=False)
        return await self._changed(changes, actor)

    async def set_offline(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        body = _body_object(request, {"enabled": (bool,)}, required=("enabled",))
        registry = self.daemon.registry
        if registry.set_offline_mode(body["enabled"], now=self.daemon.instant(), actor=actor):
            await self._persist()  # the event listener logs the change
        else:
            await self._confirm_saved()
        return Response.json({"offline_mode": registry.offline_mode,
                              "forced_by_env": self.daemon.offline_forced_by_env})

    async def hold(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        body = _body_object(request, {"for": (str, int, float), "reason": (str,)})
        seconds: float | None = None
        if "for" in body:
            try:
                seconds = parse_duration(body["for"])
            except ValueError as exc:
                raise HTTPError(422, "invalid_body", f'field "for": {exc}') from None
        registry = self.daemon.registry
        hold = registry.hold_role(params["role"], now=self.daemon.instant(), actor=actor,
                                  reason=body.get("reason", ""), seconds=seconds)
        await self._persist()
        return Response.json({"role": params["role"], "hold": hold.to_json(),
                              "primary": registry.roles[params["role"]].primary})

    async def release(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        body = _body_object(request, {"reason": (str,)})
        ended = self.daemon.registry.release_role(params["role"], now=self.daemon.instant(),
                                                  actor=actor, reason=body.get("reason", ""))
        if ended is not None:
            await self._persist()
        else:
            await self._confirm_saved()  # nothing to release: still no 200 over unsaved state
        return Response.json({"role": params["role"], "released": ended is not None,
                              "hold": None if ended is None else ended.to_json()})

    async def reload(self, request: Request, params: dict[str, str]) -> Response:
        actor = self._require_admin(request)
        try:
            summary = await self.daemon.reload(actor)
        except ConfigError as exc:
            raise HTTPError(422, "config_invalid", "the new configuration was rejected; the "
                            "old one stays in effect", errors=exc.errors) from None
        except StateNotSaved as exc:
            raise HTTPError(503, "state_write_failed", f"the new configuration is in effect "
                            f"but the state could not be saved: {exc}; it will be retried"
                            ) from None
        return Response.json(summary)

    async def _changed(self, changes: list[Any], actor: str) -> Response:
        if changes:  # the daemon's event listener logs them and tells the observers
            await self._persist()
        else:
            await self._confirm_saved()
        return Response.json({"changes": [c.to_json() for c in changes]})


def _ndjson(event: Event) -> bytes:
    return json.dumps(event.to_json(), separators=(",", ":"), default=_default).encode() + b"\n"


def _default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


#: The handler of each route of :mod:`daemon.control.routes`, by route name.
_HANDLERS: dict[str, Handler] = {
    "list_models": ControlAPI.list_models,
    "promote": ControlAPI.promote,
    "report": ControlAPI.report,
    "rollback": ControlAPI.rollback,
    "upgrade_check": ControlAPI.upgrade_check,
    "upgrade_execute": ControlAPI.upgrade_execute,
    "set_offline": ControlAPI.set_offline,
    "offline_status": ControlAPI.offline_status,
    "show": ControlAPI.show,
    "evaluate": ControlAPI.evaluate,
    "resolve": ControlAPI.resolve,
    "events": ControlAPI.events,
    "status": ControlAPI.status,
    "history": ControlAPI.history,
    "hold": ControlAPI.hold,
    "release": ControlAPI.release,
    "reload": ControlAPI.reload,
    "metrics": ControlAPI.metrics,
}

__all__ = ["API", "ControlAPI", "DaemonServices", "StateNotSaved", "actor_of"]
