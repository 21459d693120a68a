"""Filling a snapshot from the publisher's live tensors: bucket by bucket, cast on the way.

Plain tensors are copied straight into their place in the snapshot (``copy_`` casts when the
snapshot dtype differs), so a publish is one pass over the model bytes and needs no staging.
DTensor shards are gathered with ``full_tensor()`` one bucket at a time and freed before the
next bucket, so the transient memory of a sharded publish is one bucket (or the largest single
tensor, if that is bigger), never a second full copy of the model. ``full_tensor()`` is a
collective: every rank runs the same gathers in the same order, and only the publishing rank
keeps the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..._compat import foreach_copy
from ...distributed import is_dtensor
from ...errors import CorruptCheckpointError
from .layout import Layout, SnapshotViews, TensorEntry


def buckets(entries: tuple[TensorEntry, ...], bucket_bytes: int) -> Iterator[list[TensorEntry]]:
    """Consecutive entries whose bytes add up to at most ``bucket_bytes`` (a bigger tensor
    forms a bucket of its own)."""
    bucket: list[TensorEntry] = []
    size = 0
    for entry in entries:
        if bucket and size + entry.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += entry.nbytes
    if bucket:
        yield bucket


def fill_snapshot(layout: Layout, model: Mapping[str, Any], data: torch.Tensor | None, bucket_bytes: int) -> None:
    """Write every stored tensor of ``model`` into ``data`` (None on a rank that only takes
    part in the gathers)."""
    views = SnapshotViews(data) if data is not None else None
    for bucket in buckets(layout.entries, bucket_bytes):
        gathered = [_full(model[entry.name]) for entry in bucket]
        if views is not None:
            # One batched copy per bucket: a model of thousands of small tensors otherwise
            # spends as long in per-tensor dispatch as in copying.
            foreach_copy([views(entry) for entry in bucket], gathered)
        del gathered


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


# ---------------------------------------------------------------------------- optional verify
def checksum(raw: torch.Tensor) -> int:
    """A 64-bit digest of a uint8 tensor's bytes. In host memory: xxh3-64 (as the manifests of
    file steps), about the cost of one read of the bytes. In device memory, where no host hash
    can read it without a copy: a Fletcher-style pair of wrapping sums over the 8-byte words,
    plain and position-weighted, so that two flips that cancel in a plain sum (one bit set here,
    the same bit cleared in another word) still change the digest. Neither is cryptographic;
    safety against crafted input comes from the parsers, as for files."""
    if raw.device.type == "cpu":
        import xxhash

        return xxhash.xxh3_64_intdigest(raw.contiguous().numpy().data)
    return words_digest(raw)


def words_digest(raw: torch.Tensor) -> int:
    """The device-memory digest of :func:`checksum` (runs on any device)."""
    n = raw.numel()
    whole = n // 8 * 8
    words = raw[:whole].view(torch.int64)
    plain = int(words.sum()) if whole else 0
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=raw.device)
    weighted = int((words * weights).sum()) if whole else 0
    tail = int.from_bytes(bytes(raw[whole:].tolist()), "little") if whole < n else 0
    return (plain + weighted * 0x9E3779B97F4A7C15 + tail * 0xC2B2AE3D27D4EB4F + n) & 0xFFFFFFFFFFFFFFFF


def checksums(layout: Layout, data: torch.Tensor) -> list[int]:
    return [checksum(data[e.offset : e.offset + e.nbytes]) for e in layout.entries]


def verify_checksums(layout: Layout, data: torch.Tensor, expected: list[int] | None, source: str) -> None:
    """Raise naming the first damaged tensor; run before any byte reaches the receiver."""
    if expected is None:
        raise CorruptCheckpointError(
            f"{source} was published without checksums, so it cannot be verified "
            "(set [checkpoint.memory] verify_data = true on the publisher)",
            source,
        )
    for entry, want in zip(layout.entries, expected, strict=True):
        got = checksum(data[entry.offset : entry.offset + entry.nbytes])
        if got != want:
            raise CorruptCheckpointError(
                f"{source}: tensor {entry.name!r} fails its checksum ({got:#x} != {want:#x})", source
            )
