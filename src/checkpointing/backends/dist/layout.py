"""What one rank holds of each tensor: the input of the reshard plan.

A rank's layout lists, per state-dict key, the full tensor's shape and dtype and the *box* (an
offset and a shape in the full tensor) that this rank holds: all of it for a plain tensor or a
``Replicate`` DTensor, its chunk for a ``Shard`` DTensor (FSDP2's dim-0 shards, tensor-parallel
row or column shards, uneven chunks included). Tied keys (one tensor under two names) are held
once and listed as aliases. A publisher's layout also places each tensor in its snapshot buffer.

Layouts cross the wire as JSON, never pickle, and are checked field by field when read: they
come from other processes of the same job, but a typo'd address can reach another job's store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch

from ..._compat import local_shard_box
from ...distributed import is_dtensor
from ...errors import CorruptCheckpointError, StateMismatchError
from ..memory.layout import ALIGN, DTYPE_NAMES, DTYPES, align, storage_key

FORMAT = "titan-ckpt-dist-layout/1"


@dataclass(frozen=True)
class Box:
    """A rectangular part of a full tensor: ``offset`` and ``shape`` per dimension."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        hi = tuple(min(a + s, b + t) for a, s, b, t in zip(self.offset, self.shape, other.offset, other.shape, strict=True))
        if any(top <= bottom for bottom, top in zip(lo, hi, strict=True)) and self.shape:
            return None
        return Box(lo, tuple(top - bottom for bottom, top in zip(lo, hi, strict=True)))

    def within(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (which contains it)."""
        return Box(tuple(a - b for a, b in zip(self.offset, outer.offset, strict=True)), self.shape)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape, strict=True))

    def to_json(self) -> list:
        return [list(self.offset), list(self.shape)]


def full_box(shape: tuple[int, ...]) -> Box:
    return Box((0,) * len(shape), tuple(shape))


@dataclass(frozen=True)
class Held:
    """One tensor as one rank holds it."""

    name: str
    dtype: torch.dtype
    """Publisher: the dtype it sends (its snapshot's). Reader: its receiving tensor's."""
    shape: tuple[int, ...]
    """The full tensor's shape."""
    box: Box
    offset: int = -1
    """Publisher: byte offset of the box's data in the snapshot buffer (C order)."""

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.dtype.itemsize


@dataclass(frozen=True)
class RankLayout:
    tensors: tuple[Held, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    """key -> the held name it shares storage with (tied weights)."""
    nbytes: int = 0
    """Publisher: size of one snapshot buffer."""
    bucket_bytes: int = 0
    """Publisher: the bucket size every plan against it uses."""
    backend: str = ""
    """Publisher: the process-group backend of its transfers (gloo, nccl)."""

    def names(self) -> list[str]:
        return [t.name for t in self.tensors] + list(self.aliases)

    def held(self, key: str) -> Held | None:
        index = self.__dict__.get("_index")
        if index is None:
            index = {t.name: t for t in self.tensors}
            object.__setattr__(self, "_index", index)
        return index.get(self.aliases.get(key, key))

    # ------------------------------------------------------------------ wire format
    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "tensors": [
                {"name": t.name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "box": t.box.to_json(), "offset": t.offset}
                for t in self.tensors
            ],
            "aliases": dict(self.aliases),
            "nbytes": self.nbytes,
            "bucket_bytes": self.bucket_bytes,
            "backend": self.backend,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> RankLayout:
        def bad(why: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"weight-sync layout from {source} is not valid: {why}", source)

        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"format is not {FORMAT!r}")
        tensors, aliases = doc.get("tensors"), doc.get("aliases")
        if not isinstance(tensors, list) or not isinstance(aliases, dict):
            raise bad("tensors/aliases missing")
        held = tuple(_parse_held(t, bad) for t in tensors)
        names = {t.name for t in held}
        if len(names) != len(held):
            raise bad("a tensor name appears twice")
        for key, target in aliases.items():
            if not isinstance(key, str) or target not in names or key in names:
                raise bad(f"alias {key!r} -> {target!r} does not name a held tensor")
        nbytes, bucket_bytes, backend = doc.get("nbytes"), doc.get("bucket_bytes"), doc.get("backend")
        if not (
            _is_int(nbytes) and nbytes >= 0 and _is_int(bucket_bytes) and bucket_bytes >= 0 and isinstance(backend, str)
        ):
            raise bad("nbytes/bucket_bytes/backend missing")
        layout = cls(held, dict(aliases), nbytes, bucket_bytes, backend)
        for t in held:
            if t.offset >= 0 and t.offset + t.nbytes > layout.nbytes:
                raise bad(f"{t.name}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside the {layout.nbytes}-byte snapshot")
        return layout


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and len(v) <= 16 and all(_is_int(x) and x >= 0 for x in v)


def _parse_held(t: Any, bad) -> Held:
    if not isinstance(t, dict):
        raise bad("a tensor entry is not an object")
    name, dtype, shape, box, offset = (t.get(k) for k in ("name", "dtype", "shape", "box", "offset"))
    if not isinstance(name, str) or not name:
        raise bad("a tensor entry has no name")
    if dtype not in DTYPES:
        raise bad(f"{name}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not _int_list(shape) or not (isinstance(box, list) and len(box) == 2 and all(_int_list(b) for b in box)):
        raise bad(f"{name}: shape/box are not lists of sizes")
    b = Box(tuple(box[0]), tuple(box[1]))
    if len(b.offset) != len(shape) or len(b.shape) != len(shape):
        raise bad(f"{name}: box {box} does not match shape {shape}")
    if any(o + s > n for o, s, n in zip(b.offset, b.shape, shape, strict=True)):
        raise bad(f"{name}: box {box} lies outside shape {shape}")
    if not _is_int(offset) or offset < -1:
        raise bad(f"{name}: offset {offset!r} is not an integer >= -1")
    return Held(name, DTYPES[dtype], tuple(shape), b, offset)


# ---------------------------------------------------------------------------- building
def local_part(key: str, value: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """This rank's tensor for ``key`` and the box of the full tensor it holds."""
    shape = tuple(int(s) for s in value.shape)
    if not is_dtensor(value):
        return value, full_box(shape)
    from torch.distributed.tensor import Replicate, Shard

    unsupported = [p for p in value.placements if type(p) not in (Shard, Replicate)]
    if unsupported:
        raise StateMismatchError(
            f"{key}: DTensor placement {unsupported[0]} cannot be resharded by the dist backend; allowed: Shard(dim), "
            "Replicate() (redistribute a Partial or strided shard first)",
            [key],
        )
    local_shape, offset = local_shard_box(value)
    local_shape, offset = tuple(int(x) for x in local_shape), tuple(int(x) for x in offset)
    local = value.to_local()
    if tuple(local.shape) != local_shape:
        raise StateMismatchError(f"{key}: local shard has shape {tuple(local.shape)}, its placements say {local_shape}", [key])
    return local, Box(offset, local_shape)


def _dtype_ok(key: str, dtype: torch.dtype) -> None:
    if dtype not in DTYPE_NAMES:
        raise StateMismatchError(f"{key}: dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}", [key])


def build_layout(
    model: Mapping[str, Any], cast_to: torch.dtype | None = None, *, snapshot: bool = False, bucket_bytes: int = 0, backend: str = ""
) -> tuple[RankLayout, dict[str, torch.Tensor]]:
    """This rank's layout of ``model`` and its local tensors by held name.

    ``snapshot``: place every held tensor in a flat buffer (a publisher), each at an aligned
    offset, in state-dict order, so consecutive tensors are consecutive bytes."""
    held: list[Held] = []
    aliases: dict[str, str] = {}
    locals_: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    offset = 0
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise StateMismatchError(f"the dist backend carries tensors only; {key} is a {type(value).__name__}", [key])
        tied = storage_key(value)
        if tied is not None and tied in seen:
            aliases[key] = seen[tied]
            continue
        if tied is not None:
            seen[tied] = key
        local, box = local_part(key, value)
        dtype = cast_to if (snapshot and cast_to is not None and value.is_floating_point()) else value.dtype
        _dtype_ok(key, dtype)
        entry = Held(key, dtype, tuple(int(s) for s in value.shape), box, offset if snapshot else -1)
        if snapshot:
            offset = align(offset + entry.nbytes, ALIGN)
        held.append(entry)
        locals_[key] = local
    return RankLayout(tuple(held), aliases, offset, bucket_bytes, backend), locals_


def structure(layout: RankLayout) -> list:
    """What must not change between a publisher's saves (names, shapes, boxes, ties): readers
    planned against it. Dtypes may change (the snapshot's dtype stays; the copy casts)."""
    return [[t.name, list(t.shape), t.box.to_json()] for t in layout.tensors] + [sorted(layout.aliases.items())]
