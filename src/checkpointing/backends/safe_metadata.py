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
from collections import defaultdict
from typing import Any

import torch

from .._compat import storage_info_class
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..safepath import safe_join

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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load {module}.{name}, which is not part of DCP metadata; "
            "refusing to unpickle it (a crafted checkpoint could run code this way)",
            self.source,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} uses pickle persistent ids; refusing", self.source)


def safe_load_metadata(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with the restricted unpickler and check its structure."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated / garbage bytes
        raise CorruptCheckpointError(f"{source} is not readable DCP metadata: {e!r}", source) from None
    if not isinstance(obj, Metadata):
        raise CorruptCheckpointError(f"{source} does not hold DCP Metadata (got {type(obj).__name__})", source)
    check_metadata(obj, source)
    return obj


# --------------------------------------------------------------------------------------------
# Structure: every number DCP will later trust
# --------------------------------------------------------------------------------------------


def _corrupt(source: str, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{source}: {message}", source)


def _dims(value: Any, what: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _corrupt(source, f"{what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def check_metadata(metadata: Any, source: str) -> None:
    """Types, tensor geometry and storage entries of unpickled metadata, before DCP uses them.

    Unpickling restores objects from whatever state the file holds, so a field can be missing
    (one flipped bit in its name) or of any type: every such case is a CorruptCheckpointError
    here, never an AttributeError later inside DCP."""
    try:
        _check_metadata(metadata, source)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise _corrupt(source, f"DCP metadata is malformed: {e!r}") from None


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
    if not isinstance(entries, dict):
        raise _corrupt(source, "state_dict_metadata is not a dict")
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise _corrupt(source, f"state key {key!r} is not a string")
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise _corrupt(source, f"{key!r} has metadata of type {type(entry).__name__}")
        size = _dims(entry.size, f"{key!r} size", source)
        if not isinstance(getattr(entry.properties, "dtype", None), torch.dtype):
            raise _corrupt(source, f"{key!r} has no valid dtype")
        if not isinstance(entry.chunks, list):
            raise _corrupt(source, f"{key!r} chunks is not a list")
        for chunk in entry.chunks:
            offsets = _dims(chunk.offsets, f"{key!r} chunk offsets", source)
            sizes = _dims(chunk.sizes, f"{key!r} chunk sizes", source)
            if not (len(offsets) == len(sizes) == len(size)) or any(
                o + s > d for o, s, d in zip(offsets, sizes, size)
            ):
                raise _corrupt(
                    source, f"{key!r} has a chunk at offsets {offsets} of sizes {sizes} outside its size {size}"
                )

    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise _corrupt(source, "storage_data is missing (not a file-system DCP checkpoint)")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _corrupt(source, f"storage entry {index!r} is malformed")
        if not isinstance(index.fqn, str):
            raise _corrupt(source, f"storage entry {index!r} has a non-string key")
        if index.offset is not None:
            _dims(index.offset, f"{index.fqn!r} storage offset", source)
        if not isinstance(info.relative_path, str):
            raise _corrupt(source, f"{index.fqn!r} names a non-string file {info.relative_path!r}")
        for name in ("offset", "length"):
            value = getattr(info, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _corrupt(source, f"{index.fqn!r} has {name} {value!r}; a non-negative int is required")
        if info.transform_descriptors:
            # Neither we nor TorchTitan write them; a decompressed size is bounded by nothing.
            raise UnsafeCheckpointError(
                f"{source}: {index.fqn!r} is stored with transforms {list(info.transform_descriptors)!r} "
                "(e.g. compression); only plain DCP items are read",
                source,
            )


# --------------------------------------------------------------------------------------------
# Layout: every byte range inside its file, no two overlapping
# --------------------------------------------------------------------------------------------


def _chunk_nbytes(metadata: Any, index: Any) -> int | None:
    """Bytes the stored chunk ``index`` must at least occupy (a plain torch.save holds them all)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entry = metadata.state_dict_metadata.get(index.fqn)
    if not isinstance(entry, TensorStorageMetadata):
        return None
    for chunk in entry.chunks:
        if index.offset is None or tuple(chunk.offsets) == tuple(index.offset):
            itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
            return math.prod(chunk.sizes) * itemsize
    return None


def check_storage_layout(metadata: Any, root: str) -> None:
    """Every item's ``[offset, offset + length)`` lies inside its file (a path that stays inside
    ``root``), ranges in one file never overlap, and a tensor item is at least as long as its
    data. Raises before any data is read, naming the file and the state key."""
    by_file: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    joined: dict[str, str] = {}  # one realpath walk per file, not per item
    for index, info in metadata.storage_data.items():
        relative = os.fspath(info.relative_path)
        path = joined.get(relative) or joined.setdefault(relative, safe_join(root, relative))
        by_file[path].append((info.offset, info.length, index.fqn))
        least = _chunk_nbytes(metadata, index)
        if least is not None and info.length < least:
            raise CorruptCheckpointError(
                f"{path}: {index.fqn!r} is recorded as {info.length} bytes, but its data alone needs {least}",
                path,
            )
    for path, ranges in by_file.items():
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint file missing: {path}", path) from None
        end_of_previous, previous = 0, None
        for offset, length, fqn in sorted(ranges):
            if offset + length > size:
                raise CorruptCheckpointError(
                    f"{path}: {fqn!r} is recorded at bytes {offset}..{offset + length}, but the file has "
                    f"{size} bytes (truncated, or crafted metadata)",
                    path,
                )
            if offset < end_of_previous:
                raise CorruptCheckpointError(
                    f"{path}: {fqn!r} (bytes {offset}..{offset + length}) overlaps {previous!r} "
                    f"(ends at byte {end_of_previous})",
                    path,
                )
            end_of_previous, previous = offset + length, fqn
