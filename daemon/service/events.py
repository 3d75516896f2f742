"""Event fan-out: every registry event is logged, counted, told to the observer plugins and
pushed to the followers of ``GET /api/v1/events?follow=1``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..core.model import Event, EventKind
from ..probing.plugins import notify_observers
from .metrics import Metrics

EVENT_BUFFER = 1024  # events a follower may lag behind before it is dropped


class EventFanout:
    """The registry's listener: ``fanout(event)`` for each event, ``subscribe()`` to follow."""

    def __init__(self, log: Any, metrics: Metrics, plugins: Callable[[], Any]) -> None:
        self.log = log
        self.metrics = metrics
        self._plugins = plugins  # the plugin manager once loaded, else None
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """A stream of the events from now on, until the daemon drops or closes it."""
        send, receive = anyio.create_memory_object_stream[Event](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    def close_all(self) -> None:
        """End every follower's stream (at shutdown)."""
        for subscriber in list(self._subscribers):
            subscriber.close()

    def __call__(self, event: Event) -> None:
        """Every registry event: log it, count it, tell observers and followers."""
        log_event(self.log, event)
        if event.kind in (EventKind.MODEL_PROMOTED, EventKind.MODEL_ROLLED_BACK):
            # an operator's `upgrade execute` promotes as the policy would: the event says so
            automatic = "true" if event.data.get("automatic", event.actor == "policy") else "false"
            if event.kind is EventKind.MODEL_PROMOTED:
                self.metrics.promotions.labels(event.role, automatic).inc()
            else:
                self.metrics.rollbacks.labels(event.role, automatic).inc()
            pm = self._plugins()
            if pm is not None:
                notify_observers(pm, "modeld_primary_changed", self.log, role=event.role,
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


def log_level(event: Event) -> str:
    """The level an event is logged at: an outage (a model becoming unavailable, an automatic
    rollback) is a warning and a refused configuration an error, so ``journalctl -p warning``
    shows every one of them; the rest is info."""
    if event.kind is EventKind.HEALTH_CHANGED and event.data.get("new") == "unavailable":
        return "warning"
    if event.kind is EventKind.MODEL_ROLLED_BACK and event.actor == "policy":
        return "warning"
    if event.kind is EventKind.CONFIG_RELOAD_FAILED:
        return "error"
    return "info"


def log_event(log: Any, event: Event) -> None:
    """One log line for an event, with the event stream's own key names (``from``, ``to``)
    and figures rounded as a person reads them."""
    fields: dict[str, Any] = {"role": event.role, "model_id": event.model_id,
                              "from": event.from_id, "to": event.to_id}
    for key, value in event.data.items():
        fields[key] = _rounded(key, value)
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    getattr(log, log_level(event))(event.kind.value, seq=event.seq, reason=event.reason,
                                   actor=event.actor, **fields)


def _rounded(key: str, value: Any) -> Any:
    if isinstance(value, float) and not isinstance(value, bool):
        if key.endswith("_ms"):
            return round(value, 1)
        if key.startswith("score"):
            return round(value, 3)
    return value
