"""modelctl's text output: what a person reads at 3 a.m.

Local times with their age ("2026-11-26 07:17:03 (3 min ago)"), figures with their unit,
aligned tables, reasons wrapped to the terminal and never cut. ``--json`` bypasses all of this
and prints the daemon's raw values for scripts.

Standard library only and cheap to import: ``modelctl`` loads it on every start.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

#: Narrower than this, a wrapped column would be a ribbon of single words.
MIN_WRAP = 30

_UID_RE = re.compile(r"\buid=(\d+)")
_PEER_RE = re.compile(r"\buid=\d+(?: pid=\d+)?")


# ----------------------------------------------------------------------------- figures


def when(at: Any, now: float) -> str:
    """A unix time as a person reads it: local date and time, then how long ago (or how
    soon): ``2026-11-26 07:17:03 (3 min ago)``; "-" when there is none."""
    if isinstance(at, bool) or not isinstance(at, int | float) or at <= 0:
        return "-"
    return f"{clock(at)} ({relative(at, now)})"


def clock(at: float) -> str:
    """Local date and time to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def zone() -> str:
    """The local time zone's name, as times are shown in it."""
    return time.strftime("%Z") or "local time"


def relative(at: float, now: float) -> str:
    """``3 min ago``, ``in 52 min``, ``just now``."""
    delta = now - at
    if abs(delta) < 1:
        return "just now"
    span = duration(abs(delta), coarse=True)
    return f"{span} ago" if delta > 0 else f"in {span}"


def age(at: Any, now: float) -> str:
    """How long ago, alone (``3 min ago``); "-" when there is no time."""
    if isinstance(at, bool) or not isinstance(at, int | float) or at <= 0:
        return "-"
    return relative(at, now)


def duration(seconds: float, coarse: bool = False) -> str:
    """``45 s``, ``3 min``, ``2 h 5 min``, ``3 days 4 h``; ``coarse``: the largest unit only."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 or coarse else f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min" if coarse or minutes >= 10 else (
            f"{minutes} min {int(seconds % 60)} s" if int(seconds % 60) else f"{minutes} min")
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" if coarse or not minutes else f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} days" if coarse or not hours else f"{days} days {hours} h"


def ms(value: Any) -> str:
    """A latency in milliseconds with its unit: ``42 ms``, ``3.2 ms``, ``1.25 s``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def ms_number(value: Any) -> str:
    """A latency in milliseconds for a column whose header carries the unit: ``42``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def number(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return plain(value)
    return f"{value:.{digits}f}"


def size(value: Any) -> str:
    """A byte count: ``812 B``, ``6.5 KiB``, ``3.1 MiB``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value * 100:.0f}%"


def on_off(value: Any) -> str:
    return "on" if value else "off"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def plain(value: Any) -> str:
    """Any JSON value as one line of text."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, list | tuple):
        return ", ".join(plain(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    return str(value)


_USERS: dict[int, str | None] = {}


def user_name(uid: int) -> str | None:
    """The login name of ``uid`` on this host (None when it has none), looked up once."""
    if uid not in _USERS:
        import pwd  # only commands that show people pay for the lookup

        try:
            _USERS[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _USERS[uid] = None
    return _USERS[uid]


def humane(reason: Any) -> str:
    """A reason with the peers it names (``uid=0 pid=42``) named as people: ``root (uid 0)``."""
    return _PEER_RE.sub(lambda m: who(m.group(0)), plain(reason))


def who(actor: Any) -> str:
    """An actor as a person reads it: ``alice (uid 1000)`` for a peer (``uid=1000 pid=42``),
    else the actor's own name (``policy``, ``config``, ``SIGHUP``)."""
    text = str(actor or "")
    match = _UID_RE.search(text)
    if not match:
        return text or "-"
    uid = int(match.group(1))
    name = user_name(uid)
    return f"{name} (uid {uid})" if name else f"uid {uid} (no such user here)"


# ----------------------------------------------------------------------------- layout


def wrap(text: str, width: int | None) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` (words longer than that are
    kept whole: a path or URL is never cut); one line when ``width`` is None."""
    if width is None or len(text) <= width:
        return [text]
    import textwrap

    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None,
          indent: str = "", wrap_last: bool = True) -> str:
    """Columns aligned with two spaces between them. The last column is not padded; given a
    ``width`` it is wrapped to fit (continuation lines start under it), never cut; when too
    little room is left for it, each row's last cell goes on the lines below the row
    instead. ``wrap_last=False`` leaves short last cells (times, verdicts) whole."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    offset = len(indent) + sum(w + 2 for w in widths[:-1])
    room = None if width is None or not wrap_last else width - offset
    below = room is not None and room < MIN_WRAP and any(
        len(row[-1]) > room for row in rows)
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        if below:
            lines.append((indent + "  ".join(cells)).rstrip())
            assert width is not None
            lines.extend(f"{indent}    {line}" for line in wrap(row[-1], max(MIN_WRAP,
                                                                            width - 4)))
            continue
        last = wrap(row[-1], None if room is None else max(MIN_WRAP, room))
        lines.append((indent + "  ".join([*cells, last[0]])).rstrip())
        lines.extend((" " * offset + more).rstrip() for more in last[1:])
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]], width: int | None = None,
           indent: str = "") -> str:
    """``label: value`` lines, values aligned and wrapped under themselves."""
    if not pairs:
        return ""
    label_width = max(len(label) for label, _ in pairs) + 1
    offset = len(indent) + label_width + 1
    room = None if width is None else max(20, width - offset)
    lines = []
    for label, value in pairs:
        parts = wrap(value, room)
        lines.append(f"{indent}{(label + ':').ljust(label_width)} {parts[0]}".rstrip())
        lines.extend(" " * offset + more for more in parts[1:])
    return "\n".join(lines)


def note(text: str, width: int | None, indent: str = "") -> str:
    """A sentence wrapped to the terminal, continuation lines indented by two more spaces."""
    first, *rest = wrap(text, None if width is None else max(20, width - len(indent) - 2))
    return "\n".join([indent + first, *(indent + "  " + line for line in rest)])


# ----------------------------------------------------------------------------- generic


def _generic_value(key: str, value: Any, now: float) -> str:
    """A value whose meaning is known only from its key's name (keys other helpers add)."""
    if isinstance(value, bool):
        return plain(value)
    if isinstance(value, int | float):
        if key.endswith("_at") or key.endswith("_until") or key == "at":
            return when(value, now)
        if key.endswith("_ms"):
            return ms(value)
        if key.endswith("_seconds") or key.endswith("_s") or key == "seconds":
            return duration(value)
        if key.endswith("bytes"):
            return size(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "; ".join(plain(v) for v in value)
    return plain(value)


def flatten(document: Mapping[str, Any], now: float,
            prefix: str = "") -> Iterator[tuple[str, str]]:
    """``dotted.key: value`` pairs of a nested document, each value rendered by its key."""
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, now, f"{name}.")
        else:
            yield name, _generic_value(str(key), value, now)


def format_fields(document: Any, now: float | None = None, width: int | None = None) -> str:
    """Any document as aligned ``key: value`` lines, times and figures made readable."""
    now = time.time() if now is None else now
    if not isinstance(document, dict):
        return plain(document)
    pairs = list(flatten(document, now))
    return fields(pairs, width) if pairs else "ok"


def _rest(document: Mapping[str, Any], shown: set[str], now: float,
          width: int | None) -> str:
    """The keys of ``document`` not already shown (added by newer daemons), generically."""
    rest = {k: v for k, v in document.items() if k not in shown}
    return fields(list(flatten(rest, now)), width) if rest else ""


# ----------------------------------------------------------------------------- status


def health_counts(counts: Any) -> str:
    if not isinstance(counts, dict):
        return "-"
    order = ("healthy", "degraded", "unavailable", "unknown")
    names = [*order, *(k for k in counts if k not in order)]
    return ", ".join(f"{counts[k]} {k}" for k in names if k in counts)


def role_rows(document: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]
               ) -> tuple[list[str], list[list[str]]]:
    """The roles table: primary and what resolve answers with, why when they differ, and the
    preferred primary and hold when the daemon reports them."""
    details = document.get("role_details")
    if not isinstance(details, dict):  # a daemon that reports primaries only
        primaries = document.get("roles")
        details = ({name: {"role": name, "primary": primary}
                    for name, primary in primaries.items()}
                   if isinstance(primaries, dict) else {})
    summaries = {name: d if isinstance(d, dict) else {} for name, d in details.items()}
    # the preferred primary is news only where a stand-in is primary
    show_preferred = any("preferred" in d and d.get("preferred") != d.get("primary")
                         for d in summaries.values())
    show_hold = any(d.get("hold") for d in summaries.values())
    rows = [_role_row(name, summaries[name], models, show_preferred, show_hold)
            for name in sorted(summaries)]
    headers = ["ROLE", "PRIMARY"]
    if show_preferred:
        headers.append("PREFERRED")
    headers.append("RESOLVE ANSWERS")
    if show_hold:
        headers.append("HOLD")
    return headers, rows


def _role_row(name: str, summary: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
              show_preferred: bool, show_hold: bool) -> list[str]:
    primary = summary.get("primary")
    row = [name, plain(primary)]
    if show_preferred:
        row.append(plain(summary.get("preferred")))
    if "resolves_to" in summary:
        answer = summary.get("resolves_to")
        if answer is None:
            row.append(f"nothing usable (modelctl resolve --role {name})")
        elif answer == primary:
            row.append(str(answer))
        elif primary is None:
            row.append(f"{answer} (the role has no primary)")
        else:
            view = models.get(str(primary), {})
            status = view.get("health_status")
            why = f"the primary is {status}" if status and status not in (
                "healthy", "degraded") else "the primary is not usable now: modelctl list says why"
            if view and not view.get("eligible", True):
                why = "the primary is remote and offline mode is on"
            row.append(f"{answer} (a fallback: {why})")
    else:
        row.append("?")
    if show_hold:
        row.append(_hold(summary.get("hold")))
    return row


def _hold(hold: Any) -> str:
    if not isinstance(hold, dict):
        return "-"
    parts = [f"until {clock(hold['until'])}" if isinstance(hold.get("until"), int | float)
             else "", f"by {who(hold.get('by'))}" if hold.get("by") else ""]
    text = " ".join(p for p in parts if p) or "held"
    return f"{text}: {humane(hold['reason'])}" if hold.get("reason") else text


STATUS_SHOWN = {"version", "pid", "started_at", "uptime_s", "config_path", "state_file",
                "socket", "models", "health", "roles", "role_details", "offline_mode",
                "forced_by_env", "auto_execute", "last_sweep", "last_state_write", "event_seq",
                "summary"}


def format_status(document: Any, now: float | None = None, width: int | None = None) -> str:
    """``modelctl status``: the daemon, its files, the models' health and each role's
    primary beside what resolve answers with."""
    now = time.time() if now is None else now
    if not isinstance(document, dict):
        return plain(document)
    d = document
    head = f"modeld {plain(d.get('version'))}, pid {plain(d.get('pid'))}"
    if isinstance(d.get("uptime_s"), int | float):
        head += f", up {duration(d['uptime_s'])}"
    if isinstance(d.get("started_at"), int | float):
        head += f" (since {clock(d['started_at'])} {zone()})"
    pairs: list[tuple[str, str]] = []
    for label, key in (("config", "config_path"), ("state file", "state_file"),
                       ("socket", "socket")):
        if key in d:
            pairs.append((label, plain(d[key])))
    if "models" in d:
        counts = health_counts(d.get("health"))
        pairs.append(("models", f"{plain(d['models'])} ({counts})" if counts != "-"
                      else plain(d["models"])))
    if "offline_mode" in d:
        offline = on_off(d["offline_mode"])
        if d.get("forced_by_env"):
            offline += " (forced by DAENA_OFFLINE_MODE)"
        pairs.append(("offline mode", offline))
    if "auto_execute" in d:
        pairs.append(("auto-execute", "on: the policy promotes" if d["auto_execute"]
                      else "off: the policy only suggests (modelctl upgrade check)"))
    sweep = d.get("last_sweep")
    if isinstance(sweep, dict):
        text = when(sweep.get("last_probe_at"), now)
        if text == "-":
            text = "none yet"
        extra = []
        if "probes_total" in sweep:
            extra.append(f"{sweep['probes_total']} probes since start")
        if "requests_in_flight" in sweep:
            extra.append(f"{sweep['requests_in_flight']} in flight")
        pairs.append(("last probe", ", ".join([text, *extra])))
    write = d.get("last_state_write")
    if isinstance(write, dict):
        pairs.append(("last state write", _state_write(write, now)))
    if "event_seq" in d:
        pairs.append(("events", f"{plain(d['event_seq'])} so far (modelctl events)"))
    parts = [head, fields(pairs, width)]
    headers, rows = role_rows(d, {})
    if rows:
        parts.append(table(headers, rows, width))
    rest = _rest(d, STATUS_SHOWN, now, width)
    if rest:
        parts.append(rest)
    return "\n\n".join(p for p in parts if p)


def _state_write(write: Mapping[str, Any], now: float) -> str:
    if not write.get("at"):
        return "none yet"
    text = when(write.get("at"), now)
    if write.get("ok", True):
        figures = []
        if isinstance(write.get("bytes"), int | float) and write["bytes"]:
            figures.append(size(write["bytes"]))
        if isinstance(write.get("seconds"), int | float):
            figures.append(f"in {ms(write['seconds'] * 1000)}")
        return f"{text}, ok" + (f" ({' '.join(figures)})" if figures else "")
    return f"{text}, FAILED: {plain(write.get('error'))} (changes are retried)"


# ----------------------------------------------------------------------------- list


def _not_probed(view: Mapping[str, Any]) -> str:
    text = str(view.get("not_probed") or "")
    return text


def format_models(document: Any, now: float | None = None, width: int | None = None) -> str:
    """``modelctl list``: a table of the models, then a line for each thing the table cannot
    say in a word: why a probe failed, quarantines, models not probed, and roles where resolve
    answers with a fallback instead of the primary."""
    now = time.time() if now is None else now
    models = document.get("models", []) if isinstance(document, dict) else []
    roles = document.get("roles") if isinstance(document, dict) else None
    roles = roles if isinstance(roles, dict) else {}
    answers = {str(s.get("resolves_to")): name for name, s in roles.items()
               if isinstance(s, dict) and s.get("resolves_to") not in (None, s.get("primary"))}
    rows = []
    notes = []
    for m in models:
        model_id = str(m.get("id", "?"))
        flags = [name for name in ("primary", "retired", "local") if m.get(name)]
        if model_id in answers:
            flags.append("serving")
        until = m.get("quarantined_until")
        if isinstance(until, int | float) and until > now:
            flags.append("quarantined")
            notes.append(f"{model_id}: quarantined until {when(until, now)}: the policy will "
                         "not promote it before then")
        if _not_probed(m):
            flags.append("not-probed")
            notes.append(f"{model_id}: {_not_probed(m)} (its last state is kept; it is not "
                         "used while offline mode is on)" if not m.get("eligible", True)
                         else f"{model_id}: {_not_probed(m)}")
        probe = m.get("last_probe")
        reason = str(probe.get("reason") or "") if isinstance(probe, dict) else ""
        if reason:
            verdict = "ok" if probe.get("ok") else "failed"
            notes.append(f"{model_id}: last probe {verdict}: {reason}")
        rows.append([
            model_id,
            str(m.get("role", "")),
            str(m.get("provider", "")),
            str(m.get("health_status", "")),
            number(m.get("score"), 3),
            ms_number(m.get("latency_estimate")),
            number(m.get("cost_estimate"), 2),
            ",".join(flags) or "-",
            last_probe_cell(probe, now),
        ])
    for answer, role in sorted(answers.items(), key=lambda item: item[1]):
        primary = roles[role].get("primary")
        notes.append(f"role {role}: resolve answers {answer}, not the primary {primary} "
                     f"(modelctl resolve --role {role})")
    for role, summary in sorted(roles.items()):
        if isinstance(summary, dict) and "resolves_to" in summary and not summary["resolves_to"]:
            notes.append(f"role {role}: nothing usable; resolve answers 503 "
                         f"(modelctl resolve --role {role} says why, model by model)")
        if isinstance(summary, dict) and summary.get("hold"):
            notes.append(f"role {role}: held {_hold(summary['hold'])}")
    headers = ["ID", "ROLE", "PROVIDER", "HEALTH", "SCORE", "LATENCY (ms)", "COST/1M", "FLAGS",
               "LAST PROBE"]
    parts = [table(headers, rows, width, wrap_last=False) if rows else "no models configured"]
    if notes:
        parts.append("\n".join(note(n, width) for n in notes))
    offline = document.get("offline_mode") if isinstance(document, dict) else None
    parts.append(f"offline mode: {on_off(offline)}")
    return "\n\n".join(parts) if notes else "\n".join(parts)


def last_probe_cell(probe: Any, now: float) -> str:
    if not isinstance(probe, dict) or not probe.get("at"):
        return "never"
    verdict = "ok" if probe.get("ok") else "failed"
    latency = probe.get("latency_ms")
    if probe.get("ok") and isinstance(latency, int | float):
        verdict += f" in {ms(latency)}"
    return f"{verdict}, {age(probe.get('at'), now)}"


# ----------------------------------------------------------------------------- show


MODEL_SHOWN = {"id", "role", "provider", "primary", "local", "capability_tags", "cost_estimate",
               "latency_estimate", "health_status", "score", "retired", "local_path",
               "last_probe", "model", "endpoint", "quality", "eligible", "not_probed",
               "quarantined_until", "health_changed_at", "score_parts", "health",
               "recent_probes", "capabilities", "deep", "api_key_env"}


def format_model(view: Any, now: float | None = None, width: int | None = None) -> str:
    """``modelctl show``: one model, its score part by part and its recent probes."""
    now = time.time() if now is None else now
    if not isinstance(view, dict):
        return plain(view)
    v = view
    place = ["primary" if v.get("primary") else "retired (a fallback)" if v.get("retired")
             else "candidate"]
    pairs: list[tuple[str, str]] = [("id", plain(v.get("id"))),
                                    ("role", f"{plain(v.get('role'))}, {place[0]}")]
    where = plain(v.get("provider"))
    if v.get("endpoint"):
        where += f" at {v['endpoint']}"
    if v.get("model") and v.get("model") != v.get("id"):
        where += f" (upstream name {v['model']})"
    if v.get("local_path"):
        where += f", file {v['local_path']}"
    pairs.append(("provider", where))
    pairs.append(("local", ("yes" if v.get("local") else "no") + (
        "" if v.get("eligible", True) else " (not eligible: offline mode is on)")))
    health = _mapping(v.get("health"))
    status = plain(v.get("health_status"))
    changed = health.get("changed_at", v.get("health_changed_at"))
    if isinstance(changed, int | float):
        status += f" since {when(changed, now)}"
    pairs.append(("health", status))
    if health:
        pairs.append(("in a row", f"{plain(health.get('consecutive_successes'))} successes, "
                      f"{plain(health.get('consecutive_failures'))} failures"))
        pairs.append(("probes", f"{plain(health.get('probes_total'))} in all, "
                      f"{plain(health.get('failures_total'))} failed; "
                      f"{percent(health.get('success_rate'))} of the recent ones ok"))
    latency = f"{ms(v.get('latency_estimate'))}"
    if isinstance(health.get("latency_p50_ms"), int | float):
        latency += (f" (measured median; p95 {ms(health.get('latency_p95_ms'))})")
    else:
        latency += " (the configured estimate: not measured yet)"
    pairs.append(("latency", latency))
    pairs.append(("score", number(v.get("score"), 3)))
    if v.get("quality") is not None:
        pairs.append(("quality", f"{plain(v.get('quality'))} (the configured prior)"))
    pairs.append(("cost", f"{number(v.get('cost_estimate'), 2)} per 1M tokens"))
    tags = v.get("capability_tags", v.get("capabilities"))
    pairs.append(("capabilities", plain(tags)))
    if "deep" in v:
        pairs.append(("deep probe", plain(v.get("deep"))))
    if v.get("api_key_env"):
        pairs.append(("api key from", f"${v['api_key_env']}"))
    until = v.get("quarantined_until")
    if isinstance(until, int | float):
        pairs.append(("quarantined", f"until {when(until, now)}" if until > now
                      else f"until {when(until, now)} (over)"))
    if v.get("not_probed"):
        pairs.append(("not probed", str(v["not_probed"])))
    probe = v.get("last_probe")
    if isinstance(probe, dict):
        pairs.append(("last probe", _probe_line(probe, now)))
    parts = [fields(pairs, width)]
    score_parts = v.get("score_parts")
    if isinstance(score_parts, dict) and isinstance(score_parts.get("parts"), dict):
        parts.append(_score_table(score_parts))
    recent = v.get("recent_probes")
    if isinstance(recent, list) and recent:
        parts.append(_probes_table(recent, now, width))
    rest = _rest(v, MODEL_SHOWN, now, width)
    if rest:
        parts.append(rest)
    return "\n\n".join(parts)


def _probe_line(probe: Mapping[str, Any], now: float) -> str:
    verdict = str(probe.get("status") or ("ok" if probe.get("ok") else "failed"))
    if isinstance(probe.get("latency_ms"), int | float):
        verdict += f" in {ms(probe['latency_ms'])}"
    text = f"{verdict}, {when(probe.get('at'), now)}"
    if probe.get("reason"):
        text += f": {probe['reason']}"
    return text


def _fact(key: str, value: Any) -> str:
    """A probe's fact: sizes in bytes made readable (``size_vram=5.0 GiB``), else as is."""
    if ("size" in key or key.endswith("bytes")) and isinstance(value, int) and not isinstance(
            value, bool):
        return size(value)
    return plain(value)


def _score_table(score_parts: Mapping[str, Any]) -> str:
    rows = []
    for name, part in score_parts["parts"].items():
        if isinstance(part, dict):
            rows.append([name, number(part.get("value"), 3), number(part.get("weight"), 3),
                         number(part.get("contribution"), 3)])
    rows.append(["total", "", "", number(score_parts.get("total"), 3)])
    text = "score, part by part (contribution = value × weight):\n"
    text += table(["PART", "VALUE", "WEIGHT", "CONTRIBUTION"], rows, indent="  ")
    if score_parts.get("reason"):
        text += f"\n  {score_parts['reason']}"
    return text


def _probes_table(recent: Sequence[Any], now: float, width: int | None) -> str:
    rows = []
    probes = [p for p in recent if isinstance(p, dict)]
    for index, probe in enumerate(probes):
        facts = _mapping(probe.get("facts"))
        # newest first: the newest probe's facts, then an older one's only where they differ
        newer = _mapping(probes[index - 1].get("facts")) if index else None
        detail = humane(probe.get("reason")) if probe.get("reason") else ""
        if facts and facts != newer:
            listed = ", ".join(f"{k}={_fact(k, v)}" for k, v in facts.items())
            detail = f"{detail} ({listed})" if detail else listed
        rows.append([when(probe.get("at"), now),
                     str(probe.get("status") or ("ok" if probe.get("ok") else "failed")),
                     ms_number(probe.get("latency_ms")), detail or "-"])
    return ("recent probes, newest first (facts where they change):\n"
            + table([f"WHEN ({zone()})", "RESULT", "LATENCY (ms)", "DETAIL"], rows, width,
                    indent="  "))


# ----------------------------------------------------------------------------- history


def history_rows(entries: Sequence[Mapping[str, Any]], now: float,
                 with_role: bool) -> tuple[list[str], list[list[str]]]:
    """The audit trail as table rows: when, (role,) what, from, to, who, automatic, why."""
    headers = [f"WHEN ({zone()})", *(["ROLE"] if with_role else []), "ACTION", "FROM", "TO",
               "WHO", "AUTOMATIC", "REASON"]
    del now  # the table gives dates; the age of an audit entry is rarely the question
    rows = []
    for entry in entries:
        automatic = entry.get("automatic")
        at = entry.get("at")
        rows.append([
            clock(at) if isinstance(at, int | float) and not isinstance(at, bool) else "-",
            *([str(entry.get("role", ""))] if with_role else []),
            plain(entry.get("action")),
            plain(entry.get("from")),
            plain(entry.get("to")),
            who(entry.get("actor")),
            "-" if automatic is None else plain(automatic),
            humane(entry.get("reason")),
        ])
    return headers, rows


def format_history(entries: Sequence[Mapping[str, Any]], now: float | None = None,
                   width: int | None = None, with_role: bool = True) -> str:
    """``modelctl history``: who was made primary when, why, by whom, oldest first."""
    now = time.time() if now is None else now
    if not entries:
        return "no history yet"
    headers, rows = history_rows(entries, now, with_role)
    return table(headers, rows, width)


# ----------------------------------------------------------------------------- events


def _by(event: Mapping[str, Any]) -> str:
    actor = event.get("actor")
    return f" by {who(actor)}" if actor else ""


def _because(event: Mapping[str, Any]) -> str:
    reason = humane(event.get("reason")) if event.get("reason") else ""
    return f": {reason}" if reason else ""


def _change(event: Mapping[str, Any]) -> str:
    return f"{event.get('from') or '(none)'} -> {event.get('to') or '(none)'}"


def _summary_health(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    text = f"{e.get('model_id')} ({e.get('role')}): {data.get('old', '?')} -> " \
           f"{data.get('new', '?')}"
    reason = str(e.get("reason") or "")
    if reason and reason != data.get("new"):
        text += f": {reason}"
    if isinstance(data.get("latency_ms"), int | float):
        text += f" ({ms(data['latency_ms'])})"
    return text


def _summary_promoted(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    how = [w for w, on in (("automatic", data.get("automatic")), ("forced", data.get("forced")),
                           ("failback", data.get("failback"))) if on]
    extra = f" ({', '.join(how)})" if how else ""
    return f"{e.get('role')}: {_change(e)}{_by(e)}{extra}{_because(e)}"


def _summary_rolled_back(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    return f"{e.get('role')}: {_change(e)}{_by(e)}{_because(e)}"


def _summary_quarantined(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    until = data.get("until")
    span = f" until {when(until, now)}" if isinstance(until, int | float) else ""
    return f"{e.get('model_id')} ({e.get('role')}){span}{_because(e)}"


def _summary_suggested(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    scores = ""
    if isinstance(data.get("score_from"), int | float) and isinstance(
            data.get("score_to"), int | float):
        scores = f" (score {data['score_from']:.3f} -> {data['score_to']:.3f})"
    return f"{e.get('role')}: {_change(e)}{scores}{_because(e)}"


def _summary_offline(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    return f"offline mode {on_off(data.get('enabled'))}{_by(e)}"


def _summary_reloaded(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    parts = []
    for key in ("added", "removed", "changed"):
        ids = data.get(key)
        if isinstance(ids, list):
            parts.append(f"{len(ids)} {key}" + (f" ({', '.join(map(str, ids))})" if ids else ""))
    return f"configuration reloaded{_by(e)}: {', '.join(parts) or e.get('reason', '')}"


def _summary_reload_failed(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    errors = data.get("errors")
    listed = "; ".join(map(str, errors)) if isinstance(errors, list) else ""
    return (f"new configuration rejected{_by(e)}, the old one stays in effect"
            + (f": {listed}" if listed else _because(e)))


def _summary_held(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    until = data.get("until")
    span = f" until {when(until, now)}" if isinstance(until, int | float) else ""
    return f"{e.get('role')} held{span}{_by(e)}{_because(e)}"


def _summary_released(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    return f"{e.get('role')} released{_by(e)}{_because(e)}"


def _summary_model(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    return f"{e.get('model_id')} ({e.get('role')}){_by(e)}{_because(e)}"


def _summary_generic(e: Mapping[str, Any], data: Mapping[str, Any], now: float) -> str:
    subject = " ".join(str(x) for x in (e.get("role"), e.get("model_id")) if x)
    change = f" {_change(e)}" if e.get("from") or e.get("to") else ""
    extra = ", ".join(f"{k} {_generic_value(k, v, now)}" for k, v in data.items())
    return f"{subject}{change}{_by(e)}{_because(e)}" + (f" ({extra})" if extra else "")


_SUMMARIES: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any], float], str]] = {
    "health_changed": _summary_health,
    "model_promoted": _summary_promoted,
    "model_rolled_back": _summary_rolled_back,
    "model_quarantined": _summary_quarantined,
    "auto_upgrade_suggested": _summary_suggested,
    "offline_mode_changed": _summary_offline,
    "config_reloaded": _summary_reloaded,
    "config_reload_failed": _summary_reload_failed,
    "model_added": _summary_model,
    "model_removed": _summary_model,
    "role_held": _summary_held,
    "role_released": _summary_released,
}

EVENT_KIND_WIDTH = 22  # len("auto_upgrade_suggested"): streamed lines align without a table


def event_summary(event: Mapping[str, Any], now: float) -> str:
    """What an event says, in a sentence (its kind and time aside)."""
    data = _mapping(event.get("data"))
    render = _SUMMARIES.get(str(event.get("kind")), _summary_generic)
    return render(event, data, now).strip()


def format_event(event: Mapping[str, Any], now: float | None = None,
                 width: int | None = None) -> str:
    """One event on one line (wrapped under its text on a narrow terminal):
    ``2026-11-26 07:17:05  #11  model_promoted  chat: a -> b by alice (uid 1000): why``."""
    now = time.time() if now is None else now
    head = (f"{clock(event['at']) if isinstance(event.get('at'), int | float) else '-':19}  "
            f"#{event.get('seq', '?')}  {event.get('kind', '?')!s:{EVENT_KIND_WIDTH}}  ")
    body = event_summary(event, now)
    room = None if width is None else max(20, width - len(head))
    first, *rest = wrap(body, room)
    return "\n".join([head + first, *(" " * len(head) + line for line in rest)])


# ----------------------------------------------------------------------------- others


def format_changes(document: Any, width: int | None = None) -> str:
    """Promotions and rollbacks made, one row each."""
    changes = document.get("changes", []) if isinstance(document, dict) else []
    if not changes:
        return "no change"
    rows = [[plain(c.get("role")), plain(c.get("from")), plain(c.get("to")),
             humane(c.get("reason"))] for c in changes]
    return table(["ROLE", "FROM", "TO", "REASON"], rows, width)


def format_suggestions(document: Any, width: int | None = None) -> str:
    """Auto-upgrade suggestions, one row each, with the scores that justify them; then, per
    role with no suggestion, why not (when the daemon says)."""
    suggestions = document.get("suggestions", []) if isinstance(document, dict) else []
    roles = document.get("roles") if isinstance(document, dict) else None
    quiet = {name: d for name, d in roles.items()
             if isinstance(d, dict) and not d.get("suggested")} if isinstance(roles, dict) else {}
    parts = []
    if suggestions:
        rows = [[plain(s.get("role")), plain(s.get("from")), plain(s.get("to")),
                 number(s.get("score_from"), 3), number(s.get("score_to"), 3),
                 plain(s.get("reason"))] for s in suggestions]
        parts.append(table(["ROLE", "FROM", "TO", "SCORE_FROM", "SCORE_TO", "REASON"], rows,
                           width))
    elif not quiet:
        return "no suggestions: every role's primary is the best choice"
    else:
        parts.append("no suggestions")
    if quiet:
        rows = [[name, humane(d.get("why"))] for name, d in sorted(quiet.items())]
        parts.append("why not, per role:\n" + table(["ROLE", "WHY NOTHING IS SUGGESTED"], rows,
                                                     width, indent="  "))
    return "\n\n".join(parts)


def format_hold(document: Any, width: int | None = None) -> str:
    """``modelctl hold``: the role, its primary, and the hold now in force."""
    if not isinstance(document, dict):
        return plain(document)
    return (f"role {plain(document.get('role'))} held {_hold(document.get('hold'))} "
            f"(primary {plain(document.get('primary'))}); modelctl release "
            f"{plain(document.get('role'))} ends it")


def format_release(document: Any, width: int | None = None) -> str:
    """``modelctl release``: whether a hold ended."""
    if not isinstance(document, dict):
        return plain(document)
    role = plain(document.get("role"))
    if not document.get("released"):
        return f"role {role} was not held: nothing changed"
    return f"role {role} released (the hold was {_hold(document.get('hold'))})"


def format_reload(document: Any, width: int | None = None) -> str:
    """What a reload changed, and the keys that need a restart."""
    if not isinstance(document, dict) or not {"added", "removed", "changed"} <= set(document):
        return format_fields(document, width=width)
    parts = []
    for key in ("added", "removed", "changed"):
        ids = document.get(key) or []
        parts.append(f"{len(ids)} {key}" + (f" ({', '.join(map(str, ids))})" if ids else ""))
    lines = [f"configuration reloaded: {', '.join(parts)}"]
    restart = document.get("restart_required") or []
    if restart:
        lines.append(note(f"these changes take effect only on restart (systemctl restart "
                          f"modeld): {', '.join(map(str, restart))}", width))
    return "\n".join(lines)


def format_evaluate(document: Any, now: float | None = None, width: int | None = None) -> str:
    """A probe made now: its verdict, the model's health and score after it."""
    now = time.time() if now is None else now
    if not isinstance(document, dict) or not isinstance(document.get("result"), dict):
        return format_fields(document, now, width)
    result = document["result"]
    verdict = str(result.get("status", "?"))
    if isinstance(result.get("latency_ms"), int | float):
        verdict += f" in {ms(result['latency_ms'])}"
    pairs = [("model", plain(document.get("model_id"))), ("probe", verdict)]
    if result.get("reason"):
        pairs.append(("reason", str(result["reason"])))
    facts = result.get("facts")
    if isinstance(facts, dict) and facts:
        pairs.append(("facts", ", ".join(f"{k}={_fact(k, v)}" for k, v in facts.items())))
    pairs.append(("health now", plain(document.get("health_status"))))
    pairs.append(("score now", number(document.get("score"), 3)))
    parts = [fields(pairs, width)]
    score_parts = document.get("score_parts")
    if isinstance(score_parts, dict) and isinstance(score_parts.get("parts"), dict):
        parts.append(_score_table(score_parts))
    return "\n\n".join(parts)


def format_offline(document: Any) -> str:
    """``offline mode: on|off`` and whether the environment forces it."""
    on = isinstance(document, dict) and bool(document.get("offline_mode"))
    line = f"offline mode: {on_off(on)}"
    if isinstance(document, dict) and document.get("forced_by_env"):
        line += " (forced by DAENA_OFFLINE_MODE)"
    return line


def format_resolve(document: Any) -> str:
    """The chosen model id on the first line, then its fallbacks, one id a line, in order.

    Plain ids and nothing else, so ``modelctl resolve | tail -n +2`` is the chain to walk
    when the first fails (``--first`` prints the first line alone).
    """
    lines = [str(document.get("model_id", ""))]
    lines.extend(str(f) for f in document.get("fallbacks", []) or [])
    return "\n".join(lines)
