"""``modeld demo``: the real daemon on fake upstreams, playing a short narrated scenario.

What a newcomer runs first. Nothing but the installed package is needed and nothing is left
behind: the fakes (:mod:`daemon.testing.fakes`) serve on 127.0.0.1, the config, state,
socket, log and model file live in one temporary directory under ``/tmp``, the daemon is the real
``modeld run`` in a subprocess (:mod:`daemon.testing.harness`), and what is shown is the real
``modelctl`` output (:func:`daemon.control.ctl.main`, run in-process against the real socket).

The scenario: models probed and scored; the primary's server dies and ``resolve`` fails over;
the server comes back; a better model is deployed, suggested with its reason in numbers, and
promoted, the old primary retired; rollback. Every step checks what it claims: a step that
did not happen as narrated is reported as failed and the demo exits 1.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from .control import ctl
from .testing.chat_fakes import ChatOllama, ChatOpenAI
from .testing.fakes import FakeServers, write_gguf
from .testing.harness import DaemonError, DaemonProcess, daemon_config

__all__ = ["main"]

T = TypeVar("T")

ROLE = "chat"
PRIMARY = "qwen2.5-7b"          # vLLM, the initial primary
FALLBACK = "llama3-8b"          # Ollama
LOCAL = "tinyllama-1.1b"        # a GGUF file on disk
BETTER = "qwen2.5-14b"          # deployed on the vLLM server during the demo

#: Deadlines that decide whether a step succeeded (the targets are printed beside them).
SETTLE_DEADLINE = 10.0
FAILOVER_DEADLINE = 3.0         # "about two seconds": interval 1 s + 2 rechecks of 200 ms
RECOVERY_DEADLINE = 6.0
SUGGESTION_DEADLINE = 8.0
POLL = 0.02

#: Environment a surrounding service manager or the caller may have set that must not reach
#: the demo daemon (it gets its own notify socket; offline mode would hide the remote model).
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES", "DAENA_OFFLINE_MODE", "MODELD_CONFIG", "MODELD_SOCKET")


class StepFailed(Exception):
    """A step of the scenario did not happen as narrated."""


class _Terminated(BaseException):
    """SIGTERM or SIGHUP to the demo: unwind and clean up like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------- output


def say(text: str = "") -> None:
    """Print one line at once (the output is often a pipe: tests, ``tee``)."""
    print(text, flush=True)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


@dataclass
class Outcome:
    """One line of the final summary."""

    step: str
    ok: bool
    detail: str


@dataclass
class Demo:
    """The running demo: work directory, fakes, daemon, and what happened so far."""

    workdir: Path
    servers: FakeServers
    vllm: ChatOpenAI = field(init=False)
    ollama: ChatOllama = field(init=False)
    door_port: int = field(init=False)
    gguf: Path = field(init=False)
    daemon: DaemonProcess = field(init=False)
    models: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    # ------------------------------------------------------------------ set-up

    @property
    def socket(self) -> str:
        return str(self.workdir / "control.sock")

    def start_upstreams(self) -> None:
        """A vLLM server, an Ollama server (a little slower) and a GGUF file."""
        self.vllm = self.servers.start(ChatOpenAI(["Qwen/Qwen2.5-7B-Instruct"], flavor="vllm"))
        self.ollama = self.servers.start(
            ChatOllama(["llama3:8b"], loaded=["llama3:8b"], latency=0.08))
        self.door_port = _free_port()
        (self.workdir / "models").mkdir()
        self.gguf = write_gguf(
            self.workdir / "models" / "tinyllama-1.1b-chat.Q4_K_M.gguf",
            metadata={"general.architecture": "llama", "general.name": "TinyLlama 1.1B Chat"})

    def config(self) -> dict[str, Any]:
        """The demo config: tuned so the whole scenario plays in seconds."""
        return daemon_config(
            self.workdir,
            self.models,
            daemon={"socket": self.socket, "state_flush_interval": "500ms"},
            probe={"interval": "1s", "timeout": "1s", "recheck_interval": "200ms"},
            health={"failure_threshold": 3, "success_threshold": 2},
            # sustain: the lead must hold this long before it is suggested (10 min by
            # default; short here so the scenario plays in seconds)
            policy={"interval": "2s", "auto_execute": False, "min_margin": 0.05,
                    "min_consecutive_healthy": 2, "sustain": "1s"},
            gateway={"listen": f"127.0.0.1:{self.door_port}", "first_byte_timeout": "2s"},
        )

    @property
    def door(self) -> str:
        """The front door's base URL, for OpenAI clients."""
        return f"http://127.0.0.1:{self.door_port}/v1"

    def declare_models(self) -> None:
        self.models = [
            {"id": PRIMARY, "provider": "openai", "role": ROLE, "endpoint": self.vllm.url,
             "model": "Qwen/Qwen2.5-7B-Instruct", "capability_tags": ["chat", "code"],
             "latency_estimate": 600, "quality": 0.65, "local": False, "primary": True},
            {"id": FALLBACK, "provider": "ollama", "role": ROLE, "endpoint": self.ollama.url,
             "model": "llama3:8b", "capability_tags": ["chat"], "latency_estimate": 800,
             "quality": 0.55},
            {"id": LOCAL, "provider": "local_file", "role": ROLE, "local_path": str(self.gguf),
             "capability_tags": ["chat"], "latency_estimate": 300, "quality": 0.3},
        ]

    def start_daemon(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        self.daemon = DaemonProcess(self.workdir, self.config(), env=env)
        self.daemon.start(timeout=20.0)

    # ------------------------------------------------------------------ talking to it

    def command(self, *args: str) -> str:
        """The ``modelctl`` command line a person would type."""
        return shlex.join(["modelctl", "--socket", self.socket, *args])

    def modelctl(self, *args: str, show: bool = True) -> str:
        """Run the real modelctl in-process; print the command and its output; return the
        output. A non-zero exit is a failed step."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ctl.main(["--socket", self.socket, *args])
        if code == 130:  # modelctl caught our Ctrl-C: it is the demo's to handle
            raise KeyboardInterrupt
        if show:
            say(f"  $ {self.command(*args)}")
            say(indent(out.getvalue() + err.getvalue()))
        if code != 0:
            raise StepFailed(f"`{self.command(*args)}` exited {code}: "
                             f"{(err.getvalue() or out.getvalue()).strip()}")
        return out.getvalue()

    def resolved(self) -> list[str]:
        """The chain ``modelctl resolve`` prints: the model to use, then its fallbacks."""
        return self.modelctl("resolve", "--role", ROLE).split()

    def resolve_id(self) -> str | None:
        """The model resolve picks now (None when nothing is usable), over the JSON API."""
        status, data = self.daemon.request("GET", f"/api/v1/resolve?role={ROLE}")
        return str(data["model_id"]) if status == 200 else None

    def views(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.daemon.get("/api/v1/models/")["models"]}

    def wait(self, predicate: Callable[[], T | None], deadline: float,
             what: str) -> tuple[T, float]:
        """Poll until ``predicate`` gives something truthy; (value, seconds it took).

        Raises StepFailed, naming ``what`` and the deadline, if it does not happen in time.
        """
        start = time.monotonic()
        while True:
            try:
                value = predicate()
            except (OSError, KeyError, ValueError, AssertionError):
                value = None
            elapsed = time.monotonic() - start
            if value:
                return value, elapsed
            if elapsed > deadline:
                raise StepFailed(f"{what} did not happen within {deadline:g} s")
            self.daemon._check_alive()
            time.sleep(POLL)

    def score_breakdown(self, *model_ids: str) -> None:
        """Print where the scores come from: each part's contribution (``modelctl show``)."""
        rows = []
        for model_id in model_ids:
            view = self.daemon.get(f"/api/v1/models/{model_id}")
            parts = view["score_parts"]["parts"]
            rows.append([model_id, *(f"{parts[name]['contribution']:.3f}" for name in
                                     ("health", "latency", "cost", "quality")),
                         f"{view['score']:.3f}",
                         f"{view['health']['success_rate']:.0%} of the last probes ok"])
        weights = " ".join(f"{name} {parts[name]['weight']:g}" for name in parts)
        say(f"  where the scores come from (weights: {weights}; details: "
            f"modelctl show ID):")
        say(indent(ctl.format_table(
            ["MODEL", "HEALTH", "LATENCY", "COST", "QUALITY", "SCORE", "WHY THE HEALTH PART"],
            rows)))

    def record(self, step: str, ok: bool, detail: str) -> None:
        self.outcomes.append(Outcome(step, ok, detail))
        say(f"  {'OK' if ok else 'FAILED'}: {detail}")


# ----------------------------------------------------------------------------- the scenario


def heading(number: int, title: str, why: str) -> None:
    say()
    say(f"[{number}/5] {title}")
    say(f"  why: {why}")


def step_probed(demo: Demo) -> None:
    heading(1, "Models probed and scored",
            "modeld keeps probing every model, so \"which model now?\" is answered from "
            "fresh facts, not from a config file.")
    expected = {PRIMARY: "healthy", FALLBACK: "healthy", LOCAL: "healthy"}

    def settled() -> dict[str, dict[str, Any]] | None:
        views = demo.views()
        done = all(views[i]["health_status"] == s for i, s in expected.items())
        return views if done else None

    _, took = demo.wait(settled, SETTLE_DEADLINE, "the first probes")
    demo.modelctl("list")
    chain = demo.resolved()
    if chain[:1] != [PRIMARY]:
        raise StepFailed(f"resolve --role {ROLE} answered {chain[:1]}, expected {PRIMARY}")
    say(f"  $ curl --unix-socket {shlex.quote(demo.socket)} "
        f"'http://modeld/api/v1/resolve?role={ROLE}'   (the same answer as JSON)")
    demo.record("probed", True, f"{len(expected)} models probed and healthy {took:.1f} s after "
                f"the daemon was ready; {ROLE} resolves to {PRIMARY}, "
                f"fallbacks {', '.join(chain[1:])}")


def step_failover(demo: Demo) -> None:
    heading(2, f"The primary's server dies: {ROLE} fails over",
            "applications ask modeld instead of hard-coding an endpoint, so an outage costs "
            "them seconds, not an incident.")
    traffic = DoorTraffic(demo.door)
    say(f"  (meanwhile {traffic.client_name} keeps asking the front door for model=\"{ROLE}\":")
    say(f"   OpenAI(base_url=\"{demo.door}\", api_key=\"-\").chat.completions.create("
        f"model=\"{ROLE}\", ...))")
    traffic.start()
    try:
        demo.wait(lambda: traffic.served.count(PRIMARY) >= 5, SETTLE_DEADLINE,
                  f"requests through the front door to {PRIMARY}")
        say(f"  (stopping the fake vLLM server at {demo.vllm.url}: connections are now refused)")
        demo.vllm.set_mode("down")
        target = "within about 2 s"
        try:
            new, took = demo.wait(lambda: (r := demo.resolve_id()) != PRIMARY and r,
                                  FAILOVER_DEADLINE, f"failover away from {PRIMARY}")
        except StepFailed as exc:
            demo.record("failover", False, f"{exc} (target: {target})")
            raise
        after = len(traffic.served)
        demo.wait(lambda: len(traffic.served) >= after + 10 or traffic.errors, SETTLE_DEADLINE,
                  "more requests through the front door")
    finally:
        traffic.stop()
    if traffic.errors:
        raise StepFailed(f"{len(traffic.errors)} of the client's requests failed through the "
                         f"front door: {traffic.errors[0]}")
    by_model = ", ".join(f"{traffic.served.count(m)} by {m}" for m in (PRIMARY, FALLBACK))
    say(f"  the client sent {len(traffic.served)} requests: {by_model}, and not one failed "
        "(the front door tried the next model before answering)")
    demo.modelctl("list")
    chain = demo.resolved()
    if new != FALLBACK or chain[:1] != [FALLBACK]:
        raise StepFailed(f"failed over to {new} (modelctl shows {chain[:1]}), "
                         f"expected {FALLBACK}, the best-scoring model left")
    demo.record("failover", True, f"{ROLE} -> {FALLBACK} {took:.2f} s after {PRIMARY}'s "
                f"server died ({target}: the front door's first failed request started the "
                f"rechecks at once); {len(traffic.served)} requests through the door, 0 failed")


class DoorTraffic:
    """A client on a thread asking the front door for ``model="chat"`` until stopped: the
    ``openai`` SDK when it is installed (it is a test dependency, not the daemon's), else the
    same requests with httpx."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.served: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-door-client", daemon=True)
        try:
            import openai  # noqa: F401
        except ImportError:
            self.client_name = "a client (httpx: the openai package is not installed)"
            self._sdk = False
        else:
            self.client_name = "an OpenAI SDK client"
            self._sdk = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        messages = [{"role": "user", "content": "Say hi"}]
        if self._sdk:
            import openai

            sdk = openai.OpenAI(base_url=self.base_url, api_key="-", max_retries=0)

            def ask() -> str:
                raw = sdk.chat.completions.with_raw_response.create(
                    model=ROLE, messages=messages)  # type: ignore[arg-type]
                return str(raw.headers["x-modeld-model"])
        else:
            import httpx

            plain = httpx.Client(base_url=self.base_url, timeout=10)

            def ask() -> str:
                answer = plain.post("/chat/completions", json={"model": ROLE,
                                                               "messages": messages})
                answer.raise_for_status()
                return answer.headers["x-modeld-model"]
        while not self._stop.is_set():
            try:
                self.served.append(ask())
            except Exception as exc:  # every failure is reported by the step
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def step_recovery(demo: Demo) -> None:
    heading(3, "The server comes back: healthy again",
            "hysteresis: a model that was down must pass 2 probes in a row before clients are "
            "sent back to it, so a flapping server does not flap your traffic.")
    say(f"  (starting the fake vLLM server again on {demo.vllm.url})")
    demo.vllm.set_mode("normal")
    try:
        _, took = demo.wait(lambda: demo.resolve_id() == PRIMARY, RECOVERY_DEADLINE,
                            f"{PRIMARY} coming back")
    except StepFailed as exc:
        demo.record("recovery", False, str(exc))
        raise
    chain = demo.resolved()
    if chain[:1] != [PRIMARY]:
        raise StepFailed(f"modelctl resolve shows {chain[:1]}, expected {PRIMARY}")
    status = demo.views()[PRIMARY]["health_status"]
    demo.record("recovery", True, f"{PRIMARY} is {status} and primary again {took:.2f} s after "
                "its server came back")


def step_upgrade(demo: Demo) -> None:
    heading(4, "A better model appears: suggested, then promoted",
            "the policy compares scores (health, latency, cost, quality) and says why in "
            "numbers; you decide (auto_execute = false), or let it act on its own.")
    say("  (deploying Qwen2.5-14B on the vLLM server and declaring it in the config)")
    demo.vllm.add_model("Qwen/Qwen2.5-14B-Instruct")
    demo.models.append(
        {"id": BETTER, "provider": "openai", "role": ROLE, "endpoint": demo.vllm.url,
         "model": "Qwen/Qwen2.5-14B-Instruct", "capability_tags": ["chat", "code"],
         "latency_estimate": 900, "quality": 0.95, "local": False})
    demo.daemon.write_config(demo.config())
    demo.modelctl("reload")

    def suggested() -> dict[str, Any] | None:
        data = demo.daemon.post("/api/v1/models/auto-upgrade/check")
        return next((s for s in data["suggestions"] if s["to"] == BETTER), None)

    try:
        suggestion, took = demo.wait(suggested, SUGGESTION_DEADLINE,
                                     f"a suggestion to promote {BETTER}")
    except StepFailed as exc:
        demo.record("upgrade", False, str(exc))
        raise
    say(f"  ({BETTER} passed 2 probes in a row and kept its lead for sustain (1 s here, "
        f"10 min by default); {took:.1f} s after the reload the policy suggests it)")
    shown = demo.modelctl("upgrade", "check")
    if BETTER not in shown:
        raise StepFailed(f"modelctl upgrade check does not show {BETTER}")
    demo.score_breakdown(PRIMARY, BETTER)
    executed = demo.modelctl("upgrade", "execute")
    if BETTER not in executed:
        raise StepFailed(f"modelctl upgrade execute did not promote {BETTER}: {executed}")
    views = demo.views()
    if not (views[BETTER]["primary"] and views[PRIMARY]["retired"]):
        raise StepFailed(f"after execute: {BETTER} primary={views[BETTER]['primary']}, "
                         f"{PRIMARY} retired={views[PRIMARY]['retired']}")
    demo.modelctl("list")
    chain = demo.resolved()
    if chain[:2] != [BETTER, PRIMARY]:
        raise StepFailed(f"resolve shows {chain}, expected {BETTER} first and the retired "
                         f"{PRIMARY} as first fallback")
    demo.record("upgrade", True, f"{BETTER} suggested (score {suggestion['score_to']:.3f} vs "
                f"{suggestion['score_from']:.3f}) and promoted; {PRIMARY} retired, kept as "
                "first fallback")


def step_rollback(demo: Demo) -> None:
    heading(5, "Rollback restores the previous primary",
            "every promotion is recorded (who, when, why), so undoing one is a single "
            "command, and it is durable before the command returns.")
    demo.modelctl("rollback", "--role", ROLE)
    views = demo.views()
    if not (views[PRIMARY]["primary"] and views[BETTER]["retired"]):
        raise StepFailed(f"after rollback: {PRIMARY} primary={views[PRIMARY]['primary']}, "
                         f"{BETTER} retired={views[BETTER]['retired']}")
    chain = demo.resolved()
    if chain[:1] != [PRIMARY]:
        raise StepFailed(f"resolve shows {chain[:1]} after rollback, expected {PRIMARY}")
    history = demo.daemon.state()["roles"][ROLE]["history"]
    say(f"  the audit trail of role {ROLE}, as saved in {demo.daemon.state_path}:")
    say(indent(ctl.format_table(
        ["ACTION", "FROM", "TO", "BY", "REASON"],
        [[h["action"], h["from"] or "-", h["to"] or "-", h["actor"],
          textwrap.shorten(h["reason"], 60, placeholder=" ...")] for h in history])))
    demo.record("rollback", True, f"{ROLE} -> {PRIMARY} again; {BETTER} retired")


# ----------------------------------------------------------------------------- lifecycle


def _banner(demo: Demo) -> None:
    say("modeld demo: the real daemon, fake model servers, a five-step scenario")
    say(f"  work dir:  {demo.workdir}  (config, state, socket, log; removed at the end)")
    say(f"  upstreams: vLLM (OpenAI API) {demo.vllm.url}   Ollama {demo.ollama.url}")
    say(f"             GGUF file {demo.gguf}")
    say(f"  daemon:    pid {demo.daemon.pid}, `modeld run --config {demo.daemon.config_path}`")
    say(f"  socket:    {demo.socket}")
    say(f"  front door: {demo.door}  (OpenAI API: model=\"{ROLE}\" is the role)")
    say(f"  try it:    export MODELD_SOCKET={shlex.quote(demo.socket)}")


def _explore(demo: Demo) -> None:
    """Keep everything up until Ctrl-C; returns when interrupted (raises if the daemon dies)."""
    sock = shlex.quote(demo.socket)
    say()
    say("Ready for exploration: the daemon and the fake servers keep running until Ctrl-C.")
    say(f"  export MODELD_SOCKET={sock}")
    for line in (
        "modelctl list",
        f"modelctl resolve --role {ROLE}",
        f"modelctl show {BETTER}",
        f"modelctl promote {BETTER}          # then: modelctl rollback --role {ROLE}",
        "modelctl upgrade check",
        "modelctl events --follow           # in a second terminal, then act in the first",
        f"modelctl offline on                # {PRIMARY} and {BETTER} are declared remote",
        "curl --unix-socket $MODELD_SOCKET http://modeld/api/v1/status",
        f"curl {demo.vllm.url}/v1/models   # the fake vLLM server itself",
        f"curl {demo.door}/models   # the front door: roles and models with their health",
        f"curl {demo.door}/chat/completions -H 'content-type: application/json' "
        f"-d '{{\"model\": \"{ROLE}\", \"messages\": [{{\"role\": \"user\", "
        f"\"content\": \"hi\"}}]}}'",
    ):
        say(f"  {line}")
    say(f"  daemon log: {demo.daemon.log_path}")
    # the announcement inside: a terminal closed right as it is printed (SIGHUP while say()
    # returns) must end the exploration like Ctrl-C, not the demo with exit 129
    with contextlib.suppress(KeyboardInterrupt, _Terminated):
        say("Press Ctrl-C to stop everything.")
        while demo.daemon.running():
            time.sleep(0.2)
        code = demo.daemon.proc.returncode if demo.daemon.proc else None
        raise DaemonError(f"the daemon exited on its own with {code}")
    say()
    say("Ctrl-C: stopping.")


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt (even if started with SIGINT ignored, as background
    jobs are) and SIGTERM unwinds the same way, so the cleanup in ``finally`` runs. So does
    SIGHUP, the closing of the demo's terminal: the daemon runs in a session of its own and
    would be left behind with the temporary directory."""
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # the terminal is gone: writing to it now fails (EIO), and the clean-up prints
        _detach_output()
        raise _Terminated(signum)

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_hup = signal.signal(signal.SIGHUP, on_hangup)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _detach_output() -> None:
    """Point stdout and stderr at /dev/null (what is still buffered for them is dropped)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP while cleaning up: a second Ctrl-C must not leave a
    daemon."""
    previous = {s: signal.signal(s, signal.SIG_IGN)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_daemon(demo: Demo) -> str | None:
    """Stop the daemon with SIGTERM; None when it exited 0, else what went wrong."""
    try:
        code = demo.daemon.stop(timeout=15.0)
    except DaemonError as exc:
        return str(exc)
    finally:
        demo.daemon.close()
    if code != 0:
        return f"the daemon exited with {code} after SIGTERM\n{demo.daemon.log_tail(20)}"
    return None


def _log_tail(daemon: DaemonProcess, events: int = 12) -> str:
    """The daemon's last JSON log lines, one ``event key=value ...`` line each."""
    lines = []
    for entry in daemon.log_lines()[-events:]:
        context = " ".join(f"{key}={value}" for key, value in entry.items()
                           if key not in ("event", "level", "logger", "timestamp"))
        lines.append(textwrap.shorten(f"{entry.get('level', '')} {entry.get('event', '?')} "
                                      f"{context}", 160, placeholder=" ..."))
    return "\n".join(lines) or daemon.log_tail(events)


def _summary(demo: Demo, started: float) -> None:
    say()
    say("Summary")
    for outcome in demo.outcomes:
        say(f"  {'OK    ' if outcome.ok else 'FAILED'}  {outcome.step:<9} {outcome.detail}")
    say(f"  scenario played in {time.monotonic() - started:.1f} s")


def main(keep_running: bool = False) -> int:
    """Run the demo; the exit code (0 only when every step happened as narrated)."""
    with contextlib.suppress(AttributeError, ValueError):
        # the daemon's reasons use "≥"; never die on a terminal that cannot print it
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="modeld-demo-", dir="/tmp"))
    demo: Demo | None = None
    failure: str | None = None
    exit_code = 0
    with contextlib.ExitStack() as resources:
        try:
            with _signals_unwind():
                servers = resources.enter_context(FakeServers())
                demo = Demo(workdir, servers)
                demo.start_upstreams()
                demo.declare_models()
                demo.start_daemon()
                _banner(demo)
                for step in (step_probed, step_failover, step_recovery, step_upgrade,
                             step_rollback):
                    step(demo)
                _summary(demo, started)
                if keep_running:
                    _explore(demo)
        except StepFailed as exc:
            failure, exit_code = f"step failed: {exc}", 1
        except DaemonError as exc:
            failure, exit_code = f"the daemon failed: {exc}", 1
        except KeyboardInterrupt:
            failure, exit_code = "interrupted", 130
        except _Terminated as exc:
            failure = "terminated" if exc.signum == signal.SIGTERM else (
                f"terminated by {signal.Signals(exc.signum).name}")
            exit_code = 128 + exc.signum
        finally:
            with _uninterruptible():
                exit_code = _clean_up(demo, resources, workdir, failure, exit_code)
    say(f"demo {'finished' if exit_code == 0 else 'failed'} in "
        f"{time.monotonic() - started:.1f} s (exit {exit_code})")
    return exit_code


def _clean_up(demo: Demo | None, resources: contextlib.ExitStack, workdir: Path,
              failure: str | None, exit_code: int) -> int:
    """Report a failure, stop the daemon (exit 0 checked), the fakes, remove the work dir;
    returns the exit code, made non-zero if any of that went wrong."""
    has_daemon = demo is not None and hasattr(demo, "daemon") and demo.daemon.proc is not None
    if failure is not None:
        say()
        say(f"FAILED: {failure}")
        if has_daemon and exit_code == 1:
            assert demo is not None
            say("the daemon's last log events:")
            say(indent(_log_tail(demo.daemon)))
    say()
    if has_daemon:
        assert demo is not None
        problem = _stop_daemon(demo)
        if problem is None:
            say(f"daemon pid {demo.daemon.pid} stopped with SIGTERM, exit 0")
        else:
            say(f"FAILED: {problem}")
            exit_code = exit_code or 1
    resources.close()
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        say(f"FAILED: fake servers stopped but {workdir} could not be removed")
        return exit_code or 1
    say(f"fake servers stopped; {workdir} removed")
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main("--keep-running" in sys.argv[1:]))
