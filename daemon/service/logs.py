"""Logging: structlog configured once, JSON lines for machines, console for people.

Under systemd (stdout not a TTY) every line is one JSON object; on a TTY the console renderer
is used. The standard library's loggers (httpx, anyio) go through the same processors, so a
journal holds one format only. Secrets never reach a log: no probe puts a key in a reason,
and the ``redact`` processor masks any key named like a secret as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_SECRET_WORDS = ("authorization", "api_key", "apikey", "token", "password", "secret")


def _redact(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in event_dict:
        lowered = key.lower()
        if any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith("_env"):
            event_dict[key] = "[redacted]"
    return event_dict


def resolve_format(log_format: str, stream: TextIO) -> str:
    """"json" or "console" for a configured format of auto, json or console."""
    if log_format == "auto":
        return "console" if stream.isatty() else "json"
    return log_format


def configure_logging(log_format: str = "auto", level: int = logging.INFO,
                      stream: TextIO | None = None) -> str:
    """Configure structlog and stdlib logging; returns the format chosen."""
    stream = stream if stream is not None else sys.stdout
    chosen = resolve_format(log_format, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        # filter first: a debug call below the level costs a check, not a rendering
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; probes make many, so only its warnings are kept
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    return chosen


def get_logger(name: str = "modeld", **context: Any) -> Any:
    """A bound structlog logger."""
    return structlog.get_logger(name).bind(**context)
