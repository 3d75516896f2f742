"""Properties of modeld simulate over generated traces: whatever the trace, the books add up,
decisions are in time order, a run replays exactly from its seed, and a bad line is a
TraceError, never a crash. Random traces also exercise the real core's decisions."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.model import ModelSpec
from daemon.core.settings import Config, PolicyConfig, ProbeConfig
from daemon.sim import TraceError, parse_trace, simulate

MODELS = ("a", "b", "c")
CONFIG = Config(
    models=(
        ModelSpec(id="a", provider="openai", role="chat", endpoint="http://x", quality=0.9,
                  primary=True),
        ModelSpec(id="b", provider="openai", role="chat", endpoint="http://x", quality=0.6),
        ModelSpec(id="c", provider="ollama", role="chat", endpoint="http://y", quality=0.7,
                  local=True),
    ),
    probe=ProbeConfig(interval=5.0, timeout=3.0, recheck_interval=0.5),
    policy=PolicyConfig(interval=30.0, auto_execute=True, cooldown=120.0, probation=60.0,
                        quarantine=300.0),
)

behaviour = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS),
    "ok": st.sampled_from([True, False, "degraded"]),
    "latency_ms": st.sampled_from([None, 50, 400, 2500, 5000]),
})
operator = st.one_of(
    st.fixed_dictionaries({"operator": st.just("promote"), "model": st.sampled_from(MODELS),
                           "force": st.booleans()}),
    st.fixed_dictionaries({"operator": st.just("rollback"), "role": st.just("chat")}),
    st.fixed_dictionaries({"operator": st.just("offline"), "enabled": st.booleans()}),
)
steps = st.lists(st.tuples(st.floats(0, 1800, allow_nan=False), st.one_of(
    behaviour, behaviour, behaviour, operator)), max_size=25)


def trace_text(items: list[tuple[float, dict[str, object]]], end: float) -> str:
    lines = [json.dumps({"at": round(at, 3), **step}) for at, step in sorted(
        items, key=lambda item: item[0])]
    return "\n".join([*lines, json.dumps({"at": end, "end": True})])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=steps, end=st.floats(1800, 2400), seed=st.integers(0, 2**32))
def test_the_books_add_up_and_a_run_replays_from_its_seed(
        items: list[tuple[float, dict[str, object]]], end: float, seed: int) -> None:
    text = trace_text(items, round(end, 3))
    report = simulate(CONFIG, parse_trace(text, CONFIG), seed=seed)
    chat = report.roles["chat"]
    assert sum(chat.primary_seconds.values()) == pytest.approx(report.duration, abs=1e-6)
    assert 0 <= chat.no_usable_seconds <= report.duration + 1e-6
    times = [d.at for d in report.decisions]
    # a step at the end's own time still runs (file order); nothing after the end does
    assert times == sorted(times) and all(0 <= t <= report.duration for t in times)
    # the primary changes by promotions and rollbacks only, each of which changes it
    assert chat.changes == sum(1 for d in report.decisions
                               if d.kind in ("model_promoted", "model_rolled_back"))
    assert report == simulate(CONFIG, parse_trace(text, CONFIG), seed=seed)


@settings(max_examples=200, deadline=None)
@given(line=st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["at", "model", "ok", "operator", "end", "role", "for",
                                     "latency_ms", "enabled", "force", "reason", "x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6),
                              st.floats(), st.text(max_size=20),
                              st.sampled_from((*MODELS, "chat", "promote", "hold"))),
                    max_size=6).map(lambda d: json.dumps(d, allow_nan=True)),
))
def test_any_line_is_a_step_or_a_trace_error_naming_its_line(line: str) -> None:
    text = f'{line}\n{{"at": 3000000, "end": true}}'
    try:
        parse_trace(text, CONFIG, "t.jsonl")
    except TraceError as exc:
        assert all(e.startswith("t.jsonl") for e in exc.errors)
