"""``modeld simulate``: the real core driven by a trace on a virtual clock (DESIGN.md §7)."""

from .engine import Decision, HealthChange, Report, RoleSummary, Simulation, simulate
from .trace import Behaviour, End, Operator, Step, TraceError, check_trace, parse_trace, read_trace

__all__ = [
    "Behaviour", "Decision", "End", "HealthChange", "Operator", "Report", "RoleSummary",
    "Simulation", "Step", "TraceError", "check_trace", "parse_trace", "read_trace", "simulate",
]
