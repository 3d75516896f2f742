"""The daemon's clock: the one place the registry's time is read (the core is given it)."""

from __future__ import annotations

import time

from ..core.clock import Instant

# CLOCK_BOOTTIME is never stepped and counts a suspend (a quarantine of one hour is over after
# an hour of sleep too); CLOCK_MONOTONIC where it does not exist
_STEADY_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def instant() -> Instant:
    """Now, on the wall clock and on the steady clock."""
    return Instant(time.time(), time.clock_gettime(_STEADY_CLOCK))
