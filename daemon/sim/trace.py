"""Trace files for ``modeld simulate``: JSON lines in, checked steps out (DESIGN.md §7).

Each line is one step that holds from ``at`` (seconds from the start of the trace) on:

- a model's behaviour: ``{"at", "model", "ok": true | false | "degraded", "latency_ms"?,
  "reason"?}``: every probe of that model from ``at`` on answers so;
- an operator's action: ``{"at", "operator": "promote", "model", "force"?}``,
  ``"rollback"`` (``role``?), ``"offline"`` (``enabled``), ``"hold"`` (``role``, ``for``?),
  ``"release"`` (``role``); each may carry a ``reason``;
- the end: ``{"at", "end": true}``, the last line.

Blank lines and lines starting with ``#`` are comments. Everything else is checked strictly,
because a trace is often written by hand or by a script and a typo must not silently change
what is simulated: unknown keys, unknown models and roles, NaN, negative or out-of-order times,
duplicate keys, steps after the end and missing ends are errors naming the file, the line and
the field. Files are read line by line with a bounded line length, so a huge or hostile file
costs time in proportion to its size and memory in proportion to one line.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..config import parse_duration
from ..core.model import ProbeStatus
from ..core.settings import Config

#: A line longer than this (bytes, newline excluded) is an error, not a memory hog.
MAX_LINE_BYTES = 65536
#: The latest ``at`` a trace may use: 31 days, in seconds.
MAX_AT = 31 * 86400.0
#: A reason longer than this is an error (the daemon caps upstream strings similarly).
MAX_REASON_CHARS = 1000
#: How many errors one check reports before it stops looking.
MAX_ERRORS = 20
#: Steps (lines that are not comments) one trace may hold: bounds what a run keeps.
MAX_STEPS = 1_000_000

OPERATOR_ACTIONS = ("promote", "rollback", "offline", "hold", "release")

_BEHAVIOUR_KEYS = ("at", "model", "ok", "latency_ms", "reason")
_OPERATOR_KEYS: Mapping[str, tuple[str, ...]] = {
    "promote": ("at", "operator", "model", "force", "reason"),
    "rollback": ("at", "operator", "role", "reason"),
    "offline": ("at", "operator", "enabled", "reason"),
    "hold": ("at", "operator", "role", "for", "reason"),
    "release": ("at", "operator", "role", "reason"),
}
_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "promote": ("model",), "rollback": (), "offline": ("enabled",), "hold": ("role",),
    "release": ("role",),
}


class TraceError(Exception):
    """A trace that cannot be simulated; ``errors`` lists each problem, one line each, as
    ``FILE:LINE: field: what is wrong``."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True, slots=True)
class Behaviour:
    """From ``at`` on, every probe of ``model`` answers with this."""

    at: float
    line: int
    model: str
    status: ProbeStatus
    latency_ms: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Operator:
    """An operator's action at ``at``: promote, rollback, offline, hold or release."""

    at: float
    line: int
    action: str
    model: str | None = None
    role: str | None = None
    force: bool = False
    enabled: bool = False
    duration: float | None = None  # hold: seconds; None: the configured manual_hold
    reason: str = ""


@dataclass(frozen=True, slots=True)
class End:
    """The simulation stops at ``at``."""

    at: float
    line: int


Step = Behaviour | Operator | End


class _LineError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f'key "{key}" appears twice')
        out[key] = value
    return out


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class TraceParser:
    """Turns the lines of one trace into steps, checking each against the configuration and
    the lines before it. Feed lines in order with :meth:`line`, then call :meth:`finish`."""

    def __init__(self, config: Config, source: str) -> None:
        self.source = source
        self.models = {spec.id: spec for spec in config.models}
        self.roles = sorted({spec.role for spec in config.models})
        self.last_at = 0.0
        self.last_line = 0
        self.end_line = 0
        self.end_at: float | None = None
        self.steps = 0

    def error(self, lineno: int, field: str, message: str) -> str:
        where = f"{self.source}:{lineno}" if lineno else self.source
        return f"{where}: {field}: {message}" if field else f"{where}: {message}"

    def line(self, lineno: int, raw: bytes) -> Step | None:
        """The step on one line (None for a blank line or a comment); raises TraceError."""
        try:
            return self._line(lineno, raw)
        except _LineError as exc:
            raise TraceError([self.error(lineno, exc.field, exc.message)]) from None

    def _line(self, lineno: int, raw: bytes) -> Step | None:
        if len(raw) > MAX_LINE_BYTES:
            raise _LineError("", f"line is longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _LineError("", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            return None
        if self.end_line:
            raise _LineError("", f"a step after the end step of line {self.end_line}; the end "
                             "step must be the last")
        try:
            data = json.loads(stripped, parse_constant=_no_constants,
                              object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as exc:
            raise _LineError("", f"not a JSON object: {exc}") from None
        if not isinstance(data, dict):
            raise _LineError("", f"expected a JSON object, got {_type_name(data)}")
        if self.steps >= MAX_STEPS:
            raise _LineError("", f"more than {MAX_STEPS:,} steps; split the trace")
        at = self._at(data)
        if "end" in data:
            step: Step = self._end(data, at, lineno)
        elif "operator" in data:
            step = self._operator(data, at, lineno)
        elif "model" in data or "ok" in data:
            step = self._behaviour(data, at, lineno)
        else:
            raise _LineError("", 'a step needs "model" and "ok" (a model\'s behaviour), '
                             '"operator" (an operator\'s action) or "end": true')
        self.last_at = at
        self.last_line = lineno
        self.steps += 1
        return step

    def finish(self) -> None:
        """Raises TraceError when the trace has no end step."""
        if not self.end_line:
            raise TraceError([self.error(0, "", 'no end step: the last line must be '
                                         '{"at": SECONDS, "end": true}')])

    # ----------------------------------------------------------------- fields

    def _at(self, data: Mapping[str, Any]) -> float:
        if "at" not in data:
            raise _LineError("at", "missing: every step says when it starts, in seconds from "
                             "the start of the trace")
        at = self._number(data, "at")
        if at > MAX_AT:
            raise _LineError("at", f"{at:g} s is beyond the longest trace simulated "
                             f"({MAX_AT:g} s, 31 days)")
        if at < self.last_at:
            raise _LineError("at", f"{at:g} is before the {self.last_at:g} of line "
                             f"{self.last_line}: steps must be in time order")
        return at

    def _number(self, data: Mapping[str, Any], key: str) -> float:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _LineError(key, f"expected a number, got {_type_name(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise _LineError(key, "number too large") from None
        if not math.isfinite(number):
            raise _LineError(key, "must be a finite number")
        if number < 0:
            raise _LineError(key, f"cannot be negative (got {number:g})")
        return number

    def _string(self, data: Mapping[str, Any], key: str, limit: int = MAX_REASON_CHARS) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise _LineError(key, f"expected a string, got {_type_name(value)}")
        if len(value) > limit:
            raise _LineError(key, f"{len(value)} characters; at most {limit}")
        return value

    def _bool(self, data: Mapping[str, Any], key: str) -> bool:
        value = data[key]
        if not isinstance(value, bool):
            raise _LineError(key, f"expected true or false, got {_type_name(value)}")
        return value

    def _keys(self, data: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
        for key in data:
            if key not in allowed:
                raise _LineError(key, f"unknown key for {what}{_did_you_mean(key, allowed)}; "
                                 f"allowed: {', '.join(allowed)}")

    def _model(self, data: Mapping[str, Any]) -> str:
        model_id = self._string(data, "model", 200)
        if model_id not in self.models:
            known = sorted(self.models)
            listed = ", ".join(known[:20]) + (", …" if len(known) > 20 else "")
            raise _LineError("model", f'unknown model "{model_id}"'
                             f"{_did_you_mean(model_id, known)}; the configuration declares: "
                             f"{listed or 'none'}")
        return model_id

    def _role(self, data: Mapping[str, Any]) -> str:
        role = self._string(data, "role", 200)
        if role not in self.roles:
            raise _LineError("role", f'unknown role "{role}"{_did_you_mean(role, self.roles)}; '
                             f"the configuration's roles: {', '.join(self.roles) or 'none'}")
        return role

    def _reason(self, data: Mapping[str, Any]) -> str:
        return self._string(data, "reason") if "reason" in data else ""

    # ----------------------------------------------------------------- kinds

    def _end(self, data: Mapping[str, Any], at: float, lineno: int) -> End:
        self._keys(data, ("at", "end"), "the end step")
        if data["end"] is not True:
            raise _LineError("end", f"must be true, got {json.dumps(data['end'])[:40]}")
        self.end_line = lineno
        self.end_at = at
        return End(at, lineno)

    def _behaviour(self, data: Mapping[str, Any], at: float, lineno: int) -> Behaviour:
        self._keys(data, _BEHAVIOUR_KEYS, "a model's behaviour")
        for key in ("model", "ok"):
            if key not in data:
                raise _LineError(key, "missing: a model's behaviour needs model and ok")
        model_id = self._model(data)
        ok = data["ok"]
        if ok is True:
            status = ProbeStatus.OK
        elif ok is False:
            status = ProbeStatus.FAILED
        elif ok == "degraded":
            status = ProbeStatus.DEGRADED
        else:
            raise _LineError("ok", f'expected true, false or "degraded", got '
                             f"{json.dumps(ok)[:40]}")
        latency = None
        if "latency_ms" in data and data["latency_ms"] is not None:
            latency = self._number(data, "latency_ms")
        return Behaviour(at, lineno, model_id, status, latency, self._reason(data))

    def _operator(self, data: Mapping[str, Any], at: float, lineno: int) -> Operator:
        action = data["operator"]
        if action not in _OPERATOR_KEYS:
            shown = json.dumps(action)[:40]
            hint = _did_you_mean(action, OPERATOR_ACTIONS) if isinstance(action, str) else ""
            raise _LineError("operator", f"unknown action {shown}{hint}; one of: "
                             f"{', '.join(OPERATOR_ACTIONS)}")
        self._keys(data, _OPERATOR_KEYS[action], f'operator "{action}"')
        for key in _REQUIRED[action]:
            if key not in data:
                raise _LineError(key, f'missing: operator "{action}" needs {key}')
        duration = None
        if "for" in data:
            try:
                duration = parse_duration(data["for"])
            except ValueError as exc:
                raise _LineError("for", str(exc)) from None
        return Operator(
            at, lineno, action,
            model=self._model(data) if "model" in data else None,
            role=self._role(data) if "role" in data else None,
            force=self._bool(data, "force") if "force" in data else False,
            enabled=self._bool(data, "enabled") if "enabled" in data else False,
            duration=duration,
            reason=self._reason(data),
        )


def _lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the newline). A line over the limit comes back as its
    first ``MAX_LINE_BYTES + 1`` bytes (the parser rejects it) and the rest of it is skipped
    chunk by chunk, so no line is ever held whole."""
    lineno = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            rest = raw
            while rest and not rest.endswith(b"\n"):
                rest = stream.readline(MAX_LINE_BYTES)
            yield lineno, raw
            continue
        yield lineno, raw.rstrip(b"\r\n")


def open_trace(path: str | Path) -> BinaryIO:
    """The trace file opened for reading; raises TraceError naming the file and why not."""
    try:
        return open(path, "rb")  # closed by the caller's with
    except FileNotFoundError:
        raise TraceError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise TraceError([f"{path}: is a directory, not a trace file"]) from None
    except OSError as exc:
        raise TraceError([f"{path}: cannot read: {exc.strerror or exc}"]) from None


def read_trace(path: str | Path, config: Config) -> Iterator[Step]:
    """The steps of a trace file, checked as they are read; raises TraceError at the first
    bad line (with its line number) or at the end when there is no end step."""
    with open_trace(path) as stream:
        parser = TraceParser(config, str(path))
        for lineno, raw in _lines(stream):
            step = parser.line(lineno, raw)
            if step is not None:
                yield step
        parser.finish()


def check_trace(path: str | Path, config: Config, max_errors: int = MAX_ERRORS) -> list[str]:
    """Every problem of a trace file (up to ``max_errors``), one line each; [] when it is
    good. A bad line is skipped and the lines after it are checked against the last good one."""
    return inspect_trace(path, config, max_errors)[0]


def inspect_trace(path: str | Path, config: Config,
                  max_errors: int = MAX_ERRORS) -> tuple[list[str], float | None]:
    """:func:`check_trace`'s errors, and the time of the end step (None without one)."""
    errors: list[str] = []
    try:
        stream = open_trace(path)
    except TraceError as exc:
        return exc.errors, None
    with stream:
        parser = TraceParser(config, str(path))
        for lineno, raw in _lines(stream):
            try:
                parser.line(lineno, raw)
            except TraceError as exc:
                errors += exc.errors
                if len(errors) >= max_errors:
                    errors.append(f"{path}: stopped after {max_errors} errors")
                    return errors, parser.end_at
        try:
            parser.finish()
        except TraceError as exc:
            errors += exc.errors
    return errors, parser.end_at


def parse_trace(text: str, config: Config, source: str = "<trace>") -> list[Step]:
    """The steps of a trace given as text (tests, scripts); raises TraceError."""
    parser = TraceParser(config, source)
    steps = []
    for lineno, raw in enumerate(text.encode("utf-8").split(b"\n"), start=1):
        step = parser.line(lineno, raw.rstrip(b"\r"))
        if step is not None:
            steps.append(step)
    parser.finish()
    return steps
