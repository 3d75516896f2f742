"""Running one probe: deadlines, response caps, shared requests, and isolation from plugin bugs.

A probe plugin only answers "how is this model?"; everything that keeps a misbehaving plugin
or upstream from hurting the daemon lives here:

- the context a probe gets (:mod:`daemon.probing.context`) shares, caps and bounds its
  requests;
- :class:`Prober` runs a probe and always returns a :class:`~daemon.core.model.ProbeResult`: an
  unknown provider, a probe that raises, hangs or returns the wrong type all become failures
  with a reason. Only cancellation propagates.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import anyio
import httpx
import structlog

from ..core.model import ModelSpec, ProbeResult, ProbeStatus, finite_ms, json_safe
from ..core.settings import ProbeConfig
from .context import Log, Probe, ProbeContext, SingleFlight, Slots
from .limits import bounded_result
from .replies import UpstreamError, one_line

#: Extra time a probe gets beyond its own deadline, so that the deadline of a ``ctx`` request
#: (which ends exactly at the probe's deadline) fires first and gives a specific reason.
_GRACE_MAX = 0.25


class Prober:
    """Runs probes by provider name; ``run`` always returns a result.

    ``probes`` is a plain attribute so a reload can swap in a new mapping; in-flight probes
    keep the probe object they started with.
    """

    def __init__(
        self,
        probes: Mapping[str, Probe],
        client: httpx.AsyncClient,
        config: ProbeConfig,
        log: Log | None = None,
    ) -> None:
        self.probes: Mapping[str, Probe] = probes
        self.client = client
        self.config = config
        self.log: Log = log if log is not None else structlog.get_logger("modeld.prober")
        self.flights = SingleFlight()
        # At most max_concurrent requests go to the client at once, and at most a share of
        # them to one endpoint. httpx's pool could queue the rest itself, but its queue costs
        # O(waiting x connections) per request, which at a thousand endpoints starves the
        # event loop. Waiting probes that share a flight do not take a slot; time spent
        # waiting for one is not the probe's (see ProbeContext).
        self.slots = Slots(config.max_concurrent)
        self.limiter = self.slots.limiter

    async def run(self, spec: ModelSpec, *, deep: bool | None = None,
                  fresh_after: float | None = None) -> ProbeResult:
        """Probe ``spec`` once and return the verdict; never raises except on cancellation.

        ``fresh_after`` (anyio's clock): share no request that began at or before it, so a
        recheck of a server whose earlier probe hangs sends a request of its own.
        """
        started = time.perf_counter()
        ctx: ProbeContext | None = None

        def elapsed_ms() -> float:  # the probe's own time: not what it spent queued
            queued = ctx.queued if ctx is not None else 0.0
            return max(0.0, time.perf_counter() - started - queued) * 1000.0

        probe = self.probes.get(spec.provider)
        if probe is None:
            known = ", ".join(sorted(self.probes)) or "none"
            return ProbeResult.failure(
                f'no probe plugin registered for provider "{spec.provider}" (known: {known})',
                0.0,
            )
        timeout = spec.timeout or self.config.timeout
        log = self.log.bind(model_id=spec.id, provider=spec.provider)
        ctx = ProbeContext(
            self.client,
            timeout=timeout,
            deep=spec.deep if deep is None else deep,
            log=log,
            max_response_bytes=self.config.max_response_bytes,
            flights=self.flights,
            slots=self.slots,
            fresh_after=fresh_after,
        )
        grace = min(_GRACE_MAX, timeout * 0.1)
        result: Any = None
        with anyio.CancelScope(deadline=ctx.deadline + grace) as scope:

            def follow(deadline: float) -> None:  # the probe's clock stops while queued
                scope.deadline = deadline + grace

            ctx.on_deadline = follow
            try:
                result = await probe.probe(spec, ctx)
            except UpstreamError as exc:  # a probe may let ctx's errors through: fine
                result = ProbeResult.failure(exc.reason)
            except anyio.get_cancelled_exc_class():
                raise
            except (Exception, SystemExit) as exc:  # sys.exit() in a plugin is a plugin bug
                secrets = _secrets(spec)
                log.warning("probe_raised", error_type=type(exc).__name__,
                            error=_mask(str(exc)[:300], secrets))
                detail = one_line(str(exc), 200)
                result = ProbeResult.failure(
                    f"probe raised {type(exc).__name__}" + (f": {detail}" if detail else "")
                )
        if scope.cancelled_caught:
            result = ProbeResult.failure(ctx.timed_out_reason())
        if not isinstance(result, ProbeResult):
            result = ProbeResult.failure(
                f"probe returned {type(result).__name__}, not ProbeResult"
            )
        secrets = _secrets(spec)
        # bounded first (whatever a server sent, whatever a plugin built), masked on the way
        verdict = _normalised(bounded_result(result, lambda text: _mask(text, secrets)),
                              secrets)
        if verdict.latency_ms is None or scope.cancelled_caught:
            verdict = dataclasses.replace(verdict, latency_ms=elapsed_ms())
        return verdict


def _secrets(spec: ModelSpec) -> tuple[str, ...]:
    """The forms in which the model's API key could be echoed back: as is, stripped, and
    escaped the way Python and the HTTP layer quote bytes in error messages."""
    secret = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
    forms = {secret, secret.strip(), repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    # too short to search for without masking innocent text
    return tuple(sorted((f for f in forms if len(f) >= 4), key=len, reverse=True))


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _normalised(result: ProbeResult, secrets: tuple[str, ...]) -> ProbeResult:
    """``result`` as the rest of the daemon can rely on it, whatever a plugin built: a real
    status, a finite non-negative latency (or None), a one-line string reason and JSON-safe
    facts, with the model's API key masked should a probe have echoed it anywhere."""
    status = result.status
    if not isinstance(status, ProbeStatus):
        try:
            status = ProbeStatus(status)
        except ValueError:
            return ProbeResult.failure(
                f"probe returned a ProbeResult with an invalid status {one_line(repr(status))}"
            )
    raw_facts = result.facts if isinstance(result.facts, Mapping) else {}

    def masked(text: str) -> str:
        return _mask(text, secrets)

    return ProbeResult(
        status,
        finite_ms(result.latency_ms),
        masked(one_line(str(result.reason))),
        MappingProxyType({str(k): json_safe(v, masked) for k, v in raw_facts.items()}),
    )
