"""The bounds on what an upstream can make the daemon keep: one sanitiser for every result.

A server decides what its replies hold (``owned_by``, Ollama's ``details``, error messages);
a probe copies some of it into a :class:`~daemon.core.model.ProbeResult`, the registry keeps
it in memory, the API shows it and the state file saves it. Nothing a server sends may grow
any of those without bound, so every result is passed through :func:`bounded_result` where it
leaves the prober (whatever plugin built it), and every saved probe and event through
:func:`bounded_facts` / :func:`bounded_text` where the state is decoded (a file written
before these bounds, or edited by hand, is held to the same).

Pure functions, no I/O: they may be called from anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ..core.model import ProbeResult, encodable
from .replies import MAX_REASON_CHARS

__all__ = ["EVENT_ITEMS", "EVENT_TEXT_CHARS", "MAX_REASON_CHARS", "Mask", "bounded_facts",
           "bounded_result", "bounded_text", "bounded_value"]

#: Longest string value of a fact (``owned_by``, a version, a quantization level, ...).
MAX_FACT_TEXT_CHARS = 200
#: Longest fact name.
MAX_FACT_KEY_CHARS = 64
#: Facts kept per result; the rest are dropped and counted in ``facts_dropped``.
MAX_FACTS = 32
#: Items kept of a list fact (each bounded like a fact of its own, lists inside as text).
MAX_FACT_ITEMS = 16
#: About the characters all of one result's facts may take (real ones take 100 to 300):
#: keeps even 10,000 models behind hostile servers to a state of a few tens of MB.
MAX_FACTS_CHARS = 2048
#: Integers beyond this magnitude are kept as (bounded) text: JSON readers disagree past it.
MAX_FACT_INT = 2**63

_CUT = "…"


#: What is kept beyond a bound before a mask runs, so that a secret cut at the first cut is
#: still whole for the mask, or beyond the final cut (API keys are far shorter).
MASK_SLACK = 1024

Mask = Callable[[str], str]


def bounded_text(text: Any, limit: int = MAX_REASON_CHARS, mask: Mask | None = None) -> str:
    """``text`` as a string of at most ``limit`` characters (cut ones end with "…"), lone
    surrogates replaced by "?".

    ``mask`` (the prober's API-key masking) runs on the text cut to ``limit + MASK_SLACK``
    and before the final cut, so a cut never leaves part of a secret behind and a huge text
    costs no more than the bound."""
    line = text if isinstance(text, str) else str(text)
    if mask is not None:
        line = mask(line[: limit + MASK_SLACK])
    if len(line) > limit:
        line = line[: limit - 1] + _CUT
    return line if encodable(line) else line.encode("utf-8", "replace").decode("utf-8")


#: Bounds of an event's data restored from a state: the daemon's own (lists of the models a
#: reload added, config errors), so more generous than a server's facts.
EVENT_ITEMS = 4096
EVENT_TEXT_CHARS = 1000


def bounded_value(value: Any, *, nested: bool = False, mask: Mask | None = None,
                  items: int = MAX_FACT_ITEMS, text: int = MAX_FACT_TEXT_CHARS) -> Any:
    """One fact's value as the daemon keeps it: JSON-safe and bounded.

    Strings are cut at ``MAX_FACT_TEXT_CHARS``; finite numbers and booleans are kept
    (non-finite floats and integers past ``MAX_FACT_INT`` become text); a list keeps its
    first ``MAX_FACT_ITEMS`` items; anything else (a mapping, a list inside a list, an
    object) becomes its bounded text.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_FACT_INT <= value <= MAX_FACT_INT else _int_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return bounded_text(value, text, mask)
    if isinstance(value, list | tuple) and not nested:
        return [bounded_value(item, nested=True, mask=mask, items=items, text=text)
                for item in value[:items]]
    return bounded_text(_short_repr(value, mask), text, mask)


def bounded_facts(facts: Any, mask: Mask | None = None, *, items: int = MAX_FACT_ITEMS,
                  text: int = MAX_FACT_TEXT_CHARS,
                  budget: int | None = MAX_FACTS_CHARS) -> dict[str, Any]:
    """A probe's facts, bounded: at most ``MAX_FACTS`` entries of bounded names and values,
    about ``budget`` characters in all (None: no total; an event's data, the daemon's own,
    has none, and wider ``items`` and ``text``). Facts past a bound are dropped and counted
    in ``facts_dropped``."""
    if not isinstance(facts, Mapping):
        return {}
    out: dict[str, Any] = {}
    dropped = 0
    used = 0
    for key, value in facts.items():
        if len(out) >= MAX_FACTS:
            dropped += 1
            continue
        name = bounded_text(key, MAX_FACT_KEY_CHARS, mask)
        kept = bounded_value(value, mask=mask, items=items, text=text)
        cost = len(name) + _size(kept)
        if budget is not None and used + cost > budget:
            dropped += 1
            continue
        used += cost
        out[name] = kept
    if dropped:
        out["facts_dropped"] = dropped
    return out


def _size(value: Any) -> int:
    """About the characters ``value`` takes in JSON (a bounded value: no deep nesting)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, list):
        return 2 + sum(_size(item) + 1 for item in value)
    return 8


def bounded_result(result: ProbeResult, mask: Mask | None = None) -> ProbeResult:
    """``result`` with its reason and facts held to the bounds above (the same object when
    it already is); ``mask`` is applied to every string on the way (see bounded_text)."""
    reason = bounded_text(result.reason, MAX_REASON_CHARS, mask)
    facts = bounded_facts(result.facts, mask)
    if mask is None and reason == result.reason and facts == dict(result.facts):
        return result
    return ProbeResult(result.status, result.latency_ms, reason, MappingProxyType(facts))


def _int_text(value: int) -> str:
    # str() of a huge int is quadratic (and refused past 4,300 digits): say its size instead
    digits = math.floor(value.bit_length() * math.log10(2)) + 1
    return f"{'-' if value < 0 else ''}<integer of about {digits} digits>"


def _short_repr(value: Any, mask: Mask | None) -> str:
    """Text for a value that is not a JSON scalar; built from a bounded part only, so a huge
    mapping costs no more than the bound."""
    if isinstance(value, Mapping):
        parts = []
        for n, (key, item) in enumerate(value.items()):
            if n >= MAX_FACT_ITEMS:
                parts.append("…")
                break
            parts.append(f"{bounded_text(key, MAX_FACT_KEY_CHARS, mask)}: "
                         f"{bounded_text(_scalar_text(item), MAX_FACT_TEXT_CHARS, mask)}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list | tuple):
        items = [bounded_text(_scalar_text(item), MAX_FACT_TEXT_CHARS, mask)
                 for item in value[:MAX_FACT_ITEMS]]
        return "[" + ", ".join(items) + (", …" if len(value) > MAX_FACT_ITEMS else "") + "]"
    try:
        return str(value)[: MAX_FACT_TEXT_CHARS + MASK_SLACK]
    except Exception:
        return f"<{type(value).__name__}>"


def _scalar_text(value: Any) -> str:
    if isinstance(value, Mapping | list | tuple):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_FACT_INT:
        return _int_text(value)
    try:
        return str(value)[: MAX_FACT_TEXT_CHARS + 1]
    except Exception:
        return f"<{type(value).__name__}>"
