"""The ``local_file`` probe: a model file on disk is there, readable and well-formed.

Checks, in order: the file exists, is a regular file, is not empty and can be opened and read.
Then its header, by content (and by extension when the content does not say):

- GGUF: magic ``GGUF``, little-endian ``uint32`` version 2 or 3 (version 1 is refused as
  unsupported), ``uint64`` tensor and metadata counts within sane bounds, every metadata entry
  and tensor description well-formed, and the file long enough for the tensor data the header
  describes (a half-downloaded file fails here).
- safetensors: ``uint64`` little-endian header length (at most 8 MiB: real headers are a few
  hundred kB at most; the format's own 100 MB limit let a hostile file cost a 90 MB parse per
  check), then a JSON object
  whose entries have ``dtype``, ``shape`` and ``data_offsets`` (``__metadata__`` allowed), and
  tensor data that fits in the file.
- anything else: existence and readability only.

The header verdict is cached per file version (device, inode, size, mtime), so a steady file
costs a ``stat``, an ``open`` and an 8-byte read per probe. An optional ``sha256`` pin is
hashed in a worker thread once per (path, size, mtime_ns); while an 8 GB file is being hashed
the probe answers degraded "sha256 verification in progress" instead of timing out. All file
I/O runs in worker threads, never on the event loop (only the mount table, from procfs, is
read there, at most every ``MOUNTS_TTL`` seconds), and those threads are bounded: one check
of a file at a time (a probe that finds one running joins it, so a check slower than the probe
timeout finishes once and serves the next probe), and at most ``MAX_FILE_THREADS`` checks
(``MAX_FILE_THREADS_PER_MOUNT`` on one mount) and ``MAX_HASH_THREADS`` hashes running,
abandoned ones included — a hung NFS ``stat`` fails its own mount's probes with "still
running … (a hung file system?)", never piles up threads, and leaves other mounts' files
checked as usual. GGUF values are skipped, not read, and the header is bounded at
``MAX_GGUF_HEADER``.

Facts: ``format``, ``version`` (GGUF), ``tensor_count``, ``metadata_count``, ``architecture``
(GGUF ``general.architecture`` when present), ``size``, ``sha256_verified`` (when pinned).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import anyio
import anyio.from_thread
import anyio.lowlevel

from daemon import ModelSpec, ProbeContext, ProbeResult, Register, hookimpl

NAME = "local_file"

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
#: Far above any real model (a 405B model has ~1,100 tensors and ~50 metadata entries).
MAX_GGUF_TENSORS = 1 << 20
MAX_GGUF_METADATA = 1 << 20
MAX_GGUF_STRING = 1 << 26
#: Items of one metadata array of strings (the largest vocabularies have ~260,000 tokens).
MAX_GGUF_ARRAY_STRINGS = 1 << 21
#: Bytes of a GGUF header (metadata and tensor descriptions) read at most. Real headers are
#: a few MB (a 256k-token vocabulary with its merges); the largest carry an embedded
#: ``tokenizer.huggingface.json`` of up to ~20 MB. Values are skipped, not read, so this
#: bounds the work of a check, not its memory.
MAX_GGUF_HEADER = 64 * 1024 * 1024
#: Longest metadata key read (the spec's keys are short ASCII paths).
MAX_GGUF_KEY = 1 << 16
#: Real safetensors headers are small: ~25 kB for a Llama-3-8B shard, a few hundred kB for
#: a single-file SDXL checkpoint, ~2 MB for a file of 30,000 tensors. (The safetensors
#: library itself accepts up to 100 MB, which let a hostile file make each check parse
#: 90 MB of JSON; 8 MiB keeps a wide margin over real files and the parse under ~100 ms.)
MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024
HASH_CHUNK = 1 << 20
#: Worker threads header checks may have running at once, those whose probe gave up
#: included (a hung NFS ``stat`` never returns): past it, probes fail at once saying so,
#: instead of leaving one more thread behind per probe.
MAX_FILE_THREADS = 8
#: Of those, the most on one mount: a hung file system stops its own files' checks, never
#: those of files elsewhere.
MAX_FILE_THREADS_PER_MOUNT = 2
#: How long the mount table (``/proc/self/mounts``) is reused before it is read again.
MOUNTS_TTL = 5.0
#: Threads hashing pinned files at once (a hash of an 8 GB file takes a while, legitimately).
MAX_HASH_THREADS = 2

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

    def string(self, keep: int = MAX_GGUF_KEY) -> bytes | None:
        """A string: its bytes when at most ``keep`` long, else skipped (None)."""
        length = self.u64()
        if length > MAX_GGUF_STRING:
            raise InvalidHeader(f"corrupt {self.what}: a string of {length} bytes")
        if length > keep:
            self.skip(length)
            return None
        return self.read(length)

    def skip(self, size: int) -> None:
        self.handle.seek(size, os.SEEK_CUR)
        self.bounded()

    def bounded(self) -> None:
        """Raise InvalidHeader once the header has grown past MAX_GGUF_HEADER."""
        if self.handle.tell() > MAX_GGUF_HEADER:
            raise InvalidHeader(f"{self.what} is larger than {MAX_GGUF_HEADER} bytes, far "
                                "beyond any real model's")


def _gguf_value(reader: _Reader, kind: int, depth: int = 0) -> Any:
    if kind in _GGUF_SCALAR_SIZES:
        raw = reader.read(_GGUF_SCALAR_SIZES[kind])
        return raw if kind != 4 else struct.unpack("<I", raw)[0]
    if kind == _GGUF_STRING:
        return reader.string(keep=256)  # only short values are looked at (the architecture)
    if kind == _GGUF_ARRAY and depth < 3:
        item_kind = reader.u32()
        count = reader.u64()
        if item_kind in _GGUF_SCALAR_SIZES:
            reader.skip(_GGUF_SCALAR_SIZES[item_kind] * count)  # past EOF: the next read fails
            return None
        if item_kind not in (_GGUF_STRING, _GGUF_ARRAY):
            raise InvalidHeader(f"corrupt {reader.what}: array of unknown type {item_kind}")
        if count > MAX_GGUF_ARRAY_STRINGS:
            raise InvalidHeader(f"corrupt {reader.what}: array of {count} items")
        for n in range(count):
            _gguf_value(reader, item_kind, depth + 1)
            if n & 0xFFFF == 0:
                reader.bounded()
        reader.bounded()
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
        if key is None:
            raise InvalidHeader(f"corrupt GGUF header: a metadata key longer than "
                                f"{MAX_GGUF_KEY} bytes")
        kind = reader.u32()
        value = _gguf_value(reader, kind)
        if key == b"general.architecture" and isinstance(value, bytes):
            facts["architecture"] = value.decode("utf-8", "replace")
        elif key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    if handle.tell() > size:
        raise InvalidHeader("truncated GGUF header (file ends inside the metadata)")
    data_needed = 0
    for n in range(tensor_count):
        reader.string(keep=0)
        if n & 0xFFF == 0:
            reader.bounded()
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
    reader.bounded()
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
            f"safetensors header length {header_len} exceeds {MAX_SAFETENSORS_HEADER} "
            "bytes (real files need far less: a hostile or corrupt file)"
        )
    if 8 + header_len > size:
        raise InvalidHeader(
            f"truncated safetensors file: header of {header_len} bytes, file of {size}"
        )
    try:
        text = reader.read(header_len).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidHeader(f"safetensors header is not JSON: {exc}") from None
    data_size = size - 8 - header_len
    tensors = 0
    for name, entry in _safetensors_entries(text):
        if name == "__metadata__":
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


_WS = re.compile(r"[ \t\n\r]*")
#: Longest entry of one tensor: ``{"dtype": ..., "shape": [...], "data_offsets": [a, b]}``.
MAX_TENSOR_ENTRY = 4096
_FLAT_ENTRY = re.compile(r"\{[^{}]{0,%d}\}" % MAX_TENSOR_ENTRY)  # noqa: UP031 - regex braces


def _safetensors_entries(text: str) -> Iterator[tuple[str, Any]]:
    """The header's entries (name, value), decoded one at a time.

    ``json.loads`` of a whole header holds the GIL from start to end: a hostile 8 MB header
    of tiny objects stalled the event loop for half a second. Decoding entry by entry lets
    the loop run between entries, and each is bounded: a tensor's entry is one flat object
    of at most MAX_TENSOR_ENTRY characters; ``__metadata__`` is a map of strings to strings
    (what the format allows), decoded pair by pair.
    """
    decoder = json.JSONDecoder()

    def fail(what: str, pos: int) -> InvalidHeader:
        return InvalidHeader(f"safetensors header is not JSON: {what} at character {pos}")

    def skip(pos: int) -> int:
        match = _WS.match(text, pos)
        return pos if match is None else match.end()

    def string(pos: int, what: str) -> tuple[str, int]:
        if not text.startswith('"', pos):
            raise fail(f"expected {what}", pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError as exc:
            raise InvalidHeader(f"safetensors header is not JSON: {exc}") from None
        return value, end

    def members(pos: int, what: str) -> Generator[tuple[str, int], int, int]:
        """(key, position of its value) for each member of the object opening at ``pos``;
        the caller decodes each value and sends back the position after it."""
        pos = skip(pos + 1)
        if text.startswith("}", pos):
            return pos + 1
        while True:
            key, pos = string(pos, f"a name in {what}")
            pos = skip(pos)
            if not text.startswith(":", pos):
                raise fail("expected ':'", pos)
            pos = yield key, skip(pos + 1)
            pos = skip(pos)
            if text.startswith("}", pos):
                return pos + 1
            if not text.startswith(",", pos):
                raise fail("expected ',' or '}'", pos)
            pos = skip(pos + 1)

    start = skip(0)
    if not text.startswith("{", start):
        if text.startswith("[", start) or text[start:start + 1] in ('"', "-") or (
                text[start:start + 1].isdigit()):
            raise InvalidHeader("safetensors header is not a JSON object")
        raise fail("expected '{'", start)
    top = members(start, "the header")
    end = 0
    try:
        name, pos = next(top)
        while True:
            if name == "__metadata__":
                if not text.startswith("{", pos):
                    raise InvalidHeader("safetensors __metadata__ is not an object")
                meta = members(pos, "__metadata__")
                try:
                    _key, at = next(meta)
                    while True:
                        _value, after = string(at, "a string value in __metadata__")
                        _key, at = meta.send(after)
                except StopIteration as done:
                    pos = done.value
                value: Any = None
            else:
                if _FLAT_ENTRY.match(text, pos) is None:
                    raise InvalidHeader(
                        f"safetensors tensor {name[:80]!r} has no dtype (its entry is not a "
                        f"flat object of at most {MAX_TENSOR_ENTRY} characters)")
                try:
                    value, pos = decoder.raw_decode(text, pos)
                except ValueError as exc:
                    raise InvalidHeader(f"safetensors header is not JSON: {exc}") from None
            yield name, value
            name, pos = top.send(pos)
    except StopIteration as done:
        end = done.value
    if skip(end) != len(text):  # the format pads the header with spaces, nothing else
        raise fail("extra data after the header object", skip(end))


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


# ----------------------------------------------------------------------------- threads


class WorkersBusy(Exception):
    """Every thread file checks may use is still running; the message says so."""


@dataclass(slots=True)
class _Job:
    key: str
    group: str
    started: float  # time.monotonic()
    finished: anyio.Event
    result: Any = None
    error: BaseException | None = None


def read_mount_points(table: str = "/proc/self/mounts") -> tuple[str, ...]:
    """The mount points of this process, longest first ("/" when the table is unreadable).
    Reads procfs, which never waits on a file server."""
    try:
        with open(table, encoding="utf-8", errors="replace") as lines:
            points = {line.split()[1] for line in lines if len(line.split()) > 1}
    except OSError:
        return ("/",)
    # the table escapes spaces, tabs, newlines and backslashes as octal
    decoded = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p) for p in points}
    return tuple(sorted(decoded | {"/"}, key=len, reverse=True))


def mount_of(path: str, points: tuple[str, ...]) -> str:
    """The mount point ``path`` lies under, judged from its text alone: resolving symlinks
    would stat, and a stat is what hangs."""
    path = os.path.normpath(os.path.abspath(path))
    for point in points:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return point
    return "/"


class FileWorkers:
    """Blocking file work in daemon threads: one job per key (a file) at a time, and at most
    ``limit`` threads alive, counting those whose caller gave up.

    A thread blocked in the kernel (a hung NFS ``stat``) cannot be cancelled; all a caller
    can do is stop waiting. So a caller that finds the job for its key still running joins
    it instead of starting another, and once ``limit`` jobs are running nobody starts one:
    a hung file system costs at most ``limit`` threads, however long it hangs. The threads
    are daemon threads, so one stuck in the kernel never holds the daemon's exit.
    """

    def __init__(self, limit: int, what: str, per_group: int | None = None) -> None:
        self.limit = limit
        self.per_group = limit if per_group is None else per_group
        self.what = what
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    @property
    def running(self) -> int:
        """Jobs whose thread has not returned yet."""
        with self._lock:
            return len(self._jobs)

    def running_since(self, key: str) -> float | None:
        """When the running job for ``key`` started (monotonic), or None."""
        with self._lock:
            job = self._jobs.get(key)
        return None if job is None else job.started

    async def run(self, key: str, work: Callable[[], Any], wait: float,
                  group: str = "") -> _Job:
        """The job for ``key`` (started with ``work`` unless one is running), awaited for at
        most ``wait`` seconds: check ``job.finished`` and ``job.result``/``job.error``.
        Raises WorkersBusy when a new job is needed and ``limit`` are running, or
        ``per_group`` of ``group`` (a mount point)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                same = [j for j in self._jobs.values() if j.group == group]
                if len(same) >= self.per_group or len(self._jobs) >= self.limit:
                    stuck = same if len(same) >= self.per_group else list(self._jobs.values())
                    where = f" on {group}" if stuck is same and group else ""
                    oldest = min(j.started for j in stuck)
                    raise WorkersBusy(
                        f"{len(stuck)} {self.what}{where} still running, the oldest for "
                        f"{time.monotonic() - oldest:.0f}s (a hung file system?); not starting "
                        "another")
                job = _Job(key, group, time.monotonic(), anyio.Event())
                self._jobs[key] = job
                token = anyio.lowlevel.current_token()
                thread = threading.Thread(target=self._run, args=(job, work, token),
                                          name=f"modeld-{NAME}", daemon=True)
                thread.start()
        with anyio.move_on_after(max(0.0, wait)):
            await job.finished.wait()
        return job

    def _run(self, job: _Job, work: Callable[[], Any], token: Any) -> None:
        try:
            job.result = work()
        except BaseException as exc:  # handed to the caller, who reports it
            job.error = exc
        finally:
            with self._lock:
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
            # wake the waiters; the loop may be gone by now (a caller long since gone, the
            # daemon stopping): then there is nobody to wake
            with contextlib.suppress(Exception):
                anyio.from_thread.run_sync(job.finished.set, token=token)


# ----------------------------------------------------------------------------- the probe

#: Time kept back from a probe's deadline to answer with a precise reason.
_ANSWER_MARGIN = 0.05


class LocalFileProbe:
    """Probe for model files on disk; caches header verdicts and digests per file version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the worker threads write the caches
        self._headers: dict[str, tuple[tuple[int, int, int, int], FileVerdict]] = {}
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}
        self._hash_errors: dict[str, tuple[tuple[int, int], str]] = {}
        self._checks = FileWorkers(MAX_FILE_THREADS, "file checks",
                                   per_group=MAX_FILE_THREADS_PER_MOUNT)
        self._hashes = FileWorkers(MAX_HASH_THREADS, "sha256 hashes")
        self._mounts: tuple[float, tuple[str, ...]] = (-MOUNTS_TTL, ("/",))

    def _mount_of(self, path: str) -> str:
        expires, points = self._mounts
        now = time.monotonic()
        if now >= expires:
            points = read_mount_points()
            self._mounts = (now + MOUNTS_TTL, points)
        return mount_of(path, points)

    async def probe(self, spec: ModelSpec, ctx: ProbeContext) -> ProbeResult:
        """The file's health: present, readable, valid header, matching pin."""
        path = os.path.expanduser(spec.local_path)
        if not path:
            return ProbeResult.failure("local_path is not set")
        try:
            job = await self._checks.run(path, lambda: self._check(path),
                                         ctx.remaining() - _ANSWER_MARGIN,
                                         group=self._mount_of(path))
        except WorkersBusy as exc:
            return ProbeResult.failure(str(exc))
        if not job.finished.is_set():
            since = time.monotonic() - job.started
            return ProbeResult.failure(
                f"checking {path} is still running after {since:.1f}s (a hung file system?); "
                "no other check of it is started until it returns")
        if job.error is not None:
            raise job.error
        st, verdict = job.result
        if st is None:
            return ProbeResult.failure(verdict.reason)
        if verdict.reason:
            return ProbeResult.failure(verdict.reason, size=st.st_size)
        facts = {**verdict.facts, "size": st.st_size}
        if not spec.sha256:
            return ProbeResult.healthy(**facts)
        return await self._check_pin(path, (st.st_size, st.st_mtime_ns), spec.sha256, ctx, facts)

    def _check(self, path: str) -> tuple[os.stat_result | None, FileVerdict]:
        """Stat the file and, for a version not seen before, validate its header. Blocking:
        runs in a worker thread."""
        st, problem = stat_model_file(path)
        if st is None:
            return None, FileVerdict(problem)
        key = file_key(st)
        with self._lock:
            cached = self._headers.get(path)
        if cached is not None and cached[0] == key:
            readable = inspect_model_file(path, st.st_size, full=False)
            return st, readable if readable.reason else cached[1]
        verdict = inspect_model_file(path, st.st_size, full=True)
        with self._lock:
            self._headers[path] = (key, verdict)
        return st, verdict

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
            # the hash outlives this probe if the file is big; the next probes then find it
            # running ("in progress") and, once it is done, the cached digest. One hash of a
            # file at a time, whatever its version: a new version waits for the old hash.
            already = self._hashes.running_since(path) is not None
            # all hash threads busy: reported as in progress below until a slot frees
            with contextlib.suppress(WorkersBusy):
                await self._hashes.run(path, lambda: self._hash_into_cache(path, version),
                                       0.0 if already else ctx.remaining() - _ANSWER_MARGIN)
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
            return
        with self._lock:
            self._digests[path] = (version, digest)
            self._hash_errors.pop(path, None)


@hookimpl
def modeld_register_probes(register: Register) -> None:
    """Register the ``local_file`` probe."""
    register(NAME, LocalFileProbe())
