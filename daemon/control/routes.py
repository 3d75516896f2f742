"""The control API's routes, described once: the server dispatches on them, the Python client
and ``modelctl`` build their paths from them.

Standard library only, and nothing heavy: ``modelctl`` imports this on every start (a
NamedTuple, not a dataclass: ``dataclasses`` pulls in ``inspect``, a quarter of modelctl's
import time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple
from urllib.parse import quote, urlencode

API = "/api/v1"


class Route(NamedTuple):
    """One route: its name, method, path template (``{param}`` stands for one path segment),
    whether it changes the daemon (admin peers only) and what it does."""

    name: str
    method: str
    template: str
    admin: bool
    does: str

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.rstrip("/").split("/"))

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(s[1:-1] for s in self.segments if s.startswith("{"))

    def path(self, query: Iterable[tuple[str, str]] = (), /, **params: str) -> str:
        """The request path with ``params`` filled in (quoted) and an optional query."""
        missing = set(self.params) - set(params)
        if missing:
            raise TypeError(f"route {self.name} needs {', '.join(sorted(missing))}")
        path = self.template
        for name, value in params.items():
            path = path.replace("{" + name + "}", quote(value, safe=""))
        pairs = list(query)
        return path + (f"?{urlencode(pairs)}" if pairs else "")

    def match(self, path: str) -> dict[str, str] | None:
        """The params when ``path`` (trailing slash or not) is this route's, else None."""
        parts = (path.rstrip("/") or "/").split("/")
        segments = self.segments
        if len(parts) != len(segments):
            return None
        params = {}
        for part, segment in zip(parts, segments, strict=True):
            if segment.startswith("{"):
                if not part:
                    return None
                params[segment[1:-1]] = part
            elif part != segment:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("list_models", "GET", f"{API}/models/", False, "list the models"),
    Route("promote", "POST", f"{API}/models/promote", True,
          "make a model its role's primary"),
    Route("rollback", "POST", f"{API}/models/rollback", True, "undo a role's last promotion"),
    Route("upgrade_check", "POST", f"{API}/models/auto-upgrade/check", False,
          "what the policy suggests, changing nothing"),
    Route("upgrade_execute", "POST", f"{API}/models/auto-upgrade/execute", True,
          "act on the policy's suggestions now"),
    Route("set_offline", "POST", f"{API}/models/offline-mode", True,
          "turn offline mode on or off"),
    Route("offline_status", "GET", f"{API}/models/offline-mode/status", False,
          "whether offline mode is on"),
    Route("show", "GET", f"{API}/models/{{model_id}}", False,
          "one model, with score parts and recent probes"),
    Route("evaluate", "POST", f"{API}/models/{{model_id}}/evaluate", True,
          "probe a model now"),
    Route("report", "POST", f"{API}/models/{{model_id}}/report", False,
          "an application's outcome of a real request (body: ok, reason): a failure starts "
          "rechecks at once"),
    Route("resolve", "GET", f"{API}/resolve", False,
          "the model to use now and its fallback chain"),
    Route("events", "GET", f"{API}/events", False, "the event stream (NDJSON)"),
    Route("status", "GET", f"{API}/status", False, "the daemon's status"),
    Route("history", "GET", f"{API}/roles/{{role}}/history", False,
          "a role's audit trail: who was made primary when, why and by whom"),
    Route("hold", "POST", f"{API}/roles/{{role}}/hold", True,
          "hold a role against optional promotions (body: for, reason)"),
    Route("release", "POST", f"{API}/roles/{{role}}/release", True,
          "end the hold on a role"),
    Route("reload", "POST", f"{API}/reload", True, "re-read the configuration"),
    Route("metrics", "GET", "/metrics", False, "Prometheus metrics"),
)

BY_NAME: Mapping[str, Route] = {route.name: route for route in ROUTES}


def path(name: str, query: Iterable[tuple[str, str]] = (), /, **params: str) -> str:
    """The path of route ``name``: ``path("evaluate", model_id="qwen")``."""
    return BY_NAME[name].path(query, **params)


def match(request_path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
    """The routes at ``request_path`` by method, and the path's params; None when no route
    has that path. Routes without params win over templates (``/models/promote`` is not a
    model id)."""
    found: dict[str, Route] = {}
    found_params: dict[str, str] = {}
    for literal in (True, False):
        for route in ROUTES:
            if bool(route.params) == literal:
                continue
            params = route.match(request_path)
            if params is not None:
                found.setdefault(route.method, route)
                found_params = found_params or params
        if found:
            return found, found_params
    return None
