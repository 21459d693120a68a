"""Reading and writing one ``.safetensors`` file, treating every header as hostile.

The safetensors layout is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and ``[begin, end)`` byte range, then the raw bytes. A crafted file can
declare a 2**63-byte header, ranges that overlap or run past the end, sizes that disagree with
the shape, or the same name twice. :func:`read_header` checks all of that with bounded reads
before anything else looks at the file, so the caller gets a
:class:`~checkpointing.errors.CorruptCheckpointError` naming the file instead of a huge
allocation, a Rust panic or silently wrong weights.

Writing and reading go straight between tensor memory and the file (no intermediate ``bytes``
of the whole shard as ``safetensors.torch.save_file`` builds), which is what keeps the ``hf``
backend at raw-file speed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ...checksum import DigestOnTheSide, FileDigest
from ...errors import CorruptCheckpointError
from ...untrusted import describe, open_binary, parse_json

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 << 20
"""The safetensors library's own limit: a larger declared header is refused before reading."""
METADATA_KEY = "__metadata__"
MAX_NDIM = 64
MAX_DIM = 1 << 62
_MAX_WRITE = 1 << 30  # one write() call; Linux caps a single write at ~2 GiB anyway

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live in a checked file (offsets are absolute file offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: str
    file_size: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def parse_json_strict(raw: bytes, path: str, what: str) -> Any:
    """JSON where a repeated key is corruption, not 'last one wins' (bounded: see
    :func:`checkpointing.untrusted.parse_json`)."""
    return parse_json(raw, path, what)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: str, name: str, info: Any, data_start: int) -> TensorEntry:
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: tensor {describe(name)} {why}", path)

    if not isinstance(info, dict):
        raise bad("has a malformed header entry")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"has dtype {describe(dtype_name)}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise bad(f"has shape {describe(shape)}; expected a list of at most {MAX_NDIM} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"has data_offsets {describe(offsets)}; expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"has data_offsets [{begin}, {end}]; begin must be >= 0 and <= end")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(
            f"claims {end - begin} bytes, but shape {shape} of {dtype_name} needs {expected} (header lies about sizes)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str) -> ShardHeader:
    """Parse and check ``path``'s header; no tensor bytes are read."""
    try:
        f = open_binary(path, "safetensors file")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"safetensors file missing: {path}", path) from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_LENGTH_BYTES)
        if len(head) < HEADER_LENGTH_BYTES:
            raise CorruptCheckpointError(f"{path} has {file_size} bytes: too short for a safetensors header", path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(
                f"{path} declares a {header_len}-byte header; at most {MAX_HEADER_BYTES} is allowed", path
            )
        data_start = HEADER_LENGTH_BYTES + header_len
        if data_start > file_size:
            raise CorruptCheckpointError(
                f"{path} declares a {header_len}-byte header but has only {file_size} bytes (truncated?)", path
            )
        raw = f.read(header_len)
    header = parse_json_strict(raw, path, "the safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object", path)
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: {METADATA_KEY} must map strings to strings", path)
    entries = {name: _entry(path, name, info, data_start) for name, info in header.items()}
    _check_layout(path, entries, data_start, file_size)
    return ShardHeader(path, file_size, entries, metadata)


def _check_layout(path: str, entries: dict[str, TensorEntry], data_start: int, file_size: int) -> None:
    """Byte ranges must tile the data section exactly: no overlap, no gap, nothing past the end."""
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            raise CorruptCheckpointError(
                f"{path}: tensor {describe(entry.name)} overlaps the tensor before it (bytes {entry.begin - data_start}..)", path
            )
        if entry.begin > position:
            raise CorruptCheckpointError(
                f"{path}: {entry.begin - position} unaccounted bytes before tensor {describe(entry.name)}", path
            )
        position = entry.end
    if position > file_size:
        raise CorruptCheckpointError(
            f"{path} has {file_size} bytes, but its header places data up to byte {position} (truncated)", path
        )
    if position < file_size:
        raise CorruptCheckpointError(
            f"{path} has {file_size - position} trailing bytes its header does not account for", path
        )


# ------------------------------------------------------------------------------------- writing
def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already a contiguous CPU tensor."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy's stubs declare ndarray's buffer protocol (__buffer__) for Python >= 3.12 only
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


def build_header(named: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {METADATA_KEY: dict(metadata or {"format": "pt"})}
    offset = 0
    for name, tensor in named:
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(HEADER_LENGTH_BYTES + len(raw)) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data[:_MAX_WRITE])
        data = data[n:]


def write_shard(
    path: str, named: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None, progress=None
) -> tuple[int, FileDigest]:
    """Write one safetensors file; returns (size, digest) of what was written, computed from the
    same memory on the way out (on a helper thread) so the commit need not read the file back.
    The caller's commit protocol fsyncs it."""
    head = memoryview(build_header(named, metadata))
    crc = DigestOnTheSide()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        crc.add(head)
        _write_all(fd, head)
        total = len(head)
        for _, tensor in named:
            data = tensor_bytes(tensor)
            crc.add(data)
            _write_all(fd, data)
            total += len(data)
            if progress is not None:
                progress(len(data))
    finally:
        os.close(fd)
        checksum = crc.result()
    return total, checksum


# ------------------------------------------------------------------------------------- reading
def _read_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(f"{path} ended early while reading tensor bytes (truncated)", path)
        done += n


def _writable_bytes(t: torch.Tensor) -> memoryview | None:
    """A writable byte view of ``t``'s memory, or None when it cannot be filled in place."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    # numpy's stubs declare ndarray's buffer protocol (__buffer__) for Python >= 3.12 only
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def read_region(fd: int, entry: TensorEntry, path: str, offsets: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A new tensor holding ``entry`` (or the box ``offsets``/``shape`` of it), read from ``fd``.

    A box that only narrows dim 0 (FSDP's row sharding) is one contiguous read; other boxes read
    the whole tensor and slice it."""
    full = entry.shape
    offsets = offsets or (0,) * len(full)
    shape = shape or full
    rows_only = len(full) > 0 and tuple(shape[1:]) == tuple(full[1:]) and not any(offsets[1:])
    if tuple(shape) == tuple(full) or rows_only:
        row_bytes = (math.prod(full[1:]) if full else 1) * entry.dtype.itemsize
        start = entry.begin + (offsets[0] * row_bytes if full else 0)
        out = torch.empty(shape, dtype=entry.dtype)
        view = _writable_bytes(out)
        if view is not None:
            _read_exact(fd, view, start, path)
        return out
    whole = read_region(fd, entry, path)
    return whole[tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))].clone()


def read_into(fd: int, entry: TensorEntry, target: torch.Tensor, path: str, offsets: tuple[int, ...] | None = None) -> None:
    """Fill ``target`` (a plain CPU/GPU tensor: the whole entry, or its box at ``offsets``).

    Same dtype, contiguous, CPU and the whole entry: bytes go straight into the target's memory.
    Anything else goes through a temporary and ``copy_`` (which also casts dtypes)."""
    whole = offsets is None or (not any(offsets) and tuple(target.shape) == entry.shape)
    if whole and target.dtype == entry.dtype and tuple(target.shape) == entry.shape:
        view = _writable_bytes(target)
        if view is not None:
            _read_exact(fd, view, entry.begin, path)
            return
        if target.numel() == 0:
            return
    target.copy_(read_region(fd, entry, path, offsets, tuple(target.shape)))
