"""The ``local_file`` probe: a model file on disk is there, readable and well-formed.

Checks, in order: the file exists, is a regular file, is not empty and can be opened and read.
Then its header, by content (and by extension when the content does not say):

- GGUF: magic ``GGUF``, little-endian ``uint32`` version 2 or 3 (version 1 is refused as
  unsupported), ``uint64`` tensor and metadata counts within sane bounds, every metadata entry
  and tensor description well-formed, and the file long enough for the tensor data the header
  describes (a half-downloaded file fails here).
- safetensors: ``uint64`` little-endian header length (at most 100,000,000), then a JSON object
  whose entries have ``dtype``, ``shape`` and ``data_offsets`` (``__metadata__`` allowed), and
  tensor data that fits in the file.
- anything else: existence and readability only.

The header verdict is cached per file version (device, inode, size, mtime), so a steady file
costs a ``stat``, an ``open`` and an 8-byte read per probe. An optional ``sha256`` pin is
hashed in a worker thread once per (path, size, mtime_ns); while an 8 GB file is being hashed
the probe answers degraded "sha256 verification in progress" instead of timing out. All file
I/O runs in worker threads, never on the event loop.

Facts: ``format``, ``version`` (GGUF), ``tensor_count``, ``metadata_count``, ``architecture``
(GGUF ``general.architecture`` when present), ``size``, ``sha256_verified`` (when pinned).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import anyio

from daemon import ModelSpec, ProbeContext, ProbeResult, Register, hookimpl

NAME = "local_file"

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
#: Far above any real model (a 405B model has ~1,100 tensors and ~50 metadata entries).
MAX_GGUF_TENSORS = 1 << 20
MAX_GGUF_METADATA = 1 << 20
MAX_GGUF_STRING = 1 << 26
MAX_SAFETENSORS_HEADER = 100_000_000
HASH_CHUNK = 1 << 20

# GGUF metadata value types and the byte sizes of the fixed-size ones.
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# ggml tensor types whose storage is certain: type → (elements per block, bytes per block).
# Other types are accepted; their size is just not used to check the file's length.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}


class InvalidHeader(Exception):
    """The file's header is not valid; the message is the one-line reason."""


@dataclass(frozen=True, slots=True)
class FileVerdict:
    """What the header check found: ``reason`` is empty when the file is fine."""

    reason: str
    facts: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Exact reads from a binary file; running out of bytes raises InvalidHeader."""

    def __init__(self, handle: BinaryIO, what: str) -> None:
        self.handle = handle
        self.what = what

    def read(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) < size:
            raise InvalidHeader(f"truncated {self.what} (file ends inside the header)")
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.read(8))[0])

    def string(self) -> bytes:
        length = self.u64()
        if length > MAX_GGUF_STRING:
            raise InvalidHeader(f"corrupt {self.what}: a string of {length} bytes")
        return self.read(length)

    def skip(self, size: int) -> None:
        self.handle.seek(size, os.SEEK_CUR)


def _gguf_value(reader: _Reader, kind: int, depth: int = 0) -> Any:
    if kind in _GGUF_SCALAR_SIZES:
        raw = reader.read(_GGUF_SCALAR_SIZES[kind])
        return raw if kind != 4 else struct.unpack("<I", raw)[0]
    if kind == _GGUF_STRING:
        return reader.string()
    if kind == _GGUF_ARRAY and depth < 3:
        item_kind = reader.u32()
        count = reader.u64()
        if item_kind in _GGUF_SCALAR_SIZES:
            reader.skip(_GGUF_SCALAR_SIZES[item_kind] * count)  # past EOF: the next read fails
            return None
        if item_kind not in (_GGUF_STRING, _GGUF_ARRAY):
            raise InvalidHeader(f"corrupt {reader.what}: array of unknown type {item_kind}")
        if count > MAX_GGUF_STRING:
            raise InvalidHeader(f"corrupt {reader.what}: array of {count} items")
        for _ in range(count):
            _gguf_value(reader, item_kind, depth + 1)
        return None
    raise InvalidHeader(f"corrupt {reader.what}: unknown metadata type {kind}")


def check_gguf(handle: BinaryIO, size: int) -> dict[str, Any]:
    """Facts about a GGUF file; raises InvalidHeader naming what is wrong."""
    reader = _Reader(handle, "GGUF header")
    if reader.read(4) != GGUF_MAGIC:
        raise InvalidHeader("not a GGUF file (wrong magic)")
    version = reader.u32()
    if version == 1:
        raise InvalidHeader("GGUF version 1 is not supported (convert the model again)")
    if version not in GGUF_VERSIONS:
        hint = " (a big-endian file?)" if version >= 1 << 16 else ""
        raise InvalidHeader(f"unsupported GGUF version {version}{hint}")
    tensor_count = reader.u64()
    metadata_count = reader.u64()
    if tensor_count > MAX_GGUF_TENSORS:
        raise InvalidHeader(f"implausible GGUF tensor count {tensor_count}")
    if metadata_count > MAX_GGUF_METADATA:
        raise InvalidHeader(f"implausible GGUF metadata count {metadata_count}")
    # Each metadata entry takes at least 13 bytes and each tensor description at least 28.
    if 24 + 13 * metadata_count + 28 * tensor_count > size:
        raise InvalidHeader(
            f"truncated GGUF file: {metadata_count} metadata entries and {tensor_count} "
            f"tensors cannot fit in {size} bytes"
        )
    facts: dict[str, Any] = {
        "format": "gguf",
        "version": version,
        "tensor_count": tensor_count,
        "metadata_count": metadata_count,
    }
    alignment = 32
    for _ in range(metadata_count):
        key = reader.string()
        kind = reader.u32()
        value = _gguf_value(reader, kind)
        if key == b"general.architecture" and isinstance(value, bytes):
            facts["architecture"] = value.decode("utf-8", "replace")
        elif key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    if handle.tell() > size:
        raise InvalidHeader("truncated GGUF header (file ends inside the metadata)")
    data_needed = 0
    for _ in range(tensor_count):
        reader.string()
        n_dims = reader.u32()
        if n_dims > 8:
            raise InvalidHeader(f"corrupt GGUF header: a tensor with {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= reader.u64()
        ggml_type = reader.u32()
        offset = reader.u64()
        block = _GGML_BLOCKS.get(ggml_type)
        nbytes = (elements + block[0] - 1) // block[0] * block[1] if block else 0
        data_needed = max(data_needed, offset + nbytes)
    data_start = (handle.tell() + alignment - 1) // alignment * alignment
    if tensor_count and data_start + data_needed > size:
        raise InvalidHeader(
            f"truncated GGUF file: tensor data needs {data_start + data_needed} bytes, "
            f"the file has {size}"
        )
    return facts


def check_safetensors(handle: BinaryIO, size: int) -> dict[str, Any]:
    """Facts about a safetensors file; raises InvalidHeader naming what is wrong."""
    reader = _Reader(handle, "safetensors header")
    header_len = reader.u64()
    if header_len > MAX_SAFETENSORS_HEADER:
        raise InvalidHeader(
            f"safetensors header length {header_len} exceeds {MAX_SAFETENSORS_HEADER}"
        )
    if 8 + header_len > size:
        raise InvalidHeader(
            f"truncated safetensors file: header of {header_len} bytes, file of {size}"
        )
    try:
        header = json.loads(reader.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidHeader(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidHeader("safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    tensors = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise InvalidHeader("safetensors __metadata__ is not an object")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise InvalidHeader(f"safetensors tensor {name!r} has no dtype")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidHeader(f"safetensors tensor {name!r} has a bad shape")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidHeader(f"safetensors tensor {name!r} has bad data_offsets")
        if offsets[1] > data_size:
            raise InvalidHeader(
                f"truncated safetensors file: tensor {name!r} ends at byte {offsets[1]} of "
                f"the data, which has {data_size}"
            )
        tensors += 1
    return {"format": "safetensors", "tensor_count": tensors}


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies one version of a file: device, inode, size, mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stat_model_file(path: str) -> tuple[os.stat_result | None, str]:
    """The file's stat, or None and the reason it cannot be used. Blocking."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, f"file not found: {path}"
    except OSError as exc:
        return None, f"cannot stat {path}: {_os_reason(exc)}"
    if not stat.S_ISREG(st.st_mode):
        return None, f"{path} is {_kind_of(st.st_mode)}, not a regular file"
    if st.st_size == 0:
        return None, f"{path} is empty (0 bytes)"
    return st, ""


def inspect_model_file(path: str, size: int, *, full: bool) -> FileVerdict:
    """Open and read ``path``; with ``full``, validate its header. Blocking."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if not full:
                return FileVerdict("")
            handle.seek(0)
            lower = path.lower()
            try:
                if head[:4] == GGUF_MAGIC or lower.endswith(".gguf"):
                    facts = check_gguf(handle, size)
                elif lower.endswith(".safetensors") or _looks_like_safetensors(handle, head):
                    handle.seek(0)
                    facts = check_safetensors(handle, size)
                else:
                    facts = {"format": "other"}
            except InvalidHeader as exc:
                return FileVerdict(str(exc))
    except OSError as exc:
        return FileVerdict(f"cannot read {path}: {_os_reason(exc)}")
    return FileVerdict("", facts)


def _looks_like_safetensors(handle: BinaryIO, head: bytes) -> bool:
    if len(head) < 8:
        return False
    handle.seek(8)
    return handle.read(1) == b"{"


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks. Blocking."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the probe


class LocalFileProbe:
    """Probe for model files on disk; caches header verdicts and digests per file version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the hashing thread writes the digest caches
        self._headers: dict[str, tuple[tuple[int, int, int, int], FileVerdict]] = {}
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}
        self._hash_errors: dict[str, tuple[tuple[int, int], str]] = {}
        self._hashing: dict[str, tuple[int, int]] = {}

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The file's health: present, readable, valid header, matching pin."""
        path = os.path.expanduser(spec.local_path)
        if not path:
            return ProbeResult.failure("local_path is not set")
        st, problem = await anyio.to_thread.run_sync(
            stat_model_file, path, abandon_on_cancel=True
        )
        if st is None:
            return ProbeResult.failure(problem)
        key = file_key(st)
        cached = self._headers.get(path)
        full = cached is None or cached[0] != key
        verdict = await anyio.to_thread.run_sync(
            lambda: inspect_model_file(path, st.st_size, full=full), abandon_on_cancel=True
        )
        if verdict.reason:
            if full:
                self._headers[path] = (key, verdict)
            return ProbeResult.failure(verdict.reason, size=st.st_size)
        if full:
            self._headers[path] = (key, verdict)
        else:
            assert cached is not None
            verdict = cached[1]
            if verdict.reason:
                return ProbeResult.failure(verdict.reason, size=st.st_size)
        facts = {**verdict.facts, "size": st.st_size}
        if not spec.sha256:
            return ProbeResult.healthy(**facts)
        return await self._check_pin(path, (st.st_size, st.st_mtime_ns), spec.sha256, ctx, facts)

    async def _check_pin(
        self,
        path: str,
        version: tuple[int, int],
        expected: str,
        ctx: ProbeContext,
        facts: dict[str, Any],
    ) -> ProbeResult:
        expected = expected.lower()
        digest = self._cached_digest(path, version)
        if digest is None:
            with self._lock:
                started = self._hashing.get(path) == version
                if not started:
                    self._hashing[path] = version
            if not started:
                # The thread outlives this probe if the file is big; the next probes then
                # find "in progress" and, once it is done, the cached digest.
                with anyio.move_on_after(max(0.0, ctx.remaining() - 0.05)):
                    await anyio.to_thread.run_sync(
                        self._hash_into_cache, path, version, abandon_on_cancel=True
                    )
            digest = self._cached_digest(path, version)
        if digest is None:
            with self._lock:
                error = self._hash_errors.get(path)
            if error is not None and error[0] == version:
                return ProbeResult.failure(error[1], **facts)
            return ProbeResult.degraded(
                "sha256 verification in progress", sha256_verified=False, **facts
            )
        if digest != expected:
            return ProbeResult.failure(
                f"sha256 mismatch: expected {expected[:12]}…, file has {digest[:12]}…",
                sha256_verified=False,
                **facts,
            )
        return ProbeResult.healthy(sha256_verified=True, **facts)

    def _cached_digest(self, path: str, version: tuple[int, int]) -> str | None:
        with self._lock:
            entry = self._digests.get(path)
        return entry[1] if entry is not None and entry[0] == version else None

    def _hash_into_cache(self, path: str, version: tuple[int, int]) -> None:
        """Hash ``path`` and store the digest (or the error) for ``version``. Blocking."""
        try:
            digest = sha256_file(path)
        except OSError as exc:
            with self._lock:
                self._hash_errors[path] = (version, f"cannot hash {path}: {_os_reason(exc)}")
                self._hashing.pop(path, None)
            return
        with self._lock:
            self._digests[path] = (version, digest)
            self._hash_errors.pop(path, None)
            self._hashing.pop(path, None)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``local_file`` probe."""
    register(NAME, LocalFileProbe())
