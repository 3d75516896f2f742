"""Saving the registry: a snapshot on the event loop, encoding and the atomic write in a worker
thread, one write at a time, each timed, counted and logged when it fails."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ..control.api import StateNotSaved
from ..core.registry import ModelRegistry
from ..persist.codec import to_state
from ..persist.store import StateStore
from .metrics import Metrics


@dataclass(slots=True)
class WriteRecord:
    """The last state write: when, whether it worked, why not, its size and duration."""

    at: float | None = None
    ok: bool = True
    error: str = ""
    bytes: int = 0
    seconds: float = 0.0


class StateSaver:
    """Writes the registry's state when it changed since the last write."""

    def __init__(self, store: StateStore, registry: Callable[[], ModelRegistry],
                 metrics: Metrics, log: Any) -> None:
        self.store = store
        self._registry = registry
        self.metrics = metrics
        self.log = log
        self.last_write = WriteRecord()
        self.saved_version = -1
        #: the registry's ``decision_version`` in the last successful write
        self.saved_decision_version = -1
        self._lock = anyio.Lock()

    @property
    def dirty(self) -> bool:
        """Whether the registry changed since the last successful write."""
        return self._registry().version != self.saved_version

    async def persist(self) -> None:
        """Write the state durably if it changed; raises StateNotSaved when the write fails."""
        async with self._lock:
            registry = self._registry()
            version = registry.version
            if version == self.saved_version:
                return
            # the snapshot is taken on the loop (registry operations are atomic there); the
            # encoding and the write happen in a worker thread, and both are timed
            started = time.perf_counter()
            decisions = registry.decision_version
            snapshot = to_state(registry)
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
            self.saved_version = version
            self.saved_decision_version = decisions

    async def persist_decisions(self) -> None:
        """Return once every decision in effect is saved, writing the state if one is not;
        raises StateNotSaved when that write fails.

        For requests that change nothing: their answer reports the state in effect, so it may
        only be a success once that state's decisions are durable (a retry after a failed
        write must not be acknowledged while the decision it retries is still unsaved).
        Observations alone do not make this write: they are checkpointed by the flusher.
        """
        if self._registry().decision_version != self.saved_decision_version:
            await self.persist()

    async def persist_quietly(self) -> None:
        """``persist`` for callers with nobody to answer to: a failure is logged only."""
        with contextlib.suppress(StateNotSaved):
            await self.persist()
