"""modelctl against a stub daemon: requests sent, tables and JSON printed, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from daemon.control import ctl
from daemon.control.listeners import create_unix_listener
from daemon.control.messages import HTTPError, Limits, Request, Response, StreamingResponse
from daemon.control.server import HTTPServer

REPO = Path(__file__).resolve().parent.parent

#: The tests' "now": 2025-11-26 08:57:03 in Europe/Berlin (CET), where the tests' clock runs.
NOW = 1764143823.0

VIEW: dict[str, Any] = {
    "id": "llama3-8b",
    "role": "chat",
    "provider": "ollama",
    "primary": False,
    "local": True,
    "capability_tags": ["reasoning", "code"],
    "cost_estimate": 0.0,
    "latency_estimate": 812.4,
    "health_status": "healthy",
    "score": 0.8123,
    "retired": False,
    "local_path": "",
    "last_probe": {"at": NOW - 30, "ok": True, "reason": "", "latency_ms": 41.7},
    "model": "llama3:8b",
    "endpoint": "http://127.0.0.1:11434",
    "quality": 0.6,
    "eligible": True,
    "not_probed": "",
    "quarantined_until": None,
    "health_changed_at": NOW - 185,
}
REMOTE: dict[str, Any] = {
    **VIEW,
    "id": "gpt-4o",
    "provider": "openai",
    "primary": True,
    "local": False,
    "retired": False,
    "health_status": "unavailable",
    "score": 0.0,
    "cost_estimate": 5.0,
    "last_probe": {"at": NOW - 30, "ok": False, "reason": "HTTP 401", "latency_ms": None},
}
DETAIL: dict[str, Any] = {
    **VIEW,
    "latency_estimate": 41.733,
    "score_parts": {"total": 0.8123, "latency_ms": 41.7, "reason": "", "parts": {
        "health": {"value": 1.0, "weight": 0.5, "contribution": 0.5},
        "latency": {"value": 0.923, "weight": 0.2, "contribution": 0.1846},
        "cost": {"value": 1.0, "weight": 0.1, "contribution": 0.1},
        "quality": {"value": 0.6, "weight": 0.2, "contribution": 0.12}}},
    "health": {"status": "healthy", "consecutive_successes": 12, "consecutive_failures": 0,
               "success_rate": 0.95, "latency_p50_ms": 41.73333333333, "latency_p95_ms": 97.2,
               "probes_total": 120, "failures_total": 3, "changed_at": NOW - 185},
    "recent_probes": [
        {"at": NOW - 30, "ok": True, "status": "ok", "reason": "", "latency_ms": 41.712,
         "facts": {"loaded": True, "size_vram": 5368709120}},
        {"at": NOW - 60, "ok": True, "status": "ok", "reason": "", "latency_ms": 40.2,
         "facts": {"loaded": True, "size_vram": 5368709120}},
        {"at": NOW - 90, "ok": True, "status": "degraded", "latency_ms": 2400.0,
         "reason": "model present but not loaded: the first request will wait for it to load "
                   "into memory (Ollama keep_alive expired)", "facts": {"loaded": False}},
    ],
    "capabilities": ["reasoning", "code"],
    "deep": False,
    "api_key_env": "",
}
HISTORY = {"role": "chat", "primary": "gpt-4o", "history": [
    {"at": NOW - 7200, "action": "initial", "from": None, "to": "llama3-8b",
     "reason": "primary = true in the configuration", "actor": "config"},
    {"at": NOW - 600, "action": "promote", "from": "llama3-8b", "to": "gpt-4o",
     "reason": "auto-upgrade: gpt-4o scores 0.910, primary llama3-8b scores 0.812: ahead by "
               "0.098 ≥ min_margin 0.050, a lead held for 10 min ≥ sustain 10 min",
     "actor": "policy", "automatic": True},
    {"at": NOW - 30, "action": "rollback", "from": "gpt-4o", "to": "llama3-8b",
     "reason": "gpt-4o answers 401 since the key rotation", "actor": "uid=0 pid=77",
     "automatic": False},
]}
CHANGES = {"changes": [{"role": "chat", "from": "gpt-4o", "to": "llama3-8b", "reason": "manual"}]}

CANNED: dict[tuple[str, str], Any] = {
    ("GET", "/api/v1/status"): {
        "version": "0.1.0",
        "pid": 4242,
        "started_at": NOW - 7200,
        "uptime_s": 7200.0,
        "config_path": "/etc/modeld/modeld.toml",
        "state_file": "/var/lib/modeld/model_registry.json",
        "socket": "/run/modeld/control.sock",
        "models": 2,
        "health": {"unknown": 0, "healthy": 1, "degraded": 0, "unavailable": 1},
        "roles": {"chat": "gpt-4o"},
        "role_details": {"chat": {"role": "chat", "primary": "gpt-4o",
                                  "resolves_to": "llama3-8b"}},
        "offline_mode": False,
        "forced_by_env": False,
        "auto_execute": False,
        "last_sweep": {"last_probe_at": NOW - 2, "probes_total": 1234,
                       "requests_in_flight": 0},
        "last_state_write": {"at": NOW - 5, "ok": True, "error": "", "bytes": 6624,
                             "seconds": 0.0091},
        "event_seq": 13,
        "summary": "2 models: 1 healthy, 0 degraded, 1 unavailable; offline=no",
        "gateway": {"listen": "127.0.0.1:8088", "requests_total": 17},
    },
    ("GET", "/api/v1/models/"): {
        "models": [VIEW, REMOTE], "offline_mode": False,
        "roles": {"chat": {"role": "chat", "primary": "gpt-4o", "resolves_to": "llama3-8b"}},
    },
    ("GET", "/api/v1/models/llama3-8b"): DETAIL,
    ("GET", "/api/v1/roles/chat/history"): HISTORY,
    ("POST", "/api/v1/models/llama3-8b/evaluate"): {
        "model_id": "llama3-8b",
        "result": {"status": "ok", "latency_ms": 40.0},
        "score": 0.81,
    },
    ("POST", "/api/v1/models/promote"): CHANGES,
    ("POST", "/api/v1/models/rollback"): {"changes": []},
    ("POST", "/api/v1/models/auto-upgrade/check"): {
        "suggestions": [
            {
                "role": "chat",
                "from": "gpt-4o",
                "to": "llama3-8b",
                "reason": "primary unavailable",
                "score_from": 0.0,
                "score_to": 0.8123,
            }
        ]
    },
    ("POST", "/api/v1/models/auto-upgrade/execute"): CHANGES,
    ("POST", "/api/v1/models/offline-mode"): {"offline_mode": True, "forced_by_env": False},
    ("GET", "/api/v1/models/offline-mode/status"): {"offline_mode": True, "forced_by_env": True},
    ("GET", "/api/v1/resolve"): {
        "role": "chat",
        "model_id": "llama3-8b",
        "model": VIEW,
        "fallbacks": ["gpt-4o", "mistral-7b"],
    },
    ("POST", "/api/v1/reload"): {"reloaded": True, "models": 2},
}

EVENTS = [
    {"seq": 1, "at": NOW - 185, "kind": "health_changed", "role": "chat",
     "model_id": "llama3-8b", "from": "", "to": "", "reason": "healthy", "actor": "daemon",
     "data": {"old": "unknown", "new": "healthy", "latency_ms": 41.712345678901234}},
    {"seq": 2, "at": NOW - 30, "kind": "model_promoted", "role": "chat",
     "model_id": "llama3-8b", "from": "gpt-4o", "to": "llama3-8b",
     "reason": "manual promotion by uid=0 pid=77", "actor": "uid=0 pid=77",
     "data": {"automatic": False, "forced": True}},
]


@dataclass
class Stub:
    """A canned daemon: records every request, answers from CANNED or from ``errors``."""

    path: str = ""
    requests: list[Request] = field(default_factory=list)
    errors: dict[tuple[str, str], HTTPError] = field(default_factory=dict)
    follow_forever: bool = False
    drop_followers: bool = False

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        self.requests.append(request)
        key = (request.method, request.path)
        if key in self.errors:
            raise self.errors[key]
        if key == ("GET", "/api/v1/events"):
            return StreamingResponse(self._events(request))
        if key not in CANNED:
            raise HTTPError(404, "not_found", f"no route {request.method} {request.path}")
        request.json()  # a body that is not JSON would be a modelctl bug
        return Response.json(CANNED[key])

    async def _events(self, request: Request) -> AsyncIterator[bytes]:
        since = int(request.query_one("since", "0") or 0)
        for event in EVENTS:
            if event["seq"] > since:  # the daemon's since=N: the events after N
                yield json.dumps(event).encode() + b"\n"
        if request.query_one("follow") == "1" and self.drop_followers:
            yield b'{"kind":"stream_dropped","last_seq":2,"reason":"fell behind"}\n'
        if request.query_one("follow") == "1" and self.follow_forever:
            await anyio.sleep_forever()

    @property
    def last(self) -> Request:
        return self.requests[-1]


@contextlib.contextmanager
def serving(stub: Stub) -> Iterator[Callable[[], None]]:
    """``stub`` served on its socket; yields a function that stops it (the daemon going away:
    the server shut down and its socket removed)."""
    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(create_unix_listener, stub.path, 0o660)
        server = HTTPServer(stub, Limits())
        future, _ = portal.start_task(server.serve, listener)
        stopped = False

        def stop() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                portal.call(server.shutdown, 1.0)
                future.result(timeout=5)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stub.path)

        try:
            yield stop
        finally:
            stop()


@pytest.fixture(scope="module")
def stub_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    stub = Stub(path=str(tmp_path_factory.mktemp("ctl") / "control.sock"))
    with serving(stub):
        yield stub


@pytest.fixture
def stub(stub_daemon: Stub) -> Iterator[Stub]:
    stub_daemon.requests.clear()
    stub_daemon.errors.clear()
    stub_daemon.follow_forever = False
    stub_daemon.drop_followers = False
    yield stub_daemon


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The clock at NOW, local time Europe/Berlin (CET), no terminal width."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    monkeypatch.delenv("COLUMNS", raising=False)
    time.tzset()
    monkeypatch.setattr(time, "time", lambda: NOW)
    yield
    monkeypatch.undo()
    time.tzset()


def assert_aligned(lines: list[str], headers: list[str]) -> None:
    """Every column starts where its header does, on every row (a person's reading of a
    table): the character before each header's offset is a space in every line."""
    head = lines[0]
    for header in headers[1:]:
        column = head.index(header)
        for line in lines[1:]:
            if len(line) > column:
                assert line[column - 2:column] == "  ", (header, line)
                assert line[column] != " ", (header, line)


def assert_no_epoch(text: str) -> None:
    """No raw unix time (ten digits) anywhere a person reads."""
    assert not re.search(r"\b1[5-9]\d{8}(\.\d+)?\b", text), text


def run(stub: Stub, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(["--socket", stub.path, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "daemon.control.ctl", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        **kw,
    )


# ----------------------------------------------------------------------------- each command


def test_list_json_prints_the_daemons_json(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "list", "--json")
    assert code == 0
    assert json.loads(out) == CANNED[("GET", "/api/v1/models/")]


def test_json_flag_works_before_the_command_too(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl.main(["--json", "--socket", stub.path, "offline", "status"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"offline_mode": True, "forced_by_env": True}


def test_status_shows_local_times_units_and_what_resolve_answers_per_role(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    code, out, _ = run(stub, capsys, "status")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/status")
    assert out.splitlines() == [
        "modeld 0.1.0, pid 4242, up 2 h (since 2025-11-26 06:57:03 CET)",
        "",
        "config:           /etc/modeld/modeld.toml",
        "state file:       /var/lib/modeld/model_registry.json",
        "socket:           /run/modeld/control.sock",
        "models:           2 (1 healthy, 0 degraded, 1 unavailable, 0 unknown)",
        "offline mode:     off",
        "auto-execute:     off: the policy only suggests (modelctl upgrade check)",
        "last probe:       2025-11-26 08:57:01 (2 s ago), 1234 probes since start, 0 in flight",
        "last state write: 2025-11-26 08:56:58 (5 s ago), ok (6.5 KiB in 9.1 ms)",
        "events:           13 so far (modelctl events)",
        "",
        # the primary is not what resolve answers with: both are shown, never "chat: gpt-4o"
        "ROLE  PRIMARY  RESOLVE ANSWERS",
        "chat  gpt-4o   llama3-8b (a fallback: the primary is not usable now: modelctl list "
        "says why)",
        "",
        # keys a newer daemon adds are shown too, figures by their key's name
        "gateway.listen:         127.0.0.1:8088",
        "gateway.requests_total: 17",
    ]
    assert_no_epoch(out)


def test_status_json_keeps_the_raw_values(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "status", "--json")
    assert code == 0
    assert json.loads(out) == CANNED[("GET", "/api/v1/status")]


def test_list_is_an_aligned_table_with_the_states_a_table_cannot_say_below_it(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    code, out, _ = run(stub, capsys, "list")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/models/")
    lines = out.splitlines()
    headers = ["ID", "ROLE", "PROVIDER", "HEALTH", "SCORE", "LATENCY (ms)", "COST/1M", "FLAGS",
               "LAST PROBE"]
    assert lines[:3] == [
        "ID         ROLE  PROVIDER  HEALTH       SCORE  LATENCY (ms)  COST/1M  FLAGS          "
        "LAST PROBE",
        "llama3-8b  chat  ollama    healthy      0.812  812           0.00     local,serving  "
        "ok in 42 ms, 30 s ago",
        "gpt-4o     chat  openai    unavailable  0.000  812           5.00     primary        "
        "failed, 30 s ago",
    ]
    assert_aligned(lines[:3], headers)
    # the reason in full, and the row resolve answers with named, with the primary it replaces
    assert lines[3:] == [
        "",
        "gpt-4o: last probe failed: HTTP 401",
        "role chat: resolve answers llama3-8b, not the primary gpt-4o (modelctl resolve --role "
        "chat)",
        "",
        "offline mode: off",
    ]
    assert_no_epoch(out)


def test_list_shows_quarantine_until_when_not_probed_and_nothing_usable(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    from daemon.control import text

    document = {
        "models": [
            {**VIEW, "quarantined_until": NOW + 3120},
            {**REMOTE, "eligible": False, "not_probed": "not probed: offline",
             "last_probe": {"at": NOW - 4000, "ok": True, "reason": "", "latency_ms": 8.25}},
        ],
        "offline_mode": True,
        "roles": {"chat": {"role": "chat", "primary": "gpt-4o", "resolves_to": None}},
    }
    out = text.format_models(document)
    lines = out.splitlines()
    assert lines[1].split()[7] == "local,quarantined"
    assert lines[2].split()[7] == "primary,not-probed"
    assert lines[2].endswith("ok in 8.2 ms, 66 min ago")
    assert lines[3:] == [
        "",
        "llama3-8b: quarantined until 2025-11-26 09:49:03 (in 52 min): the policy will not "
        "promote it before then",
        "gpt-4o: not probed: offline (its last state is kept; it is not used while offline "
        "mode is on)",
        "role chat: nothing usable; resolve answers 503 (modelctl resolve --role chat says "
        "why, model by model)",
        "",
        "offline mode: on",
    ]


def test_long_reasons_wrap_to_the_terminal_and_are_never_cut(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    reason = ("connection refused by 127.0.0.1:8000 (is the vLLM server running? systemctl "
              "status vllm) after 3 attempts")
    stub_doc = {"models": [{**REMOTE, "last_probe": {"at": NOW - 1, "ok": False,
                                                      "reason": reason}}]}
    from daemon.control import text

    out = text.format_models(stub_doc, width=60)
    notes = [line for line in out.splitlines() if line.startswith(("gpt-4o:", "  "))]
    assert all(len(line) <= 60 for line in notes), notes
    # the words of the reason, in order, all there: wrapped, not cut
    assert " ".join(" ".join(notes).split()) == f"gpt-4o: last probe failed: {reason}"
    assert notes[1].startswith("  ")  # continuation lines are indented


def test_show_explains_the_model_with_local_times_units_and_tables(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run(stub, capsys, "show", "llama3-8b")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/models/llama3-8b")
    assert out.splitlines() == [
        "id:           llama3-8b",
        "role:         chat, candidate",
        "provider:     ollama at http://127.0.0.1:11434 (upstream name llama3:8b)",
        "local:        yes",
        "health:       healthy since 2025-11-26 08:53:58 (3 min ago)",
        "in a row:     12 successes, 0 failures",
        "probes:       120 in all, 3 failed; 95% of the recent ones ok",
        "latency:      42 ms (measured median; p95 97 ms)",
        "score:        0.812",
        "quality:      0.6 (the configured prior)",
        "cost:         0.00 per 1M tokens",
        "capabilities: reasoning, code",
        "deep probe:   no",
        "last probe:   ok in 42 ms, 2025-11-26 08:56:33 (30 s ago)",
        "",
        "score, part by part (contribution = value × weight):",
        "  PART     VALUE  WEIGHT  CONTRIBUTION",
        "  health   1.000  0.500   0.500",
        "  latency  0.923  0.200   0.185",
        "  cost     1.000  0.100   0.100",
        "  quality  0.600  0.200   0.120",
        "  total                   0.812",
        "",
        "recent probes, newest first (facts where they change):",
        "  WHEN (CET)                       RESULT    LATENCY (ms)  DETAIL",
        "  2025-11-26 08:56:33 (30 s ago)   ok        42            "
        "loaded=yes, size_vram=5.0 GiB",
        "  2025-11-26 08:56:03 (1 min ago)  ok        40            -",
        "  2025-11-26 08:55:33 (1 min ago)  degraded  2400          "
        "model present but not loaded: the first",
        " " * 59 + "request will wait for it to load into",
        " " * 59 + "memory (Ollama keep_alive expired)",
        " " * 59 + "(loaded=no)",
    ]
    assert_no_epoch(out)
    code, out, _ = run(stub, capsys, "show", "llama3-8b", "--json")
    assert json.loads(out) == DETAIL  # scripts get the raw values


def test_evaluate_posts_and_prints_the_verdict_and_the_score(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stub, capsys, "evaluate", "llama3-8b")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("POST", "/api/v1/models/llama3-8b/evaluate")
    assert out.splitlines() == [
        "model:      llama3-8b",
        "probe:      ok in 40 ms",
        "health now: -",
        "score now:  0.810",
    ]


def test_history_shows_when_who_by_name_automatic_and_why(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    import pwd

    root = pwd.getpwuid(0).pw_name
    code, out, _ = run(stub, capsys, "history", "--role", "chat")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/roles/chat/history")
    lines = out.splitlines()
    assert lines == [
        "WHEN (CET)           ACTION    FROM       TO         WHO           AUTOMATIC  REASON",
        "2025-11-26 06:57:03  initial   -          llama3-8b  config        -          "
        "primary = true in the configuration",
        "2025-11-26 08:47:03  promote   llama3-8b  gpt-4o     policy        yes        "
        "auto-upgrade: gpt-4o scores 0.910, primary llama3-8b scores 0.812: ahead by 0.098 ≥ "
        "min_margin 0.050, a lead held for 10 min ≥ sustain 10 min",
        f"2025-11-26 08:56:33  rollback  gpt-4o     llama3-8b  {root} (uid 0)  no         "
        "gpt-4o answers 401 since the key rotation",
    ]
    assert_aligned(lines, ["WHEN (CET)", "ACTION", "FROM", "TO", "WHO", "AUTOMATIC", "REASON"])
    code, out, _ = run(stub, capsys, "history", "--role", "chat", "--limit", "1")
    assert stub.last.query == {"limit": ["1"]}
    assert len(out.splitlines()) == 2 and "key rotation" in out


def test_history_of_every_role_asks_for_the_roles_then_each_history(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    code, out, _ = run(stub, capsys, "history", "--json")
    assert code == 0
    assert [r.path for r in stub.requests] == ["/api/v1/status", "/api/v1/roles/chat/history"]
    entries = json.loads(out)["history"]
    assert [e["action"] for e in entries] == ["initial", "promote", "rollback"]
    assert entries[-1]["actor"] == "uid=0 pid=77"  # raw for scripts
    assert all(e["role"] == "chat" for e in entries)
    code, out, _ = run(stub, capsys, "history")
    assert out.splitlines()[0].split()[:4] == ["WHEN", "(CET)", "ROLE", "ACTION"]


def test_history_on_a_narrow_terminal_puts_the_reasons_under_their_rows(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(stub, capsys, "history", "--role", "chat")
    lines = out.splitlines()
    assert code == 0
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("WHEN (CET)           ACTION    FROM")
    assert lines[1] == "    REASON"
    assert lines[2].startswith("2025-11-26 06:57:03  initial")
    assert lines[3] == "    primary = true in the configuration"
    promote = lines[lines.index(next(x for x in lines if " promote " in x)) + 1:][:2]
    assert " ".join(x.strip() for x in promote).startswith(
        "auto-upgrade: gpt-4o scores 0.910, primary llama3-8b scores 0.812")


def test_events_print_one_readable_line_each_and_json_keeps_the_ndjson(
    stub: Stub, capsys: pytest.CaptureFixture[str], berlin: None
) -> None:
    import pwd

    root = pwd.getpwuid(0).pw_name
    code, out, err = run(stub, capsys, "events")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "2025-11-26 08:53:58  #1  health_changed          llama3-8b (chat): unknown -> healthy "
        "(42 ms)",
        f"2025-11-26 08:56:33  #2  model_promoted          chat: gpt-4o -> llama3-8b by {root} "
        f"(uid 0) (forced): manual promotion by {root} (uid 0)",
    ]
    code, out, _ = run(stub, capsys, "events", "--json")
    assert [json.loads(line) for line in out.splitlines()] == EVENTS
    code, out, _ = run(stub, capsys, "events", "--since", "1", "--json")
    assert stub.last.query == {"since": ["1"]}
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2]


def test_events_follow_without_since_says_how_to_get_the_backlog(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(stub, capsys, "events", "--follow")
    assert stub.last.query == {"follow": ["1"]}
    assert code == 0
    assert err == ("modelctl: showing events from now on; add --since 0 to replay the ones the "
                   "daemon kept first (or --since N: those after event N)\n")
    assert len(out.splitlines()) == 2
    code, out, err = run(stub, capsys, "events", "--follow", "--since", "0")
    assert err == ""


def test_events_follow_cut_off_by_the_daemon_exits_1_naming_where_to_resume(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.drop_followers = True
    code, out, err = run(stub, capsys, "events", "--follow", "--json")
    assert code == 1
    assert json.loads(out.splitlines()[-1])["kind"] == "stream_dropped"
    assert "--since 2" in err
    code, out, err = run(stub, capsys, "events", "--follow", "--since", "0")
    assert code == 1
    assert "stream_dropped" not in out and "resume with modelctl events --follow --since 2" in err


def test_reload_refused_prints_every_error_with_file_and_key_path(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    errors = ['/etc/modeld/modeld.toml: probe.intervall: unknown key (did you mean "interval"?)',
              '/etc/modeld/modeld.toml: models[2] (id "qwen").cost_estimate: cannot be negative']
    stub.errors[("POST", "/api/v1/reload")] = HTTPError(
        422, "config_invalid", "the new configuration was rejected; the old one stays in effect",
        errors=errors)
    code, out, err = run(stub, capsys, "reload")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "modelctl: reload refused (422 config_invalid): the new configuration was rejected; "
        "the old one stays in effect",
        *(f"  {line}" for line in errors),
    ]


def test_reload_accepted_says_what_changed_and_what_needs_a_restart(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.control import text

    assert text.format_reload({"added": ["qwen2.5-14b"], "removed": [], "changed": ["a", "b"],
                               "restart_required": ["daemon.socket"]}) == (
        "configuration reloaded: 1 added (qwen2.5-14b), 0 removed, 2 changed (a, b)\n"
        "these changes take effect only on restart (systemctl restart modeld): daemon.socket")


def test_promote_and_rollback_send_the_reason(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(stub, capsys, "promote", "llama3-8b", "--reason", "gpt-4o key rotated")
    assert code == 0
    assert stub.last.json() == {"model_id": "llama3-8b", "reason": "gpt-4o key rotated"}
    run(stub, capsys, "rollback", "--role", "chat", "--reason", "back to the 70b")
    assert stub.last.json() == {"role": "chat", "reason": "back to the 70b"}


def test_resolve_first_prints_the_id_alone(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "resolve", "--role", "chat", "--first")
    assert (code, out) == (0, "llama3-8b\n")
    stub.errors[("GET", "/api/v1/resolve")] = HTTPError(
        503, "no_usable_model", "no usable model in role chat", reasons={"a": "unavailable"})
    code, out, err = run(stub, capsys, "resolve", "--role", "chat", "--first")
    assert (code, out) == (1, "")
    assert "no usable model in role chat" in err


def test_the_readme_idiom_fails_when_nothing_is_usable_and_gives_the_id_otherwise(
    stub: Stub
) -> None:
    readme = (REPO / "README.md").read_text()
    idiom = next(line for line in readme.splitlines() if line.startswith("MODEL=$(modelctl"))
    assert "--first" in idiom and not re.search(r"[^|]\|[^|]", idiom)  # no pipe
    script = f'{idiom}\necho "model=$MODEL"\n'
    env = {**os.environ, "MODELD_SOCKET": stub.path,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ok = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                        timeout=20)
    assert (ok.returncode, ok.stdout) == (0, "model=llama3-8b\n"), ok.stderr
    stub.errors[("GET", "/api/v1/resolve")] = HTTPError(
        503, "no_usable_model", "no usable model in role chat", reasons={})
    failed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                            timeout=20)
    assert failed.returncode == 1 and failed.stdout == ""  # it stopped: no empty MODEL used
    # and the old idiom indeed never failed: the pipe's status is head's
    old = subprocess.run(["bash", "-c", 'MODEL=$(modelctl resolve --role chat | head -1) || '
                          'exit 1\necho "went on with [$MODEL]"'], capture_output=True,
                         text=True, env=env, timeout=20)
    assert old.returncode == 0 and old.stdout == "went on with []\n"


def test_show_unknown_model_is_refused_with_exit_1(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(stub, capsys, "show", "no such/model")
    assert code == 1
    assert stub.last.path == "/api/v1/models/no such/model"  # sent percent-encoded
    assert stub.last.target == "/api/v1/models/no%20such%2Fmodel"
    assert out == ""
    assert err.startswith("modelctl: show refused (404 not_found): no route GET")


def test_promote_sends_model_id_and_force(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "promote", "llama3-8b")
    assert code == 0
    assert stub.last.method == "POST" and stub.last.path == "/api/v1/models/promote"
    assert stub.last.json() == {"model_id": "llama3-8b"}
    assert stub.last.header("content-type") == "application/json"
    assert out.splitlines() == [
        "ROLE  FROM    TO         REASON",
        "chat  gpt-4o  llama3-8b  manual",
    ]
    code, _, _ = run(stub, capsys, "promote", "llama3-8b", "--force")
    assert code == 0
    assert stub.last.json() == {"model_id": "llama3-8b", "force": True}


def test_promote_refused_shows_the_daemons_message_and_exits_1(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.errors[("POST", "/api/v1/models/promote")] = HTTPError(
        409, "model_unavailable", "gpt-4o is unavailable; use --force to promote it anyway"
    )
    code, out, err = run(stub, capsys, "promote", "gpt-4o")
    assert code == 1
    assert out == ""
    assert err == (
        "modelctl: promote refused (409 model_unavailable): "
        "gpt-4o is unavailable; use --force to promote it anyway\n"
    )
    code, out, err = run(stub, capsys, "promote", "gpt-4o", "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "model_unavailable"  # scripts get the JSON


def test_forbidden_is_refused_with_exit_1(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    stub.errors[("POST", "/api/v1/reload")] = HTTPError(
        403, "forbidden", "uid 65534 is not root, the daemon's uid, or in group modeld"
    )
    code, _, err = run(stub, capsys, "reload")
    assert code == 1
    assert "reload refused (403 forbidden): uid 65534" in err


def test_rollback_with_and_without_role(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "rollback")
    assert code == 0
    assert (stub.last.method, stub.last.path, stub.last.json()) == (
        "POST",
        "/api/v1/models/rollback",
        {},
    )
    assert out == "no change\n"
    run(stub, capsys, "rollback", "--role", "chat")
    assert stub.last.json() == {"role": "chat"}


def test_upgrade_check_prints_suggestions_with_scores(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stub, capsys, "upgrade", "check")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("POST", "/api/v1/models/auto-upgrade/check")
    assert out.splitlines() == [
        "ROLE  FROM    TO         SCORE_FROM  SCORE_TO  REASON",
        "chat  gpt-4o  llama3-8b  0.000       0.812     primary unavailable",
    ]


def test_upgrade_execute_prints_changes(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "upgrade", "execute")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("POST", "/api/v1/models/auto-upgrade/execute")
    assert "chat  gpt-4o  llama3-8b  manual" in out


def test_offline_on_off_status(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "offline", "on")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("POST", "/api/v1/models/offline-mode")
    assert stub.last.json() == {"enabled": True}
    assert out == "offline mode: on\n"
    run(stub, capsys, "offline", "off")
    assert stub.last.json() == {"enabled": False}
    code, out, _ = run(stub, capsys, "offline", "status")
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/models/offline-mode/status")
    assert out == "offline mode: on (forced by DAENA_OFFLINE_MODE)\n"


def test_resolve_prints_the_model_first_then_the_fallbacks(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        stub, capsys, "resolve", "--role", "chat", "--capability", "code", "--capability", "vision"
    )
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/resolve")
    assert stub.last.query == {"role": ["chat"], "capability": ["code", "vision"]}
    assert out == "llama3-8b\ngpt-4o\nmistral-7b\n"
    run(stub, capsys, "resolve", "--capability", "code", "vision")
    assert stub.last.query == {"capability": ["code", "vision"]}


def test_resolve_with_nothing_usable_exits_1_with_the_reasons_and_prints_no_id(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.errors[("GET", "/api/v1/resolve")] = HTTPError(
        503,
        "no_usable_model",
        "no usable model for role chat",
        reasons={"llama3-8b": "unavailable: 3 failed probes", "gpt-4o": "remote, offline mode"},
    )
    code, out, err = run(stub, capsys, "resolve", "--role", "chat")
    assert code == 1
    assert out == ""  # $(modelctl resolve) is empty, never a wrong id
    assert err.splitlines() == [
        "modelctl: resolve refused (503 no_usable_model): no usable model for role chat",
        "  llama3-8b: unavailable: 3 failed probes",
        "  gpt-4o: remote, offline mode",
    ]


def test_events_follow_prints_as_they_come_and_ctrl_c_exits_0(stub: Stub) -> None:
    stub.follow_forever = True
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.control.ctl", "--socket", stub.path, "events", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # arrives while the stream is still open
        second = proc.stdout.readline()
        assert "  #1  health_changed  " in first and "  #2  model_promoted  " in second
        assert proc.poll() is None  # still following
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err  # only the hint on following without --since
    assert out == ""


# ----------------------------------------------------------------------------- exit codes


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main([]) == 2
    assert ctl.main(["bogus"]) == 2
    assert ctl.main(["offline", "maybe"]) == 2
    assert ctl.main(["events", "--since", "x"]) == 2
    assert ctl.main(["show"]) == 2
    assert "usage: modelctl" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


def test_missing_socket_exits_3_asking_whether_modeld_runs(tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.sock")
    proc = run_process("--socket", path, "list")
    assert proc.returncode == 3
    assert proc.stderr == (
        f"modelctl: cannot reach modeld at {path}: no such socket "
        "(is modeld running? is --socket right?)\n"
    )


def test_stale_socket_exits_3_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    proc = run_process("resolve", env={"MODELD_SOCKET": path})  # the env var is honoured
    assert proc.returncode == 3
    assert f"at {path}: connection refused (stale socket" in proc.stderr
    assert proc.stdout == ""


def test_unreachable_causes_are_named() -> None:
    path = "/run/modeld/control.sock"
    assert "are you in the modeld group?" in ctl.describe_unreachable(
        path, PermissionError(13, "Permission denied")
    )
    assert "is modeld running?" in ctl.describe_unreachable(path, FileNotFoundError(2, "x"))
    assert "stale socket" in ctl.describe_unreachable(path, ConnectionRefusedError(111, "x"))
    assert "timed out" in ctl.describe_unreachable(path, TimeoutError())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_permission_denied_exits_3_asking_about_the_group(stub: Stub) -> None:
    # A forked child that drops to nobody (the interpreter in the venv may not be
    # executable by nobody, so no exec): the 0660 root socket must refuse it.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stderr = os.fdopen(write_end, "w")
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = ctl.main(["--socket", stub.path, "status"])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, err
    assert err == (
        f"modelctl: cannot reach modeld at {stub.path}: permission denied "
        "(are you in the modeld group?)\n"
    )


def test_daemon_answering_garbage_exits_3(tmp_path: Path) -> None:
    path = str(tmp_path / "garbage.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()

    import threading

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        code = ctl.main(["--socket", path, "status"])
    finally:
        thread.join(5)
        server.close()
    assert code == 3


# ----------------------------------------------------------------------------- start-up cost


HEAVY = ("anyio", "httpx", "httpcore", "structlog", "prometheus_client", "pydantic", "h11",
         "inspect", "dataclasses", "email", "http")


def test_modelctl_imports_nothing_heavy(stub: Stub) -> None:
    script = (
        "import sys, json\n"
        "from daemon.control import ctl\n"
        "codes = [ctl.main(['--help']), ctl.main(['--socket', sys.argv[1], 'list'])]\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[2].split(','))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, stub.path, ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"codes": [0, 0], "heavy": []}


def test_modelctl_starts_fast() -> None:
    start = time.monotonic()
    proc = run_process("--help")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0
    assert elapsed < 1.0, f"modelctl --help took {elapsed:.2f}s"




# ----------------------------------------------------------------------------- watch


WATCH_CANNED = {
    ("GET", "/api/v1/resolve"): CANNED[("GET", "/api/v1/resolve")],
}


def _watch_command(socket_path: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "daemon.control.ctl", "--socket", socket_path, "watch",
            "--interval", "0.2", *extra]


def _read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} after {timeout} s in:\n{seen.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_watch_redraws_a_live_table_in_place_and_ctrl_c_exits_0(stub: Stub) -> None:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TZ": "Europe/Berlin"}
    proc = subprocess.Popen(_watch_command(stub.path), stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    os.close(slave)
    try:
        screen = _read_until(master, b"Ctrl-C to quit")
        screen += _read_until(master, b"Ctrl-C to quit")  # a second frame: it refreshes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        screen += _read_until(master, b"\x1b[?25h", timeout=5)  # the cursor is given back
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    assert proc.stderr is not None
    assert proc.stderr.read() == b""  # no traceback
    text = screen.decode()
    assert text.startswith("\x1b[?25l")  # cursor hidden while drawing
    assert text.count("\x1b[H") >= 2  # each frame drawn in place from the top left
    frame = text.rsplit("\x1b[H", 1)[-1].replace("\x1b[K", "").replace("\r", "")
    lines = frame.split("\n")
    # the roles: primary and what resolve answers, side by side
    roles = lines.index(next(line for line in lines if line.startswith("ROLE ")))
    assert lines[roles].split() == ["ROLE", "PRIMARY", "RESOLVE", "ANSWERS", "LAST", "CHANGE"]
    assert lines[roles + 1].startswith("chat  gpt-4o   llama3-8b (a fallback: the primary is "
                                       "unavailable)  rollback ")
    assert all(len(line) <= 120 for line in lines), lines  # fitted to the terminal
    header = next(line for line in lines if line.startswith("MODEL "))
    assert header.split() == ["MODEL", "ROLE", "HEALTH", "CHANGED", "SCORE", "LATENCY", "(ms)",
                              "FLAGS", "RESOLVE", "LAST", "PROBE"]
    rows = lines[lines.index(header) + 1:lines.index(header) + 3]
    # resolve's answer first, then the chain; health with since when
    assert rows[0].split()[:3] == ["llama3-8b", "chat", "healthy"]
    assert "answer" in rows[0].split() and "fallback" in rows[1].split()
    assert rows[1].split()[:2] == ["gpt-4o", "chat"]
    assert_aligned([header, *rows], ["ROLE", "HEALTH", "CHANGED", "SCORE", "FLAGS", "RESOLVE"])
    assert "recent events:" in frame
    assert frame.count(" #2  model_promoted ") == 1  # each event once, frame after frame
    assert_no_epoch(frame)


def test_watch_exits_3_saying_so_when_the_daemon_goes_away(tmp_path: Path) -> None:
    stub = Stub(path=str(tmp_path / "control.sock"))
    with serving(stub) as stop:
        proc = subprocess.Popen(_watch_command(stub.path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=REPO)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith(b"modeld 0.1.0 at")  # a frame was drawn (plain on a pipe)
            stop()
            code = proc.wait(timeout=10)
            out, err = proc.communicate(timeout=5)
        finally:
            proc.kill()
            proc.wait()
    assert code == 3
    assert b"\x1b[" not in out  # no escape codes on a pipe
    assert err.decode() == (f"modelctl watch: stopped, the daemon went away: cannot reach modeld "
                            f"at {stub.path}: no such socket (is modeld running? is --socket "
                            "right?)\n")


@pytest.mark.parametrize(("seconds", "words"), [
    (0.4, "just now"), (5, "5 s ago"), (59, "59 s ago"), (180, "3 min ago"),
    (5400, "90 min ago"), (7200, "2 h ago"), (200000, "2 days ago"), (-3120, "in 52 min"),
])
def test_ages_read_as_a_person_says_them(seconds: float, words: str) -> None:
    from daemon.control import text

    assert text.relative(NOW - seconds, NOW) == words


@pytest.mark.parametrize(("value", "shown"), [
    (0.912, "0.9 ms"), (41.712345678901234, "42 ms"), (2400.0, "2.40 s"), (None, "-"),
])
def test_latencies_are_rounded_with_their_unit(value: Any, shown: str) -> None:
    from daemon.control import text

    assert text.ms(value) == shown


def test_durations_and_sizes_have_units() -> None:
    from daemon.control import text

    assert [text.duration(s) for s in (4.25, 45, 125, 7260, 97200 * 3)] == [
        "4.2 s", "45 s", "2 min 5 s", "2 h 1 min", "3 days 9 h"]
    assert [text.size(n) for n in (812, 6624, 3 << 20)] == ["812 B", "6.5 KiB", "3.0 MiB"]


def test_status_shows_the_preferred_primary_and_holds_when_the_daemon_reports_them(
    berlin: None
) -> None:
    from daemon.control import text

    document = {"roles": {"chat": "llama3-8b"}, "role_details": {"chat": {
        "role": "chat", "primary": "llama3-8b", "preferred": "gpt-4o",
        "resolves_to": "llama3-8b",
        "hold": {"until": NOW + 3600, "by": "uid=0 pid=9", "reason": "vendor outage"}}}}
    out = text.format_status(document)
    assert out.splitlines()[-2:] == [
        "ROLE  PRIMARY    PREFERRED  RESOLVE ANSWERS  HOLD",
        "chat  llama3-8b  gpt-4o     llama3-8b        until 2025-11-26 09:57:03 by root (uid 0): "
        "vendor outage",
    ]
    without = text.format_status({"role_details": {"chat": {
        "role": "chat", "primary": "a", "resolves_to": "a"}}})
    assert "PREFERRED" not in without and "HOLD" not in without


def test_check_hold_and_release_read_as_sentences(berlin: None) -> None:
    from daemon.control import text

    check = text.format_suggestions({"suggestions": [], "roles": {
        "chat": {"role": "chat", "suggested": False,
                 "why": "new leads old by 0.100 ≥ min_margin 0.050, but not yet for sustain "
                        "600s (for 140s so far)"},
        "embed": {"role": "embed", "suggested": False, "why": "role held by uid=0 pid=9 for "
                  "3600s more (vendor outage): no optional upgrade"}}})
    assert check.splitlines() == [
        "no suggestions", "", "why not, per role:",
        "  ROLE   WHY NOTHING IS SUGGESTED",
        "  chat   new leads old by 0.100 ≥ min_margin 0.050, but not yet for sustain 600s "
        "(for 140s so far)",
        "  embed  role held by root (uid 0) for 3600s more (vendor outage): no optional upgrade",
    ]
    hold = {"by": "uid=0 pid=9", "reason": "vendor outage", "since": NOW, "until": NOW + 3600}
    assert text.format_hold({"role": "chat", "primary": "a", "hold": hold}) == (
        "role chat held until 2025-11-26 09:57:03 by root (uid 0): vendor outage (primary a); "
        "modelctl release chat ends it")
    assert text.format_release({"role": "chat", "released": True, "hold": hold}).startswith(
        "role chat released (the hold was until 2025-11-26 09:57:03 by root (uid 0)")
    assert text.format_release({"role": "chat", "released": False, "hold": None}) == (
        "role chat was not held: nothing changed")
    held = {"seq": 3, "at": NOW, "kind": "role_held", "role": "chat", "actor": "uid=0 pid=9",
            "reason": "vendor outage", "data": {"until": NOW + 3600}}
    assert text.event_summary(held, NOW) == (
        "chat held until 2025-11-26 09:57:03 (in 60 min) by root (uid 0): vendor outage")
    ended = {**held, "kind": "role_released", "actor": "policy", "reason": "the hold ended"}
    assert text.event_summary(ended, NOW) == "chat released by policy: the hold ended"
    # the preferred primary is shown only where a stand-in is primary
    same = text.format_status({"role_details": {"chat": {
        "role": "chat", "primary": "a", "preferred": "a", "resolves_to": "a", "hold": None}}})
    assert "PREFERRED" not in same and "HOLD" not in same
