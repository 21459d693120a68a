"""The reshard plan: which bytes each publisher sends a reader, in which buckets, computed once.

Inputs are layouts only (:mod:`.layout`): every publisher's boxes (FSDP2 dim-0 shards, or any
``Shard``/``Replicate`` placement) and one reader's boxes (a full replica, tensor-parallel row
or column shards, ...). For each tensor the reader holds, the intersection of its box with each
publisher's box is a *piece*; where publishers hold the same box (replicas), one of them is
chosen, spread over tensors and readers. Pieces from one publisher are ordered by where they
sit in its snapshot and grouped into *buckets* of at most ``bucket_bytes`` (a bigger piece is
split along its leading dimensions):

* a **span** bucket is pieces that lie back to back in the publisher's snapshot (whole FSDP
  shards, row ranges): it is sent straight from the snapshot, no copy;
* a **packed** bucket gathers pieces that are not (a column block of a row shard): the
  publisher packs it into one of two rotating buffers before sending.

A reader receives every bucket straight into its staging buffer (laid out in plan order, so
every bucket lands contiguously), and copies pieces into its own tensors only once all of them
arrived. Both sides compute the same plan from the same layouts and compare digests before the
first byte moves; later syncs replay it (no layout exchange, no planning).

Every mismatch (names, shapes, dtypes, ties, a box no publisher covers) is a
:class:`~checkpointing.errors.StateMismatchError` naming the keys, raised before anything moves.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import StateMismatchError
from ...receiver import castable, describe_mismatch
from ..memory.layout import ALIGN, DTYPE_NAMES, align
from .layout import Box, Held, RankLayout


@dataclass(frozen=True)
class Piece:
    """One box of one tensor, from one publisher to the reader."""

    target: str
    """Held name on the reader (its tied keys share it)."""
    source: Held
    """The publisher's entry it comes from (dtype as sent, snapshot offset)."""
    src_box: Box
    """Relative to the publisher's local tensor."""
    dst_box: Box
    """Relative to the reader's local tensor."""
    at: int = 0
    """Byte offset inside its bucket."""

    @property
    def nbytes(self) -> int:
        return self.src_box.numel * self.source.dtype.itemsize

    def snapshot_range(self) -> tuple[int, int] | None:
        """(start, end) bytes in the publisher's snapshot when the piece is contiguous there."""
        start = contiguous_start(self.source.box.shape, self.src_box)
        if start is None:
            return None
        begin = self.source.offset + start * self.source.dtype.itemsize
        return begin, begin + self.nbytes


@dataclass(frozen=True)
class Bucket:
    pieces: tuple[Piece, ...]
    nbytes: int
    span: int = -1
    """Start of the bucket in the publisher's snapshot when it is sent from there as is (a
    span); -1 for a packed bucket."""


@dataclass(frozen=True)
class PairPlan:
    """Everything one publisher sends one reader, in order."""

    source: int
    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def digest(self) -> str:
        """Both sides compare this before any transfer: equal digests, same bytes expected."""
        h = hashlib.sha256()
        for b in self.buckets:
            h.update(f"{b.nbytes}/{b.span}|".encode())
            for p in b.pieces:
                h.update(f"{p.target}<{p.source.name}:{DTYPE_NAMES[p.source.dtype]}{p.src_box}{p.dst_box}@{p.at};".encode())
        return h.hexdigest()[:32]


def contiguous_start(shape: Sequence[int], box: Box) -> int | None:
    """Element index where ``box`` starts inside a C-contiguous tensor of ``shape``, when the
    box's elements are one contiguous run there; None otherwise."""
    dims = len(shape)
    first = next((i for i in range(dims) if box.shape[i] != 1), dims)
    if any(box.shape[j] != shape[j] for j in range(first + 1, dims)):
        return None
    start, stride = 0, 1
    for j in reversed(range(dims)):
        start += box.offset[j] * stride
        stride *= shape[j]
    return start


def split_box(box: Box, itemsize: int, limit: int) -> list[Box]:
    """``box`` cut along its leading dimensions into boxes of at most ``limit`` bytes (a single
    element may exceed it). Cuts along the first dimension that is not 1 keep a contiguous box
    contiguous."""
    if box.numel * itemsize <= limit or box.numel <= 1:
        return [box]
    dim = next(i for i, s in enumerate(box.shape) if s > 1)
    slab = box.numel // box.shape[dim] * itemsize  # bytes of one index along ``dim``
    step = max(1, limit // slab)
    out = []
    for lo in range(0, box.shape[dim], step):
        size = min(step, box.shape[dim] - lo)
        offset = box.offset[:dim] + (box.offset[dim] + lo,) + box.offset[dim + 1 :]
        shape = box.shape[:dim] + (size,) + box.shape[dim + 1 :]
        part = Box(offset, shape)
        out += split_box(part, itemsize, limit) if size == 1 and slab > limit else [part]
    return out


# ---------------------------------------------------------------------------- checks
def check_publishers(publishers: Sequence[RankLayout]) -> None:
    """Every publisher rank must describe the same tensors (its own boxes of them)."""
    first = publishers[0]
    names = set(first.names())
    for rank, other in enumerate(publishers[1:], start=1):
        differ = sorted(names ^ set(other.names()))
        if differ:
            raise StateMismatchError(f"publisher ranks 0 and {rank} publish different tensors: {differ[:20]}", differ)
        bad = [
            k for k in names
            if (a := first.held(k)) is not None and (b := other.held(k)) is not None and (a.shape, a.dtype) != (b.shape, b.dtype)
        ]
        if bad:
            raise StateMismatchError(f"publisher ranks 0 and {rank} disagree on the shape or dtype of {sorted(bad)[:20]}", sorted(bad))
        if (other.bucket_bytes, other.backend) != (first.bucket_bytes, first.backend):
            raise StateMismatchError(
                f"publisher rank {rank} uses bucket {other.bucket_bytes} B over {other.backend}, rank 0 "
                f"{first.bucket_bytes} B over {first.backend}: give every publisher the same [dist] options"
            )


def check_fit(publishers: Sequence[RankLayout], reader: RankLayout, source: str) -> None:
    """The reader's tensors against what is published: names both ways, shapes, dtypes, ties.
    StateMismatchError naming every key that does not fit."""
    published = publishers[0]
    have, want = set(published.names()), set(reader.names())
    missing = sorted(want - have, key=reader.names().index)
    unexpected = sorted(have - want, key=published.names().index)
    problems: list[str] = []
    keys: list[str] = []
    for key in reader.names():
        mine, theirs = reader.held(key), published.held(key)
        if theirs is None or mine is None:
            continue
        if mine.shape != theirs.shape:
            problems.append(f"{key}: shape {theirs.shape} published, receiver has {mine.shape}")
            keys.append(key)
        elif not castable(theirs.dtype, mine.dtype):
            problems.append(f"{key}: dtype {theirs.dtype} published, receiver has {mine.dtype} (only floating types are cast)")
            keys.append(key)
    if missing or unexpected or problems:
        raise StateMismatchError(describe_mismatch(source, missing, unexpected, problems, "published"), missing + unexpected + keys)


# ---------------------------------------------------------------------------- planning
def plan_reader(publishers: Sequence[RankLayout], reader: RankLayout, reader_id: str, source: str) -> list[PairPlan]:
    """The whole plan for one reader: one PairPlan per publisher rank (possibly empty).

    Receiver keys tied to another (aliases) are received once, except where the publisher holds
    the two as separate tensors: then both are received, and compared before they are applied
    (:mod:`.apply`)."""
    check_publishers(publishers)
    check_fit(publishers, reader, source)
    spread = zlib.crc32(reader_id.encode())
    pieces: list[list[Piece]] = [[] for _ in publishers]
    uncovered: list[str] = []
    published = publishers[0]
    untied = [
        Held(key, reader.held(key).dtype, reader.held(key).shape, reader.held(key).box)  # type: ignore[union-attr]
        for key in reader.aliases
        if published.held(key) is not published.held(reader.aliases[key])
    ]
    for index, mine in enumerate([*reader.tensors, *untied]):
        covered = 0
        for replicas in _box_classes(publishers, mine.name):
            rank = replicas[(index + spread) % len(replicas)]
            theirs = publishers[rank].held(mine.name)
            assert theirs is not None
            inter = theirs.box.intersect(mine.box)
            if inter is None or inter.numel == 0:
                continue
            covered += inter.numel
            for part in split_box(inter, theirs.dtype.itemsize, publishers[rank].bucket_bytes):
                pieces[rank].append(Piece(mine.name, theirs, part.within(theirs.box), part.within(mine.box)))
        if covered != mine.box.numel:
            uncovered.append(mine.name)
    if uncovered:
        raise StateMismatchError(
            f"{source}: the publishers' shards do not cover what the receiver holds of {uncovered[:20]} "
            "(overlapping or missing shards)",
            uncovered,
        )
    return [PairPlan(rank, tuple(_buckets(p, publishers[rank].bucket_bytes))) for rank, p in enumerate(pieces)]


def _box_classes(publishers: Sequence[RankLayout], name: str) -> list[list[int]]:
    """Publisher ranks grouped by the box of ``name`` they hold; distinct boxes must not overlap
    (they are checked through coverage: an overlap counts its elements twice)."""
    classes: dict[Box, list[int]] = {}
    for rank, layout in enumerate(publishers):
        held = layout.held(name)
        if held is not None and held.box.numel:
            classes.setdefault(held.box, []).append(rank)
    return list(classes.values())


def _buckets(pieces: list[Piece], limit: int) -> list[Bucket]:
    pieces = sorted(pieces, key=lambda p: (p.source.offset, _first_element(p)))
    out: list[Bucket] = []
    current: list[Piece] = []
    span: tuple[int, int] | None = None  # (start, end) while the current bucket is a span
    size = 0

    def close() -> None:
        nonlocal current, span, size
        if current:
            out.append(Bucket(tuple(current), size if span is None else span[1] - span[0], -1 if span is None else span[0]))
        current, span, size = [], None, 0

    for piece in pieces:
        where = piece.snapshot_range()
        if current and span is not None:
            if where is not None and _extends(span, where, piece.source.dtype.itemsize, limit):
                current.append(_at(piece, where[0] - span[0]))
                span = (span[0], where[1])
                continue
            close()
        elif current:
            at = align(size, ALIGN)
            if at + piece.nbytes <= limit:
                current.append(_at(piece, at))
                size = at + piece.nbytes
                continue
            close()
        current = [_at(piece, 0)]
        span, size = (where, 0) if where is not None else (None, piece.nbytes)
    close()
    return out


def _extends(span: tuple[int, int], where: tuple[int, int], itemsize: int, limit: int) -> bool:
    """Whether a piece at snapshot bytes ``where`` can join the span bucket ``span``: it follows
    it (across alignment padding at most), the bucket stays within ``limit``, and the piece
    lands at a multiple of its element size inside the bucket. Buckets land at ALIGN-aligned
    offsets in the reader's staging, but a span may start mid-tensor (a shard that begins at
    an odd float32), so a float64 tensor after it can sit at a misaligned bucket offset; it
    starts a new bucket instead, and the reader can view it in place."""
    return (
        span[1] <= where[0] <= align(span[1], ALIGN)
        and where[1] - span[0] <= limit
        and (where[0] - span[0]) % itemsize == 0
    )


def _first_element(piece: Piece) -> int:
    shape = piece.source.box.shape
    start, stride = 0, 1
    for j in reversed(range(len(shape))):
        start += piece.src_box.offset[j] * stride
        stride *= shape[j]
    return start


def _at(piece: Piece, at: int) -> Piece:
    return Piece(piece.target, piece.source, piece.src_box, piece.dst_box, at)


def staging_offsets(plans: Sequence[PairPlan]) -> tuple[list[list[int]], int]:
    """Where each bucket lands in the reader's staging buffer (plan order, aligned), and the
    buffer's size."""
    offsets, end = [], 0
    for plan in plans:
        row = []
        for bucket in plan.buckets:
            row.append(end)
            end = align(end + bucket.nbytes, ALIGN)
        offsets.append(row)
    return offsets, end


def piece_view(buffer: torch.Tensor, at: int, piece: Piece) -> torch.Tensor:
    """The piece inside a byte buffer (staging, or a packed bucket), typed and shaped."""
    raw = buffer[at : at + piece.nbytes]
    return raw.view(piece.source.dtype).view(piece.src_box.shape)


def local_view(local: torch.Tensor, box: Box) -> torch.Tensor:
    return local[box.slices()] if box.shape else local


def total_elements(plans: Sequence[PairPlan]) -> int:
    return sum(math.prod(p.src_box.shape) for plan in plans for b in plan.buckets for p in b.pieces)
