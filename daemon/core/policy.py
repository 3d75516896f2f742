"""The auto-upgrade policy: which model should be a role's primary, and why, in numbers.

Pure functions of data and time. The registry gathers the facts; this module decides.

Three kinds of suggestion (DESIGN.md §3):

- **failover** (urgent): the primary is unavailable or missing. At once, whatever the margin,
  the cooldown or a hold. The model promoted stands in: the role's *preferred* primary stays.
- **failback**: the preferred primary is healthy again for ``min_consecutive_healthy`` probes
  and not quarantined, while a stand-in is primary. Not stopped by a hold (it returns to the
  operator's model); spaced by the cooldown from the previous failback (see the registry).
- **upgrade** (optional): a candidate beats the primary by ``min_margin`` and has done so at
  every evaluation for ``sustain``. Never while the role is held. The primary is judged on its
  health *since it recovered* (:func:`daemon.core.scoring.score_since_recovery`), so the
  failures of an outage it came back from do not count against it; candidates are judged on
  their whole window. The burden of proof is on the change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .model import HealthStatus
from .settings import PolicyConfig

FAILOVER = "failover"
FAILBACK = "failback"
UPGRADE = "upgrade"

_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Candidate:
    """The facts about one model of a role that the policy looks at. For the primary,
    ``score`` is its score on its health since it recovered and ``window_score`` its ordinary
    score (they differ while its window still holds an outage it came back from)."""

    id: str
    status: HealthStatus
    score: float
    consecutive_successes: int
    eligible: bool  # False for a remote model in offline mode
    window_score: float | None = None


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A promotion the policy recommends, with its reason."""

    role: str
    from_id: str | None
    to_id: str
    reason: str
    score_from: float
    score_to: float
    urgent: bool = False  # the primary is unavailable or missing: cooldown does not apply
    kind: str = UPGRADE  # failover | failback | upgrade

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "role": self.role,
            "from": self.from_id,
            "to": self.to_id,
            "reason": self.reason,
            "score_from": round(self.score_from, 6),
            "score_to": round(self.score_to, 6),
            "kind": self.kind,
            "urgent": self.urgent,
        }


@dataclass(frozen=True, slots=True)
class Leads:
    """Since when each candidate has led one primary by ``min_margin``, as last evaluated."""

    primary: str
    since: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def shifted(self, delta: float) -> Leads:
        """The same leads with every time moved by ``delta`` (a wall-clock step)."""
        return Leads(self.primary, MappingProxyType({k: v + delta for k, v in self.since.items()}))


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy makes of one role now: a suggestion or none, why in words, and the
    leads to remember for the next evaluation."""

    role: str
    suggestion: Suggestion | None
    why: str
    leads: Leads | None = None

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "suggested": self.suggestion is not None, "why": self.why}


def _not_candidate(m: Candidate, quarantined_until: Mapping[str, float], now: float,
                   config: PolicyConfig) -> str | None:
    """Why ``m`` is not a candidate, or None when it is."""
    if not m.eligible:
        return "remote, and offline mode is on"
    if m.status is not HealthStatus.HEALTHY:
        return f"{m.status.value}"
    if m.consecutive_successes < config.min_consecutive_healthy:
        return (f"{m.consecutive_successes} of {config.min_consecutive_healthy} successes in "
                "a row")
    until = quarantined_until.get(m.id, 0.0)
    if until > now:
        return f"quarantined for {until - now:.0f}s more"
    return None


def _evidence(best: Candidate) -> str:
    return (f"{best.id} is healthy with score {best.score:.3f} "
            f"({best.consecutive_successes} successes in a row)")


def decide(
    role: str,
    primary: Candidate | None,
    members: Sequence[Candidate],
    quarantined_until: Mapping[str, float],
    now: float,
    config: PolicyConfig,
    *,
    preferred: str | None = None,
    leads: Leads | None = None,
    held: str | None = None,
) -> Decision:
    """The policy's decision for one role.

    ``preferred`` is the role's preferred primary, ``leads`` what the last evaluation
    remembered, ``held`` a description of the operator's hold when one is in force.
    """
    others = [m for m in members if primary is None or m.id != primary.id]
    excluded = {m.id: _not_candidate(m, quarantined_until, now, config) for m in others}
    pool = [m for m in others if excluded[m.id] is None]
    # ties on score go to the alphabetically first id, deterministically
    pool.sort(key=lambda m: (-m.score, m.id))
    by_id = {m.id: m for m in pool}

    def none_left() -> str:
        if not others:
            return "no other model in the role"
        return "no candidate: " + "; ".join(f"{i} {why}" for i, why in sorted(excluded.items()))

    # -- urgent: the primary is missing or unavailable
    if primary is None or primary.status is HealthStatus.UNAVAILABLE:
        where = (f"role {role} has no primary" if primary is None
                 else f"primary {primary.id} is unavailable")
        if not pool:
            return Decision(role, None, f"{where}; {none_left()}")
        back = preferred is not None and preferred in by_id and config.failback
        best = by_id[preferred] if back and preferred is not None else pool[0]
        kind = FAILBACK if back else FAILOVER
        reason = (f"{where}; failing back to the preferred primary: {_evidence(best)}" if back
                  else f"{where}; {_evidence(best)}")
        return Decision(role, Suggestion(role, primary.id if primary else None, best.id, reason,
                                         primary.score if primary else 0.0, best.score,
                                         urgent=True, kind=kind), reason)

    # -- failback: a stand-in is primary and the preferred model is fit again
    why_not_back = ""
    if config.failback and preferred is not None and preferred != primary.id:
        if preferred in by_id:
            best = by_id[preferred]
            reason = (f"the preferred primary {preferred} is healthy again "
                      f"({best.consecutive_successes} successes in a row); {primary.id} stood "
                      "in for it")
            return Decision(role, Suggestion(role, primary.id, preferred, reason, primary.score,
                                             best.score, kind=FAILBACK), reason)
        if preferred in excluded:
            why_not_back = (f"no failback yet: the preferred primary {preferred} is "
                            f"{excluded[preferred]}; ")

    # -- optional upgrade
    if held is not None:
        return Decision(role, None, f"{why_not_back}role held {held}: no optional upgrade")
    if not pool:
        return Decision(role, None, why_not_back + none_left())
    best = pool[0]
    against = primary.score
    judged = f"primary {primary.id} scores {against:.3f}"
    if primary.window_score is not None and abs(primary.window_score - against) > 0.0005:
        judged += (f" on its health since it recovered ({primary.window_score:.3f} over its "
                   "whole window)")
    margin = best.score - against
    leading = [m for m in pool if m.score - against >= config.min_margin - 1e-12]
    if not leading:
        word = f"ahead by {margin:.3f}" if margin >= 0 else f"behind by {-margin:.3f}"
        return Decision(role, None, f"{why_not_back}best candidate {best.id} scores "
                        f"{best.score:.3f}, {judged}: {word} < min_margin "
                        f"{config.min_margin:.3f}")
    before = leads.since if leads is not None and leads.primary == primary.id else {}
    since = {m.id: before.get(m.id, now) for m in leading}
    kept = Leads(primary.id, MappingProxyType(since))
    sustained = [m for m in leading if now - since[m.id] >= config.sustain - _EPSILON]
    if not sustained:
        first = min(leading, key=lambda m: since[m.id])
        held_for = now - since[first.id]
        return Decision(role, None, f"{why_not_back}{first.id} leads {primary.id} by "
                        f"{first.score - against:.3f} ≥ min_margin {config.min_margin:.3f}, "
                        f"but not yet for sustain {config.sustain:g}s (for {held_for:.0f}s so "
                        "far)", kept)
    best = sustained[0]
    margin = best.score - against
    lasted = now - since[best.id]
    reason = (f"{best.id} scores {best.score:.3f}, {judged}: ahead by {margin:.3f} ≥ "
              f"min_margin {config.min_margin:.3f}"
              + (f", for {lasted:.0f}s ≥ sustain {config.sustain:g}s" if config.sustain else ""))
    return Decision(role, Suggestion(role, primary.id, best.id, reason, against, best.score),
                    reason, kept)


def suggest(
    role: str,
    primary: Candidate | None,
    members: Sequence[Candidate],
    quarantined_until: Mapping[str, float],
    now: float,
    config: PolicyConfig,
) -> Suggestion | None:
    """The promotion to suggest in one role with no memory of earlier evaluations, no
    preferred primary and no hold (:func:`decide` without its context), or None."""
    return decide(role, primary, members, quarantined_until, now, config).suggestion


def cooldown_remaining(last_auto_promotion_at: float | None, now: float,
                       config: PolicyConfig) -> float:
    """Seconds until the role may be promoted automatically again (0 when it may)."""
    if last_auto_promotion_at is None:
        return 0.0
    return max(0.0, last_auto_promotion_at + config.cooldown - now)


def in_probation(promoted_at: float | None, promoted_automatically: bool, now: float,
                 config: PolicyConfig) -> bool:
    """Whether a primary is still on probation: promoted automatically less than
    ``probation`` ago."""
    return (
        promoted_automatically
        and promoted_at is not None
        and now - promoted_at <= config.probation
    )
