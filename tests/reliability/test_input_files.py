"""Hostile model files and hung file systems: the local_file probe stays cheap and bounded.

Before: a 90 MB safetensors header (under the old 100 MB limit) was parsed in a thread on
every probe; a probe that timed out left its thread running while the next probe started
another (12 threads, RSS 3.3 GB, ``resolve`` stalls of 5 s), and a hung NFS ``stat`` piled up
threads the same way. Now the header is bounded to what real files use, one check of a file
runs at a time (a probe finding one running joins it), and the threads the probe may have
running — abandoned ones included — are bounded.
"""

from __future__ import annotations

import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import plugins.local_file as local_file
from daemon.core.model import ModelSpec, ProbeResult, ProbeStatus
from daemon.core.settings import ProbeConfig
from daemon.probing.context import make_http_client
from daemon.probing.prober import Prober
from daemon.testing.fakes import write_gguf

pytestmark = pytest.mark.anyio

TIMEOUT = 0.2


def spec_for(path: Path | str, model_id: str = "f") -> ModelSpec:
    return ModelSpec(id=model_id, provider="local_file", local_path=str(path))


async def probe(probe_obj: Any, path: Path | str, model_id: str = "f",
                timeout: float = TIMEOUT) -> ProbeResult:
    config = ProbeConfig(timeout=timeout)
    async with make_http_client(config) as client:
        return await Prober({"local_file": probe_obj}, client, config).run(
            spec_for(path, model_id))


def write_big_safetensors(path: Path, header_bytes: int) -> Path:
    """A well-formed safetensors file whose header is ``header_bytes`` of valid JSON: many
    zero-sized tensors (real files never need more than a few MB)."""
    entry = '"t%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    count = header_bytes // (len(entry % 0) + 1)
    header = ("{" + ",".join(entry % i for i in range(count)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


async def test_oversized_safetensors_header_is_refused_without_parsing(tmp_path: Path) -> None:
    path = write_big_safetensors(tmp_path / "big.safetensors", 20_000_000)
    started = time.perf_counter()
    result = await probe(local_file.LocalFileProbe(), path)
    elapsed = time.perf_counter() - started
    assert result.status is ProbeStatus.FAILED
    assert "header length" in result.reason and str(local_file.MAX_SAFETENSORS_HEADER) in (
        result.reason), result.reason
    assert elapsed < 0.1, f"{elapsed * 1000:.0f} ms to refuse it"


async def test_a_real_sized_header_still_passes(tmp_path: Path) -> None:
    # ~2 MB: the size of a single-file model with ~30,000 tensors
    path = write_big_safetensors(tmp_path / "ok.safetensors", 2_000_000)
    result = await probe(local_file.LocalFileProbe(), path, timeout=5.0)
    assert result.status is ProbeStatus.OK, result.reason


@pytest.fixture
def hung_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``stat`` of any path containing "hung" blocks (a dead NFS server) until released."""
    release = threading.Event()
    calls: dict[str, int] = {}
    running = {"now": 0, "peak": 0}
    lock = threading.Lock()
    real = local_file.stat_model_file

    def stat(path: str) -> Any:
        with lock:
            calls[path] = calls.get(path, 0) + 1
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        try:
            if "hung" in path:
                release.wait(30)
            elif "slow" in path:
                time.sleep(0.1)
            return real(path)
        finally:
            with lock:
                running["now"] -= 1

    monkeypatch.setattr(local_file, "stat_model_file", stat)
    state = {"release": release, "calls": calls, "running": running}
    try:
        yield state
    finally:
        release.set()
        deadline = time.monotonic() + 5
        while running["now"] and time.monotonic() < deadline:
            time.sleep(0.01)


async def test_a_hung_stat_does_not_pile_up_threads(tmp_path: Path,
                                                    hung_paths: dict[str, Any]) -> None:
    probe_obj = local_file.LocalFileProbe()
    path = tmp_path / "hung.gguf"
    for _ in range(5):  # the scheduler's rechecks of a model whose file system hangs
        result = await probe(probe_obj, path)
        assert result.status is ProbeStatus.FAILED
    assert hung_paths["calls"][str(path)] == 1, "a second check of the same file was started"
    assert "still running" in result.reason and "hung" in result.reason, result.reason


async def test_threads_left_behind_are_bounded_per_mount_and_in_all(
        tmp_path: Path, hung_paths: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # tmp_path/nfs{0,1,...} are mounts of their own (as the mount table says), all hung
    mounts = tuple(str(tmp_path / f"nfs{i}") for i in range(8))
    monkeypatch.setattr(local_file, "read_mount_points", lambda: (*mounts, "/"))
    probe_obj = local_file.LocalFileProbe()
    per_mount = local_file.MAX_FILE_THREADS_PER_MOUNT
    on_one = [await probe(probe_obj, Path(mounts[0]) / f"hung-{i}.gguf", f"a{i}", 0.1)
              for i in range(per_mount + 3)]
    assert hung_paths["running"]["peak"] == per_mount
    assert "on " + mounts[0] in on_one[-1].reason and "still running" in on_one[-1].reason
    # a file elsewhere is checked as usual while that mount hangs
    healthy = write_gguf(tmp_path / "fine.gguf")
    result = await probe(probe_obj, healthy, "fine")
    assert result.status is ProbeStatus.OK, result.reason
    # many hung mounts: the total stays bounded too, and then even a healthy file says why
    for n, mount in enumerate(mounts[1:]):
        for i in range(per_mount):
            await probe(probe_obj, Path(mount) / f"hung-{i}.gguf", f"b{n}-{i}", 0.1)
    assert hung_paths["running"]["peak"] == local_file.MAX_FILE_THREADS
    result = await probe(probe_obj, healthy, "fine")
    assert result.status is ProbeStatus.FAILED and "hung" in result.reason, result.reason
    hung_paths["release"].set()
    deadline = time.monotonic() + 5
    while hung_paths["running"]["now"] and time.monotonic() < deadline:
        await anyio.sleep(0.01)
    await anyio.sleep(0.05)
    result = await probe(probe_obj, healthy, "fine")
    assert result.status is ProbeStatus.OK, result.reason


def test_the_mount_of_a_path_is_found_from_the_table(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text("/dev/vda / ext4 rw 0 0\nsrv:/models /mnt/my\\040models nfs4 rw 0 0\n"
                     "tmpfs /mnt/my tmpfs rw 0 0\n")
    points = local_file.read_mount_points(str(table))
    assert local_file.mount_of("/mnt/my models/llama.gguf", points) == "/mnt/my models"
    assert local_file.mount_of("/mnt/my/x.gguf", points) == "/mnt/my"
    assert local_file.mount_of("/mnt/myx/x.gguf", points) == "/"
    assert local_file.read_mount_points(str(tmp_path / "absent")) == ("/",)


async def test_concurrent_probes_of_one_file_share_one_check(
        tmp_path: Path, hung_paths: dict[str, Any]) -> None:
    path = write_gguf(tmp_path / "slow.gguf")  # its stat takes 100 ms
    results: list[ProbeResult] = []
    config = ProbeConfig(timeout=2.0)
    async with make_http_client(config) as client:
        prober = Prober({"local_file": local_file.LocalFileProbe()}, client, config)

        async def one(i: int) -> None:
            results.append(await prober.run(spec_for(path, f"m{i}")))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    assert [r.status for r in results] == [ProbeStatus.OK] * 5, [r.reason for r in results]
    assert hung_paths["calls"][str(path)] == 1
    assert hung_paths["running"]["peak"] == 1


async def test_oversized_gguf_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Eight metadata strings of 60 MB each (a sparse file): before, each was read into memory
    in turn (60 MB peak, 480 MB read per check); now strings are skipped, not read, and the
    header is bounded."""
    path = tmp_path / "big.gguf"
    blob = 60 * 1024 * 1024
    with open(path, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 8))
        for i in range(8):
            key = f"general.blob{i}".encode()
            out.write(struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, blob))
            out.seek(blob, 1)
        out.truncate(out.tell())
    tracemalloc.start()
    try:
        result = await probe(local_file.LocalFileProbe(), path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status is ProbeStatus.FAILED
    assert "header" in result.reason and str(local_file.MAX_GGUF_HEADER) in result.reason, (
        result.reason)
    assert peak < 4 * 1024 * 1024, f"{peak / 1e6:.1f} MB allocated"


def test_safetensors_limit_is_what_real_files_use() -> None:
    # real headers: ~25 kB for a Llama-3-8B shard, a few hundred kB for a single-file SDXL
    assert local_file.MAX_SAFETENSORS_HEADER <= 16 * 1024 * 1024


async def test_checking_a_large_header_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """A header at the limit, of many small valid entries: the check takes a while in its
    thread, but the event loop keeps running (``json.loads`` of the whole header held the GIL
    for all of it: ~0.35 s for 8 MB)."""
    path = write_big_safetensors(tmp_path / "wide.safetensors",
                                 local_file.MAX_SAFETENSORS_HEADER - 64)
    worst = 0.0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.002)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        result = await probe(local_file.LocalFileProbe(), path, timeout=10.0)
        done.set()
    assert result.status is ProbeStatus.OK, result.reason
    # json.loads of the whole header: ~350 ms here; a busy 2-core box adds its own jitter
    assert worst < 0.2, f"the event loop stalled {worst * 1000:.0f} ms"


@pytest.mark.parametrize(("header", "reason"), [
    (b'{"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [0, 4]}}    ', ""),
    (b'{"__metadata__": {"n": 1}}', "string value in __metadata__"),
    (b'{"__metadata__": []}', "__metadata__ is not an object"),
    (b'{"w": {"dtype": "F32", "shape": [[[1]]], "data_offsets": [0, 4]}}', "bad shape"),
    (b'{"w": {"dtype": {"x": 1}, "shape": [1], "data_offsets": [0, 4]}}', "has no dtype"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} {}', "extra data"),
    (b'{"w" {}}', "expected ':'"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "expected ',' or '}'"),
], ids=["valid-padded", "metadata-not-text", "metadata-list", "nested-shape", "nested-dtype",
        "trailing-data", "no-colon", "unclosed"])
async def test_safetensors_header_is_decoded_entry_by_entry(
        tmp_path: Path, header: bytes, reason: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    result = await probe(local_file.LocalFileProbe(), path, timeout=2.0)
    if not reason:
        assert result.status is ProbeStatus.OK, result.reason
        assert result.facts["tensor_count"] == 1
    else:
        assert result.status is ProbeStatus.FAILED
        assert reason in result.reason, result.reason


async def test_a_check_that_raises_fails_the_probe_and_frees_its_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> Any:
        raise RuntimeError("stat exploded")

    monkeypatch.setattr(local_file, "stat_model_file", broken)
    probe_obj = local_file.LocalFileProbe()
    for _ in range(local_file.MAX_FILE_THREADS + 2):  # no slot is left taken
        result = await probe(probe_obj, tmp_path / "m.gguf", timeout=2.0)
        assert result.status is ProbeStatus.FAILED
        assert result.reason == "probe raised RuntimeError: stat exploded", result.reason
    assert probe_obj._checks.running == 0
