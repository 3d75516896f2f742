"""The probe scheduler: one loop per endpoint, every model probed on its interval (jittered),
re-probed at the recheck pace while its verdict is open, and each result folded into the
registry.

A probe still unanswered after ``recheck_interval`` (when the model usually answers in a
fraction of that, and the endpoint has answered no other probe since) does not hold the next
recheck back: the next one starts, with a request of its own, up to ``failure_threshold``
probes of one model in flight. A server that accepts and
never answers is so unavailable about ``timeout + (failure_threshold - 1) × recheck_interval``
after its first unanswered probe, not ``failure_threshold × (timeout + recheck_interval)``.

The rules (who is due on a tick, the jitter, the next due time, when a probe is overdue,
when the loop wakes) are :mod:`daemon.core.schedule`'s, the ones ``modeld simulate`` drives
on its virtual clock; this module keeps the clock, the tasks and the bookkeeping.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING

import anyio

from ..core import schedule
from ..core.health import needs_recheck
from ..core.model import ModelSpec, ProbeResult
from ..probing.limits import bounded_result
from ..probing.plugins import notify_observers

if TYPE_CHECKING:
    from .lifecycle import Daemon


class ProbeScheduler:
    """Keeps every model of ``daemon``'s registry probed; ``run()`` until cancelled."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.next_due: dict[str, float] = {}
        self.reschedule = anyio.Event()
        self.probes_total = 0
        self.last_probe_at: float | None = None
        self.health_changed = False  # since the last STATUS= line
        self._persisted_decisions = 0
        self._wakers: dict[str, anyio.Event] = {}  # endpoint key -> its loop's wake-up

    def forget(self, model_id: str) -> None:
        """Drop a model that a reload removed."""
        self.next_due.pop(model_id, None)

    def note_decisions_saved(self) -> None:
        """The registry's decisions so far are durable (at start, after loading the state)."""
        self._persisted_decisions = self.daemon.registry.decision_version

    def apply(self, spec: ModelSpec, result: ProbeResult) -> None:
        """Fold one probe result into the registry, with its metrics and observer calls."""
        daemon = self.daemon
        if spec.id not in daemon.registry.models:
            return  # removed by a reload while the probe ran
        self.probes_total += 1
        self.last_probe_at = time.time()
        daemon.metrics.probes.labels(spec.id, result.status.value).inc()
        if result.latency_ms is not None:
            daemon.metrics.probe_seconds.observe(result.latency_ms / 1000.0)
        applied = daemon.registry.apply_probe(spec.id, result, daemon.instant())
        if applied.event is not None:
            daemon.metrics.health_changes.labels(applied.new.value).inc()
            if daemon.pm is not None:
                notify_observers(daemon.pm, "modeld_health_changed", daemon.log, spec=spec,
                                 old=applied.old, new=applied.new, result=result)
            # counted and sent by the status timer: counting every model on every transition
            # made a start with 10,000 models quadratic
            self.health_changed = True

    def observe(self, model_id: str, result: ProbeResult) -> None:
        """Fold in an outcome seen outside the probes (a real request through the front door,
        or an application's report). A failure starts the rechecks at once, so the first
        failed request, not the next scheduled probe, moves the verdict for everyone."""
        entry = self.daemon.registry.models.get(model_id)
        if entry is None:
            return
        # held to the same bounds as a probe's result: its reason came from an upstream too
        result = bounded_result(result)
        self.apply(entry.spec, result)
        entry = self.daemon.registry.models.get(model_id)
        if entry is not None and not result.ok and needs_recheck(entry.health):
            self.recheck(model_id)

    def recheck(self, model_id: str) -> None:
        """Probe ``model_id`` at once, recording nothing: something outside the probes (a
        front-door request that timed out without saying whether the server is hung) wants
        the probes' verdict now."""
        entry = self.daemon.registry.models.get(model_id)
        if entry is None:
            return
        self.next_due[model_id] = time.monotonic()
        waker = self._wakers.get(entry.spec.endpoint_key)
        if waker is not None:
            waker.set()

    def overdue_after(self, model_id: str) -> float | None:
        """Seconds after which a probe of ``model_id`` still unanswered counts as hanging, so
        that the next recheck starts beside it; None when no recheck should start (the model
        is unavailable already: its rechecks wait for answers)."""
        entry = self.daemon.registry.models.get(model_id)
        if entry is None:
            return None
        return schedule.overdue_after(entry.spec, entry.health, self.daemon.config.probe)

    async def _probe(self, model_id: str, tick: float, jitter: float,
                     fresh_after: float | None = None) -> ProbeResult | None:
        daemon = self.daemon
        entry = daemon.registry.models.get(model_id)
        if entry is None:
            return None
        spec = entry.spec
        interval = schedule.probe_interval(spec, daemon.config.probe)
        if not daemon.registry.eligible(entry):
            daemon.registry.mark_not_probed(model_id, "not probed: offline")
            self.next_due[model_id] = schedule.next_due_not_probed(
                tick=tick, interval=interval, jitter=jitter)
            return None
        assert daemon.prober is not None
        # no limiter here: the prober bounds upstream requests (max_concurrent), and a probe
        # waiting on another's shared request must not hold a slot while it waits
        result = await daemon.prober.run(spec, fresh_after=fresh_after)
        self.apply(spec, result)
        changed_decisions = daemon.registry.decision_version
        entry = daemon.registry.models.get(model_id)
        if entry is None:
            return result
        self.next_due[model_id] = schedule.next_due_after_probe(
            entry.health, tick=tick, finished_at=time.monotonic(), interval=interval,
            jitter=jitter, recheck_interval=daemon.config.probe.recheck_interval)
        if changed_decisions != self._persisted_decisions:
            # a probe triggered a decision (probation rollback): make it durable now
            self._persisted_decisions = daemon.registry.decision_version
            await daemon.saver.persist_quietly()
        return result

    async def _group_loop(self, key: str, model_ids: list[str]) -> None:
        """Probe the models behind one endpoint on shared ticks, so their requests coalesce.

        A probe still running does not hold the others back: a deep probe or a long
        per-model timeout must not slow its neighbours' rechecks after a failure. Nor does it
        hold its own model's next recheck back once it is overdue (see :meth:`overdue_after`):
        up to ``failure_threshold`` probes of a model may be in flight, each later one with a
        request of its own (``fresh_after``), shared only by the rechecks of the same tick.
        """
        in_flight: dict[str, list[float]] = {}  # model id → start times of its probes
        wake = anyio.Event()
        waiting_until = math.inf
        most = schedule.max_in_flight(self.daemon.config.health)

        answered_at = -math.inf  # when a probe of this endpoint last succeeded
        # model id → when its probes began to go unanswered (its oldest probe since its last
        # success); an answer from the endpoint after that means the server is not hung
        unanswered_since: dict[str, float] = {}

        async def probe(model_id: str, tick: float, jitter: float,
                        fresh_after: float | None) -> None:
            nonlocal answered_at
            try:
                result = await self._probe(model_id, tick, jitter, fresh_after)
                if result is not None and result.ok:
                    answered_at = time.monotonic()
                    unanswered_since.pop(model_id, None)
            finally:
                starts = in_flight.get(model_id, [])
                if tick in starts:
                    starts.remove(tick)
                if not starts:
                    in_flight.pop(model_id, None)
                # wake the loop only when this model is due sooner than it planned to wake:
                # a sweep's models all finish due at the same time, and waking the loop for
                # each of them would rescan the group once per model
                if starts or self.next_due.get(model_id, 0.0) < waiting_until:
                    wake.set()

        hang_after: dict[str, float | None] = {}  # overdue_after, as of the sweep's launch
        registry = self.daemon.registry

        def overdue_at(model_id: str) -> float:
            """When ``model_id``'s newest probe in flight turns overdue (inf: never). Not
            when the endpoint answered another probe since this model's went unanswered: a
            probe slow because the loop is busy with a thousand models, or one model's stuck
            generation, is no hung server."""
            entry = registry.models.get(model_id)
            if entry is None:
                return math.inf
            return schedule.overdue_at(
                in_flight[model_id], hang_after.get(model_id), most, entry.health.status,
                unanswered_since=unanswered_since.get(model_id, math.inf),
                answered_at=answered_at)

        async with anyio.create_task_group() as tg:
            while True:
                wake = self._wakers[key] = anyio.Event()
                tick = time.monotonic()
                horizon = tick + schedule.GROUP_SLACK
                due = schedule.due_models(model_ids, self.next_due, in_flight, tick)
                overdue = [m for m in model_ids if m in in_flight and overdue_at(m) <= horizon]
                if due or overdue:
                    jitter = schedule.jitter_factor(random.random())
                    fresh_after = anyio.current_time()  # share no request begun before now
                    for model_id in due:
                        in_flight[model_id] = [tick]
                        hang_after[model_id] = self.overdue_after(model_id)
                        unanswered_since.setdefault(model_id, tick)
                        tg.start_soon(probe, model_id, tick, jitter, None)
                    for model_id in overdue:
                        in_flight[model_id].append(tick)
                        tg.start_soon(probe, model_id, tick, jitter, fresh_after)
                waiting_until = schedule.group_wake_at(
                    model_ids, self.next_due, in_flight, tick,
                    {m: overdue_at(m) for m in in_flight})
                with anyio.move_on_after(max(waiting_until - time.monotonic(), 0.0)):
                    await wake.wait()

    async def run(self) -> None:
        """Run one loop per endpoint; start over with the new groups after a reload."""
        while True:
            self.reschedule = anyio.Event()
            async with anyio.create_task_group() as tg:
                self._wakers.clear()
                groups = schedule.endpoint_groups(
                    entry.spec for entry in self.daemon.registry.models.values())
                for key, model_ids in groups.items():
                    tg.start_soon(self._group_loop, key, model_ids)
                await self.reschedule.wait()
                tg.cancel_scope.cancel()
