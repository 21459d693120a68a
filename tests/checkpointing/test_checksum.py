"""The parallel whole-file CRC32 equals zlib's single pass, so manifests do not change."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from checkpointing.checksum import PARALLEL_MIN, crc32_combine, crc32_file


def test_combine_matches_crc_of_the_concatenation():
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randbytes(rng.randint(0, 300)), rng.randbytes(rng.randint(0, 300))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("size", [0, 1, 4097, PARALLEL_MIN + 12345])
@pytest.mark.parametrize("threads", [1, 3])
def test_file_crc_matches_one_pass(tmp_path, size, threads):
    data = random.Random(size).randbytes(min(size, 1 << 20)) * (size // (1 << 20) or 1)
    data = (data + os.urandom(size))[:size]
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert crc32_file(str(path), threads=threads) == (size, zlib.crc32(data))
