"""Whole-file digests for the step manifest: which hash, and the one place that computes it.

New manifests record **xxh3-64** (PyPI ``xxhash``), older ones CRC32 (``zlib``); both load and
verify, each with its own algorithm (:class:`FileDigest` says which). Why xxh3: on this machine
one core hashes ~17 GB/s with it against ~4 GB/s for ``zlib.crc32`` (crc32c: ~13 GB/s), so a
verified load no longer pays more for checking than for reading; a 64-bit digest lets a random
corruption through with probability 2^-64 instead of CRC32's 2^-32 (CRC's guarantee for short
burst errors matters for links, not for files on a checksummed-nowhere disk); ``xxhash`` ships
wheels for every CPython and platform torch does. Neither hash resists a deliberate forger, and
neither claims to: the manifest sits beside the data it describes.

The xxh3 digest of a file is the xxh3-64 of the concatenated xxh3-64 digests of its consecutive
:data:`SEGMENT`-byte segments. Segments let several threads hash one large file at once (and a
writer hash as it writes, in any chunking) and still agree on one value.

Both algorithms read a file through a read-only mapping (no copy out of the page cache) and,
for a large file, by several threads at once over byte ranges (``zlib.crc32`` and ``xxhash``
release the GIL), CRC32's ranges joined with :func:`crc32_combine`.
"""

from __future__ import annotations

import mmap
import os
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .untrusted import open_regular

XXH3 = "xxh3"
CRC32 = "crc32"
ALGORITHM = XXH3
"""What new manifests record."""
ALGORITHMS = (XXH3, CRC32)

CHUNK = 16 << 20
"""Bytes per read: large enough for few syscalls, small enough to stay in cache."""
SEGMENT = 64 << 20
"""xxh3 segment size (part of the digest's definition: never change it for existing files)."""
PARALLEL_MIN = 64 << 20
"""Files smaller than this are hashed by one thread (thread start-up would dominate)."""
MAX_THREADS = 8


@dataclass(frozen=True)
class FileDigest:
    """One file's digest and the algorithm that made it."""

    algorithm: str
    value: int

    def entry(self) -> dict[str, Any]:
        """The manifest fields (beside ``size``): xxh3 as 16 hex digits (JSON readers that
        parse numbers as doubles would round a 64-bit integer), CRC32 as an integer, as before."""
        return {XXH3: f"{self.value:016x}"} if self.algorithm == XXH3 else {CRC32: self.value}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> FileDigest | None:
        """The digest a manifest entry records; None when it records none we know."""
        xxh = entry.get(XXH3)
        if isinstance(xxh, str) and len(xxh) == 16:
            try:
                return cls(XXH3, int(xxh, 16))
            except ValueError:
                return None
        crc = entry.get(CRC32)
        if isinstance(crc, int) and not isinstance(crc, bool) and 0 <= crc <= 0xFFFFFFFF:
            return cls(CRC32, crc)
        return None

    def __str__(self) -> str:
        return f"{self.algorithm} {self.value:016x}" if self.algorithm == XXH3 else f"{self.algorithm} {self.value:#010x}"


# ---------------------------------------------------------------------------- streaming
class StreamDigest:
    """The digest of bytes as they are written, in any chunking: what a writer records so the
    commit does not read the file back."""

    def __init__(self, algorithm: str = ALGORITHM):
        self.algorithm = algorithm
        self.size = 0
        self._crc = 0
        self._segments: list[bytes] = []
        self._segment = _xxh3() if algorithm == XXH3 else None
        self._in_segment = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        if self._segment is None:
            self._crc = zlib.crc32(view, self._crc)
            return
        while len(view):
            take = min(len(view), SEGMENT - self._in_segment)
            self._segment.update(view[:take])
            self._in_segment += take
            view = view[take:]
            if self._in_segment == SEGMENT:
                self._segments.append(self._segment.digest())
                self._segment, self._in_segment = _xxh3(), 0

    def finish(self) -> FileDigest:
        if self._segment is None:
            return FileDigest(CRC32, self._crc & 0xFFFFFFFF)
        tail = [self._segment.digest()] if self._in_segment or not self._segments else []
        return FileDigest(XXH3, _join(self._segments + tail))


class DigestOnTheSide:
    """A :class:`StreamDigest` of the buffers being written, computed on one helper thread while
    the caller's write copies the same buffer into the page cache (both release the GIL), so the
    digest costs little wall time. One worker keeps the buffers in order; each pending task
    holds its buffer alive until it is hashed."""

    def __init__(self, algorithm: str = ALGORITHM) -> None:
        self._digest = StreamDigest(algorithm)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest")
        self._pending: list = []

    def add(self, data: Any, keep: Any = None) -> None:
        """Hash ``data`` after the buffers added before it. Its memory must stay unchanged
        until it is hashed: ``keep`` (the object that owns it, say a tensor) is held until then."""
        self._pending.append(self._pool.submit(self._update, data, keep))
        if len(self._pending) > 64:  # bound the buffers held alive
            self._pending.pop(0).result()

    def _update(self, data: Any, keep: Any) -> None:
        self._digest.update(data)

    def settle(self) -> None:
        """Wait until every buffer added so far is hashed (the caller may then reuse them)."""
        pending, self._pending = self._pending, []
        for task in pending:
            task.result()

    def result(self) -> FileDigest:
        try:
            self.settle()
        finally:
            self._pool.shutdown(wait=True)
        return self._digest.finish()


def _xxh3():
    import xxhash

    return xxhash.xxh3_64()


def _join(segment_digests: list[bytes]) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(b"".join(segment_digests))


# ---------------------------------------------------------------------------- files
class _Source:
    """A file's bytes for hashing: mapped when it is a regular file (the hash reads the page
    cache in place; with ``read`` every byte would be copied once more first, which on a warm
    file costs more than the hash itself), else read in chunks. Committed files never shrink in
    place (a delete renames, then unlinks, and an unlinked file keeps its pages while mapped), so
    the mapping cannot lose pages under the hash."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._map: mmap.mmap | None = None
        self.view: memoryview | None = None
        if size and stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                self._map = None
            else:
                self._map.madvise(mmap.MADV_SEQUENTIAL)
                self.view = memoryview(self._map)

    def feed(self, start: int, length: int, update) -> None:
        if self.view is not None:
            for at in range(start, start + length, CHUNK):
                update(self.view[at : min(at + CHUNK, start + length)])
            return
        buffer = bytearray(min(CHUNK, max(length, 1)))
        chunk = memoryview(buffer)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [chunk[: min(len(buffer), length - done)]], start + done)
            if n <= 0:
                raise OSError(f"file shrank while being checksummed (at byte {start + done})")
            update(chunk[:n])
            done += n

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
        if self._map is not None:
            self._map.close()


def _crc_range(source: _Source, start: int, length: int) -> int:
    crc = 0

    def update(chunk) -> None:
        nonlocal crc
        crc = zlib.crc32(chunk, crc)

    source.feed(start, length, update)
    return crc


def _xxh3_segment(source: _Source, start: int, length: int) -> bytes:
    h = _xxh3()
    source.feed(start, length, h.update)
    return h.digest()


def _parts(size: int, threads: int) -> int:
    return max(1, min(threads, size // (PARALLEL_MIN // 2))) if size >= PARALLEL_MIN else 1


def digest_file(path: str, algorithm: str = ALGORITHM, threads: int | None = None) -> tuple[int, FileDigest]:
    """(size, digest) of a file with ``algorithm``, by several threads for a large file."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {ALGORITHMS}")
    threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
    fd = open_regular(path)  # a FIFO or device in a step is refused, never read (or waited on)
    try:
        size = os.fstat(fd).st_size
        source = _Source(fd, size)
        try:
            return size, _digest(source, size, algorithm, threads)
        finally:
            source.close()
    finally:
        os.close(fd)


def _digest(source: _Source, size: int, algorithm: str, threads: int) -> FileDigest:
    parts = _parts(size, threads)
    if algorithm == XXH3:
        starts = range(0, size, SEGMENT)
        if len(starts) <= 1 or parts == 1:
            segments = [_xxh3_segment(source, s, min(SEGMENT, size - s)) for s in starts] or [_xxh3().digest()]
        else:
            with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="xxh3") as pool:
                segments = list(pool.map(lambda s: _xxh3_segment(source, s, min(SEGMENT, size - s)), starts))
        return FileDigest(XXH3, _join(segments))
    if parts == 1:
        return FileDigest(CRC32, _crc_range(source, 0, size))
    step = -(-size // parts)
    ranges = [(start, min(step, size - start)) for start in range(0, size, step)]
    with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="crc32") as pool:
        crcs = list(pool.map(lambda r: _crc_range(source, *r), ranges))
    crc = crcs[0]
    for (_, length), part in zip(ranges[1:], crcs[1:], strict=True):
        crc = crc32_combine(crc, part, length)
    return FileDigest(CRC32, crc)


def crc32_file(path: str, threads: int | None = None) -> tuple[int, int]:
    """(size, crc32) of a file, equal to ``zlib.crc32`` of its whole content (old manifests)."""
    size, digest = digest_file(path, CRC32, threads)
    return size, digest.value


# zlib's crc32_combine: append ``len2`` zero bits' worth of CRC shifting to ``crc1`` by squaring a
# GF(2) operator matrix, then xor in ``crc2``. 32x32 bit matrices as lists of 32 ints.
def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:  # apply len2 zero *bytes*: 8 zero bits per byte, starting at 2^3
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2
