"""The auto-upgrade policy: which model should be a role's primary, and why, in numbers.

Pure functions of data and time. The registry gathers the facts; this module decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import HealthStatus
from .settings import PolicyConfig


@dataclass(frozen=True, slots=True)
class Candidate:
    """The facts about one model of a role that the policy looks at."""

    id: str
    status: HealthStatus
    score: float
    consecutive_successes: int
    eligible: bool  # False for a remote model in offline mode


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

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "role": self.role,
            "from": self.from_id,
            "to": self.to_id,
            "reason": self.reason,
            "score_from": round(self.score_from, 6),
            "score_to": round(self.score_to, 6),
        }


def suggest(
    role: str,
    primary: Candidate | None,
    members: Sequence[Candidate],
    quarantined_until: Mapping[str, float],
    now: float,
    config: PolicyConfig,
) -> Suggestion | None:
    """The promotion to suggest in one role, or None when the primary should stay.

    Candidates are healthy, eligible, not quarantined and have at least
    ``min_consecutive_healthy`` successes in a row. The best one is suggested when it beats the
    primary's score by ``min_margin``, or at once when the primary is unavailable or missing.
    """
    pool = [
        m
        for m in members
        if (primary is None or m.id != primary.id)
        and m.eligible
        and m.status is HealthStatus.HEALTHY
        and m.consecutive_successes >= config.min_consecutive_healthy
        and quarantined_until.get(m.id, 0.0) <= now
    ]
    if not pool:
        return None
    # ties on score go to the alphabetically first id, deterministically
    best = min(pool, key=lambda m: (-m.score, m.id))
    evidence = (
        f"{best.id} is healthy with score {best.score:.3f} "
        f"({best.consecutive_successes} successes in a row)"
    )
    if primary is None:
        return Suggestion(role, None, best.id, f"role {role} has no primary; {evidence}",
                          0.0, best.score, urgent=True)
    if primary.status is HealthStatus.UNAVAILABLE:
        return Suggestion(role, primary.id, best.id,
                          f"primary {primary.id} is unavailable; {evidence}",
                          primary.score, best.score, urgent=True)
    margin = best.score - primary.score
    if margin >= config.min_margin - 1e-12:
        return Suggestion(
            role, primary.id, best.id,
            f"{best.id} scores {best.score:.3f}, primary {primary.id} scores "
            f"{primary.score:.3f}: ahead by {margin:.3f} ≥ min_margin {config.min_margin:.3f}",
            primary.score, best.score,
        )
    return None


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
