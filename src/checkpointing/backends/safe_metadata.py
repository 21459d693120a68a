"""Turning an untrusted DCP ``.metadata`` file into metadata the reader can act on safely.

torch 2.13's ``FileSystemReader.read_metadata`` calls ``pickle.load`` on the file, so a crafted
checkpoint executes arbitrary code the moment it is loaded. This module's unpickler resolves
only the handful of classes DCP's metadata is made of; anything else (``os.system``,
``builtins.eval``, ``subprocess.Popen``...) raises :class:`UnsafeCheckpointError` before it can
be called.

Unpickling safely is not enough: DCP then trusts the metadata's numbers. A byte range past the
end of a file makes ``read(length)`` try to allocate ``length`` bytes up front (terabytes, if the
file says so); overlapping ranges make one file be read many times over; a chunk outside its
tensor, or a compressed item, defeats the bounds too. :func:`check_metadata` and
:func:`check_storage_layout` refuse all of that before a single data byte is read, so what a
load allocates is bounded by the bytes really on disk plus the receiver's own tensors.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._compat import storage_info_class
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..safepath import safe_join
from ..untrusted import describe, regular_size

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


MAX_KEY_NODES = 256
"""Objects one dict key or set member may be made of. DCP's keys are strings and
``MetadataIndex(fqn, offset)``: a handful. A crafted key of nested tuples that share references
is tiny in the file but takes exponential time to hash (pickle's memo makes it cheap to write)."""
MAX_NDIM = 64
MAX_DIM = 1 << 62
"""Largest size of one dimension; a tensor's element count is bounded by the same number."""
MAX_CHECK_STEPS = 10_000_000
"""Chunk-pair comparisons the overlap check may make over the whole file before giving up."""

_HASHING = (set, frozenset, dict, OrderedDict)


_FLAT = frozenset((str, int, bytes, float, bool, type(None)))
"""Key types whose hash costs at most their own length: checked without a walk (the common case)."""


def _check_keys(keys: Any, source: str) -> None:
    for key in keys:
        if type(key) not in _FLAT:
            _check_key(key, source)


def _check_key(key: Any, source: str) -> None:
    """Refuse a dict key or set member too complex to hash in bounded time."""
    todo, seen = [key], 0
    while todo:
        value = todo.pop()
        seen += 1
        if seen > MAX_KEY_NODES:
            raise UnsafeCheckpointError(
                f"{source} holds a dict key or set member built from more than {MAX_KEY_NODES} objects "
                "(nested shared references take exponential time to hash); refusing it",
                source,
            )
        if isinstance(value, (tuple, frozenset)):
            todo.extend(value)
        elif not isinstance(value, (str, bytes, int, float, type(None), torch.dtype)):
            state = getattr(value, "__dict__", None)
            if isinstance(state, dict):
                todo.extend(state.values())


if TYPE_CHECKING:

    class _PythonUnpickler(pickle._Unpickler):
        """What typeshed leaves out of the pure-Python unpickler (its ``stack`` and the opcode
        handlers wrapped below), declared so that the guards are type-checked against them."""

        dispatch: ClassVar[dict[int, Callable[[Any], None]]]
        stack: list[Any]

        def load_setitem(self) -> None: ...
        def load_setitems(self) -> None: ...
        def load_dict(self) -> None: ...
        def load_additems(self) -> None: ...
        def load_frozenset(self) -> None: ...
        def load_reduce(self) -> None: ...
        def load_newobj(self) -> None: ...
        def load_newobj_ex(self) -> None: ...
        def load_build(self) -> None: ...

else:
    _PythonUnpickler = pickle._Unpickler


class _RestrictedUnpickler(_PythonUnpickler):  # the Python unpickler: its opcodes can be guarded
    """Resolves only DCP's metadata classes, refuses persistent ids, and checks every dict key
    and set member before it is hashed. Python's own unpickler (about 2.5x slower than the C one,
    which cannot be hooked) because every hash bomb goes through SETITEM(S), DICT, ADDITEMS,
    FROZENSET or a set/dict constructor, and those are only guarded here."""

    dispatch = dict(_PythonUnpickler.dispatch)

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load {describe(module)}.{describe(name)}, which is not part of DCP metadata; "
            "refusing to unpickle it (a crafted checkpoint could run code this way)",
            self.source,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} uses pickle persistent ids; refusing", self.source)

    # -- guarded opcodes (installed in ``dispatch`` below the class)
    def load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1], self.source)
        super().load_setitem()

    def load_setitems(self) -> None:
        _check_keys(self.stack[::2], self.source)
        super().load_setitems()

    def load_dict(self) -> None:
        _check_keys(self.stack[::2], self.source)
        super().load_dict()

    def load_additems(self) -> None:
        _check_keys(self.stack, self.source)
        super().load_additems()

    def load_frozenset(self) -> None:
        _check_keys(self.stack, self.source)
        super().load_frozenset()

    def _check_call(self, func: Any, args: Any) -> None:
        if func in _HASHING or (isinstance(func, type) and issubclass(func, _HASHING)):
            for arg in args if isinstance(args, (tuple, list)) else (args,):
                for item in arg if isinstance(arg, (list, tuple, set, frozenset)) else (arg,):
                    if func in (dict, OrderedDict) and isinstance(item, (tuple, list)) and item:
                        item = item[0]
                    _check_key(item, self.source)

    def load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    def load_build(self) -> None:
        state = self.stack[-1]
        slots = state[1] if isinstance(state, tuple) and len(state) == 2 else None
        if isinstance(slots, dict) and any(not isinstance(k, str) or k.startswith("__") for k in slots):
            raise UnsafeCheckpointError(f"{self.source} sets special attributes while unpickling; refusing", self.source)
        super().load_build()



for _opcode, _method in (
    (pickle.SETITEM, _RestrictedUnpickler.load_setitem),
    (pickle.SETITEMS, _RestrictedUnpickler.load_setitems),
    (pickle.DICT, _RestrictedUnpickler.load_dict),
    (pickle.ADDITEMS, _RestrictedUnpickler.load_additems),
    (pickle.FROZENSET, _RestrictedUnpickler.load_frozenset),
    (pickle.REDUCE, _RestrictedUnpickler.load_reduce),
    (pickle.NEWOBJ, _RestrictedUnpickler.load_newobj),
    (pickle.NEWOBJ_EX, _RestrictedUnpickler.load_newobj_ex),
    (pickle.BUILD, _RestrictedUnpickler.load_build),
):
    _RestrictedUnpickler.dispatch[_opcode[0]] = _method
for _opcode in (pickle.OBJ, pickle.INST):  # protocol 0/1 class calls: DCP never writes them
    _RestrictedUnpickler.dispatch.pop(_opcode[0], None)
del _opcode, _method


def safe_load_metadata(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with the restricted unpickler and check its structure."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except (Exception, RecursionError) as e:  # truncated / garbage bytes, an unknown opcode
        raise CorruptCheckpointError(
            f"{source} is not readable DCP metadata: {type(e).__name__}: {_error_text(e)}", source
        ) from None
    if not isinstance(obj, Metadata):
        raise CorruptCheckpointError(f"{source} does not hold DCP Metadata (got {type(obj).__name__})", source)
    check_metadata(obj, source)
    return obj


def _error_text(error: BaseException) -> str:
    """An exception's message, cut short: unpickling errors can quote the crafted object."""
    try:
        text = str(error)
    except Exception:  # a str() that fails (or recurses) on crafted content
        text = ""
    return text[:200]


# --------------------------------------------------------------------------------------------
# Structure: every number DCP will later trust
# --------------------------------------------------------------------------------------------


def _corrupt(source: str, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{source}: {message}", source)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dims(value: Any, what: str, source: str) -> tuple[int, ...]:
    """A shape or offset: at most MAX_NDIM non-negative ints, each at most MAX_DIM."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM or not all(
        _is_int(d) and 0 <= d <= MAX_DIM for d in value
    ):
        raise _corrupt(
            source, f"{what} must be a tuple of at most {MAX_NDIM} ints in 0..2**62, got {describe(value)}"
        )
    return tuple(int(d) for d in value)


def _numel(shape: tuple[int, ...], what: str, source: str) -> int:
    n = math.prod(shape)
    if n > MAX_DIM:
        raise _corrupt(source, f"{what} has {n} elements; at most 2**62 are allowed")
    return n


def check_metadata(metadata: Any, source: str) -> None:
    """Types, tensor geometry and storage entries of unpickled metadata, before DCP uses them.

    Unpickling restores objects from whatever state the file holds, so a field can be missing
    (one flipped bit in its name) or of any type: every such case is a CorruptCheckpointError
    here, never an AttributeError later inside DCP. Messages never ``repr`` what was unpickled
    (see :func:`~checkpointing.untrusted.describe`)."""
    try:
        _check_metadata(metadata, source)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError) as e:
        raise _corrupt(source, f"DCP metadata is malformed: {type(e).__name__}: {_error_text(e)}") from None


def _check_metadata(metadata: Any, source: str) -> None:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
        StorageMeta,
        TensorStorageMetadata,
    )

    _StorageInfo = storage_info_class()
    storage_meta = getattr(metadata, "storage_meta", None)
    if storage_meta is not None and not isinstance(storage_meta, StorageMeta):
        raise _corrupt(source, f"storage_meta is a {type(storage_meta).__name__}, not StorageMeta")

    entries = metadata.state_dict_metadata
    storage = metadata.storage_data
    if type(entries) is not dict:
        raise _corrupt(source, "state_dict_metadata is not a dict")
    if type(storage) is not dict:
        raise _corrupt(source, "storage_data is missing (not a file-system DCP checkpoint)")

    # Storage entries first: the chunk checks below look their items up.
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise _corrupt(source, f"a storage entry is a {type(index).__name__} -> {type(info).__name__}")
        fqn = index.fqn
        if not isinstance(fqn, str):
            raise _corrupt(source, f"a storage entry has a key of type {type(fqn).__name__}, not a string")
        if index.offset is not None:
            _dims(index.offset, f"{describe(fqn)} storage offset", source)
        if not isinstance(info.relative_path, str):
            raise _corrupt(source, f"{describe(fqn)} names a file of type {type(info.relative_path).__name__}")
        for name in ("offset", "length"):
            value = getattr(info, name)
            if not _is_int(value) or not 0 <= value <= MAX_DIM:
                raise _corrupt(source, f"{describe(fqn)} has {name} {describe(value)}; a non-negative int is required")
        if getattr(info, "transform_descriptors", None):
            # Neither we nor TorchTitan write them; a decompressed size is bounded by nothing.
            raise UnsafeCheckpointError(
                f"{source}: {describe(fqn)} is stored with transforms {describe(info.transform_descriptors)} "
                "(e.g. compression); only plain DCP items are read",
                source,
            )

    # Every chunk has its own storage entry, so there are never more chunks than entries: this
    # bounds the work below by the file's size even when one crafted chunk list is shared by
    # every tensor (cheap to pickle, quadratic to check).
    total_chunks = 0
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise _corrupt(source, f"a state key is a {type(key).__name__}, not a string")
        if type(entry) is TensorStorageMetadata:
            if type(entry.chunks) is not list:
                raise _corrupt(source, f"{describe(key)} chunks is not a list")
            total_chunks += len(entry.chunks)
        elif type(entry) is not BytesStorageMetadata:
            raise _corrupt(source, f"{describe(key)} has metadata of type {type(entry).__name__}")
    if total_chunks > len(storage):
        raise _corrupt(source, f"{total_chunks} tensor chunks but only {len(storage)} stored items")

    budget = [MAX_CHECK_STEPS]
    for key, entry in entries.items():
        if type(entry) is BytesStorageMetadata:
            if MetadataIndex(key) not in storage:
                raise _corrupt(source, f"non-tensor value {describe(key)} has no stored bytes")
            continue
        size = _dims(entry.size, f"{describe(key)} size", source)
        _numel(size, describe(key), source)
        if not isinstance(getattr(entry.properties, "dtype", None), torch.dtype):
            raise _corrupt(source, f"{describe(key)} has no valid dtype")
        boxes = []
        for chunk in entry.chunks:
            offsets = _dims(chunk.offsets, f"{describe(key)} chunk offsets", source)
            sizes = _dims(chunk.sizes, f"{describe(key)} chunk sizes", source)
            if not (len(offsets) == len(sizes) == len(size)) or any(
                o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)
            ):
                raise _corrupt(
                    source, f"{describe(key)} has a chunk at offsets {offsets} of sizes {sizes} outside its size {size}"
                )
            if MetadataIndex(key, offsets) not in storage:
                raise _corrupt(source, f"{describe(key)} has a chunk at offsets {offsets} with no stored bytes")
            boxes.append((offsets, sizes))
        check_tiling(key, size, boxes, source, budget)


def check_tiling(key: str, size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], source: str,
                 budget: list[int] | None = None) -> None:
    """The chunks of one tensor cover it exactly: no element left out (a load would leave the
    receiver's old value there and still report success), none stored twice (which bytes would
    win?). Boxes are already known to lie inside the tensor, so "exactly" is: disjoint, and
    their volumes add up to the tensor's element count."""
    numel = math.prod(size)
    solid = [(o, s) for o, s in boxes if math.prod(s) > 0]
    covered = sum(math.prod(s) for _, s in solid)
    if covered != numel or (numel and not solid):
        what = "no chunks" if not solid else f"chunks covering {covered} of its {numel} elements"
        raise _corrupt(
            source,
            f"{describe(key)} (size {size}) has {what}" + (" (some overlap)" if covered > numel else "")
            + "; the stored chunks must cover the tensor exactly",
        )
    if len(solid) < 2:
        return
    # Sweep along the dimension where the chunks differ most (the sharded one): real layouts
    # then compare each chunk with a handful of neighbours.
    dim = max(range(len(size)), key=lambda d: len({o[d] for o, _ in solid}))
    solid.sort(key=lambda box: box[0][dim])
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    budget = budget if budget is not None else [MAX_CHECK_STEPS]
    for offsets, sizes in solid:
        start = offsets[dim]
        active = [a for a in active if a[0][dim] + a[1][dim] > start]
        budget[0] -= len(active) + 1
        if budget[0] < 0:
            raise _corrupt(source, f"chunk layout too complex to check (more than {MAX_CHECK_STEPS} comparisons)")
        for other_offsets, other_sizes in active:
            if all(o < oo + os_ and oo < o + s for o, s, oo, os_ in zip(offsets, sizes, other_offsets, other_sizes, strict=True)):
                raise _corrupt(
                    source,
                    f"{describe(key)} has overlapping chunks at offsets {other_offsets} and {offsets}; "
                    "the stored chunks must cover the tensor exactly",
                )
        active.append((offsets, sizes))


# --------------------------------------------------------------------------------------------
# Layout: every byte range inside its file, no two overlapping
# --------------------------------------------------------------------------------------------


def _chunk_bytes(metadata: Any) -> dict[tuple[str, tuple[int, ...]], int]:
    """(state key, chunk offsets) -> bytes that chunk's data occupies (a plain torch.save holds
    them all), for every tensor chunk of checked metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            itemsize = entry.properties.dtype.itemsize
            for chunk in entry.chunks:
                out[(key, tuple(chunk.offsets))] = math.prod(chunk.sizes) * itemsize
    return out


def check_storage_layout(metadata: Any, root: str) -> None:
    """Every item's ``[offset, offset + length)`` lies inside its file (a regular file, at a
    path that stays inside ``root``), ranges in one file never overlap, and a tensor item is at
    least as long as its data. Raises before any data is read, naming the file and the state key."""
    by_file: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    joined: dict[str, str] = {}  # one realpath walk per file, not per item
    least = _chunk_bytes(metadata)
    for index, info in metadata.storage_data.items():
        relative = os.fspath(info.relative_path)
        path = joined.get(relative) or joined.setdefault(relative, safe_join(root, relative))
        by_file[path].append((info.offset, info.length, index.fqn))
        needed = least.get((index.fqn, tuple(index.offset))) if index.offset is not None else None
        if needed is not None and info.length < needed:
            raise CorruptCheckpointError(
                f"{path}: {describe(index.fqn)} is recorded as {info.length} bytes, but its data alone needs {needed}",
                path,
            )
    for path, ranges in by_file.items():
        try:
            size = regular_size(path, "DCP data file")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint file missing: {path}", path) from None
        end_of_previous, previous = 0, None
        for offset, length, fqn in sorted(ranges):
            if offset + length > size:
                raise CorruptCheckpointError(
                    f"{path}: {describe(fqn)} is recorded at bytes {offset}..{offset + length}, but the file has "
                    f"{size} bytes (truncated, or crafted metadata)",
                    path,
                )
            if offset < end_of_previous:
                raise CorruptCheckpointError(
                    f"{path}: {describe(fqn)} (bytes {offset}..{offset + length}) overlaps {describe(previous)} "
                    f"(ends at byte {end_of_previous})",
                    path,
                )
            end_of_previous, previous = offset + length, fqn
