"""Hostile checkpoint content, made from a real step: pickles that run code, paths that leave
the step, symlinks out, safetensors headers and DCP metadata that lie about sizes.

The edits start from files the real backends wrote, so only the hostile part differs from a
checkpoint the loader would accept.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import resource
import struct
from collections.abc import Callable, Iterator
from typing import Any


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the marker file existing afterwards is
    proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------ DCP .metadata
def read_own_metadata(path: str) -> Any:
    """Unpickle a ``.metadata`` this test run just wrote (trusted: it is ours, before tampering)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def write_metadata(path: str, metadata: Any) -> None:
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def edit_metadata(edit: Callable[[Any], None]) -> Callable[[str], None]:
    def damage(path: str) -> None:
        md = read_own_metadata(path)
        edit(md)
        write_metadata(path, md)

    return damage


def pickle_gadgets(marker: str) -> dict[str, Callable[[str], None]]:
    """Ways to smuggle code into a ``.metadata`` file."""

    def whole_file(path: str) -> None:
        with open(path, "wb") as f:
            pickle.dump(RunsCode(marker), f)

    def nested_in_real_metadata(path: str) -> None:
        md = read_own_metadata(path)
        md.planner_data = {"innocent": RunsCode(marker)}
        write_metadata(path, md)

    def inside_storage_info(path: str) -> None:
        md = read_own_metadata(path)
        key = next(iter(md.storage_data))
        md.storage_data[key] = RunsCode(marker)
        write_metadata(path, md)

    def eval_global(path: str) -> None:
        # protocol 0 text: GLOBAL builtins.eval, then call it on a string
        code = f"__import__('os').close(__import__('os').open({marker!r}, 65))"
        payload = f"cbuiltins\neval\n(V{code}\ntR.".encode()
        with open(path, "wb") as f:
            f.write(payload)

    return {
        "whole_file": whole_file,
        "nested_in_real_metadata": nested_in_real_metadata,
        "inside_storage_info": inside_storage_info,
        "eval_global": eval_global,
    }


def redirect_storage(to: str) -> Callable[[str], None]:
    """Point every data item of a ``.metadata`` at ``to`` (a path outside the step)."""

    def edit(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = to

    return edit_metadata(edit)


def first_bytes_item(md: Any):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            return index, info
    return None, None


def first_tensor_item(md: Any):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(index.fqn), TensorStorageMetadata):
            return index, info
    return None, None


HUGE = 1 << 44  # 16 TiB: an allocation of this size is the failure being tested for


def dcp_huge_sizes() -> dict[str, tuple[Callable[[Any], bool], Callable[[Any], None]]]:
    """(applies to this metadata?, edit) pairs that make a ``.metadata`` declare sizes far
    beyond the files on disk."""

    def has_bytes(md) -> bool:
        return first_bytes_item(md)[1] is not None

    def has_tensor(md) -> bool:
        return first_tensor_item(md)[1] is not None

    def bytes_item_length(md):
        first_bytes_item(md)[1].length = HUGE

    def tensor_item_length(md):
        first_tensor_item(md)[1].length = HUGE

    def tensor_item_offset(md):
        first_tensor_item(md)[1].offset = HUGE

    def tensor_shape(md):
        index, _ = first_tensor_item(md)
        meta = md.state_dict_metadata[index.fqn]
        meta.size = type(meta.size)([HUGE] + list(meta.size[1:]))
        for chunk in meta.chunks:
            chunk.sizes = type(chunk.sizes)([HUGE] + list(chunk.sizes[1:]))

    return {
        "bytes_item_length": (has_bytes, bytes_item_length),
        "tensor_item_length": (has_tensor, tensor_item_length),
        "tensor_item_offset": (has_tensor, tensor_item_offset),
        "tensor_shape": (has_tensor, tensor_shape),
    }


# ------------------------------------------------------------------------------ safetensors
def read_safetensors(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_safetensors(path: str, header: dict | bytes, data: bytes, declared: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def safetensors_attacks() -> dict[str, Callable[[str], None]]:
    """Each rewrites a real shard so its header lies in one way."""

    def rewrite(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes, int | None]]):
        def damage(path: str) -> None:
            header, data = read_safetensors(path)
            write_safetensors(path, *edit(header, data))

        return damage

    def overlapping(h, d):
        a, b = _tensors(h)[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
        h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
        return h, d, None

    def past_the_end(h, d):
        last = _tensors(h)[-1]
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin, end + 4096]
        h[last]["shape"] = [(end + 4096 - begin) // 4] if h[last]["dtype"] == "F32" else h[last]["shape"]
        return h, d, None

    def begin_after_end(h, d):
        t = _tensors(h)[0]
        begin, end = h[t]["data_offsets"]
        h[t]["data_offsets"] = [end, begin]
        return h, d, None

    def size_disagrees_with_shape(h, d):
        t = _tensors(h)[0]
        h[t]["shape"] = [x * 2 for x in h[t]["shape"]] or [2]
        return h, d, None

    def huge_shape(h, d):
        t = _tensors(h)[0]
        h[t]["shape"] = [HUGE, HUGE]
        return h, d, None

    def huge_offsets(h, d):
        t = _tensors(h)[-1]
        h[t]["shape"] = [HUGE // 4]
        h[t]["data_offsets"] = [h[t]["data_offsets"][0], h[t]["data_offsets"][0] + HUGE]
        return h, d, None

    def huge_declared_header(h, d):
        return json.dumps(h).encode(), d, (1 << 63) - 1

    def header_longer_than_file(h, d):
        raw = json.dumps(h).encode()
        return raw, d, len(raw) + len(d) + 1

    def not_json(h, d):
        return b"\xff\xfe not json" + b" " * 6, d, None

    def duplicate_key(h, d):
        t = _tensors(h)[0]
        raw = json.dumps(h).encode()
        dup = json.dumps({t: h[t]})[1:-1].encode()
        return raw[:-1] + b"," + dup + b"}", d, None

    def unknown_dtype(h, d):
        h[_tensors(h)[0]]["dtype"] = "F128"
        return h, d, None

    def negative_offset(h, d):
        t = _tensors(h)[0]
        begin, end = h[t]["data_offsets"]
        h[t]["data_offsets"] = [begin - 8, end - 8]
        return h, d, None

    edits = {
        "overlapping": overlapping,
        "past_the_end": past_the_end,
        "begin_after_end": begin_after_end,
        "size_disagrees_with_shape": size_disagrees_with_shape,
        "huge_shape": huge_shape,
        "huge_offsets": huge_offsets,
        "huge_declared_header": huge_declared_header,
        "header_longer_than_file": header_longer_than_file,
        "not_json": not_json,
        "duplicate_key": duplicate_key,
        "unknown_dtype": unknown_dtype,
        "negative_offset": negative_offset,
    }
    return {name: rewrite(edit) for name, edit in edits.items()}


# ------------------------------------------------------------------------------ memory bound
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_headroom(nbytes: int = 2 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size + ``nbytes`` while a hostile file
    is loaded: a loader that believes a declared 16 TiB size fails with MemoryError (which the
    test then reports) instead of quietly reserving it under overcommit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + nbytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def raised_memory_error(error: BaseException) -> bool:
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MemoryError) or "MemoryError" in str(e) or "DefaultCPUAllocator" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
    return False
