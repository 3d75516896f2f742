"""``modelctl watch``: a live table of roles and models, the thing one leaves open in a
terminal during an incident.

Every ``interval`` it asks the daemon for its status, the models, each role's resolve chain
and last change, and the events since the last frame, and redraws in place with plain ANSI
(cursor home, clear to the end of each line, clear below): no curses, no dependency. On a
pipe it prints one frame after the other. It ends on Ctrl-C (exit 0) and when the daemon
goes away (exit 3, saying so under the last frame).
"""

from __future__ import annotations

import collections
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from . import routes, text
from .ctl import EXIT_OK, EXIT_UNREACHABLE, Client, Refused, Unreachable, terminal_width

HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
EVENTS_SHOWN = 6


@dataclass
class Snapshot:
    """What one frame shows, as the daemon answered."""

    status: dict[str, Any]
    models: list[dict[str, Any]]
    role_details: dict[str, dict[str, Any]]
    chains: dict[str, list[str]]  # role → [answer, fallback, ...]; [] when nothing usable
    last_change: dict[str, dict[str, Any]]  # role → its latest history entry
    offline_mode: bool = False


@dataclass
class EventTail:
    """The last few events, fetched incrementally (only those after the newest seen)."""

    seen: int | None = None
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_SHOWN))

    def update(self, client: Client) -> None:
        query = [] if self.seen is None else [("since", str(self.seen))]
        import json

        for line in client.stream_lines(routes.path("events", query)):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (isinstance(event, dict) and isinstance(event.get("seq"), int)
                    and event["seq"] > (self.seen or 0)):
                self.recent.append(event)
                self.seen = event["seq"]
        if self.seen is None:
            self.seen = 0


def _get(client: Client, name: str, query: Sequence[tuple[str, str]] = (),
         **params: str) -> Any:
    route = routes.BY_NAME[name]
    return client.call(route.method, route.path(query, **params))


def snapshot(client: Client) -> Snapshot:
    """Ask the daemon for everything a frame shows."""
    status = _get(client, "status")
    listing = _get(client, "list_models")
    status = status if isinstance(status, dict) else {}
    listing = listing if isinstance(listing, dict) else {}
    models = [m for m in listing.get("models", []) if isinstance(m, dict)]
    details = status.get("role_details") or listing.get("roles") or {
        name: {"role": name, "primary": primary}
        for name, primary in (status.get("roles") or {}).items()}
    chains: dict[str, list[str]] = {}
    last_change: dict[str, dict[str, Any]] = {}
    for role in sorted(details):
        try:
            answer = _get(client, "resolve", [("role", role)])
            chains[role] = [str(answer.get("model_id")), *map(str, answer.get("fallbacks", []))]
        except Refused:
            chains[role] = []
        try:
            history = _get(client, "history", [("limit", "1")], role=role).get("history") or []
            if history:
                last_change[role] = history[-1]
        except Refused:  # a daemon without the history route
            pass
    return Snapshot(status, models, details, chains, last_change,
                    bool(listing.get("offline_mode")))


def render(snap: Snapshot, now: float, width: int | None, socket_path: str,
           interval: float, tail: EventTail) -> str:
    """One frame, as text."""
    s = snap.status
    counts = text.health_counts(s.get("health"))
    head = [text.note(f"modeld {text.plain(s.get('version'))} at {socket_path}: "
                      f"{text.plain(s.get('models', len(snap.models)))} models ({counts}); "
                      f"offline mode {text.on_off(snap.offline_mode)}", width),
            f"{text.clock(now)} {text.zone()}, every {interval:g} s; Ctrl-C to quit"]
    by_id = {str(m.get("id")): m for m in snap.models}
    headers, rows = text.role_rows({"role_details": snap.role_details}, by_id)
    headers.append("LAST CHANGE")
    for row, role in zip(rows, sorted(snap.role_details), strict=True):
        entry = snap.last_change.get(role)
        if entry:
            row.append(f"{entry.get('action')} {text.age(entry.get('at'), now)} by "
                       f"{text.who(entry.get('actor'))}")
        else:
            row.append("-")
    # the resolve column may be long; the change column is last and is the one wrapped
    roles_table = text.table(headers, rows, width) if rows else "no roles"
    model_rows = []
    notes = []
    def order(m: dict[str, Any]) -> tuple[str, int, str]:
        chain = snap.chains.get(str(m.get("role", "")), [])
        place = chain.index(str(m.get("id"))) if m.get("id") in chain else len(chain)
        return (str(m.get("role", "")), place, str(m.get("id")))

    for m in sorted(snap.models, key=order):
        model_id = str(m.get("id"))
        role = str(m.get("role", ""))
        chain = snap.chains.get(role, [])
        if model_id in chain:
            place = "answer" if chain.index(model_id) == 0 else f"fallback {chain.index(model_id)}"
        else:
            place = "unusable"
        flags = [name for name in ("primary", "retired") if m.get(name)]
        until = m.get("quarantined_until")
        if isinstance(until, int | float) and until > now:
            flags.append("quarantined")
        if m.get("not_probed"):
            flags.append("not-probed")
        probe = m.get("last_probe")
        reason = str(probe.get("reason") or "") if isinstance(probe, dict) else ""
        if reason and not (isinstance(probe, dict) and probe.get("ok")):
            notes.append(f"{model_id}: {reason}")
        model_rows.append([
            model_id, role, str(m.get("health_status", "")),
            text.age(m.get("health_changed_at"), now),
            text.number(m.get("score"), 3), text.ms_number(m.get("latency_estimate")),
            ",".join(flags) or "-", place, text.last_probe_cell(probe, now)])
    models_table = text.table(["MODEL", "ROLE", "HEALTH", "CHANGED", "SCORE", "LATENCY (ms)",
                               "FLAGS", "RESOLVE", "LAST PROBE"], model_rows, width,
                              wrap_last=False)
    parts = ["\n".join(head), roles_table, models_table]
    if notes:
        parts.append("\n".join(text.note(n, width) for n in notes))
    if tail.recent:
        parts.append("recent events:\n" + "\n".join(
            text.format_event(e, now, width) for e in tail.recent))
    return "\n\n".join(parts)


def _draw(out: TextIO, frame: str, tty: bool) -> None:
    if tty:
        lines = frame.split("\n")
        out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
    else:
        out.write(frame + "\n\n")
    out.flush()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(client: Client, out: TextIO, interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Redraw until Ctrl-C (exit 0) or until the daemon goes away (exit 3)."""
    tty = bool(getattr(out, "isatty", lambda: False)())
    tail = EventTail()
    drawn = False
    previous_term = signal.signal(signal.SIGTERM, _interrupt)  # restore the cursor on kill too
    try:
        if tty:
            out.write(HIDE_CURSOR + HOME + "\x1b[2J")
        while True:
            try:
                snap = snapshot(client)
                tail.update(client)
            except Unreachable as exc:
                if not drawn:
                    raise  # never reached: modelctl's usual message and exit 3
                _restore(out, tty)
                tty = False
                print(f"modelctl watch: stopped, the daemon went away: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE
            _draw(out, render(snap, clock(), terminal_width(out), client.socket_path,
                              interval, tail), tty)
            drawn = True
            sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        _restore(out, tty)
        signal.signal(signal.SIGTERM, previous_term)


def _restore(out: TextIO, tty: bool) -> None:
    if tty:
        out.write(SHOW_CURSOR)
        out.flush()
