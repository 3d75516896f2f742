"""The local_file probe: GGUF and safetensors headers, unusable files, the sha256 pin."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes_fixtures import running_prober, spec

import plugins.local_file as local_file
from daemon.core.model import ModelSpec, ProbeResult, ProbeStatus
from daemon.testing.fakes import write_gguf, write_safetensors


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def model_file(path: Path, **fields: object) -> ModelSpec:
    return spec("file-model", provider="local_file", local_path=str(path), **fields)


async def probe_file(path: Path, **fields: object) -> ProbeResult:
    async with running_prober() as prober:
        return await prober.run(model_file(path, **fields))


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.anyio
@pytest.mark.parametrize("version", [2, 3])
async def test_valid_gguf_is_healthy_with_facts(tmp_path: Path, version: int) -> None:
    path = write_gguf(tmp_path / "m.gguf", version=version,
                      tensors={"a": (4, 8), "b": (16,), "c": (2, 2, 2)},
                      metadata={"general.architecture": "qwen2", "general.name": "tiny",
                                "tokenizer.ggml.tokens": ["<s>", "</s>", "hi"],
                                "tokenizer.ggml.scores": [0.0, 0.5, 1.0],
                                "general.file_type": 1, "general.quantized": False})
    result = await probe_file(path)
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts["format"] == "gguf"
    assert result.facts["version"] == version
    assert result.facts["tensor_count"] == 3
    assert result.facts["metadata_count"] == 6
    assert result.facts["architecture"] == "qwen2"
    assert result.facts["size"] == path.stat().st_size


@pytest.mark.anyio
async def test_gguf_with_custom_alignment_is_valid(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", alignment=64)
    result = await probe_file(path)
    assert result.ok, result.reason


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (10, "truncated GGUF header"),  # inside the counts
        (30, "truncated GGUF file: 2 metadata entries and 2 tensors cannot fit in 30 bytes"),
        (120, "truncated GGUF"),  # inside the tensor descriptions
        (-40, "truncated GGUF file: tensor data needs"),  # a half-downloaded file
    ],
)
async def test_truncated_gguf_fails(tmp_path: Path, cut: int, reason: str) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert result.reason.startswith(reason), result.reason


@pytest.mark.anyio
async def test_gguf_extension_with_wrong_magic_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "not a GGUF file (wrong magic)"


@pytest.mark.anyio
async def test_gguf_version_1_is_refused_as_unsupported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "old.gguf", version=1)
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert result.reason == "GGUF version 1 is not supported (convert the model again)"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("version", "reason"),
    [(4, "unsupported GGUF version 4"),
     (0x03000000, "unsupported GGUF version 50331648 (a big-endian file?)")],
)
async def test_unknown_gguf_versions_fail(tmp_path: Path, version: int, reason: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, 0) + bytes(64))
    result = await probe_file(path)
    assert result.reason == reason


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tensors", "metadata", "reason"),
    [
        (2**63, 1, "implausible GGUF tensor count 9223372036854775808"),
        (1, 2**40, "implausible GGUF metadata count 1099511627776"),
        (5000, 5000, "truncated GGUF file: 5000 metadata entries and 5000 tensors"),
    ],
)
async def test_absurd_gguf_counts_fail(
    tmp_path: Path, tensors: int, metadata: int, reason: str
) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, metadata) + bytes(4096))
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert result.reason.startswith(reason), result.reason


@pytest.mark.anyio
async def test_gguf_with_a_corrupt_metadata_type_fails(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", metadata={"general.architecture": "llama"})
    data = bytearray(path.read_bytes())
    key_len = len("general.architecture")
    type_at = 4 + 4 + 8 + 8 + 8 + key_len
    data[type_at:type_at + 4] = struct.pack("<I", 77)
    path.write_bytes(bytes(data))
    result = await probe_file(path)
    assert result.reason == "corrupt GGUF header: unknown metadata type 77"


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.anyio
async def test_valid_safetensors_is_healthy(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "model.safetensors",
                             tensors={"w": (2, 3), "b": (3,)}, metadata={"format": "pt"})
    result = await probe_file(path)
    assert result.status is ProbeStatus.OK, result.reason
    assert result.facts == {"format": "safetensors", "tensor_count": 2,
                            "size": path.stat().st_size}


@pytest.mark.anyio
async def test_safetensors_is_recognised_without_its_extension(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "model.bin")
    result = await probe_file(path)
    assert result.facts["format"] == "safetensors"


def _safetensors_with_header(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (struct.pack("<Q", 100_000_001) + b"{}", "safetensors header length 100000001 exceeds"),
        (struct.pack("<Q", 5000) + b'{"a": 1}', "truncated safetensors file: header of 5000"),
        (struct.pack("<Q", 4) + b"nope", "safetensors header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "safetensors header is not a JSON object"),
        (struct.pack("<Q", 3), "truncated safetensors file"),
        (b"\x01\x02", "truncated safetensors header"),
    ],
)
async def test_broken_safetensors_headers_fail(tmp_path: Path, raw: bytes, reason: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert result.reason.startswith(reason), result.reason


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"shape": [1], "data_offsets": [0, 4]}, "safetensors tensor 'w' has no dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "has a bad shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "has bad data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}, "truncated safetensors"),
    ],
)
async def test_safetensors_entries_are_checked(
    tmp_path: Path, entry: dict[str, object], reason: str
) -> None:
    path = _safetensors_with_header(tmp_path / "m.safetensors",
                                    json.dumps({"w": entry}).encode(), bytes(4))
    result = await probe_file(path)
    assert result.status is ProbeStatus.FAILED
    assert reason in result.reason


# ----------------------------------------------------------------------------- unusable files


@pytest.mark.anyio
async def test_zero_byte_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    result = await probe_file(path)
    assert result.reason == f"{path} is empty (0 bytes)"


@pytest.mark.anyio
async def test_missing_file_fails(tmp_path: Path) -> None:
    result = await probe_file(tmp_path / "gone.gguf")
    assert result.reason == f"file not found: {tmp_path / 'gone.gguf'}"


@pytest.mark.anyio
async def test_a_directory_or_a_fifo_is_not_a_model_file(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    os.mkfifo(tmp_path / "pipe.gguf")  # opening it would block: the probe must not open it
    as_dir = await probe_file(tmp_path / "dir.gguf")
    as_fifo = await probe_file(tmp_path / "pipe.gguf")
    assert as_dir.reason.endswith("is a directory, not a regular file")
    assert as_fifo.reason.endswith("is a named pipe, not a regular file")


@pytest.mark.anyio
async def test_other_files_need_only_exist_and_be_readable(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01binary")
    result = await probe_file(path)
    assert result.status is ProbeStatus.OK
    assert result.facts["format"] == "other"


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A directory anyone may enter, so only the file's own mode decides readability."""
    path = Path(tempfile.mkdtemp(prefix="md-unreadable-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_an_unreadable_file_fails_with_permission_denied(world_traversable_dir: Path) -> None:
    """chmod 000 does not stop root, so as root the check runs in a child that drops to nobody.

    The child calls the probe's own blocking check (the code the probe runs in its worker
    thread), so what is tested is the real open() failing with EACCES, not a mock.
    """
    path = write_gguf(world_traversable_dir / "secret.gguf")
    path.chmod(0o000)
    if os.geteuid() != 0:
        verdict = local_file.inspect_model_file(str(path), path.stat().st_size, full=True)
        assert verdict.reason == f"cannot read {path}: permission denied"
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            verdict = local_file.inspect_model_file(str(path), path.stat().st_size, full=True)
            os.write(write_end, verdict.reason.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reason = reader.read().decode()
    os.waitpid(pid, 0)
    assert reason == f"cannot read {path}: permission denied"


# ----------------------------------------------------------------------------- sha256 pin


@pytest.mark.anyio
async def test_sha256_pin_is_hashed_once_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    reads: list[str] = []
    real = local_file.sha256_file

    def counting_sha256_file(p: str) -> str:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(local_file, "sha256_file", counting_sha256_file)
    async with running_prober() as prober:
        first = await prober.run(model_file(path, sha256=digest.upper()))
        second = await prober.run(model_file(path, sha256=digest))
        assert reads == [str(path)]  # the second probe used the cache: the file was not read
        path.write_bytes(path.read_bytes() + b"\0" * 32)  # a new version: size and mtime
        third = await prober.run(model_file(path, sha256=digest))
    assert first.status is ProbeStatus.OK and first.facts["sha256_verified"] is True
    assert second.status is ProbeStatus.OK and second.facts["sha256_verified"] is True
    assert len(reads) == 2
    assert third.status is ProbeStatus.FAILED
    assert third.reason.startswith(f"sha256 mismatch: expected {digest[:12]}…, file has ")


@pytest.mark.anyio
async def test_a_slow_hash_makes_the_probe_degraded_not_timed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    path = write_gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    release = threading.Event()
    calls: list[str] = []

    def slow_sha256_file(p: str) -> str:
        calls.append(p)
        release.wait(5)
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    monkeypatch.setattr(local_file, "sha256_file", slow_sha256_file)
    async with running_prober(timeout=0.3) as prober:
        first = await prober.run(model_file(path, sha256=digest))
        second = await prober.run(model_file(path, sha256=digest))
        release.set()
        import anyio

        with anyio.fail_after(5):
            while (third := await prober.run(model_file(path, sha256=digest))).status \
                    is not ProbeStatus.OK:
                await anyio.sleep(0.02)
    assert first.status is ProbeStatus.DEGRADED
    assert first.reason == "sha256 verification in progress"
    assert second.reason == "sha256 verification in progress"
    assert len(calls) == 1  # the second probe did not start a second hash
    assert third.facts["sha256_verified"] is True


@pytest.mark.anyio
async def test_header_is_parsed_once_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    parses: list[int] = []
    real = local_file.check_gguf
    monkeypatch.setattr(local_file, "check_gguf",
                        lambda handle, size: parses.append(size) or real(handle, size))
    async with running_prober() as prober:
        for _ in range(3):
            assert (await prober.run(model_file(path))).ok
        path.write_bytes(path.read_bytes()[:-40])
        broken = await prober.run(model_file(path))
    assert len(parses) == 2
    assert not broken.ok
