"""Whole-file CRC32s, computed by several threads at once.

The manifest keeps one CRC32 per file. One thread running ``zlib.crc32`` manages about 2-3 GB/s,
slower than a read from the page cache, so verifying a step used to cost more than reading it.
``zlib.crc32`` releases the GIL, so the file is cut into ranges that threads read and checksum in
parallel, and the ranges' CRCs are joined with :func:`crc32_combine` (zlib's algorithm) into the
exact value a single pass gives: manifests stay byte-for-byte what they were.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from .untrusted import open_regular

CHUNK = 16 << 20
"""Bytes per read: large enough for few syscalls, small enough to stay in cache."""
PARALLEL_MIN = 64 << 20
"""Files smaller than this are checksummed by one thread (thread start-up would dominate)."""
MAX_THREADS = 8


def _crc_range(fd: int, start: int, length: int) -> int:
    crc = 0
    buffer = bytearray(min(CHUNK, max(length, 1)))
    view = memoryview(buffer)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buffer), length - done)]], start + done)
        if n <= 0:
            raise OSError(f"file shrank while being checksummed (at byte {start + done})")
        crc = zlib.crc32(view[:n], crc)
        done += n
    return crc


def crc32_file(path: str, threads: int | None = None) -> tuple[int, int]:
    """(size, crc32) of a file, equal to ``zlib.crc32`` of its whole content."""
    threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
    fd = open_regular(path)  # a FIFO or device in a step is refused, never read (or waited on)
    try:
        size = os.fstat(fd).st_size
        parts = max(1, min(threads, size // (PARALLEL_MIN // 2))) if size >= PARALLEL_MIN else 1
        if parts == 1:
            return size, _crc_range(fd, 0, size)
        step = -(-size // parts)
        ranges = [(start, min(step, size - start)) for start in range(0, size, step)]
        with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="crc32") as pool:
            crcs = list(pool.map(lambda r: _crc_range(fd, *r), ranges))
    finally:
        os.close(fd)
    crc = crcs[0]
    for (_, length), part in zip(ranges[1:], crcs[1:], strict=True):
        crc = crc32_combine(crc, part, length)
    return size, crc


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
