"""Reading DCP step directories: safely, and with one copy of each byte.

Safely: ``.metadata`` goes through :mod:`.safe_metadata` (no code runs, every byte range stays in
its file), non-tensor values through ``torch.load(weights_only=True)``, and they are read before
any tensor so a refused value leaves the receiver untouched.

With one copy: DCP's own reader ``torch.load``s each tensor into a fresh buffer and then copies
it into the receiver, touching every byte three times (allocate, read, copy). A tensor item is a
small ``torch.save`` zip whose data record is stored uncompressed, so this reader parses only the
item's pickle (on the meta device, no data read), finds the record's offset, and reads the bytes
straight into the receiving tensor. Anything unusual (another dtype, a non-contiguous target,
a GPU target, big-endian data) takes DCP's general path instead.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from .._compat import create_file_view, narrow_tensor_by_index, set_element
from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ..safepath import safe_join
from ..untrusted import describe, open_binary, read_regular
from .safe_metadata import check_storage_layout, safe_load_metadata

DCP_METADATA = ".metadata"
MAX_METADATA_BYTES = 512 << 20
"""DCP metadata grows with tensors x ranks (one chunk entry each, ~150 bytes): 512 MiB holds a
few million chunks, beyond the largest jobs, and refuses a sparse or padded file unread."""
ZIP_MAGIC = b"PK\x03\x04"
"""Every DCP item is a ``torch.save`` zip. torch's legacy (pre-zip) format allocates whatever
element count a storage declares before reading it: refused, never parsed."""


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that parses metadata without executing code, refuses metadata whose
    file names leave the checkpoint directory or whose byte ranges leave their files, and reads
    tensor bytes straight into the receiver.

    The checked metadata is kept, so the fit check before a load and ``dcp.load`` itself parse
    and stat the checkpoint once."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._checked: dict[str, Any] = {}
        self._metadata: Any = None
        self.direct_reads = 0
        """Tensor items read straight into the receiver (the rest took DCP's general path)."""

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:  # another directory: nothing checked so far applies to it
            self._checked, self._metadata = {}, None

    # -- metadata
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        if name not in self._checked:
            self._checked[name] = self._read_checked(name)
        metadata = self._checked[name]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        self._metadata = metadata
        return metadata

    def _read_checked(self, name: str):
        root = os.fspath(self.path)
        path = safe_join(root, name)
        try:
            data = read_regular(path, MAX_METADATA_BYTES, "DCP metadata")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"DCP metadata missing: {path}", path) from None
        metadata = safe_load_metadata(data, path)
        check_storage_layout(metadata, root)
        return metadata

    # -- data
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Non-tensor items first: one that must be refused fails before any tensor of the
        receiver is overwritten. Tensors then follow in file order (sequential reads)."""

        def order(item: ReadItem):
            info = self.storage_data[item.storage_index]
            return (item.type != LoadItemType.BYTE_IO, info.relative_path, info.offset)

        items = sorted(plan.items, key=order)
        for group in ([i for i in items if i.type == LoadItemType.BYTE_IO], [i for i in items if i.type != LoadItemType.BYTE_IO]):
            for relative_path, file_items in itertools.groupby(group, key=lambda i: self.storage_data[i.storage_index].relative_path):
                path = safe_join(os.fspath(self.path), relative_path)
                try:
                    stream = open_binary(path, "DCP data file")
                except FileNotFoundError:
                    raise CorruptCheckpointError(f"checkpoint file missing: {path}", path) from None
                with stream:
                    for item in file_items:
                        self._read_item(stream, item, planner, path)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, stream, item: ReadItem, planner: LoadPlanner, path: str) -> None:
        info = self.storage_data[item.storage_index]
        stream.seek(info.offset)
        if info.length < len(ZIP_MAGIC) or _read_all(stream, len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise CorruptCheckpointError(
                f"{path}: item {describe(item.storage_index.fqn)} at byte {info.offset} is not a torch.save zip "
                "(legacy or damaged format; refused unparsed)",
                path,
            )
        if item.type == LoadItemType.BYTE_IO:
            view = create_file_view(stream, info.offset, info.length)
            planner.load_bytes(item, io.BytesIO(view.read(-1)))
        elif not self._read_tensor_direct(stream, info, item, planner, path):
            self._read_tensor_general(stream, info, item, planner)

    def _read_tensor_general(self, stream, info, item: ReadItem, planner: LoadPlanner) -> None:
        """DCP's own way: load the item into a new tensor, narrow it, copy it into the target."""
        view = create_file_view(stream, info.offset, info.length)
        tensor = torch.load(view, map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpointError(
                f"{describe(item.storage_index.fqn)}: stored chunk has size {tuple(tensor.size())}, the receiver "
                f"expects {tuple(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    def _read_tensor_direct(self, stream, info, item: ReadItem, planner: LoadPlanner, path: str) -> bool:
        """Read the item's bytes straight into the target; False when this item needs the
        general path (nothing has been written to the target then)."""
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu" or not target.is_contiguous() or sys.byteorder != "little":
            return False
        view = create_file_view(stream, info.offset, info.length)
        archive = torch._C.PyTorchFileReader(view)  # the zip directory only: no data is read
        if [r for r in archive.get_all_records() if r.startswith("data/")] != ["data/0"]:
            return False
        # torch's _C stub omits PyTorchFileReader.has_record and get_record_offset (both exist in torch 2.13)
        if archive.has_record("byteorder") and bytes(archive.get_record("byteorder")) != b"little":  # type: ignore[attr-defined]
            return False
        stored = self._stored_tensor(view, archive, item, target.dtype)
        if stored is None or stored.dtype != target.dtype:
            return False
        size_of = getattr(archive, "get_record_size", None)  # torch >= 2.12
        if size_of is None:
            return False
        record_offset, record_size = archive.get_record_offset("data/0"), size_of("data/0")  # type: ignore[attr-defined]
        if record_size != stored.numel() * stored.element_size() or record_offset + record_size > info.length:
            return False
        region = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
        if region.size() != target.size() or not region.is_contiguous():
            return False
        itemsize = region.element_size()
        if region.numel():
            stream.seek(info.offset + record_offset + region.storage_offset() * itemsize)
            _read_exactly(stream, target.reshape(-1).view(torch.uint8).numpy(), path, item.storage_index.fqn)
        planner.commit_tensor(item, target)
        self.direct_reads += 1
        return True

    def _stored_tensor(self, view, archive, item: ReadItem, dtype: torch.dtype) -> torch.Tensor | None:
        """The stored tensor's description, as a meta tensor, when it is a plain contiguous tensor
        over all of storage ``0``; None otherwise.

        Fast: its pickle is byte for byte the one torch.save writes for a plain tensor of the
        chunk's shape. Otherwise the pickle is read with ``weights_only=True`` on the meta device."""
        shape = self._chunk_shape(item)
        if shape is not None and bytes(archive.get_record("data.pkl")) == _plain_tensor_pickle(dtype, shape):
            return torch.empty(shape, dtype=dtype, device="meta")
        view.seek(0)
        stored = torch.load(view, map_location="meta", weights_only=True)
        if type(stored) is not torch.Tensor or stored.storage_offset() != 0 or not stored.is_contiguous():
            return None
        if stored.untyped_storage().nbytes() != stored.numel() * stored.element_size():
            return None
        return stored

    def _chunk_shape(self, item: ReadItem) -> tuple[int, ...] | None:
        entry = self._metadata.state_dict_metadata.get(item.storage_index.fqn) if self._metadata else None
        for chunk in getattr(entry, "chunks", ()):
            if tuple(chunk.offsets) == tuple(item.storage_index.offset or ()):
                return tuple(chunk.sizes)
        return None


@functools.lru_cache(maxsize=4096)
def _plain_tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """``data.pkl`` of ``torch.save`` of a fresh contiguous tensor (data skipped, memory untouched)."""
    buffer = io.BytesIO()
    with torch.serialization.skip_data():
        torch.save(torch.empty(shape, dtype=dtype), buffer)
    return bytes(torch._C.PyTorchFileReader(io.BytesIO(buffer.getvalue())).get_record("data.pkl"))


def _read_all(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_exactly(stream, buffer, path: str, fqn: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = stream.readinto(view[done:])
        if not n:
            raise CorruptCheckpointError(f"{path}: {describe(fqn)} is cut short ({done} of {len(view)} bytes)", path)
        done += n


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (ints, strings, lists in train/lr state) come back through
    ``torch.load(weights_only=True)``, which cannot construct arbitrary objects; DCP's own
    planner uses ``weights_only=False`` here."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"non-tensor value {describe(fqn)} needs more than weights_only=True allows (it could run code); "
                f"refusing it: {str(e)[:300]}"
            ) from None
        except (Exception, RecursionError) as e:
            raise CorruptCheckpointError(f"non-tensor value {describe(fqn)} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def first_failure(error: BaseException) -> BaseException:
    """DCP wraps per-rank failures in CheckpointException, a *BaseException* that ``except
    Exception`` (and every caller's error handling) would miss: take the first rank's cause."""
    failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return error


@contextlib.contextmanager
def dcp_failures_as(what: str) -> Iterator[None]:
    """Around a DCP save: its ``CheckpointException`` (a BaseException, missed by every
    ``except Exception``) becomes a CheckpointError saying ``what`` failed, caused by the first
    rank's failure."""
    try:
        yield
    except CheckpointException as e:
        first = first_failure(e)
        raise CheckpointError(f"{what} failed: {first!r}") from first


def load_checked(state_dict: dict[str, Any], reader: SafeFileSystemReader, source: str, process_group: Any = None) -> None:
    """``dcp.load`` through the safe reader and planner, with every failure a CheckpointError:
    ours pass through, DCP's ``CheckpointException`` (a BaseException) is unwrapped, anything
    else a crafted item provokes inside DCP or torch becomes a CorruptCheckpointError naming
    ``source``. Callers hand in a *staged* state dict (:mod:`checkpointing.staging`): this
    writes into it item by item."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException, RecursionError) as e:
        first = first_failure(e)
        if isinstance(first, CheckpointError):
            raise first from None
        text = str(first)[:300] if not isinstance(first, RecursionError) else "nested too deeply"
        raise CorruptCheckpointError(f"reading DCP checkpoint {source} failed: {type(first).__name__}: {text}", source) from None


def read_metadata(step_dir: str):
    """A step directory's DCP metadata, checked (no code runs, every byte range in its file)."""
    return SafeFileSystemReader(step_dir).read_metadata()
