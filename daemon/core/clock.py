"""Time as the core is given it: a pure value, never read from a clock here.

The daemon passes an :class:`Instant`: the wall time (what people read and what the state file
keeps) and a reading of a clock that is never stepped (``CLOCK_BOOTTIME``: it also counts a
suspend, as a quarantine should). The registry keeps its times as wall time; when the two
readings drift apart — NTP stepped the wall clock — it shifts every stored time by the step,
so no duration (cooldown, probation, quarantine, hold, sustain) is stretched or cut by it.

A bare float is a wall time from a clock that never steps: the simulator's virtual clock and
the tests pass floats.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Drift between the two clocks below this is reading jitter, not a step (seconds).
STEP_TOLERANCE = 0.5


@dataclass(frozen=True, slots=True)
class Instant:
    """One moment, read from both clocks at once."""

    wall: float  # unix time
    steady: float  # seconds on a clock that is never stepped (any origin)

    @property
    def skew(self) -> float:
        """Wall minus steady: constant until the wall clock is stepped."""
        return self.wall - self.steady


Now = float | Instant


def wall_time(now: Now) -> float:
    """The wall time of ``now``."""
    return now.wall if isinstance(now, Instant) else float(now)
