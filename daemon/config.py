"""Configuration: TOML in, frozen dataclasses out, every default filled, every error named.

One schema table (``SCHEMA`` and ``MODEL_FIELDS``) drives parsing, ``modeld config`` and the
README's configuration reference, so the three cannot drift apart.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .core.model import (
    HTTP_PROVIDERS,
    MODEL_ID_RE,
    OPENAI_SERVERS,
    RESERVED_MODEL_IDS,
    ModelSpec,
)
from .core.settings import (
    Config,
    ControlConfig,
    DaemonConfig,
    GatewayConfig,
    HealthConfig,
    PolicyConfig,
    ProbeConfig,
    ScoreConfig,
)

DEFAULT_CONFIG_PATH = "/etc/modeld/modeld.toml"
EX_CONFIG = 78


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ----------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(
    r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(ms|s|m|h)?\s*$"
)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as "500ms", "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration (seconds, or a string like \"30s\"), got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f'bad duration "{value}": use seconds or a number with ms, s, m or h ("30s")'
            )
        number = float(match.group(1))
        # divide for ms: "1900ms" must be exactly 1.9, and 1900 * 0.001 is not
        unit = match.group(2)
        seconds = number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if seconds != seconds or seconds < 0:
        raise ValueError("a duration cannot be negative")
    if math.isinf(seconds):
        raise ValueError("a duration must be finite")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact string form of a duration, for ``modeld config``.

    Exact means ``parse_duration`` of it gives back ``seconds`` bit for bit; a form that
    would not (large or odd values) falls back to the float's repr in seconds.
    """
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            text = f"{int(seconds / size)}{unit}"
            if parse_duration(text) == seconds:
                return text
    ms = seconds * 1000
    if ms.is_integer() and parse_duration(f"{int(ms)}ms") == seconds:
        return f"{int(ms)}ms"
    return f"{seconds!r}s"


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: its kind, and one line for the reference."""

    name: str
    kind: str  # str | int | float | bool | duration | mode | list[str]
    doc: str
    check: Callable[[Any], str | None] | None = None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "cannot be negative"


def _unit_interval(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0.0 and 1.0"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _host_port(value: Any) -> str | None:
    if value == "":
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return 'must be "HOST:PORT", e.g. "127.0.0.1:9464", or empty'
    return None


# ----------------------------------------------------------------------------- [gateway]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where the front door listens: a TCP ``host``/``port``, or a Unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def loopback(self) -> bool:
        """Whether only this host can connect (a Unix socket, or a loopback address)."""
        if self.path:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str) -> ListenAddress:
    """``"127.0.0.1:8088"``, ``"[::1]:8088"`` or ``"unix:/run/modeld/gateway.sock"`` as an
    address; raises ValueError saying what is wrong."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f'"{value}": a Unix socket needs an absolute path '
                             '("unix:/run/modeld/gateway.sock")')
        if len(path.encode()) > 107:
            raise ValueError(f'"{value}": the socket path is over 107 bytes, the limit of '
                             "AF_UNIX")
        return ListenAddress(path=path)
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'"{value}" is not "HOST:PORT" (e.g. "127.0.0.1:8088") nor '
                         '"unix:PATH"')
    return ListenAddress(host=host, port=int(port))


def _check_listen(value: Any) -> str | None:
    if value == "":
        return None
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_env_name(value: Any) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return (f'"{value}" is not an environment variable name; give the variable\'s name '
                "(e.g. MODELD_CLIENTS_KEY), never the key itself")
    return None


def _check_gateway(gateway: GatewayConfig, out: _Collector) -> None:
    """The rules across [gateway] keys: a door reachable from other hosts needs a key."""
    if not gateway.listen or _check_listen(gateway.listen) is not None:
        return
    address = parse_listen(gateway.listen)
    if not address.loopback and not gateway.clients_key_env:
        out.add("gateway.clients_key_env", f'is required when gateway.listen ("{address}") '
                "is not a loopback address: name the environment variable holding the "
                "bearer token clients must send")


SCHEMA: dict[str, tuple[type, tuple[Key, ...]]] = {
    "daemon": (
        DaemonConfig,
        (
            Key("state_file", "str", "where the registry state is kept (JSON, written atomically)"),
            Key("socket", "str", "the control socket (HTTP over a Unix socket)"),
            Key("socket_mode", "mode", 'the socket\'s permissions, an octal string like "0660"'),
            Key("admin_group", "str", "peers in this group (or root, or the daemon's uid) may "
                "change things; empty: only root and the daemon's uid"),
            Key("plugin_dirs", "list[str]", "directories whose *.py files are loaded as plugins"),
            Key("metrics_listen", "str", 'e.g. "127.0.0.1:9464": Prometheus /metrics over TCP, '
                "read-only; empty: off", _host_port),
            Key("log_format", "str", "auto (JSON unless stdout is a TTY), json or console",
                _one_of("auto", "json", "console")),
            Key("state_flush_interval", "duration", "how often probe-driven state is written "
                "when it changed (decisions are written at once)", _positive),
            Key("state_checkpoint", "duration", "observations that change no verdict "
                "(latencies, counters) are written at most this often; 0s: with every flush",
                _non_negative),
            Key("shutdown_grace", "duration", "on SIGTERM, how long in-flight requests may finish"),
            Key("max_connections", "int", "control-socket connections served at once", _positive),
            Key("request_timeout", "duration", "a client must send a whole request within this "
                "(else 408), so a stalled client cannot hold a connection", _positive),
        ),
    ),
    "control": (
        ControlConfig,
        (
            Key("max_connections_per_peer", "int", "control-socket connections one uid may "
                "hold at once (more → 429); admins are held only to daemon.max_connections",
                _positive),
            Key("admin_reserve", "int", "of daemon.max_connections, this many are kept for "
                "admins (root, the daemon's uid, admin_group), so a lock-out cannot lock "
                "them out", _non_negative),
            Key("idle_timeout", "duration", "an idle keep-alive connection is closed after "
                "this", _positive),
            Key("max_followers_per_peer", "int", "GET /api/v1/events?follow=1 streams one uid "
                "may hold at once (more → 429)", _positive),
        ),
    ),
    "probe": (
        ProbeConfig,
        (
            Key("interval", "duration", "per model, jittered ±10%", _positive),
            Key("timeout", "duration", "one probe's deadline, all its requests included",
                _positive),
            Key("max_concurrent", "int", "probes in flight at once", _positive),
            Key("recheck_interval", "duration", "after a failure, re-probe at this pace until "
                "the verdict is clear", _positive),
            Key("max_response_bytes", "int", "a bigger upstream response fails the probe",
                _positive),
        ),
    ),
    "health": (
        HealthConfig,
        (
            Key("failure_threshold", "int", "consecutive failures → unavailable", _positive),
            Key("success_threshold", "int", "consecutive successes to leave unavailable",
                _positive),
            Key("degraded_latency_ms", "float", "a success slower than this counts as degraded",
                _positive),
            Key("window", "int", "probes kept for latency percentiles and success rate",
                _positive),
        ),
    ),
    "score": (
        ScoreConfig,
        (
            Key("health", "float", "weight of health × success rate", _non_negative),
            Key("latency", "float", "weight of target / (target + p50)", _non_negative),
            Key("cost", "float", "weight of 1 − min(cost / ceiling, 1)", _non_negative),
            Key("quality", "float", "weight of the model's quality prior", _non_negative),
            Key("latency_target_ms", "float", "the latency that scores 0.5", _positive),
            Key("cost_ceiling", "float", "the cost (per 1M tokens) that scores 0", _positive),
        ),
    ),
    "policy": (
        PolicyConfig,
        (
            Key("interval", "duration", "the auto-upgrade timer", _positive),
            Key("auto_execute", "bool", "false: only suggest; true: act on suggestions"),
            Key("min_margin", "float", "a candidate must beat the primary's score by this much",
                _unit_interval),
            Key("min_consecutive_healthy", "int", "successes in a row before a model is a "
                "candidate", _non_negative),
            Key("cooldown", "duration", "between automatic promotions in one role"),
            Key("probation", "duration", "a new primary that becomes unavailable within this "
                "is rolled back"),
            Key("quarantine", "duration", "a model rolled back from is not auto-promoted again "
                "for this long"),
            Key("sustain", "duration", "an optional upgrade's lead must have held this long "
                "(0s: at the first check that sees it)"),
            Key("failback", "bool", "after an urgent failover, return to the preferred primary "
                "once it is healthy again"),
            Key("manual_hold", "duration", "an operator's promote or rollback holds the role "
                "against optional promotions this long (0s: no hold)"),
        ),
    ),
    "gateway": (
        GatewayConfig,
        (
            Key("listen", "str", 'the OpenAI-compatible front door: "127.0.0.1:8088" or '
                '"unix:/run/modeld/gateway.sock"; empty: off', _check_listen),
            Key("clients_key_env", "str", "name of an env var holding the bearer token clients "
                "must send; required when listen is not loopback", _check_env_name),
            Key("first_byte_timeout", "duration", "an upstream that sends nothing for this long "
                "counts as failed and the next model is tried", _positive),
            Key("stream_idle_timeout", "duration", "an answer that then pauses this long between "
                "two chunks is ended", _positive),
            Key("max_attempts", "int", "models tried per request, along the resolve chain",
                _positive),
            Key("max_request_bytes", "int", "a bigger request body is refused (413)", _positive),
            Key("max_concurrent", "int", "requests in flight; beyond it 429 with Retry-After",
                _positive),
        ),
    ),
}


def _check_model_id(value: Any) -> str | None:
    if not MODEL_ID_RE.fullmatch(value):
        return f'"{value}" is not a valid model id (letters, digits, . _ : -; 1-128 characters)'
    if value in RESERVED_MODEL_IDS:
        return f'"{value}" is a route word under /api/v1/models/ and cannot be a model id'
    return None


def _check_sha256(value: Any) -> str | None:
    if value and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return "must be 64 hexadecimal digits"
    return None


def _check_endpoint(value: Any) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        host, _port = parts.hostname, parts.port  # both parse lazily and may raise
    except ValueError as exc:
        return f'"{value}" is not a valid URL: {exc}'
    if parts.scheme not in ("http", "https") or not host:
        return f'"{value}" is not an http:// or https:// URL'
    if parts.username is not None or parts.password is not None:
        return ("must not carry credentials (user:password@); put a token in the environment "
                "variable named by api_key_env")
    return None


MODEL_FIELDS: tuple[Key, ...] = (
    Key("id", "str", "[A-Za-z0-9][A-Za-z0-9._:-]{0,127}; required", _check_model_id),
    Key("provider", "str", "the probe plugin's name (openai, ollama, local_file, ...); required"),
    Key("role", "str", "promotion and fallback stay inside a role"),
    Key("endpoint", "str", "base URL of the server (HTTP providers)", _check_endpoint),
    Key("model", "str", "upstream model name; defaults to id"),
    Key("api_key_env", "str", "name of an env var holding a bearer token (never the key)"),
    Key("capability_tags", "list[str]", "what the model can do, for resolve ?capability="),
    Key("cost_estimate", "float", "cost per 1M tokens", _non_negative),
    Key("latency_estimate", "float", "latency prior in ms, until probes measure it",
        _non_negative),
    Key("quality", "float", "prior 0..1 from your own evals", _unit_interval),
    Key("local_path", "str", "model file on disk (local_file provider)"),
    Key("local", "bool", "eligible in offline mode; default: local_path set or loopback endpoint"),
    Key("primary", "bool", "initial primary of its role, used only when no state exists"),
    Key("deep", "bool", "deep probe: a 1-token generation instead of a listing"),
    Key("sha256", "str", "local_file: pin the file's digest", _check_sha256),
    Key("interval", "duration", "per-model probe interval; default [probe].interval", _positive),
    Key("timeout", "duration", "per-model probe timeout; default [probe].timeout", _positive),
    Key("server", "str", "openai provider: the server behind the endpoint, whose readiness "
        "is asked beside the listing; auto detects it", _one_of(*OPENAI_SERVERS)),
)

_MODEL_DEFAULTS = ModelSpec(id="", provider="")


# ----------------------------------------------------------------------------- parsing


class _Collector:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def add(self, key_path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {key_path}: {message}")


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _coerce(key: Key, raw: Any) -> Any:
    """The value converted to the key's kind; raises ValueError naming what is wrong."""
    kind = key.kind
    if kind == "str":
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {_type_name(raw)}")
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_type_name(raw)}")
        return raw
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {_type_name(raw)}")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {_type_name(raw)}")
        if raw != raw or raw in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        return float(raw)
    if kind == "duration":
        return parse_duration(raw)
    if kind == "mode":
        if isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3,4}", raw):
            return int(raw, 8)
        raise ValueError(f'expected an octal string like "0660", got {raw!r}')
    if kind == "list[str]":
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ValueError(f"expected a list of strings, got {_type_name(raw)}")
        return tuple(raw)
    raise AssertionError(f"unknown kind {kind}")


def _type_name(raw: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(raw), type(raw).__name__)


def _parse_table(
    table: Mapping[str, Any], keys: Sequence[Key], prefix: str, out: _Collector
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    by_name = {key.name: key for key in keys}
    for name, raw in table.items():
        key = by_name.get(name)
        if key is None:
            out.add(f"{prefix}{name}", "unknown key" + _did_you_mean(name, list(by_name)))
            continue
        try:
            value = _coerce(key, raw)
            problem = key.check(value) if key.check else None
        except ValueError as exc:
            out.add(f"{prefix}{name}", str(exc))
            continue
        if problem:
            out.add(f"{prefix}{name}", problem)
            continue
        values[name] = value
    return values


def is_loopback_url(url: str) -> bool:
    """Whether an endpoint URL points at this host."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_label(index: int, model_id: str | None = None) -> str:
    """How messages name a model: ``models[2] (id "qwen")``, or ``models[2]`` when it has no
    valid id to name it by."""
    return f'models[{index}] (id "{model_id}")' if model_id else f"models[{index}]"


def provider_error(label: str, provider: str, known: Collection[str]) -> str | None:
    """The error (key path and what) for a provider no loaded plugin serves, else None."""
    if provider in known:
        return None
    names = ", ".join(sorted(known)) or "none"
    return f'{label}.provider: no probe plugin named "{provider}" (loaded: {names})'


@dataclass(frozen=True, slots=True)
class _ParsedModel:
    """One ``[[models]]`` table as far as it could be read: the spec when it is valid, and
    the id and provider whenever those alone are, so that checks across models (duplicate
    ids, unknown providers) still run on a file with other mistakes."""

    spec: ModelSpec | None
    label: str
    model_id: str | None
    provider: str | None


def _parse_model(raw: Any, index: int, out: _Collector) -> _ParsedModel:
    if not isinstance(raw, dict):
        out.add(model_label(index), "expected a table ([[models]])")
        return _ParsedModel(None, model_label(index), None, None)
    raw_id, raw_provider = raw.get("id"), raw.get("provider")
    model_id = raw_id if isinstance(raw_id, str) and _check_model_id(raw_id) is None else None
    provider = raw_provider if isinstance(raw_provider, str) else None
    label = model_label(index, model_id)
    prefix = f"{label}."
    before = len(out.errors)
    values = _parse_table(raw, MODEL_FIELDS, prefix, out)
    for required in ("id", "provider"):
        if required not in raw:
            out.add(f"{prefix}{required}", "is required")

    def missing(key: str) -> bool:  # unset or empty; a value already refused is not missing
        return not values.get(key) and not (key in raw and key not in values)

    if provider == "local_file" and missing("local_path"):
        out.add(f"{prefix}local_path", 'is required for provider "local_file"')
    if provider in HTTP_PROVIDERS and missing("endpoint"):
        out.add(f"{prefix}endpoint", f'is required for provider "{provider}"')
    if raw.get("server", "auto") != "auto" and provider is not None and provider != "openai":
        out.add(f"{prefix}server", 'applies to provider "openai" only (it names the '
                f'OpenAI-compatible server behind the endpoint), not "{provider}"')
    if len(out.errors) > before:
        return _ParsedModel(None, label, model_id, provider)
    values.setdefault("model", values["id"])
    if "local" not in values:
        values["local"] = bool(values.get("local_path")) or is_loopback_url(
            values.get("endpoint", "")
        )
    return _ParsedModel(replace(_MODEL_DEFAULTS, **values), label, model_id, provider)


def parse_config(data: Mapping[str, Any], source: str = "<config>",
                 known_providers: Collection[str] | None = None) -> Config:
    """A Config from parsed TOML; raises ConfigError listing every problem found, in one go:
    key and type errors, duplicate ids, conflicting primaries and, given
    ``known_providers`` (the probes the plugins register), providers nobody serves."""
    out = _Collector(source)
    sections: dict[str, Any] = {}
    top_keys = [*SCHEMA, "models"]
    for name in data:
        if name not in top_keys:
            out.add(name, "unknown section" + _did_you_mean(name, top_keys))
    for name, (cls, keys) in SCHEMA.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            out.add(name, f"expected a table [{name}], got {_type_name(raw)}")
            continue
        sections[name] = cls(**_parse_table(raw, keys, f"{name}.", out))

    score = sections.get("score")
    if score is not None and score.health + score.latency + score.cost + score.quality <= 0:
        out.add("score", "the weights health, latency, cost and quality sum to 0; "
                "give at least one a positive weight")
    daemon_section, control = sections.get("daemon"), sections.get("control")
    if daemon_section is not None and control is not None:
        if control.admin_reserve >= daemon_section.max_connections:
            out.add("control.admin_reserve", f"must be less than daemon.max_connections "
                    f"({daemon_section.max_connections}), or no other peer could connect")
        if control.max_followers_per_peer > control.max_connections_per_peer:
            out.add("control.max_followers_per_peer", f"cannot exceed "
                    f"control.max_connections_per_peer ({control.max_connections_per_peer}): "
                    "each stream holds a connection")
    gateway = sections.get("gateway")
    if gateway is not None:
        _check_gateway(gateway, out)
    health = sections.get("health")
    if health is not None and health.window < 1:
        out.add("health.window", "must be at least 1")

    models: list[ModelSpec] = []
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        out.add("models", "expected an array of tables [[models]]")
        raw_models = []
    seen: dict[str, int] = {}
    primaries: dict[str, int] = {}
    models_by_index: dict[int, str] = {}
    for index, raw in enumerate(raw_models):
        parsed = _parse_model(raw, index, out)
        if known_providers is not None and parsed.provider is not None:
            problem = provider_error(parsed.label, parsed.provider, known_providers)
            if problem:
                out.errors.append(f"{source}: {problem}")
        if parsed.model_id is not None:
            if parsed.model_id in seen:
                first = seen[parsed.model_id]
                out.add(f"models[{index}].id", f'duplicate model id "{parsed.model_id}" '
                        f"(first declared at models[{first}])")
                continue
            seen[parsed.model_id] = index
        spec = parsed.spec
        if spec is None:
            continue
        if spec.primary:
            if spec.role in primaries:
                first = primaries[spec.role]
                out.add(f"{parsed.label}.primary", f'role "{spec.role}" already has a primary '
                        f"({model_label(first, models_by_index[first])}); only one "
                        "primary = true per role")
            else:
                primaries[spec.role] = index
        models_by_index[index] = spec.id
        models.append(spec)

    if out.errors:
        raise ConfigError(out.errors)
    return Config(models=tuple(models), path=source, **sections)


def load_config(path: str | os.PathLike[str],
                known_providers: Collection[str] | None = None) -> Config:
    """The configuration read from a TOML file; raises ConfigError naming file and key."""
    return parse_config(read_toml(path), str(path), known_providers)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A configuration file's TOML as data; raises ConfigError naming the file and what."""
    source = str(path)
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        message = f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([message]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError([f"{source}: invalid TOML: arrays or tables nested too deeply"]
                          ) from None
    return data


def plugin_dirs_of(data: Mapping[str, Any]) -> tuple[str, ...]:
    """``[daemon].plugin_dirs`` of parsed TOML, read on its own, so that the plugins can be
    loaded (and providers checked) even when other keys are wrong; the default if unusable."""
    section = data.get("daemon")
    raw = section.get("plugin_dirs") if isinstance(section, dict) else None
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    return DaemonConfig().plugin_dirs


def runtime_warnings(config: Config, environ: Mapping[str, str]) -> list[str]:
    """What is valid but will not work when the daemon runs on this host, one line each
    (file, key path, what, what to do): an admin group that does not exist, an API key
    variable that is not set here, a model file that is not there, no models at all."""
    import grp

    source = config.path
    found = []
    group = config.daemon.admin_group
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            found.append(f'{source}: daemon.admin_group: group "{group}" does not exist on this '
                         "host, so only root and the daemon's own uid may change things "
                         f"(create it: groupadd --system {group})")
    key_env = config.gateway.clients_key_env
    if config.gateway.listen and key_env and not environ.get(key_env, "").strip():
        found.append(f"{source}: gateway.clients_key_env: ${key_env} is not set (or empty) in "
                     "this environment, so the daemon will refuse to start (exit 78) rather "
                     "than serve a front door nobody can use; set it with Environment= or "
                     "EnvironmentFile= in a drop-in")
    if not config.models:
        found.append(f"{source}: models: no [[models]] declared: the daemon starts, but "
                     "resolve has nothing to answer with")
    for index, spec in enumerate(config.models):
        label = model_label(index, spec.id)
        if spec.api_key_env and not environ.get(spec.api_key_env):
            found.append(f"{source}: {label}.api_key_env: ${spec.api_key_env} is not set (or "
                         "empty) in this environment, so probes send no key; under systemd "
                         "set it with Environment= or EnvironmentFile= in a drop-in")
        if spec.local_path and not os.path.exists(spec.local_path):
            found.append(f'{source}: {label}.local_path: "{spec.local_path}" does not exist, '
                         "so the model will be unavailable")
    return found


# ----------------------------------------------------------------------------- output


def _render_value(key: Key, value: Any) -> Any:
    if key.kind == "duration":
        return format_duration(value)
    if key.kind == "mode":
        return f"{value:04o}"
    if key.kind == "list[str]":
        return list(value)
    return value


def config_to_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as a TOML-ready dict, defaults included."""
    out: dict[str, Any] = {}
    for name, (_cls, keys) in SCHEMA.items():
        section = getattr(config, name)
        out[name] = {key.name: _render_value(key, getattr(section, key.name)) for key in keys}
    models = []
    for spec in config.models:
        entry: dict[str, Any] = {}
        for key in MODEL_FIELDS:
            value = getattr(spec, key.name)
            if value is None:
                continue  # per-model overrides not set: the section default applies
            entry[key.name] = _render_value(key, value)
        models.append(entry)
    out["models"] = models
    return out


def render_config(config: Config) -> str:
    """The effective configuration as TOML."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(config))


def default_value(section: str, key: str) -> Any:
    """The default of one key, rendered as in TOML, for documentation."""
    if section == "models":
        spec_field = {f.name: f for f in fields(ModelSpec)}[key]
        value = spec_field.default
        kind = next(k for k in MODEL_FIELDS if k.name == key)
        return None if value is None else _render_value(kind, value)
    cls, keys = SCHEMA[section]
    kind = next(k for k in keys if k.name == key)
    return _render_value(kind, getattr(cls(), key))
