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


# ------------------------------------------------------------------ xxh3 (new manifests)
def _segmented_xxh3(data: bytes) -> int:
    """The definition, written out: xxh3-64 over the xxh3-64 digests of 64 MiB segments."""
    import xxhash

    from checkpointing.checksum import SEGMENT

    parts = [data[i : i + SEGMENT] for i in range(0, len(data), SEGMENT)] or [b""]
    return xxhash.xxh3_64_intdigest(b"".join(xxhash.xxh3_64_digest(p) for p in parts))


@pytest.mark.parametrize("size", [0, 1, 4097, (64 << 20) + 3])
@pytest.mark.parametrize("threads", [1, 3])
def test_file_xxh3_matches_its_definition_and_any_write_chunking(tmp_path, size, threads):
    from checkpointing.checksum import XXH3, StreamDigest, digest_file

    rng = random.Random(size)
    data = (rng.randbytes(1 << 16) * (size // (1 << 16) + 1))[:size]
    path = tmp_path / "blob"
    path.write_bytes(data)
    got = digest_file(str(path), threads=threads)
    assert got[0] == size and got[1].algorithm == XXH3 and got[1].value == _segmented_xxh3(data)
    stream = StreamDigest()
    at = 0
    while at < size:  # a writer's uneven chunks
        n = rng.choice([1, 7, 4096, 5 << 20])
        stream.update(data[at : at + n])
        at += n
    assert stream.size == size and stream.finish() == got[1]


def test_digests_round_trip_through_manifest_entries():
    from checkpointing.checksum import CRC32, XXH3, FileDigest

    for digest in (FileDigest(XXH3, 2**64 - 1), FileDigest(XXH3, 0), FileDigest(CRC32, 0xDEADBEEF)):
        assert FileDigest.from_entry({"size": 1, **digest.entry()}) == digest
    for bad in ({"xxh3": "nothex!!nothex!!"}, {"xxh3": 5}, {"crc32": -1}, {"crc32": True}, {}):
        assert FileDigest.from_entry(bad) is None


# ------------------------------------------------------------------ CRC32 manifests written by older code
OLD_STEPS = os.path.join(os.path.dirname(__file__), "data", "crc32_manifests")


def _small_module():
    import torch
    import torch.nn as nn

    class Small(nn.Module):  # what data/crc32_manifests/make.py saved
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(4, 6))
            self.b = nn.Parameter(torch.zeros(10))
            self.register_buffer("c", torch.zeros(5, dtype=torch.int64))

    return Small()


@pytest.mark.parametrize("backend", ["dcp", "hf"])
def test_steps_with_crc32_manifests_still_load_and_verify(tmp_path, backend):
    import json
    import shutil

    import torch

    from checkpointing import CheckpointConfig, Checkpointer, CorruptCheckpointError
    from checkpointing.cli import main as ckpt

    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(OLD_STEPS, backend), folder)
    assert all("crc32" in e and "xxh3" not in e for e in json.loads((folder / "step-1" / "manifest.json").read_text())["files"].values())
    assert ckpt(["verify", str(folder / "step-1")]) == 0
    model = _small_module()
    cfg = CheckpointConfig(enable=True, backend=backend, folder="ckpt", load_only=True, verify="checksum")
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
        assert c.load() and c.loaded_step == 1
    assert torch.equal(model.a, torch.arange(24.0).reshape(4, 6))
    assert torch.equal(model.b, torch.linspace(-1, 1, 10))
    assert torch.equal(model.c, torch.arange(5))
    # ... and a flipped byte in such a step is still caught, by its CRC32
    data = next(p for p in (folder / "step-1").iterdir() if p.suffix in (".distcp", ".safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-9] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="crc32"):
        with Checkpointer(model_parts=[_small_module()], checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
            c.load()
    assert ckpt(["verify", str(folder / "step-1")]) == 1
