"""Trace files for modeld simulate: good steps parsed, every bad one named by file, line and
field, and hostile files (huge lines, NaN, deep nesting, endless times) refused cheaply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.core.model import ModelSpec, ProbeStatus
from daemon.core.settings import Config
from daemon.sim.trace import (
    MAX_LINE_BYTES,
    Behaviour,
    End,
    Operator,
    TraceError,
    check_trace,
    parse_trace,
    read_trace,
)

CONFIG = Config(models=(
    ModelSpec(id="qwen2.5-14b", provider="openai", role="chat", primary=True),
    ModelSpec(id="llama3-8b", provider="ollama", role="chat"),
    ModelSpec(id="embed", provider="ollama", role="embeddings"),
))
END = '{"at": 100, "end": true}'


def error_of(text: str) -> str:
    with pytest.raises(TraceError) as caught:
        parse_trace(text, CONFIG, "t.jsonl")
    assert len(caught.value.errors) == 1
    return caught.value.errors[0]


def test_the_design_example_parses_into_its_steps() -> None:
    steps = parse_trace("\n".join([
        '{"at": 0, "model": "qwen2.5-14b", "ok": true, "latency_ms": 300}',
        '{"at": 600, "model": "qwen2.5-14b", "ok": false, "reason": "connection refused"}',
        '{"at": 612, "model": "llama3-8b", "ok": "degraded"}',
        '{"at": 900, "operator": "promote", "model": "llama3-8b", "force": true}',
        '{"at": 901, "operator": "rollback", "role": "chat"}',
        '{"at": 902, "operator": "offline", "enabled": true}',
        '{"at": 903, "operator": "hold", "role": "chat", "for": "2h"}',
        '{"at": 904, "operator": "release", "role": "chat", "reason": "checked"}',
        '{"at": 7200, "end": true}',
    ]), CONFIG)
    assert steps[0] == Behaviour(0.0, 1, "qwen2.5-14b", ProbeStatus.OK, 300.0)
    assert steps[1] == Behaviour(600.0, 2, "qwen2.5-14b", ProbeStatus.FAILED, None,
                                 "connection refused")
    assert steps[2].status is ProbeStatus.DEGRADED  # type: ignore[union-attr]
    assert steps[3] == Operator(900.0, 4, "promote", model="llama3-8b", force=True)
    assert steps[4] == Operator(901.0, 5, "rollback", role="chat")
    assert steps[5] == Operator(902.0, 6, "offline", enabled=True)
    assert steps[6] == Operator(903.0, 7, "hold", role="chat", duration=7200.0)
    assert steps[7] == Operator(904.0, 8, "release", role="chat", reason="checked")
    assert steps[8] == End(7200.0, 9)


def test_comments_and_blank_lines_are_skipped_but_count_as_lines() -> None:
    steps = parse_trace(f"# a blip\n\n   \n{END}\n", CONFIG)
    assert steps == [End(100.0, 4)]


@pytest.mark.parametrize(("line", "expected"), [
    ('{"at": -1, "model": "llama3-8b", "ok": true}', "t.jsonl:1: at: cannot be negative"),
    ('{"at": NaN, "model": "llama3-8b", "ok": true}', "t.jsonl:1: not a JSON object: NaN"),
    ('{"at": Infinity, "end": true}', "t.jsonl:1: not a JSON object: Infinity"),
    ('{"at": 1e400, "end": true}', "t.jsonl:1: at: must be a finite number"),
    ('{"at": 99999999999, "end": true}', "t.jsonl:1: at: 1e+11 s is beyond the longest"),
    ('{"at": "10", "end": true}', "t.jsonl:1: at: expected a number, got a string"),
    ('{"at": true, "end": true}', "t.jsonl:1: at: expected a number, got a boolean"),
    ('{"model": "llama3-8b", "ok": true}', "t.jsonl:1: at: missing"),
    ('{"at": 1, "model": "llama3-7b", "ok": true}',
     't.jsonl:1: model: unknown model "llama3-7b" (did you mean "llama3-8b"?)'),
    ('{"at": 1, "model": "llama3-8b", "ok": "yes"}',
     't.jsonl:1: ok: expected true, false or "degraded", got "yes"'),
    ('{"at": 1, "model": "llama3-8b"}', "t.jsonl:1: ok: missing"),
    ('{"at": 1, "ok": true}', "t.jsonl:1: model: missing"),
    ('{"at": 1, "model": "llama3-8b", "ok": true, "lateny_ms": 3}',
     't.jsonl:1: lateny_ms: unknown key for a model\'s behaviour (did you mean "latency_ms"?)'),
    ('{"at": 1, "model": "llama3-8b", "ok": true, "latency_ms": -5}',
     "t.jsonl:1: latency_ms: cannot be negative"),
    ('{"at": 1, "at": 2, "end": true}', 'key "at" appears twice'),
    ('[1, 2]', "t.jsonl:1: expected a JSON object, got an array"),
    ('{"at": 1}', 't.jsonl:1: a step needs "model" and "ok"'),
    ('{"at": 1, "operator": "promot", "model": "llama3-8b"}',
     't.jsonl:1: operator: unknown action "promot" (did you mean "promote"?)'),
    ('{"at": 1, "operator": "promote"}', 't.jsonl:1: model: missing: operator "promote"'),
    ('{"at": 1, "operator": "hold", "role": "chta"}',
     't.jsonl:1: role: unknown role "chta" (did you mean "chat"?)'),
    ('{"at": 1, "operator": "hold", "role": "chat", "for": "forever"}',
     't.jsonl:1: for: bad duration "forever"'),
    ('{"at": 1, "operator": "offline", "enabled": "yes"}',
     "t.jsonl:1: enabled: expected true or false, got a string"),
    ('{"at": 1, "operator": "rollback", "model": "llama3-8b"}',
     't.jsonl:1: model: unknown key for operator "rollback"'),
    ('{"at": 1, "end": false}', "t.jsonl:1: end: must be true, got false"),
    ('{"at": 1, "model": "llama3-8b", "ok": true, "reason": "' + "x" * 2000 + '"}',
     "t.jsonl:1: reason: 2000 characters; at most 1000"),
    ("[" * 100_000 + "]" * 100_000, "t.jsonl:1: line is longer than"),
    ("[" * 50_000 + "]" * 10_000, "t.jsonl:1: not a JSON object"),
])
def test_a_bad_line_is_named_by_file_line_and_field(line: str, expected: str) -> None:
    message = error_of(f"{line}\n{END}")
    assert message.startswith("t.jsonl:1: ")
    assert expected in message


def test_steps_out_of_time_order_are_refused_naming_both_lines() -> None:
    message = error_of('{"at": 10, "model": "llama3-8b", "ok": true}\n'
                       '{"at": 5, "model": "llama3-8b", "ok": false}\n' + END)
    assert message == ("t.jsonl:2: at: 5 is before the 10 of line 1: steps must be in "
                       "time order")


def test_steps_at_the_same_time_keep_their_file_order() -> None:
    steps = parse_trace('{"at": 5, "model": "llama3-8b", "ok": true}\n'
                        '{"at": 5, "model": "llama3-8b", "ok": false}\n' + END, CONFIG)
    assert [s.line for s in steps] == [1, 2, 3]


def test_a_step_after_the_end_is_refused() -> None:
    assert error_of(f'{END}\n{{"at": 200, "model": "llama3-8b", "ok": true}}') == (
        "t.jsonl:2: a step after the end step of line 1; the end step must be the last")


def test_a_trace_without_an_end_is_refused() -> None:
    assert error_of('{"at": 0, "model": "llama3-8b", "ok": true}') == (
        't.jsonl: no end step: the last line must be {"at": SECONDS, "end": true}')


def test_an_empty_trace_is_refused() -> None:
    assert "no end step" in error_of("")


def test_invalid_utf8_is_named_with_its_byte(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"at": 0, "model": "llama3-8b", "ok": true, "reason": "\xff"}\n' +
                     END.encode())
    assert check_trace(path, CONFIG) == [f"{path}:1: not UTF-8 text (invalid start byte at "
                                         "byte 55)"]


def test_check_reports_every_bad_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"at": 0, "model": "nope", "ok": true}\n'
                    '{"at": 1, "model": "llama3-8b", "ok": true}\n'
                    '{"at": 2, "model": "llama3-8b", "ok": 3}\n')
    errors = check_trace(path, CONFIG)
    assert [e.split(": ")[0] for e in errors] == [f"{path}:1", f"{path}:3", str(path)]
    assert "no end step" in errors[-1]


def test_check_stops_after_twenty_errors_on_a_file_of_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("garbage\n" * 100_000)
    errors = check_trace(path, CONFIG)
    assert len(errors) == 21 and errors[-1].endswith("stopped after 20 errors")


def test_a_huge_line_is_refused_without_reading_it_whole_and_the_next_line_is_checked(
        tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with path.open("wb") as out:
        out.write(b'{"at": 0, "reason": "' + b"x" * (8 * MAX_LINE_BYTES) + b'"}\n')
        out.write(b'{"at": 1, "model": "nope", "ok": true}\n')
        out.write(END.encode() + b"\n")
    errors = check_trace(path, CONFIG)
    assert errors[0] == f"{path}:1: line is longer than {MAX_LINE_BYTES} bytes"
    assert errors[1].startswith(f'{path}:2: model: unknown model "nope"')
    assert len(errors) == 2


def test_a_line_of_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    head = '{"at": 0, "model": "llama3-8b", "ok": true, "reason": "'
    line = head + "x" * (MAX_LINE_BYTES - len(head) - 2) + '"}'
    assert len(line) == MAX_LINE_BYTES
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n" + END + "\n")
    with pytest.raises(TraceError, match=r"reason: .* characters; at most 1000"):
        list(read_trace(path, CONFIG))  # past the line limit: the field limit speaks


def test_read_trace_streams_and_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.jsonl: file not found"):
        list(read_trace(tmp_path / "nope.jsonl", CONFIG))
    assert check_trace(tmp_path, CONFIG) == [f"{tmp_path}: is a directory, not a trace file"]


def test_read_trace_yields_the_good_steps_before_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"at": i, "model": "llama3-8b", "ok": True}) for i in range(3)]
    path.write_text("\n".join([*lines, "{oops", END]))
    seen = []
    with pytest.raises(TraceError, match=":4: not a JSON object"):
        for step in read_trace(path, CONFIG):
            seen.append(step)
    assert len(seen) == 3


def test_a_trace_of_more_than_a_million_steps_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.sim import trace

    monkeypatch.setattr(trace, "MAX_STEPS", 3)
    lines = [f'{{"at": {i}, "model": "llama3-8b", "ok": true}}' for i in range(3)]
    assert error_of("\n".join([*lines, END])) == "t.jsonl:4: more than 3 steps; split the trace"
