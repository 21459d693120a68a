"""Where each tensor of a published snapshot lives, and the JSON manifest that says so.

A snapshot is one flat byte buffer: every stored tensor at an aligned offset, in the order of the
publisher's state dict. Tied weights (two keys aliasing one tensor, e.g. qwen3's
``tok_embeddings.weight`` / ``output.weight``) are stored once; the second key is an alias, so a
reader can keep them tied. The manifest is plain JSON, never pickle, and a reader validates
every field against the segment's real size before it touches a byte, so a damaged or crafted
manifest is a :class:`~checkpointing.errors.CorruptCheckpointError`, not an out-of-bounds read.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch

from ...distributed import is_dtensor
from ...dtypes import storable_dtypes
from ...errors import CorruptCheckpointError
from ...untrusted import describe, parse_json

MANIFEST_FORMAT = "titan-ckpt-memory/1"
ALIGN = 64
"""Byte alignment of every tensor: a cache line, and a multiple of every dtype's size."""

DTYPES: dict[str, torch.dtype] = storable_dtypes()
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_MANIFEST_BYTES = 64 << 20
"""A manifest for even a huge model is a few MB; a bigger declared length is corruption."""


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CorruptCheckpointError(
            f"tensor {key!r} has dtype {dtype}, which the memory backend does not carry; "
            f"allowed: {', '.join(DTYPES)}"
        ) from None


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its full (global) shape and dtype as published."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def view(self, data: torch.Tensor) -> torch.Tensor:
        """This tensor inside the snapshot's uint8 buffer, without a copy."""
        raw = data[self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


class SnapshotViews:
    """Every stored tensor as a view into one snapshot buffer. One typed base per dtype and one
    ``as_strided`` per tensor: a handoff of a few hundred tensors spends its time copying, not
    slicing."""

    def __init__(self, data: torch.Tensor):
        self.data = data
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, entry: TensorEntry) -> torch.Tensor:
        size = entry.dtype.itemsize
        typed = self._typed.get(entry.dtype)
        if typed is None:
            typed = self._typed[entry.dtype] = self.data[: self.data.numel() // size * size].view(entry.dtype)
        strides, step = [], 1
        for dim in reversed(entry.shape):
            strides.append(step)
            step *= dim
        return typed.as_strided(entry.shape, strides[::-1], typed.storage_offset() + entry.offset // size)


@dataclass(frozen=True)
class Layout:
    """The snapshot's structure. Equal layouts let a publisher reuse a slot as it is."""

    entries: tuple[TensorEntry, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    """key -> name of the stored entry it shares storage with (tied weights)."""

    @property
    def nbytes(self) -> int:
        return max((e.offset + e.nbytes for e in self.entries), default=0)

    def names(self) -> list[str]:
        return [e.name for e in self.entries] + list(self.aliases)

    def entry(self, name: str) -> TensorEntry | None:
        return self._by_name().get(self.aliases.get(name, name))

    def _by_name(self) -> dict[str, TensorEntry]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {e.name: e for e in self.entries}
            object.__setattr__(self, "_index", cached)
        return cached

    # ------------------------------------------------------------------ building
    @classmethod
    def for_state(cls, model: Mapping[str, Any], cast_to: torch.dtype | None = None) -> Layout:
        """The layout a publisher writes for ``model`` (FQN -> tensor or DTensor).

        ``cast_to`` turns every floating tensor into that dtype (an fp32 trainer publishing a
        bf16 snapshot); other tensors keep theirs."""
        entries: list[TensorEntry] = []
        aliases: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        offset = 0
        for name, value in model.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(name)
            key = storage_key(value)
            if key is not None and key in seen:
                aliases[name] = seen[key]
                continue
            if key is not None:
                seen[key] = name
            dtype = cast_to if (cast_to is not None and value.is_floating_point()) else value.dtype
            dtype_name(dtype, name)
            shape = tuple(int(s) for s in value.shape)
            nbytes = math.prod(shape) * dtype.itemsize
            entries.append(TensorEntry(name, dtype, shape, offset, nbytes))
            offset = align(offset + nbytes)
        return cls(tuple(entries), aliases)

    # ------------------------------------------------------------------ manifest
    def to_manifest(self, version: int, checksums: list[int] | None = None) -> bytes:
        """The JSON manifest of one version. Only the version and checksums change from one
        publish to the next, so the tensor table is encoded once per layout."""
        tail = f'"version":{int(version)},"checksums":{json.dumps(checksums, separators=(",", ":"))}}}'
        return self._manifest_head() + tail.encode()

    def _manifest_head(self) -> bytes:
        head = self.__dict__.get("_head")
        if head is None:
            table = {
                "format": MANIFEST_FORMAT,
                "nbytes": self.nbytes,
                "tensors": [
                    {"name": e.name, "dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "offset": e.offset, "nbytes": e.nbytes}
                    for e in self.entries
                ],
                "aliases": dict(self.aliases),
            }
            head = json.dumps(table, separators=(",", ":"))[:-1].encode() + b","
            object.__setattr__(self, "_head", head)
        return head

    def manifest_budget(self, with_checksums: bool) -> int:
        """Bytes a manifest of this layout can take, whatever version and checksums it holds."""
        worst = [2**64 - 1] * len(self.entries) if with_checksums else None
        return len(self.to_manifest(-(2**63), worst))


def storage_key(t: torch.Tensor) -> tuple | None:
    """Identity of the memory a tensor views: equal keys mean the same tensor (tied weights)."""
    local: torch.Tensor | None = t
    if is_dtensor(t):  # its local shard (without to_local's autograd op)
        local = getattr(t, "_local_tensor", None) if hasattr(t, "_local_tensor") else t.to_local()
    if local is None or local.device.type == "meta":
        return None
    try:
        ptr = local.data_ptr()
    except RuntimeError:  # tensors without storage (e.g. some subclasses): never tied
        return None
    return (local.device, ptr, tuple(local.shape), tuple(local.stride()), local.dtype)


def manifest_crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def parse_manifest(
    raw: bytes, data_len: int, source: str, known: Layout | None = None
) -> tuple[Layout, int, list[int] | None]:
    """(layout, version, checksums) from manifest bytes, every field checked against the
    ``data_len`` bytes the segment really holds. Anything else is a CorruptCheckpointError.

    ``known``: a layout this reader already parsed and checked from an earlier manifest. A
    publisher writes a manifest as its layout's table, byte for byte the same every version,
    then the version and checksums; when ``raw`` starts with ``known``'s table and that table
    fits ``data_len``, only the rest is parsed (a 3000-tensor table is 16 ms of a reader's load).
    The rest must then hold nothing but those two members, each checked as below; anything else
    takes the full parse."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"memory snapshot manifest in {source} is damaged: {why}", source)

    if known is not None and known.nbytes <= data_len:
        head = known._manifest_head()
        if raw.startswith(head):
            rest = parse_json(b"{" + raw[len(head) :], source, "memory snapshot manifest")
            if isinstance(rest, dict) and rest.keys() <= {"version", "checksums"}:
                return (known, *_checked_tail(rest.get("version"), rest.get("checksums"), len(known.entries), bad))

    doc = parse_json(raw, source, "memory snapshot manifest")  # bad UTF-8, bad JSON, absurd nesting
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise bad(f"format is not {MANIFEST_FORMAT!r}")
    version, tensors, aliases, checksums = doc.get("version"), doc.get("tensors"), doc.get("aliases"), doc.get("checksums")
    if not _is_int(version):
        raise bad("version is not an integer")  # named before any fault in the table
    if not isinstance(tensors, list) or not isinstance(aliases, dict):
        raise bad("tensors/aliases missing")
    entries = [_parse_entry(t, data_len, bad) for t in tensors]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise bad("a tensor name appears twice")
    for key, target in aliases.items():
        if not isinstance(key, str) or not isinstance(target, str) or target not in names or key in names:
            raise bad(f"alias {describe(key)} -> {describe(target)} does not name a stored tensor")
    version, checksums = _checked_tail(version, checksums, len(entries), bad)
    return Layout(tuple(entries), dict(aliases)), version, checksums


def _checked_tail(version: Any, checksums: Any, count: int, bad) -> tuple[int, list[int] | None]:
    """The members that change every version: an integer version, and no checksums or one
    integer per stored tensor."""
    if not _is_int(version):
        raise bad("version is not an integer")
    if checksums is not None and (
        not isinstance(checksums, list) or len(checksums) != count or not all(_is_int(c) for c in checksums)
    ):
        raise bad("checksums do not match the tensors")
    return version, checksums


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(t: Any, data_len: int, bad) -> TensorEntry:
    if not isinstance(t, dict):
        raise bad("a tensor entry is not an object")
    name, dtype, shape, offset, nbytes = (t.get(k) for k in ("name", "dtype", "shape", "offset", "nbytes"))
    if not isinstance(name, str) or not name:
        raise bad("a tensor entry has no name")
    if dtype not in DTYPES:
        raise bad(f"{describe(name)}: dtype {describe(dtype)} not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(s) and 0 <= s <= 1 << 62 for s in shape):
        raise bad(f"{describe(name)}: shape {describe(shape)} is not a list of at most 16 sizes")
    if not (_is_int(offset) and _is_int(nbytes)) or offset < 0 or nbytes < 0:
        raise bad(f"{describe(name)}: offset/nbytes are not non-negative integers")
    torch_dtype = DTYPES[dtype]
    if nbytes != math.prod(shape) * torch_dtype.itemsize:
        raise bad(f"{describe(name)}: nbytes {describe(nbytes)} does not match shape {describe(shape)} of {dtype}")
    if offset % ALIGN or offset + nbytes > data_len:
        raise bad(f"{describe(name)}: bytes [{offset}, {offset + nbytes}) lie outside the {data_len}-byte snapshot or are unaligned")
    return TensorEntry(name, torch_dtype, tuple(shape), offset, nbytes)
