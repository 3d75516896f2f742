"""modelctl: the command line of modeld's control socket.

Shell scripts call ``modelctl resolve`` on every start, so this module imports the standard
library only (no anyio, httpx, structlog or prometheus_client): HTTP/1.1 goes over the Unix
socket as a few lines of raw-socket code (``http.client`` alone, with the ``email`` package
it pulls in, would cost a third of the start-up time).

Exit codes: 0 success, 1 refused by the daemon (its message is shown), 2 usage, 3 daemon
unreachable (the socket path and the likely cause are named).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from . import routes, text

DEFAULT_SOCKET = "/run/modeld/control.sock"
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

REQUEST_TIMEOUT = 60.0  # evaluate runs a probe; everything else answers at once



# ----------------------------------------------------------------------------- transport


class ProtocolError(Exception):
    """The answer was not HTTP/1.x, or the connection broke in the middle of it."""


class RawReply:
    """An HTTP/1.1 response read off a socket: status, headers, then the body as it comes
    (by Content-Length, chunked, or until the daemon closes the connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._done = False
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP status line: {status_line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._remaining = int(length) if length and length.isdigit() else None

    def _fill(self) -> bool:
        data = self._sock.recv(65536)
        self._buffer += data
        return bool(data)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            if len(self._buffer) > 1 << 20 or not self._fill():
                raise ProtocolError("the connection closed in the middle of the answer")
        found, self._buffer = self._buffer.split(marker, 1)
        return found

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise ProtocolError("the connection closed in the middle of the answer")
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read_piece(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        if self._done:
            return b""
        if self._chunked:
            size_line = self._read_until(b"\r\n").split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                self._done = True
                return b""
            data = self._take(size + 2)[:-2]
            return data
        if self._remaining is not None:
            if self._remaining == 0:
                self._done = True
                return b""
            if not self._buffer and not self._fill():
                raise ProtocolError("the connection closed in the middle of the answer")
            data = self._buffer[: self._remaining]
            self._buffer = self._buffer[len(data):]
            self._remaining -= len(data)
            return data
        if self._buffer or self._fill():
            data, self._buffer = self._buffer, b""
            return data
        self._done = True
        return b""

    def read(self) -> bytes:
        """The whole body."""
        return b"".join(iter(self.read_piece, b""))

    def lines(self) -> Iterator[bytes]:
        """The body line by line, each line as soon as it is complete."""
        pending = b""
        for piece in iter(self.read_piece, b""):
            pending += piece
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending


def _connect(socket_path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
    except BaseException:
        sock.close()
        raise
    return sock


class Unreachable(Exception):
    """The daemon could not be reached or did not speak HTTP properly (exit 3)."""


class Refused(Exception):
    """The daemon answered with an error (exit 1)."""

    def __init__(self, status: int, document: Any) -> None:
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict):
            error = {"code": "error", "message": str(document)}
        self.status = status
        self.document = document
        self.code = str(error.get("code", "error"))
        self.message = str(error.get("message", ""))
        self.details = {k: v for k, v in error.items() if k not in ("code", "message")}
        super().__init__(f"{status} {self.code}: {self.message}")


def describe_unreachable(socket_path: str, exc: BaseException) -> str:
    """One line saying why the daemon at ``socket_path`` cannot be reached, and what to check."""
    where = f"cannot reach modeld at {socket_path}"
    if isinstance(exc, FileNotFoundError):
        return f"{where}: no such socket (is modeld running? is --socket right?)"
    if isinstance(exc, PermissionError):
        return f"{where}: permission denied (are you in the modeld group?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}: connection refused (stale socket: modeld is not running)"
    if isinstance(exc, TimeoutError):
        return f"{where}: timed out waiting for an answer (is modeld stuck?)"
    if isinstance(exc, ProtocolError):
        return f"{where}: the connection broke or the answer was not HTTP ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{where}: {exc.strerror}"
    return f"{where}: {exc}"


class Client:
    """One request per call, to the daemon at ``socket_path``."""

    def __init__(self, socket_path: str, timeout: float | None = REQUEST_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(
        self, method: str, path: str, body: Any, timeout: float | None
    ) -> tuple[socket.socket, RawReply]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", "Host: modeld", "Accept: application/json",
                "Connection: close", f"Content-Length: {len(payload)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        try:
            sock = _connect(self.socket_path, timeout)
        except OSError as exc:
            raise Unreachable(describe_unreachable(self.socket_path, exc)) from exc
        try:
            sock.sendall(request)
            return sock, RawReply(sock)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise Unreachable(describe_unreachable(self.socket_path, exc)) from exc

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The daemon's JSON answer; raises ``Refused`` on an error status, else ``Unreachable``."""
        sock, resp = self._open(method, path, body, self.timeout)
        try:
            raw = resp.read()
        except (OSError, ProtocolError) as exc:
            raise Unreachable(describe_unreachable(self.socket_path, exc)) from exc
        finally:
            sock.close()
        document: Any
        try:
            document = json.loads(raw) if raw.strip() else {}
        except ValueError:
            document = raw.decode("utf-8", "replace").strip()
            if resp.status < 400:
                raise Unreachable(
                    f"modeld at {self.socket_path} answered {method} {path} with something "
                    f"that is not JSON: {document[:200]!r}"
                ) from None
        if resp.status >= 400:
            raise Refused(resp.status, document)
        return document

    def stream_lines(self, path: str) -> Iterator[bytes]:
        """The lines of a streaming answer as they come; ends when the daemon ends the stream."""
        sock, resp = self._open("GET", path, None, None)
        try:
            if resp.status >= 400:
                raw = resp.read()
                try:
                    document: Any = json.loads(raw)
                except ValueError:
                    document = raw.decode("utf-8", "replace")
                raise Refused(resp.status, document)
            try:
                yield from resp.lines()
            except (OSError, ProtocolError):
                return  # the daemon went away (e.g. it is shutting down): end quietly
        finally:
            sock.close()


# ----------------------------------------------------------------------------- output

format_table = text.table  # the demo lays its own tables out the same way


def terminal_width(out: TextIO) -> int | None:
    """The width to wrap text to: the terminal's, else ``$COLUMNS``; None (no wrapping) when
    the output is a pipe or a file and nobody said how wide."""
    try:
        if out.isatty():
            return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


# ----------------------------------------------------------------------------- commands


Command = Callable[[argparse.Namespace, Client, TextIO], int]


def _emit(args: argparse.Namespace, out: TextIO, document: Any,
          human: Callable[[Any, int | None], str]) -> int:
    if args.json:
        out.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(human(document, terminal_width(out)) + "\n")
    return EXIT_OK


def _route(name: str, **params: str) -> tuple[str, str]:
    """The method and path of a control route (:mod:`daemon.control.routes`)."""
    route = routes.BY_NAME[name]
    return route.method, route.path(**params)


def cmd_status(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    return _emit(args, out, client.call(*_route("status")),
                 lambda d, w: text.format_status(d, width=w))


def cmd_list(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    return _emit(args, out, client.call(*_route("list_models")),
                 lambda d, w: text.format_models(d, width=w))


def cmd_show(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    return _emit(args, out, client.call(*_route("show", model_id=args.model_id)),
                 lambda d, w: text.format_model(d, width=w))


def cmd_evaluate(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    document = client.call(*_route("evaluate", model_id=args.model_id), {})
    return _emit(args, out, document, lambda d, w: text.format_evaluate(d, width=w))


def cmd_promote(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    body: dict[str, Any] = {"model_id": args.model_id}
    if args.force:
        body["force"] = True
    if args.reason:
        body["reason"] = args.reason
    return _emit(args, out, client.call(*_route("promote"), body), text.format_changes)


def cmd_rollback(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    body: dict[str, Any] = {"role": args.role} if args.role else {}
    if args.reason:
        body["reason"] = args.reason
    return _emit(args, out, client.call(*_route("rollback"), body), text.format_changes)


def cmd_hold(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    body: dict[str, Any] = {}
    if args.duration:
        body["for"] = args.duration
    if args.reason:
        body["reason"] = args.reason
    return _emit(args, out, client.call(*_route("hold", role=args.role), body),
                 lambda d, w: text.format_hold(d, width=w))


def cmd_release(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
    return _emit(args, out, client.call(*_route("release", role=args.role), body),
                 lambda d, w: text.format_release(d, width=w))


def cmd_upgrade(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    document = client.call(*_route(f"upgrade_{args.action}"), {})
    human = text.format_suggestions if args.action == "check" else text.format_changes
    return _emit(args, out, document, human)


def cmd_offline(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.state == "status":
        document = client.call(*_route("offline_status"))
    else:
        body = {"enabled": args.state == "on"}
        document = client.call(*_route("set_offline"), body)
    return _emit(args, out, document, lambda d, w: text.format_offline(d))


def cmd_resolve(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    query: list[tuple[str, str]] = []
    if args.role:
        query.append(("role", args.role))
    query.extend(("capability", tag) for tag in args.capability or ())
    path = routes.path("resolve", query)
    document = client.call("GET", path)
    if args.first and not args.json:
        # the id alone; nothing usable is a refusal (exit 1) before this, so
        # MODEL=$(modelctl resolve --first) || exit 1 never goes on with an empty MODEL
        out.write(f"{document.get('model_id', '')}\n")
        return EXIT_OK
    return _emit(args, out, document, lambda d, w: text.format_resolve(d))


def cmd_events(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    query: list[tuple[str, str]] = []
    if args.follow:
        query.append(("follow", "1"))
    if args.since is not None:
        query.append(("since", str(args.since)))
    path = routes.path("events", query)
    width = None if args.json else terminal_width(out)
    if args.follow and args.since is None and not args.json:
        print("modelctl: showing events from now on; add --since 0 to replay the ones the "
              "daemon kept first (or --since N: those after event N)", file=sys.stderr)
    last: Any = None
    for line in client.stream_lines(path):
        raw = line.decode("utf-8", "replace").rstrip("\r\n")
        if not raw:
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        last = event
        if isinstance(event, dict) and event.get("kind") == "stream_dropped":
            if args.json:
                out.write(raw + "\n")
            break
        if args.json or not isinstance(event, dict):
            out.write(raw + "\n")
        else:
            out.write(text.format_event(event, time.time(), width) + "\n")
        out.flush()
    if isinstance(last, dict) and last.get("kind") == "stream_dropped":
        print(f"modelctl: the daemon cut this stream off (it fell behind); resume with "
              f"modelctl events --follow --since {last.get('last_seq')}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    return _emit(args, out, client.call(*_route("reload"), {}), text.format_reload)


def _roles(client: Client) -> list[str]:
    document = client.call(*_route("status"))
    roles = document.get("roles") if isinstance(document, dict) else None
    return sorted(roles) if isinstance(roles, dict) else []


def _entry_time(entry: dict[str, Any]) -> float:
    at = entry.get("at")
    return float(at) if isinstance(at, int | float) else 0.0


def cmd_history(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    roles = [args.role] if args.role else _roles(client)
    query = [("limit", str(args.limit))] if args.limit else []
    entries: list[dict[str, Any]] = []
    for role in roles:
        document = client.call("GET", routes.path("history", query, role=role))
        for entry in document.get("history", []) if isinstance(document, dict) else []:
            if isinstance(entry, dict):
                entries.append({"role": role, **entry})
    entries.sort(key=_entry_time)
    if args.limit:
        entries = entries[-args.limit:]
    if args.json:
        out.write(json.dumps({"history": entries}, indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    out.write(text.format_history(entries, time.time(), terminal_width(out),
                                  with_role=not args.role) + "\n")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    from . import watch

    return watch.run(client, out, interval=args.interval)


# ----------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _common_options(socket_default: Any, json_default: Any) -> _Parser:
    # A new parser each time: parents share their action objects with their children.
    common = _Parser(add_help=False)
    common.add_argument(
        "--socket",
        default=socket_default,
        help=f"control socket (default: $MODELD_SOCKET, else {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=json_default,
        help="print the daemon's JSON instead of tables (for scripts)",
    )
    return common


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0.1 and 3600, got {value!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The ``modelctl`` argument parser."""
    parser = _Parser(
        prog="modelctl",
        description="Drive modeld through its control socket.",
        epilog="exit codes: 0 ok, 1 refused by the daemon, 2 usage, 3 daemon unreachable",
        parents=[_common_options(None, False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        # Options are valid after the command too; SUPPRESS keeps the subcommand's default
        # from overwriting a value given before the command.
        common = _common_options(argparse.SUPPRESS, argparse.SUPPRESS)
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    add("status", cmd_status, "daemon version, uptime, files, counts, and per role the "
        "primary beside the model resolve answers with")
    add("list", cmd_list, "every model with its health, score, role and flags")
    add("show", cmd_show, "one model in detail: score part by part, recent probes"
        ).add_argument("model_id", metavar="ID")
    add(
        "evaluate", cmd_evaluate, "probe a model now and show the result and new score"
    ).add_argument("model_id", metavar="ID")
    p = add("promote", cmd_promote, "make a model its role's primary (the old one is retired)")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--force", action="store_true", help="promote even if it is unavailable")
    p.add_argument("--reason", metavar="TEXT", help="why, for the role's history")
    p = add("rollback", cmd_rollback, "restore a role's previous primary")
    p.add_argument("--role", help="the role (default: the daemon's default role)")
    p.add_argument("--reason", metavar="TEXT", help="why, for the role's history")
    p = add("hold", cmd_hold, "hold a role: the policy makes no optional promotion there "
            "(failover and failback still happen) until released or the hold ends")
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--for", dest="duration", metavar="DURATION", help='how long: "2h", "30m", '
                   "or seconds (default: the daemon's policy.manual_hold)")
    p.add_argument("--reason", metavar="TEXT", help="why, for the role's history")
    p = add("release", cmd_release, "end the hold on a role (a manual promote or rollback "
            "holds it)")
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--reason", metavar="TEXT", help="why, for the role's history")
    p = add("upgrade", cmd_upgrade, "auto-upgrade: check for better models, or act on it now")
    p.add_argument("action", choices=["check", "execute"])
    p = add("offline", cmd_offline, "offline mode: only local models are used")
    p.add_argument("state", choices=["on", "off", "status"])
    p = add("resolve", cmd_resolve, "the model to use now (first line) and its fallbacks")
    p.add_argument("--role", help="the role (default: the daemon's default role)")
    p.add_argument(
        "--capability",
        action="extend",
        nargs="+",
        metavar="TAG",
        help="required capability tags (repeatable)",
    )
    p.add_argument("--first", action="store_true", help="print only the model to use; exit 1 "
                   "when nothing is usable: MODEL=$(modelctl resolve --first) || exit 1")
    p = add("events", cmd_events, "health changes, promotions, rollbacks, reloads: one line "
            "each (--json: the daemon's NDJSON)")
    p.add_argument("--follow", "-f", action="store_true", help="keep reading until Ctrl-C")
    p.add_argument("--since", type=int, metavar="N", help="replay from after event N "
                   "(0: every event the daemon kept)")
    add("reload", cmd_reload, "re-read the configuration (like SIGHUP); a refusal lists every "
        "error")
    p = add("history", cmd_history, "the audit trail: who made which model primary, when, why")
    p.add_argument("--role", help="one role (default: every role, merged by time)")
    p.add_argument("--limit", type=_positive, metavar="N", help="the last N entries only")
    p = add("watch", cmd_watch, "a live table of roles and models, refreshed until Ctrl-C")
    p.add_argument("--interval", type=_seconds, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes (default: 2)")
    return parser


def _report_refusal(args: argparse.Namespace, exc: Refused, out: TextIO, err: TextIO) -> None:
    if args.json:
        out.write(json.dumps(exc.document, indent=2, ensure_ascii=False) + "\n")
    err.write(f"modelctl: {args.command} refused ({exc.status} {exc.code}): {exc.message}\n")
    reasons = exc.details.get("reasons")
    if isinstance(reasons, dict):
        for model_id, why in reasons.items():
            err.write(f"  {model_id}: {why}\n")
    elif reasons:
        err.write(f"  {text.plain(reasons)}\n")
    errors = exc.details.get("errors")
    if isinstance(errors, list):  # a rejected configuration: every error, file and key path
        for line in errors:
            err.write(f"  {line}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``modelctl``; the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    socket_path = args.socket or os.environ.get("MODELD_SOCKET") or DEFAULT_SOCKET
    client = Client(socket_path)
    out, err = sys.stdout, sys.stderr
    try:
        return int(args.func(args, client, out))
    except Refused as exc:
        _report_refusal(args, exc, out, err)
        return EXIT_REFUSED
    except Unreachable as exc:
        err.write(f"modelctl: {exc}\n")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        if args.command in ("events", "watch"):
            return EXIT_OK  # Ctrl-C is how one stops following
        err.write("modelctl: interrupted\n")
        return 130
    except BrokenPipeError:
        # `modelctl resolve | head -1`: the reader left; that is not an error.
        _silence_stdout()
        return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    # `python -m daemon.control.ctl`: run the module proper, not this copy named __main__,
    # so that its exceptions are the classes the other modules (watch) catch
    from daemon.control import ctl as _ctl

    raise SystemExit(_ctl.main())
