"""modelctl against a stub daemon: requests sent, tables and JSON printed, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
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

VIEW: dict[str, Any] = {
    "id": "llama3-8b",
    "role": "chat",
    "provider": "ollama",
    "primary": True,
    "local": True,
    "capability_tags": ["reasoning", "code"],
    "cost_estimate": 0.0,
    "latency_estimate": 812.4,
    "health_status": "healthy",
    "score": 0.8123,
    "retired": False,
    "local_path": "",
    "last_probe": {"at": 1000.0, "ok": True, "reason": "", "latency_ms": 41.7},
}
REMOTE: dict[str, Any] = {
    **VIEW,
    "id": "gpt-4o",
    "provider": "openai",
    "primary": False,
    "local": False,
    "retired": True,
    "health_status": "unavailable",
    "score": 0.0,
    "cost_estimate": 5.0,
    "last_probe": {"at": 1000.0, "ok": False, "reason": "HTTP 401", "latency_ms": None},
}
CHANGES = {"changes": [{"role": "chat", "from": "gpt-4o", "to": "llama3-8b", "reason": "manual"}]}

CANNED: dict[tuple[str, str], Any] = {
    ("GET", "/api/v1/status"): {
        "version": "0.1.0",
        "uptime": 12.5,
        "config_path": "/etc/modeld/modeld.toml",
        "counts": {"models": 2, "healthy": 1},
        "last_sweep": None,
    },
    ("GET", "/api/v1/models/"): {"models": [VIEW, REMOTE], "offline_mode": False},
    ("GET", "/api/v1/models/llama3-8b"): VIEW,
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
    {"seq": 1, "kind": "health_changed", "model_id": "llama3-8b"},
    {"seq": 2, "kind": "model_promoted", "role": "chat", "from": "gpt-4o", "to": "llama3-8b"},
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
            if event["seq"] >= since:
                yield json.dumps(event).encode() + b"\n"
        if request.query_one("follow") == "1" and self.drop_followers:
            yield b'{"kind":"stream_dropped","last_seq":2,"reason":"fell behind"}\n'
        if request.query_one("follow") == "1" and self.follow_forever:
            await anyio.sleep_forever()

    @property
    def last(self) -> Request:
        return self.requests[-1]


@pytest.fixture(scope="module")
def stub_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    stub = Stub(path=str(tmp_path_factory.mktemp("ctl") / "control.sock"))
    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(create_unix_listener, stub.path, 0o660)
        server = HTTPServer(stub, Limits())
        future, _ = portal.start_task(server.serve, listener)
        yield stub
        portal.call(server.shutdown, 1.0)
        future.result(timeout=5)


@pytest.fixture
def stub(stub_daemon: Stub) -> Iterator[Stub]:
    stub_daemon.requests.clear()
    stub_daemon.errors.clear()
    stub_daemon.follow_forever = False
    stub_daemon.drop_followers = False
    yield stub_daemon


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


def test_status_prints_every_key_aligned(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(stub, capsys, "status")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/status")
    assert out.splitlines() == [
        "version:        0.1.0",
        "uptime:         12.5",
        "config_path:    /etc/modeld/modeld.toml",
        "counts.models:  2",
        "counts.healthy: 1",
        "last_sweep:     -",
    ]


def test_list_prints_an_aligned_table_and_the_offline_mode(
    stub: Stub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ctl.time, "time", lambda: 1030.0)
    code, out, _ = run(stub, capsys, "list")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/models/")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "ROLE",
        "PROVIDER",
        "HEALTH",
        "SCORE",
        "LATENCY_MS",
        "COST",
        "FLAGS",
        "LAST",
        "PROBE",
    ]
    assert lines[1].split()[:8] == [
        "llama3-8b",
        "chat",
        "ollama",
        "healthy",
        "0.812",
        "812",
        "0.00",
        "primary,local",
    ]
    assert lines[1].endswith("ok 42ms 30s ago")
    assert lines[2].split()[:8] == [
        "gpt-4o",
        "chat",
        "openai",
        "unavailable",
        "0.000",
        "812",
        "5.00",
        "retired",
    ]
    assert lines[2].endswith("failed 30s ago (HTTP 401)")
    # aligned: every column starts at the same offset on every row
    for header in ("ROLE", "HEALTH", "FLAGS"):
        column = lines[0].index(header)
        assert lines[1][column - 2 : column] == "  " and lines[2][column - 2 : column] == "  "
    assert lines[3] == "offline mode: off"


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


def test_show_quotes_the_id_and_prints_fields(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stub, capsys, "show", "llama3-8b")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("GET", "/api/v1/models/llama3-8b")
    assert "capability_tags:       reasoning, code" in out.splitlines()
    assert "last_probe.latency_ms: 41.7" in out.splitlines()


def test_show_unknown_model_is_refused_with_exit_1(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(stub, capsys, "show", "no such/model")
    assert code == 1
    assert stub.last.path == "/api/v1/models/no such/model"  # sent percent-encoded
    assert stub.last.target == "/api/v1/models/no%20such%2Fmodel"
    assert out == ""
    assert err.startswith("modelctl: show refused (404 not_found): no route GET")


def test_evaluate_posts_and_prints_the_result(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stub, capsys, "evaluate", "llama3-8b")
    assert code == 0
    assert (stub.last.method, stub.last.path) == ("POST", "/api/v1/models/llama3-8b/evaluate")
    assert "result.status:     ok" in out.splitlines()
    assert "score:             0.81" in out.splitlines()


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


def test_events_prints_ndjson_lines_and_passes_since(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stub, capsys, "events")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == EVENTS
    code, out, _ = run(stub, capsys, "events", "--since", "2")
    assert stub.last.query == {"since": ["2"]}
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2]


def test_events_follow_ends_quietly_when_the_daemon_closes_the_stream(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(stub, capsys, "events", "--follow")
    assert stub.last.query == {"follow": ["1"]}
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 2


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
        assert json.loads(first)["seq"] == 1 and json.loads(second)["seq"] == 2
        assert proc.poll() is None  # still following
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert err == ""  # no traceback
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


def test_events_follow_cut_off_by_the_daemon_exits_1_naming_where_to_resume(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.drop_followers = True
    code, out, err = run(stub, capsys, "events", "--follow")
    assert code == 1
    assert json.loads(out.splitlines()[-1])["kind"] == "stream_dropped"
    assert "--since 2" in err
