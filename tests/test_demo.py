"""``modeld demo``: it plays every step to its end, proves each with modelctl's output, and
leaves no process or temporary file behind — also with ``--keep-running`` and on Ctrl-C.

The demo runs as a user runs it: ``python -m daemon demo`` in a subprocess. ``TMPDIR`` points
at a private directory so that any temporary file the demo or the harness forgets is seen.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.testing.harness import short_tempdir

HANG_GUARD = 60.0  # the demo's own target is 40 s; this only stops a hung run


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    with short_tempdir("md-tmp-") as path:
        yield path


def _env(private_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(private_tmp)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _found(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in the demo's output:\n{text}"
    return match.group(1)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the demo's work dir: its daemon)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def _assert_nothing_left(output: str, private_tmp: Path) -> None:
    workdir = _found(r"work dir:\s+(\S+)", output)
    pid = int(_found(r"daemon:\s+pid (\d+)", output))
    assert f"daemon pid {pid} stopped with SIGTERM, exit 0" in output
    assert f"fake servers stopped; {workdir} removed" in output
    assert not Path(workdir).exists(), f"{workdir} left behind"
    assert not _pid_running(pid), f"daemon pid {pid} still running"
    assert _processes_mentioning(workdir) == []
    assert list(private_tmp.iterdir()) == [], "temporary files left in TMPDIR"


class DemoRun:
    """``modeld demo`` in a subprocess, its output read line by line as it comes."""

    def __init__(self, private_tmp: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "demo", *args], env=_env(private_tmp),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_line(self, fragment: str, timeout: float = 30.0) -> str:
        """The first output line containing ``fragment``; fails if the demo ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {fragment!r} after {timeout}s:\n{self.output}")
            if line is None:
                pytest.fail(f"the demo ended before printing {fragment!r}:\n{self.output}")
            self.lines.append(line)
            if fragment in line:
                return line

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the exit and the rest of the output; the exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None):
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _modelctl() -> list[str]:
    script = Path(sys.executable).parent / "modelctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.control.ctl"]


def test_demo_plays_every_step_and_leaves_nothing_behind(private_tmp: Path) -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "daemon", "demo"], env=_env(private_tmp),
                            capture_output=True, text=True, timeout=HANG_GUARD)
    wall = time.monotonic() - started
    out = result.stdout
    print(f"modeld demo: exit {result.returncode} in {wall:.1f} s wall")
    assert result.returncode == 0, out + result.stderr
    assert "FAILED" not in out

    for heading in ("[1/5] Models probed and scored",
                    "[2/5] The primary's server dies: chat fails over",
                    "[3/5] The server comes back: healthy again",
                    "[4/5] A better model appears: suggested, then promoted",
                    "[5/5] Rollback restores the previous primary"):
        assert heading in out
    # each step shows the command to type, with the socket path
    socket = _found(r"socket:\s+(\S+)", out)
    for command in ("list", "resolve --role chat", "reload", "upgrade check",
                    "upgrade execute", "rollback --role chat"):
        assert f"$ modelctl --socket {socket} {command}\n" in out
    assert f"export MODELD_SOCKET={socket}" in out

    # failover, measured, within the demo's own deadline of 3 s ("about two seconds")
    failover = float(_found(r"OK: chat -> llama3-8b ([\d.]+) s after qwen2\.5-7b's server died",
                            out))
    assert failover <= 3.0
    # an OpenAI client kept asking the front door for "chat" throughout: not one failure
    door = re.search(r"the client sent (\d+) requests: (\d+) by qwen2\.5-7b, (\d+) by "
                     r"llama3-8b, and not one failed", out)
    assert door and int(door.group(2)) >= 5 and int(door.group(3)) >= 10, out
    _found(r"OK: qwen2\.5-7b is healthy and primary again ([\d.]+) s", out)
    # the suggestion, with its numbers, then the promotion, then the rollback (modelctl tables)
    assert re.search(r"^    chat  qwen2\.5-7b  qwen2\.5-14b  [\d.]+ +[\d.]+ +qwen2\.5-14b scores "
                     r"[\d.]+, primary qwen2\.5-7b scores [\d.]+"
                     # the 7b is judged on its health since it recovered from step 2's outage
                     r"( on its health since it recovered \([\d.]+ over its whole window\))?"
                     r": ahead by [\d.]+ ≥ min_margin [\d.]+, for \d+s ≥ sustain 1s", out,
                     re.MULTILINE)
    assert re.search(r"^    chat  qwen2\.5-7b  qwen2\.5-14b  auto-upgrade: ", out, re.MULTILINE)
    assert re.search(r"^    qwen2\.5-7b +chat +openai +healthy +[\d.]+ +[\d.]+ +[\d.]+ +retired",
                     out, re.MULTILINE)
    assert re.search(r"^    chat  qwen2\.5-14b  qwen2\.5-7b +manual rollback", out, re.MULTILINE)
    summary = out[out.index("\nSummary\n"):]
    assert len(re.findall(r"^  OK ", summary, re.MULTILINE)) == 5

    reported = float(_found(r"demo finished in ([\d.]+) s \(exit 0\)", out))
    assert reported < 40.0, f"the demo reports {reported} s; its target is under 40 s"
    _assert_nothing_left(out, private_tmp)


def test_keep_running_serves_modelctl_until_ctrl_c(private_tmp: Path) -> None:
    demo = DemoRun(private_tmp, "--keep-running")
    try:
        demo.wait_line("Ready for exploration", timeout=HANG_GUARD)
        socket = _found(r"export MODELD_SOCKET=(\S+)", demo.output)
        resolved = subprocess.run([*_modelctl(), "--socket", socket, "resolve", "--role", "chat"],
                                  capture_output=True, text=True, timeout=10)
        assert resolved.returncode == 0, resolved.stderr
        # after the rollback: the first model, then the retired 14b as first fallback
        assert resolved.stdout.split()[:2] == ["qwen2.5-7b", "qwen2.5-14b"]
        demo.wait_line("Press Ctrl-C to stop everything.")
        demo.proc.send_signal(signal.SIGINT)
        code = demo.finish()
    finally:
        demo.kill()
    assert code == 0, demo.output
    assert "Ctrl-C: stopping." in demo.output
    _assert_nothing_left(demo.output, private_tmp)


def test_ctrl_c_mid_scenario_stops_everything_and_says_so(private_tmp: Path) -> None:
    demo = DemoRun(private_tmp)
    try:
        demo.wait_line("[2/5]", timeout=HANG_GUARD)
        demo.proc.send_signal(signal.SIGINT)
        code = demo.finish()
    finally:
        demo.kill()
    assert code == 130, demo.output
    assert "FAILED: interrupted" in demo.output
    assert "Summary" not in demo.output  # no success is claimed for steps that did not run
    _assert_nothing_left(demo.output, private_tmp)


def test_a_missed_deadline_is_reported_as_failed_never_as_success(private_tmp: Path) -> None:
    # an impossible failover deadline: the demo must say so, exit 1, and still clean up
    code = ("import daemon.demo as demo; demo.FAILOVER_DEADLINE = 0.01; "
            "raise SystemExit(demo.main())")
    result = subprocess.run([sys.executable, "-c", code], env=_env(private_tmp),
                            capture_output=True, text=True, timeout=HANG_GUARD)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "FAILED: step failed: failover away from qwen2.5-7b did not happen within 0.01 s" in out
    assert "OK: chat -> llama3-8b" not in out
    assert "Summary" not in out
    _assert_nothing_left(out, private_tmp)


def test_sigterm_stops_everything_too(private_tmp: Path) -> None:
    demo = DemoRun(private_tmp)
    try:
        demo.wait_line("[1/5]", timeout=HANG_GUARD)
        demo.proc.send_signal(signal.SIGTERM)
        code = demo.finish()
    finally:
        demo.kill()
    assert code == 128 + signal.SIGTERM, demo.output
    assert "FAILED: terminated" in demo.output
    _assert_nothing_left(demo.output, private_tmp)


def test_keep_running_cleans_up_when_its_terminal_closes(private_tmp: Path) -> None:
    # the demo on a real terminal (a pty), as a terminal emulator runs it; closing the
    # terminal sends SIGHUP, and every later write to it fails: the daemon (in a session of
    # its own) and the work directory must still go
    import pty
    import select

    pid, terminal = pty.fork()
    if pid == 0:  # pragma: no cover - the child: become the demo
        os.execve(sys.executable, [sys.executable, "-m", "daemon", "demo", "--keep-running"],
                  _env(private_tmp))
    seen = b""
    try:
        deadline = time.monotonic() + HANG_GUARD
        while b"Press Ctrl-C to stop everything." not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([terminal], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(terminal, 65536)
                except OSError:  # the demo ended (EIO on a pty whose other side closed)
                    pytest.fail(f"the demo ended early:\n{seen.decode(errors='replace')}")
        output = seen.decode(errors="replace")
        workdir = _found(r"work dir:\s+(\S+)", output)
        daemon_pid = int(_found(r"daemon:\s+pid (\d+)", output))
        assert _pid_running(daemon_pid)
    finally:
        os.close(terminal)  # the terminal closes: the kernel sends SIGHUP to the demo
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the demo did not exit within 30 s of its terminal closing")
        time.sleep(0.05)
    left = {"exit": os.waitstatus_to_exitcode(done[1]), "dir": Path(workdir).exists(),
            "daemon": _pid_running(daemon_pid), "tmp": list(private_tmp.iterdir())}
    if left["daemon"]:  # not to leave it running for the rest of the suite
        os.kill(daemon_pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)
    # it cleaned up, rather than being killed by the SIGHUP
    assert left == {"exit": 0, "dir": False, "daemon": False, "tmp": []}
    assert _processes_mentioning(workdir) == []
