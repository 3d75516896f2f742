"""State files the daemon cannot use: every value is checked at load, what cannot be used is
set aside (``<name>.corrupt-<UTC time>``) and the daemon starts.

Before: ``1e999`` in an integer field → OverflowError, exit 1 on every start; NaN or Infinity
in a time, latency, quarantine or event → loaded, then the first write failed (``allow_nan=
False``) → exit 73 on every start, a restart loop under systemd; a FIFO at the state path →
start-up hung silently; ``"retired": "false"`` → retired (``bool("false")``); 900 kB strings in
saved facts were kept whole.

Most cases run the daemon's load path in-process (what ``Daemon._load_state`` does: load,
shape check, decode, set aside on StateShapeError) and then encode the registry, as the first
flush would; two run the real daemon.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from reliability_support import clean_env, corrupt_copies, start_and_wait_ready

from daemon.config import parse_config
from daemon.core.model import ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.persist.codec import StateShapeError, check_state_shape, from_state, to_state
from daemon.persist.store import StateStore
from daemon.probing.limits import MAX_FACT_TEXT_CHARS, MAX_REASON_CHARS
from daemon.testing.fakes import write_gguf
from daemon.testing.harness import DaemonProcess, daemon_config

T0 = 1_700_000_000.0


def config() -> Any:
    return parse_config({"models": [
        {"id": "a", "provider": "openai", "endpoint": "http://10.0.0.1:8000", "role": "chat",
         "primary": True},
        {"id": "b", "provider": "openai", "endpoint": "http://10.0.0.2:8000", "role": "chat"},
    ]}, "test.toml")


def saved_state(store: StateStore) -> dict[str, Any]:
    """A real state with every part filled in: probes, a promotion, a quarantine, events."""
    registry = ModelRegistry(config(), T0)
    for i in range(3):
        registry.apply_probe("a", ProbeResult.healthy(120.0 + i, owned_by="vllm"), T0 + i)
        registry.apply_probe("b", ProbeResult.healthy(80.0), T0 + i)
    registry.promote_model("b", now=T0 + 6, actor="uid=0 pid=1", reason="faster")
    registry.quarantine("a", now=T0 + 8, reason="test")
    store.write(to_state(registry), now=T0 + 9)
    return dict(json.loads(store.path.read_text()))


def load_like_the_daemon(store: StateStore) -> tuple[ModelRegistry, str | None]:
    """What Daemon._load_state does with the file; the registry and the copy set aside."""
    loaded = store.load()
    kept = loaded.corrupt_copy
    registry = None
    if loaded.data is not None:
        try:
            problems = check_state_shape(loaded.data)
            if problems:
                raise StateShapeError("; ".join(problems))
            registry = from_state(config(), loaded.data, T0 + 10)
        except StateShapeError as exc:
            kept = store.set_aside(str(exc)).corrupt_copy
    if registry is None:
        registry = ModelRegistry(config(), T0 + 10)
    store.encode(to_state(registry))  # the first flush must not fail
    return registry, kept


def edit(data: dict[str, Any], path: str, raw: str) -> str:
    """The state's JSON text with the value at ``path`` (dots and [n]) replaced by ``raw``."""
    marker = "__VALUE__"
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = marker
    else:
        node[last] = marker
    return json.dumps(data).replace(f'"{marker}"', raw)


#: where → the raw JSON put there; each makes the file unusable
UNUSABLE = [
    ("models.a.consecutive_failures", "1e999"),
    ("models.a.probes_total", "-Infinity"),
    ("models.a.changed_at", "NaN"),
    ("models.a.window.[0].[1]", "Infinity"),
    ("models.a.recent.[0].latency_ms", "NaN"),
    ("quarantine.a", "Infinity"),
    ("events.[0].at", "NaN"),
    ("roles.chat.history.[0].at", "1e999"),
    ("models.a.consecutive_successes", "-5"),
    ("models.a.probes_total", '"12"'),
    ("models.a.retired", '"false"'),
    ("offline_mode", '"yes"'),
    ("models.a.window.[0]", "[true]"),
    ("roles.chat.stack.[0].automatic", "1"),
    ("roles.chat.promoted_at", '"yesterday"'),
    ("event_seq", "1.5"),
    ("events.[0].data", "[" * 50_000 + "]" * 50_000),
    ("models.a.recent.[0].facts", '{"x": ' + "[" * 50_000 + "]" * 50_000 + "}"),
    ("roles.chat.hold", '{"by": "x", "reason": "r", "since": 1, "until": NaN}'),
    ("roles.chat.hold", '{"by": "x", "reason": "r", "since": 1, "until": "never"}'),
    ("roles.chat.hold", '"held"'),
    ("roles.chat.preferred", "7"),
    ("roles.chat.last_failback_at", "Infinity"),
    ("models", "[1, 2]"),
    ("roles", '"chat"'),
    ("models.a", "7"),
    ("events", "{}"),
]


@pytest.mark.parametrize(("where", "raw"), UNUSABLE, ids=[f"{w}={r[:12]}" for w, r in UNUSABLE])
def test_unusable_value_sets_the_file_aside_and_starts_fresh(
        tmp_path: Path, where: str, raw: str) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.write_text(edit(saved_state(store), where, raw))
    registry, kept = load_like_the_daemon(store)
    assert kept is not None, f"{where}={raw[:20]} was loaded"
    assert Path(kept).exists() and not store.path.exists()
    assert registry.roles["chat"].primary == "a"  # fresh, from the config


def test_a_valid_state_still_loads_whole(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    saved_state(store)
    registry, kept = load_like_the_daemon(store)
    assert kept is None
    assert registry.roles["chat"].primary == "b"
    assert "a" in registry.quarantined_until
    assert registry.models["a"].health.probes_total == 3
    hold = registry.roles["chat"].hold
    assert hold is not None and hold.reason == "faster"  # the operator's hold survives


def test_huge_saved_strings_are_cut_to_the_bounds_at_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    data = saved_state(store)
    data["models"]["a"]["recent"][0]["facts"]["owned_by"] = "x" * 900_000
    data["models"]["a"]["recent"][0]["reason"] = "y" * 900_000
    data["events"][0]["reason"] = "z" * 900_000
    data["roles"]["chat"]["history"][0]["reason"] = "w" * 900_000
    store.path.write_text(json.dumps(data))
    registry, kept = load_like_the_daemon(store)
    assert kept is None
    encoded = store.encode(to_state(registry))
    assert len(encoded) < 20_000, f"{len(encoded)} bytes after load"
    record = registry.models["a"].recent[-1]
    assert len(record.facts["owned_by"]) == MAX_FACT_TEXT_CHARS
    assert len(record.reason) <= MAX_REASON_CHARS


def test_a_fifo_at_the_state_path_is_set_aside_without_hanging(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    os.mkfifo(store.path)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(load_like_the_daemon(store)),
                              daemon=True)
    worker.start()
    worker.join(5.0)
    if worker.is_alive():  # unblock the reader so the thread ends
        fd = os.open(store.path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(5.0)
        pytest.fail("loading a state path that is a FIFO hung")
    _, kept = outcome[0]
    assert kept is not None and Path(kept).exists()
    assert not store.path.exists()


@pytest.mark.parametrize("trouble", ["1e999-in-an-int", "fifo"])
def test_the_daemon_starts_past_an_unusable_state_file(workdir: Path, trouble: str) -> None:
    gguf = write_gguf(workdir / "m.gguf")
    config = daemon_config(workdir, [{"id": "m", "provider": "local_file",
                                      "local_path": str(gguf), "primary": True}])
    with DaemonProcess(workdir, config, env=clean_env()) as daemon:
        daemon.wait_health("m", "healthy")
        daemon.stop()
        state_path = daemon.state_path
        if trouble == "fifo":
            state_path.unlink()
            os.mkfifo(state_path)
        else:
            data = json.loads(state_path.read_text())
            state_path.write_text(edit(data, "models.m.consecutive_successes", "1e999"))
        start_and_wait_ready(daemon, timeout=10.0)
        assert corrupt_copies(state_path), "nothing was set aside"
        assert any(line.get("event") == "state_corrupt" for line in daemon.log_lines())
        daemon.wait_health("m", "healthy")
        assert daemon.stop() == 0
        assert json.loads(state_path.read_text())["models"]["m"]["status"] == "healthy"


def test_the_daemons_own_event_data_survives_the_bounds(tmp_path: Path) -> None:
    """A reload that added 100 models: its event keeps the whole list across a restart."""
    store = StateStore(tmp_path / "state.json")
    data = saved_state(store)
    added = [f"model-{i}" for i in range(100)]
    data["events"][0]["data"] = {"added": added, "errors": ["x" * 400]}
    store.path.write_text(json.dumps(data))
    registry, kept = load_like_the_daemon(store)
    assert kept is None
    restored = next(e for e in registry.events if e.seq == data["events"][0]["seq"])
    assert restored.data["added"] == added
    assert restored.data["errors"] == ["x" * 400]


def test_a_directory_at_the_state_path_is_set_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.mkdir()
    (store.path / "inside").write_text("x")
    _, kept = load_like_the_daemon(store)
    assert kept is not None and Path(kept).is_dir()
    assert not store.path.exists()


def test_a_fifo_as_the_lock_file_is_a_clear_error(tmp_path: Path) -> None:
    from daemon.persist.store import StateError

    store = StateStore(tmp_path / "state.json")
    os.mkfifo(store.lock_path)
    with pytest.raises(StateError, match="not a regular file"):
        store.lock()


def test_a_lock_file_that_cannot_be_written_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk and no lock file yet: the pid cannot be written (was: a traceback)."""
    import errno

    from daemon.persist.store import StateError

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)  # the store's os module
    store = StateStore(tmp_path / "state.json")
    with pytest.raises(StateError, match="No space left on device"):
        store.lock()


def test_a_migration_that_cannot_read_an_old_file_sets_it_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.persist.store as store_module

    def strict_step(data: dict[str, Any]) -> dict[str, Any]:
        data["models"] = {k: v["renamed"] for k, v in data["models"].items()}
        return data

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(store_module.MIGRATIONS, 1, strict_step)
    store = StateStore(tmp_path / "state.json")
    store.path.write_text(json.dumps({"schema_version": 1, "models": {"a": {"x": 1}}}))
    loaded = store.load()
    assert loaded.data is None and loaded.corrupt_copy is not None
    assert "migration from schema_version 1 failed: KeyError" in loaded.problem
