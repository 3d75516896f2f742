"""The OpenAI-compatible front door (DESIGN.md §6): one ``/v1`` base URL for applications,
routed by role along the resolve chain, failing over per request before the first byte, and
every failed attempt an observation for the model's health.

- :mod:`.routing`: which models a request may go to, in which order (pure).
- :mod:`.door`: :class:`Gateway`, the requests — authorization, limits, the attempts, the relay.
- :mod:`.server`: :class:`DoorServer`, HTTP/1.1 on h11 with streamed answers and hang-up
  detection.
- :mod:`.upstream`: :class:`UpstreamPool`, the client for upstreams (h11, keep-alive pool).
"""

from __future__ import annotations

from .door import Gateway, error_headers, make_upstream_client
from .routing import DoorError, choose, model_listing, routable, upstream_url
from .server import DoorRequest, DoorServer, Reply
from .upstream import TransportError, UpstreamPool

__all__ = [
    "DoorError",
    "DoorRequest",
    "DoorServer",
    "Gateway",
    "Reply",
    "TransportError",
    "UpstreamPool",
    "choose",
    "error_headers",
    "make_upstream_client",
    "model_listing",
    "refusal",
    "routable",
    "upstream_url",
]


def refusal(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of an error the server gives before the door sees the request."""
    error = DoorError(status, code, message)
    return error_headers(), error.body()
