"""An async Python client of modeld's control socket, for applications.

::

    async with ModeldClient() as modeld:
        answer = await modeld.resolve(role="chat")
        model_id, chain = answer["model_id"], answer["fallbacks"]
        async for event in modeld.events(follow=True):
            ...

Every method returns the daemon's JSON document as is (DESIGN.md §5 fixes the shapes).
Errors the daemon answers with raise ``ModeldError``; a daemon that cannot be reached raises
``ModeldUnreachable`` (a ``ModeldError`` with status 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any

import httpx

from . import routes

__all__ = ["DEFAULT_SOCKET", "ModeldClient", "ModeldError", "ModeldUnreachable"]

DEFAULT_SOCKET = "/run/modeld/control.sock"

_Params = list[tuple[str, str | int | float | bool | None]]


def _route(name: str, **params: str) -> tuple[str, str]:
    """The method and path of a control route (:mod:`daemon.control.routes`)."""
    route = routes.BY_NAME[name]
    return route.method, route.path(**params)


class ModeldError(Exception):
    """The daemon refused a request: HTTP ``status``, its error ``code`` and ``message``.

    ``details`` holds the error's other keys (``reasons`` for ``no_usable_model``, ...).
    """

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @classmethod
    def from_response(cls, status: int, body: bytes) -> ModeldError:
        """The error a response carries, tolerating bodies that are not the error document."""
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict):
            text = body.decode("utf-8", "replace").strip()[:500]
            return cls(status, "http_error", text or f"HTTP {status}")
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        return cls(status, str(error.get("code", "error")), str(error.get("message", "")), details)


class ModeldUnreachable(ModeldError):
    """The control socket could not be reached, or the connection broke."""

    def __init__(self, socket_path: str, cause: BaseException) -> None:
        super().__init__(
            0, "unreachable", f"cannot reach modeld at {socket_path}: {cause}", {"cause": cause}
        )


class ModeldClient:
    """A connection pool to the control socket at ``socket_path``; use as an async context."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.socket_path = socket_path or os.environ.get("MODELD_SOCKET") or DEFAULT_SOCKET
        self._http = httpx.AsyncClient(
            base_url="http://modeld",
            transport=transport or httpx.AsyncHTTPTransport(uds=self.socket_path),
            timeout=httpx.Timeout(timeout),
            headers={"Accept": "application/json"},
        )

    async def __aenter__(self) -> ModeldClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    # ------------------------------------------------------------------ plumbing

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: _Params | None = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(
                method, path, json=body if method == "POST" else None, params=params
            )
        except httpx.TransportError as exc:
            raise ModeldUnreachable(self.socket_path, exc) from exc
        if response.status_code >= 400:
            raise ModeldError.from_response(response.status_code, response.content)
        return response

    async def _json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: _Params | None = None,
    ) -> dict[str, Any]:
        response = await self._request(method, path, body=body, params=params)
        try:
            document = response.json()
        except ValueError as exc:
            raise ModeldError(
                response.status_code, "invalid_response", f"{method} {path}: not JSON: {exc}"
            ) from exc
        if not isinstance(document, dict):
            raise ModeldError(
                response.status_code, "invalid_response", f"{method} {path}: not a JSON object"
            )
        return document

    # ------------------------------------------------------------------ routes

    async def list_models(self) -> dict[str, Any]:
        """``{"models": [view, ...], "offline_mode": bool}``."""
        return await self._json(*_route("list_models"))

    async def get_model(self, model_id: str) -> dict[str, Any]:
        """One model's view, with score parts and recent probes."""
        return await self._json(*_route("show", model_id=model_id))

    async def evaluate(self, model_id: str) -> dict[str, Any]:
        """Probe ``model_id`` now; the result and its new score."""
        return await self._json(*_route("evaluate", model_id=model_id), body={})

    async def report(self, model_id: str, *, ok: bool, reason: str = "") -> dict[str, Any]:
        """Tell the daemon how a real request to ``model_id`` went. A failure is an
        observation that starts rechecks at once (``{"observed": true, ...}``); a success is
        acknowledged and not counted. Raises ModeldError 429 ``rate_limited`` past the
        per-peer budget."""
        body: dict[str, Any] = {"ok": ok}
        if reason:
            body["reason"] = reason
        return await self._json(*_route("report", model_id=model_id), body=body)

    async def promote(self, model_id: str, *, force: bool = False,
                      reason: str = "") -> dict[str, Any]:
        """Make ``model_id`` its role's primary; ``{"changes": [...]}``. ``reason`` goes into
        the role's history (default: "manual promotion by ...")."""
        body: dict[str, Any] = {"model_id": model_id}
        if force:
            body["force"] = True
        if reason:
            body["reason"] = reason
        return await self._json(*_route("promote"), body=body)

    async def rollback(self, role: str | None = None, *, reason: str = "") -> dict[str, Any]:
        """Restore ``role``'s previous primary; ``{"changes": [...]}``."""
        body: dict[str, Any] = {"role": role} if role else {}
        if reason:
            body["reason"] = reason
        return await self._json(*_route("rollback"), body=body)

    async def auto_upgrade_check(self) -> dict[str, Any]:
        """``{"suggestions": [...]}``; changes nothing."""
        return await self._json(*_route("upgrade_check"), body={})

    async def auto_upgrade_execute(self) -> dict[str, Any]:
        """Act on the suggestions now; ``{"changes": [...]}``."""
        return await self._json(*_route("upgrade_execute"), body={})

    async def set_offline_mode(self, enabled: bool) -> dict[str, Any]:
        """``{"offline_mode": bool, "forced_by_env": bool}`` after the change."""
        return await self._json(*_route("set_offline"), body={"enabled": enabled})

    async def offline_status(self) -> dict[str, Any]:
        """``{"offline_mode": bool, "forced_by_env": bool}``."""
        return await self._json(*_route("offline_status"))

    async def resolve(
        self, role: str | None = None, capabilities: Iterable[str] = ()
    ) -> dict[str, Any]:
        """``{"role", "model_id", "model", "fallbacks"}``; nothing usable → ModeldError 503."""
        params: _Params = [("role", role)] if role else []
        params.extend(("capability", tag) for tag in capabilities)
        return await self._json(*_route("resolve"), params=params)

    async def status(self) -> dict[str, Any]:
        """Version, uptime, config path, counts, last sweep."""
        return await self._json(*_route("status"))

    async def history(self, role: str, *, limit: int | None = None) -> dict[str, Any]:
        """``{"role", "primary", "history": [{"at", "action", "from", "to", "reason", "actor",
        ...}, ...]}``: the role's audit trail, oldest first (the last ``limit`` entries)."""
        params: _Params = [] if limit is None else [("limit", str(limit))]
        return await self._json(*_route("history", role=role), params=params)

    async def hold(self, role: str, *, duration: str | float | None = None,
                   reason: str = "") -> dict[str, Any]:
        """Hold ``role`` against optional promotions for ``duration`` ("2h", or seconds;
        default: the daemon's ``policy.manual_hold``); ``{"role", "hold", "primary"}``."""
        body: dict[str, Any] = {}
        if duration is not None:
            body["for"] = duration
        if reason:
            body["reason"] = reason
        return await self._json(*_route("hold", role=role), body=body)

    async def release(self, role: str, *, reason: str = "") -> dict[str, Any]:
        """End the hold on ``role``; ``{"role", "released": bool, "hold"}``."""
        return await self._json(*_route("release", role=role),
                                body={"reason": reason} if reason else {})

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration, as SIGHUP does."""
        return await self._json(*_route("reload"), body={})

    async def metrics(self) -> str:
        """The Prometheus exposition text."""
        response = await self._request(*_route("metrics"))
        return response.text

    async def events(
        self, follow: bool = False, since: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The events, oldest first; with ``follow`` it waits for new ones until closed.

        Ends when the daemon ends the stream (without ``follow``: after the replay; with it:
        when the daemon shuts down). A broken connection raises ``ModeldUnreachable``.
        """
        params: _Params = []
        if follow:
            params.append(("follow", "1"))
        if since is not None:
            params.append(("since", str(since)))
        # An event stream may be quiet for hours: no read timeout while following.
        timeout = httpx.Timeout(self._http.timeout.connect, read=None) if follow else None
        request = self._http.build_request(
            *_route("events"),
            params=params,
            timeout=timeout if timeout is not None else self._http.timeout,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ModeldUnreachable(self.socket_path, exc) from exc
        try:
            if response.status_code >= 400:
                raise ModeldError.from_response(response.status_code, await response.aread())
            try:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as exc:
                        raise ModeldError(
                            response.status_code, "invalid_response", f"bad event line: {exc}"
                        ) from exc
                    yield event
            except httpx.TransportError as exc:
                raise ModeldUnreachable(self.socket_path, exc) from exc
        finally:
            await response.aclose()
