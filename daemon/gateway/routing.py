"""Which models a front-door request may go to, in which order, and where they listen.

Plain functions of the registry: no I/O, so they are tested without sockets. A request's
``model`` names a **role** (its resolve chain, offline rules included) or a **model id** (that
model only); ``x-modeld-capabilities`` narrows a role to the models with those tags. Only
models with an HTTP server are routable: ``openai`` servers and Ollama (through its own
OpenAI-compatible ``/v1``); ``local_file`` models have no server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.model import ModelSpec
from ..core.registry import ModelEntry, ModelRegistry, NoUsableModel, UnknownRole

#: Providers whose servers speak the OpenAI API under ``/v1``.
ROUTABLE_PROVIDERS = frozenset({"openai", "ollama"})

#: The proxied routes: client path -> the path under the upstream's ``/v1`` base.
PROXIED = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
}


class DoorError(Exception):
    """An answer the door gives itself, OpenAI-shaped: ``{"error": {"message", "type",
    "code", ...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, *, kind: str = "",
                 headers: Sequence[tuple[str, str]] = (), **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind or _default_type(status)
        self.headers = tuple(headers)
        self.extra = extra

    def body(self) -> bytes:
        """The JSON document."""
        error = {"message": self.message, "type": self.kind, "param": None, "code": self.code,
                 **self.extra}
        # a lone surrogate (an upstream's "\ud800" quoted in a reason) is written as its
        # JSON escape instead of failing the whole answer
        return json.dumps({"error": error}, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "backslashreplace")


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def routable(spec: ModelSpec) -> bool:
    """Whether the door can send requests to this model (an HTTP server of the OpenAI API)."""
    return spec.provider in ROUTABLE_PROVIDERS and bool(spec.endpoint)


def upstream_url(spec: ModelSpec, path: str) -> str:
    """The upstream URL of a proxied route (``/chat/completions``) for ``spec``.

    OpenAI-compatible endpoints may be declared with or without their ``/v1``; Ollama's
    endpoint is the server's root, its OpenAI API lives under ``/v1``.
    """
    base = spec.endpoint.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + path


@dataclass(frozen=True, slots=True)
class Chain:
    """The models a request may try, in order, and what it asked for."""

    asked: str
    role: str | None  # None: the request named a model id
    model_ids: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it is not in the chain


def parse_capabilities(header: str | None) -> tuple[str, ...]:
    """``"code, long_context"`` as ``("code", "long_context")``."""
    if not header:
        return ()
    return tuple(dict.fromkeys(tag.strip() for tag in header.split(",") if tag.strip()))


def choose(registry: ModelRegistry, asked: str, capabilities: Sequence[str] = ()) -> Chain:
    """The chain for a request's ``model``; raises DoorError (404 unknown, 503 none usable).

    A role is looked up first (applications ask for ``"chat"``), then a model id.
    """
    if registry.role_members(asked):
        try:
            answer = registry.get_model_for_use(asked, capabilities)
        except NoUsableModel as exc:
            reasons = {m: why if routable(registry.models[m].spec) else
                       f"{_not_routable(registry.models[m].spec)}; {why}"
                       for m, why in exc.reasons.items()}
            raise _none_usable(asked, exc.message, reasons) from None
        except UnknownRole:  # pragma: no cover - role_members said it exists
            raise _unknown(registry, asked) from None
        skipped: dict[str, str] = {}
        chain = []
        for model_id in (answer.model_id, *answer.fallbacks):
            spec = registry.models[model_id].spec
            if routable(spec):
                chain.append(model_id)
            else:
                skipped[model_id] = _not_routable(spec)
        if not chain:
            raise _none_usable(asked, f'no routable model in role "{asked}"', skipped)
        return Chain(asked, asked, tuple(chain), skipped)
    entry = registry.models.get(asked)
    if entry is None:
        raise _unknown(registry, asked)
    if not routable(entry.spec):
        raise DoorError(404, "model_not_found",
                        f"The model `{asked}` has no server the front door could send requests "
                        f"to (provider {entry.spec.provider}); ask for a role or another model.")
    why = registry.unusable_reason(entry, capabilities)
    if why is not None:
        raise _none_usable(asked, f'model "{asked}" is not usable now', {asked: why})
    return Chain(asked, None, (asked,))


def _not_routable(spec: ModelSpec) -> str:
    return f"not routable: provider {spec.provider} has no server"


def _unknown(registry: ModelRegistry, asked: str) -> DoorError:
    roles = sorted(registry.roles)
    models = sorted(m for m, e in registry.models.items() if routable(e.spec))
    known = ", ".join([*roles, *models][:30]) or "none"
    if len(asked) > 128:  # an error never echoes a client's field whole (it may be megabytes)
        asked = asked[:128] + f"... ({len(asked)} characters)"
    return DoorError(404, "model_not_found",
                     f'The model `{asked}` does not exist: it is neither a role nor a model id '
                     f"of this modeld (roles and models: {known}).")


def _none_usable(asked: str, message: str, reasons: dict[str, str]) -> DoorError:
    detail = "; ".join(f"{m}: {why}" for m, why in reasons.items())
    return DoorError(503, "no_usable_model", f"{message} ({detail})" if detail else message,
                     headers=(("retry-after", "1"),), reasons=dict(reasons))


def model_listing(registry: ModelRegistry, created: int) -> dict[str, Any]:
    """``GET /v1/models``: every role, then every routable model, OpenAI-shaped, with the
    health in extra fields (clients that do not know them ignore them)."""
    data: list[dict[str, Any]] = []
    for role in sorted(registry.roles):
        data.append(role_entry(registry, role, created))
    for model_id in sorted(registry.models):
        entry = registry.models[model_id]
        if routable(entry.spec):
            data.append(model_entry(entry, created))
    return {"object": "list", "data": data}


def role_entry(registry: ModelRegistry, role: str, created: int) -> dict[str, Any]:
    """One role as a model of the listing."""
    try:
        chain = choose(registry, role)
    except DoorError as exc:
        return {"id": role, "object": "model", "created": created, "owned_by": "modeld",
                "kind": "role", "health_status": "unavailable", "serves": None,
                "fallbacks": [], "reasons": exc.extra.get("reasons", {})}
    first = registry.models[chain.model_ids[0]]
    return {"id": role, "object": "model", "created": created, "owned_by": "modeld",
            "kind": "role", "health_status": first.health.status.value,
            "serves": chain.model_ids[0], "fallbacks": list(chain.model_ids[1:])}


def model_entry(entry: ModelEntry, created: int) -> dict[str, Any]:
    """One model of the listing."""
    spec = entry.spec
    return {"id": spec.id, "object": "model", "created": created, "owned_by": "modeld",
            "kind": "model", "role": spec.role, "provider": spec.provider,
            "upstream_model": spec.upstream_name, "health_status": entry.health.status.value,
            "score": round(entry.score.total, 4), "capability_tags": list(spec.capability_tags)}
