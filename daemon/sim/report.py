"""``modeld simulate``'s text output: a timeline and a summary table, for people.

Times are offsets from the start of the trace (``+1:02:03.5``): a trace has no wall clock.
Every figure carries its unit; reasons are printed whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..control.text import duration, table
from .engine import Decision, HealthChange, OperatorStep, Report

_LABELS = {
    "model_promoted": "promoted",
    "model_rolled_back": "rolled back",
    "model_quarantined": "quarantined",
    "auto_upgrade_suggested": "suggested",
    "offline_mode_changed": "offline mode",
    "operator_refused": "refused",
    "role_held": "held",
    "role_released": "released",
}


def offset(seconds: float) -> str:
    """``+0:10:00``, ``+1:02:03.5``: an offset from the start of the trace."""
    tenths = round(seconds * 10)
    whole, tenth = divmod(tenths, 10)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    text = f"+{hours}:{minutes:02d}:{secs:02d}"
    return f"{text}.{tenth}" if tenth else text


def seconds_cell(seconds: float) -> str:
    """``6,540 s (1 h 49 min)``; below a minute, just the seconds."""
    exact = f"{seconds:.2f} s" if seconds < 10 and seconds != int(seconds) else \
        f"{seconds:,.0f} s"
    return exact if seconds < 60 else f"{exact} ({duration(seconds)})"


def _decision_row(decision: Decision) -> list[str]:
    label = _LABELS.get(decision.kind, decision.kind.replace("_", " "))
    if decision.from_id and decision.to_id:
        subject = f"{decision.from_id} → {decision.to_id}"
    else:
        subject = decision.to_id or decision.from_id or ""
    return [offset(decision.at), decision.role or "-", label, subject,
            f"{decision.reason} (by {decision.actor})"]


def _health_row(change: HealthChange) -> list[str]:
    why = "" if change.reason in ("", change.new) else f": {change.reason}"
    return [offset(change.at), change.role, "health", change.model,
            f"{change.old} → {change.new}{why}"]


def _operator_row(step: OperatorStep) -> list[str]:
    return [offset(step.at), step.role or "-", f"operator {step.action}", step.subject,
            step.outcome]


def timeline(report: Report, with_health: bool = True) -> str:
    """Decisions and (unless ``with_health`` is false) health changes, in time order."""
    rows: list[tuple[float, int, list[str]]] = []
    # a refused operator step is already on its operator row, and a suggestion acted on at
    # once is the promotion's own line (--json keeps both)
    acted = {(d.at, d.role, d.from_id, d.to_id) for d in report.decisions
             if d.kind == "model_promoted"}
    rows += [(d.at, 2, _decision_row(d)) for d in report.decisions
             if d.kind != "operator_refused" and not (
                 d.kind == "auto_upgrade_suggested"
                 and (d.at, d.role, d.from_id, d.to_id) in acted)]
    rows += [(o.at, 1, _operator_row(o)) for o in report.operator_steps]
    if with_health:
        rows += [(h.at, 0, _health_row(h)) for h in report.health_changes]
    rows.sort(key=lambda r: (r[0], r[1]))
    if not rows:
        return "  (nothing happened)"
    text = table(["time", "role", "what", "model", "why"], [r[2] for r in rows], indent="  ",
                 wrap_last=False)
    if with_health and report.health_changes_dropped:
        text += (f"\n  … and {report.health_changes_dropped:,} more health changes not shown "
                 "(every decision is)")
    return text


def summary(report: Report) -> str:
    """Per role: seconds on each primary (and share), primary changes, seconds with no usable
    model, the final primary."""
    if not report.roles:
        return "  (no roles: the configuration declares no models)"
    rows: list[list[str]] = []
    total = report.duration
    for name, role in report.roles.items():
        first = True
        items: Sequence[tuple[str, float]] = sorted(role.primary_seconds.items(),
                                                   key=lambda kv: (-kv[1], kv[0]))
        if not items:
            items = [("(no primary)", total)]
        for model_id, seconds in items:
            share = f"{100 * seconds / total:.1f} %" if total > 0 else "-"
            if first:
                rows.append([name, model_id, seconds_cell(seconds), share, str(role.changes),
                             seconds_cell(role.no_usable_seconds), role.final_primary or "none"])
                first = False
            else:
                rows.append(["", model_id, seconds_cell(seconds), share, "", "", ""])
    return table(["role", "primary", "time as primary", "share", "changes", "no usable model",
                  "final primary"], rows, indent="  ", wrap_last=False)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def render_text(report: Report, *, config_path: str, trace_path: str,
                with_health: bool = True) -> str:
    """The whole text report: a header, the timeline, the summary."""
    auto = "on" if report.auto_execute else "off (suggestions only)"
    head = (f"modeld simulate: {trace_path} with {config_path}\n"
            f"{seconds_cell(report.duration)} simulated: {_count(report.probes, 'probe')}, "
            f"{_count(report.policy_ticks, 'policy tick')}, auto_execute {auto}, "
            f"seed {report.seed}")
    return "\n".join([head, "", "Timeline (time from the start of the trace)",
                      timeline(report, with_health), "", "Summary", summary(report), ""])
