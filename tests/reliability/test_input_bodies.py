"""Hostile request bodies on the control socket: each gets a clear 400 naming what is wrong.

Before: 100k nested arrays → 500 ``internal_error`` (RecursionError); ``{"model_id":
"\\ud800"}`` → no answer at all (the error reply naming the model could not be encoded);
``NaN`` / ``1e999`` were taken as numbers. Asserted against the real daemon (one run for all
bodies), and the parser and the reply encoder on their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.control.messages import MAX_JSON_DEPTH, HTTPError, Request, Response, parse_json
from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, UnixHTTPConnection, daemon_config

DEEP = b"[" * 100_000 + b"]" * 100_000

#: body → what the 400's message must say
HOSTILE: list[tuple[str, bytes, str]] = [
    ("deep-arrays", DEEP, "nested too deeply"),
    ("deep-in-a-field", b'{"model_id": ' + b"[" * 900 + b"]" * 900 + b"}", "nested too deeply"),
    ("lone-surrogate", b'{"model_id": "\\ud800"}', "lone surrogate"),
    ("lone-surrogate-key", b'{"\\udfff": 1}', "lone surrogate"),
    ("surrogate-bytes", b'{"model_id": "\xed\xa0\x80"}', "lone surrogate"),
    ("nan", b'{"model_id": "m", "force": NaN}', "NaN is not a JSON number"),
    ("infinity", b'{"enabled": -Infinity}', "Infinity is not a JSON number"),
    ("huge-float", b'{"model_id": 1e999}', "1e999 is out of range"),
    ("huge-int", b'{"model_id": ' + b"9" * 5000 + b"}", "has 5000 digits"),
]


@pytest.mark.parametrize(("body", "says"), [(b, s) for _, b, s in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_body_is_invalid_json_naming_the_problem(body: bytes, says: str) -> None:
    with pytest.raises(HTTPError) as caught:
        Request("POST", "/api/v1/models/promote", {}, [], body).json()
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
    assert says in caught.value.message, caught.value.message
    assert "request body" in caught.value.message
    Response.json({"error": caught.value.message})  # the reply itself can be written


def test_valid_bodies_still_parse() -> None:
    assert parse_json(b'{"model_id": "caf\\u00e9 \\ud83d\\ude00", "force": true}', "b") == {
        "model_id": "café 😀", "force": True}
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(nested, "b") is not None
    assert parse_json(b'{"n": 1.5e300, "i": 18446744073709551615}', "b") == {
        "n": 1.5e300, "i": 18446744073709551615}


def test_reply_with_a_lone_surrogate_is_written_as_its_escape() -> None:
    body = Response.json({"error": {"message": 'no model "\ud800"'}}).body
    assert json.loads(body) == {"error": {"message": 'no model "\ud800"'}}
    assert b"\\ud800" in body


def test_hostile_bodies_on_the_real_socket_get_400_and_the_daemon_stays(
        workdir: Path) -> None:
    gguf = write_gguf(workdir / "m.gguf")
    config = daemon_config(workdir, [{"id": "m", "provider": "local_file",
                                      "local_path": str(gguf), "primary": True}])
    with DaemonProcess(workdir, config) as daemon:
        daemon.wait_health("m", "healthy")
        before = daemon.state()["roles"]
        routes = ["/api/v1/models/promote", "/api/v1/models/offline-mode",
                  "/api/v1/models/rollback"]
        for name, body, says in HOSTILE:
            for path in routes:
                conn = UnixHTTPConnection(daemon.socket_path)
                try:
                    conn.request("POST", path, body=body,
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    answer = json.loads(resp.read())
                finally:
                    conn.close()
                assert resp.status == 400, (name, path, resp.status, answer)
                assert answer["error"]["code"] == "invalid_json", (name, answer)
                assert says in answer["error"]["message"], (name, answer)
        assert daemon.state()["roles"] == before
        assert daemon.get("/api/v1/status")["pid"] == daemon.pid
        assert daemon.get("/api/v1/models/offline-mode/status")["offline_mode"] is False


def test_long_strings_in_a_body_are_refused_and_never_echoed_whole() -> None:
    from daemon.control.api import MAX_BODY_TEXT, _body_object

    allowed: dict[str, tuple[type, ...]] = {"model_id": (str,), "reason": (str,)}
    cases = [
        (json.dumps({"model_id": "m", "reason": "r" * 500_000}), "at most"),
        (json.dumps({"k" * 500_000: 1}), "unknown field"),
        (json.dumps({"model_id": ["x" * 500_000]}), "must be str"),
    ]
    for body, says in cases:
        with pytest.raises(HTTPError) as caught:
            _body_object(Request("POST", "/api/v1/models/promote", {}, [], body.encode()),
                         allowed)
        assert caught.value.status == 422 and says in caught.value.message
        assert len(caught.value.message) < 300, caught.value.message[:100]
    ok = _body_object(Request("POST", "/p", {}, [], json.dumps(
        {"model_id": "m", "reason": "r" * MAX_BODY_TEXT}).encode()), allowed)
    assert len(ok["reason"]) == MAX_BODY_TEXT


@pytest.mark.parametrize(("body", "says"), [(b, s) for _, b, s in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_the_front_door_refuses_the_same_bodies_with_a_clear_400(body: bytes, says: str) -> None:
    from daemon.gateway.door import _parse_body
    from daemon.gateway.routing import DoorError

    with pytest.raises(DoorError) as caught:
        _parse_body(body)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
    assert says in caught.value.message, caught.value.message


def test_an_upstream_error_body_nested_too_deeply_still_gives_a_reason() -> None:
    """The front door peeks at 2 kB of an upstream's error body for the reason: 1,024 "["
    nest deeper than the interpreter's recursion limit (was: RecursionError, a 500)."""
    from daemon.gateway.door import _error_message

    message = _error_message(b"[" * 1024 + b"]" * 1024)
    assert message.startswith("[[[") and len(message) <= 160


def test_a_front_door_error_quoting_a_lone_surrogate_can_be_written() -> None:
    from daemon.gateway.routing import DoorError

    error = DoorError(503, "no_usable_model", 'upstream said "\ud800"',
                      reasons={"m": "HTTP 503: \udfff"})
    assert json.loads(error.body())["error"]["reasons"] == {"m": "HTTP 503: \udfff"}
