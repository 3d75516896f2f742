"""The state store (daemon.persist.store): atomic durable writes, corrupt and newer files,
the lock."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import daemon.persist.store as state_mod
from daemon.config import parse_config
from daemon.core.model import ProbeResult
from daemon.core.registry import ModelRegistry
from daemon.persist.codec import check_state_shape, from_state, to_state
from daemon.persist.store import (
    SCHEMA_VERSION,
    StateError,
    StateLocked,
    StateStore,
)

CORRUPT_NAME = re.compile(r"^state\.json\.corrupt-\d{8}T\d{6}Z(-\d+)?$")
T0 = 1_700_000_000.0


def config():
    return parse_config({"models": [
        {"id": "a", "provider": "openai", "endpoint": "http://10.0.0.1:8000", "role": "chat",
         "primary": True},
        {"id": "b", "provider": "ollama", "endpoint": "http://127.0.0.1:11434", "role": "chat"},
    ]}, "test.toml")


def busy_registry() -> ModelRegistry:
    registry = ModelRegistry(config(), T0)
    for i in range(3):
        registry.apply_probe("a", ProbeResult.healthy(120.0 + i), T0 + i)
        registry.apply_probe("b", ProbeResult.healthy(80.0, loaded=True), T0 + i)
    registry.apply_probe("a", ProbeResult.failure("connection refused"), T0 + 5)
    registry.promote_model("b", now=T0 + 6, actor="uid:0", reason="faster")
    registry.set_offline_mode(True, now=T0 + 7, actor="uid:0")
    registry.quarantine("a", now=T0 + 8, reason="test")
    return registry


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state.json")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".probe-" in p.name)


def is_temp_fd(fd: int) -> bool:
    try:
        return ".tmp-" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


# ----------------------------------------------------------------------------- round trip


def test_missing_file_loads_as_a_fresh_start(store):
    loaded = store.load()
    assert loaded.data is None and loaded.corrupt_copy is None


def test_registry_state_round_trips_through_the_file(store):
    registry = busy_registry()
    store.write(to_state(registry), now=T0 + 9)
    loaded = store.load()
    assert loaded.data is not None and loaded.corrupt_copy is None
    assert loaded.data["schema_version"] == SCHEMA_VERSION
    assert loaded.data["saved_at"] == T0 + 9
    assert check_state_shape(loaded.data) == []
    restored = from_state(config(), loaded.data, T0 + 10)
    assert to_state(restored) == to_state(registry)
    assert restored.roles["chat"].primary == "b"
    assert restored.offline_mode is True


def test_written_file_is_sorted_json_with_schema_version(store):
    size = store.write({"b": 1, "a": {"z": 1, "y": 2}}, now=5.0)
    raw = store.path.read_bytes()
    assert size == len(raw) and raw.endswith(b"\n")
    assert raw == json.dumps({"a": {"y": 2, "z": 1}, "b": 1, "saved_at": 5.0,
                              "schema_version": SCHEMA_VERSION},
                             sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_write_replaces_the_previous_state(store):
    store.write({"n": 1}, now=1.0)
    store.write({"n": 2}, now=2.0)
    assert store.load().data["n"] == 2
    assert leftovers(store.path.parent) == []


def test_encode_refuses_nan_rather_than_writing_invalid_json(store):
    with pytest.raises(ValueError):
        store.encode({"x": float("nan")})


# ----------------------------------------------------------------------------- mode


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_file_mode_is_0640_whatever_the_umask(store, umask):
    old = os.umask(umask)
    try:
        store.write({"n": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o640


def test_replacing_a_world_readable_file_leaves_mode_0640(store):
    store.path.write_text("{}")
    store.path.chmod(0o666)
    store.write({"n": 1})
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- failed writes


def test_enospc_midway_through_write_keeps_the_old_file_and_no_temp(store, monkeypatch):
    store.write({"n": 1}, now=1.0)
    before = store.path.read_bytes()
    real_write = os.write
    calls = {"n": 0}

    def write_then_fill_disk(fd, data):
        if not is_temp_fd(fd):
            return real_write(fd, data)
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_mod.os, "write", write_then_fill_disk)
    with pytest.raises(OSError) as caught:
        store.write({"n": 2, "pad": "x" * 10_000}, now=2.0)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert calls["n"] == 2  # it really failed midway, after a partial write
    assert store.path.read_bytes() == before
    assert leftovers(store.path.parent) == []
    assert store.load().data["n"] == 1


def test_enospc_on_fsync_keeps_the_old_file_and_no_temp(store, monkeypatch):
    store.write({"n": 1}, now=1.0)
    before = store.path.read_bytes()
    real_fsync = os.fsync

    def fsync_fails_for_temp(fd):
        if is_temp_fd(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(state_mod.os, "fsync", fsync_fails_for_temp)
    with pytest.raises(OSError, match="No space left"):
        store.write({"n": 2}, now=2.0)
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert leftovers(store.path.parent) == []


def test_failed_first_write_leaves_no_state_file_and_no_temp(store, monkeypatch):
    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_mod.os, "write", no_space)
    with pytest.raises(OSError):
        store.write({"n": 1})
    monkeypatch.undo()
    assert not store.path.exists()
    assert leftovers(store.path.parent) == []


# ----------------------------------------------------------------------------- corrupt / newer


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b""])
def test_invalid_json_is_kept_aside_and_load_starts_fresh(store, content):
    store.path.write_bytes(content)
    loaded = store.load()
    assert loaded.data is None
    assert loaded.corrupt_copy is not None
    kept = Path(loaded.corrupt_copy)
    assert kept.parent == store.path.parent
    assert CORRUPT_NAME.match(kept.name), kept.name
    assert kept.read_bytes() == content
    assert not store.path.exists()
    assert "not valid JSON" in loaded.problem


@pytest.mark.parametrize("data", [{"models": {}}, [1, 2], {"schema_version": "1"},
                                  {"schema_version": 1.0}, {"schema_version": True}])
def test_json_without_an_integer_schema_version_is_kept_aside(store, data):
    store.path.write_text(json.dumps(data))
    loaded = store.load()
    assert loaded.data is None
    assert loaded.corrupt_copy and CORRUPT_NAME.match(Path(loaded.corrupt_copy).name)
    assert "schema_version" in loaded.problem


def test_two_corrupt_files_in_the_same_second_are_both_kept(store):
    store.path.write_text("bad one")
    first = store.load().corrupt_copy
    store.path.write_text("bad two")
    second = store.load().corrupt_copy
    assert first and second and first != second
    assert Path(first).read_text() == "bad one" and Path(second).read_text() == "bad two"


def test_after_a_corrupt_file_the_daemon_starts_fresh_from_config(store):
    store.path.write_text('{"truncated": ')
    loaded = store.load()
    assert loaded.data is None
    registry = ModelRegistry(config(), T0)
    assert registry.roles["chat"].primary == "a"
    store.write(to_state(registry))
    assert check_state_shape(store.load().data) == []


def test_state_with_a_bad_shape_can_be_set_aside(store):
    store.path.write_text(json.dumps({"schema_version": 1, "models": []}))
    loaded = store.load()
    assert loaded.data is not None
    assert check_state_shape(loaded.data)
    aside = store.set_aside("bad shape")
    assert aside.data is None and aside.problem == "bad shape"
    assert CORRUPT_NAME.match(Path(aside.corrupt_copy).name)


def test_newer_schema_is_refused_and_the_file_left_untouched(store):
    content = json.dumps({"schema_version": SCHEMA_VERSION + 1, "future": True}).encode()
    store.path.write_bytes(content)
    with pytest.raises(StateError) as caught:
        store.load()
    message = str(caught.value)
    assert str(store.path) in message and f"schema_version {SCHEMA_VERSION + 1}" in message
    assert "untouched" in message
    assert store.path.read_bytes() == content
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json"]


def test_older_schema_is_migrated(store, monkeypatch):
    def upgrade(data):
        return {**data, "upgraded": True}

    monkeypatch.setitem(state_mod.MIGRATIONS, SCHEMA_VERSION - 1, upgrade)
    store.path.write_text(json.dumps({"schema_version": SCHEMA_VERSION - 1}))
    loaded = store.load()
    assert loaded.migrated_from == SCHEMA_VERSION - 1
    assert loaded.data == {"schema_version": SCHEMA_VERSION, "upgraded": True}


def test_older_schema_without_a_migration_is_kept_aside(store):
    store.path.write_text(json.dumps({"schema_version": SCHEMA_VERSION - 1}))
    loaded = store.load()
    assert loaded.data is None and loaded.corrupt_copy
    assert "no migration" in loaded.problem


# ----------------------------------------------------------------------------- lock


HOLDER = textwrap.dedent("""
    import sys
    from daemon.persist.store import StateStore
    store = StateStore(sys.argv[1])
    store.lock()
    print("locked", flush=True)
    sys.stdin.readline()
""")


@contextmanager
def lock_held_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_second_lock_holder_fails_naming_the_first_pid(store):
    with lock_held_by_another_process(store.path) as holder:
        with pytest.raises(StateLocked) as caught:
            store.lock()
        assert caught.value.holder_pid == holder.pid
        assert f"pid {holder.pid}" in str(caught.value)
        assert str(store.path) in str(caught.value)


def test_lock_is_free_again_when_the_holder_exits(store):
    with lock_held_by_another_process(store.path):
        pass
    store.lock()
    assert store.lock_path.read_text().strip() == str(os.getpid())
    store.unlock()


def test_second_store_in_the_same_process_cannot_take_the_lock(tmp_path):
    first = StateStore(tmp_path / "state.json")
    second = StateStore(tmp_path / "state.json")
    first.lock()
    try:
        with pytest.raises(StateLocked) as caught:
            second.lock()
        assert caught.value.holder_pid == os.getpid()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


def test_lock_file_sits_beside_the_state_file(store):
    assert store.lock_path == store.path.with_name("state.json.lock")


# ----------------------------------------------------------------------------- writable


def test_check_writable_passes_and_leaves_nothing_behind(store):
    store.check_writable()
    assert leftovers(store.path.parent) == []


def test_check_writable_fails_when_the_directory_does_not_exist(tmp_path):
    store = StateStore(tmp_path / "missing" / "state.json")
    with pytest.raises(StateError, match="does not exist"):
        store.check_writable()


def test_check_writable_fails_when_the_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="does not exist"):
        StateStore(tmp_path / "file" / "state.json").check_writable()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the test process cannot write: mode 0555 for a normal user; for root
    (which ignores permission bits) a read-only tmpfs mount."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_check_writable_fails_on_a_read_only_directory(read_only_dir):
    store = StateStore(read_only_dir / "state.json")
    with pytest.raises(StateError, match="not writable") as caught:
        store.check_writable()
    assert str(read_only_dir) in str(caught.value)


def test_write_to_a_read_only_directory_raises_and_keeps_nothing(read_only_dir):
    with pytest.raises(OSError):
        StateStore(read_only_dir / "state.json").write({"n": 1})
    assert list(read_only_dir.iterdir()) == []


# ----------------------------------------------------------------------------- shape


def test_check_state_shape_accepts_a_registry_state(store):
    data = json.loads(store.encode(to_state(busy_registry()), now=T0))
    assert check_state_shape(data) == []


def test_check_state_shape_names_missing_and_mistyped_keys():
    data = json.loads(StateStore("/x").encode(to_state(busy_registry()), now=T0))
    del data["roles"]
    data["offline_mode"] = "yes"
    data["event_seq"] = True
    assert check_state_shape(data) == ["offline_mode has the wrong type (str)",
                                       "missing key roles",
                                       "event_seq has the wrong type (bool)"]


def test_check_state_shape_names_broken_models_and_roles():
    data = json.loads(StateStore("/x").encode(to_state(busy_registry()), now=T0))
    del data["models"]["a"]["status"]
    data["roles"]["chat"] = {"primary": "a"}
    assert check_state_shape(data) == ["models.a lacks status or retired",
                                       "roles.chat lacks primary or history"]


def test_check_state_shape_of_a_non_object():
    assert check_state_shape([]) == ["state is not a JSON object"]


def test_remove_stale_temps_deletes_only_leftovers_of_killed_writers(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "model_registry.json")
    store.write({"offline_mode": False})
    leftovers = [".model_registry.json.tmp-123-456", ".model_registry.json.probe-77"]
    keep = ["model_registry.json", "model_registry.json.corrupt-20260101T000000Z",
            ".other.json.tmp-1-2", "notes.txt"]
    for name in [*leftovers, *keep[1:]]:
        (tmp_path / name).write_text("x")
    assert store.remove_stale_temps() == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert store.remove_stale_temps() == []
