"""Writing DCP step files: TorchTitan's format, without torch.save's per-record CRC32, each
file's manifest digest computed as it is written.

DCP's ``FileSystemWriter`` stores every tensor item as a small ``torch.save`` zip, and torch.save
CRC32s every record with miniz's table-driven CRC (about 0.4 s per GB on one core): a second
checksum of bytes our manifest already covers. torch.save takes that choice from a
process-wide setting, and flipping it while our save runs would also change every other
``torch.save`` in the process (another thread's checkpoint, a user's file). So this writer does
the file writing itself, as ``FileSystemWriter.write_data`` does (same files, same item order,
same ``WriteResult`` records), with a zip writer of its own per item
(:func:`checkpointing._compat.save_without_record_crc`); nothing process-wide changes. The
files are what TorchTitan's stock DCP reader and ``torch.load`` read.

Each file's bytes are also fed to a digest on a helper thread as they are written
(:class:`~checkpointing.checksum.DigestOnTheSide`), so the commit does not read them back and
the hash overlaps the next item's serialization and write.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .. import _compat
from ..checksum import DigestOnTheSide, FileDigest

LARGE_WRITE = 1 << 16
"""Writes at least this large are hashed in place; smaller ones are copied and batched."""

FileRecorder = Callable[[str, int, FileDigest], None]
"""``(file name relative to the step, size, digest)`` of each data file written."""


class _DigestingStream(io.RawIOBase):
    """A write-only stream that forwards to ``raw`` and digests what it forwards, on a helper
    thread: a large write (a tensor's data record, written by the zip writer straight from the
    tensor's memory) is hashed in place while :attr:`owner` (that tensor) is kept alive; small
    writes (zip headers and pickles, which may sit in the writer's temporary buffers) are
    copied and handed over in batches, so a few hundred tiny writes per item cost one task."""

    def __init__(self, raw: Any, digest: DigestOnTheSide):
        super().__init__()
        self.raw = raw
        self.digest = digest
        self.position = raw.tell()
        self.owner: Any = None
        self._small = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not len(view):
            return 0
        done = self.raw.write(view) or 0
        while done < len(view):  # a raw file may write less: finish it here
            done += self.raw.write(view[done:]) or 0
        if len(view) >= LARGE_WRITE:
            self.hand_over_small()
            self.digest.add(view, keep=self.owner)
        else:
            self._small += view
            if len(self._small) >= LARGE_WRITE:
                self.hand_over_small()
        self.position += len(view)
        return len(view)

    def hand_over_small(self) -> None:
        if self._small:
            self.digest.add(bytes(self._small))
            self._small.clear()

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.raw.flush()


class RecordingFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` whose tensor items carry no zip record CRC32 and whose data files
    are digested while written (``record`` receives each one)."""

    def __init__(self, path: str | os.PathLike, *, record: FileRecorder | None = None, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._record = record

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        parts = _compat.dcp_storage_writer_parts()
        prefix = plan.storage_data.prefix
        if self.single_file_per_rank:
            buckets = parts.split_by_size_and_type(self.thread_count, plan.items)
        else:
            buckets = [[item] for item in plan.items]
        files = [(f"{prefix}{i}{parts.suffix}", bucket) for i, bucket in enumerate(buckets)]
        if self.thread_count > 1 and len(files) > 1:
            with ThreadPoolExecutor(max_workers=self.thread_count, thread_name_prefix="dcp-write") as pool:
                written = list(pool.map(lambda f: self._write_file(f[0], f[1], planner, parts), files))
        else:
            written = [self._write_file(name, items, planner, parts) for name, items in files]
        future: Future[list[WriteResult]] = Future()
        future.set_result([result for results in written for result in results])
        return future

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner, parts: Any) -> list[WriteResult]:
        """One data file: byte items first, then tensors, as DCP's own writer orders them."""
        path = self.fs.concat_path(self.path, name)
        digest = DigestOnTheSide()
        results = []
        try:
            with self.fs.create_stream(path, "wb") as raw:
                stream = _DigestingStream(raw, digest)
                for item in [i for i in items if i.type == WriteItemType.BYTE_IO]:
                    results.append(self._write_item(stream, planner.resolve_data(item), item, name, parts))
                for item in [i for i in items if i.type != WriteItemType.BYTE_IO]:
                    tensor = planner.resolve_data(item)
                    assert isinstance(tensor, torch.Tensor)  # DCP resolves every non-BYTE_IO item to a tensor
                    results.append(self._write_item(stream, _cpu_tensor(tensor), item, name, parts))
                raw.flush()
                stream.hand_over_small()
                if self.sync_files:
                    os.fsync(raw.fileno())
        finally:
            result = digest.result()
        if self._record is not None:
            self._record(name, stream.position, result)
        return results

    def _write_item(self, stream: _DigestingStream, data: Any, item: WriteItem, name: str, parts: Any) -> WriteResult:
        offset = stream.tell()
        target, descriptors = self.transforms.transform_save_stream(item, stream)
        stream.owner = data  # what the item's large writes point into: alive until they are hashed
        try:
            if item.type == WriteItemType.BYTE_IO:
                target.write(data.getbuffer())
            else:
                _compat.save_without_record_crc(data, target)
            target.close()
        finally:
            stream.owner = None
        length = stream.tell() - offset
        return WriteResult(
            index=item.index,
            size_in_bytes=length,
            storage_data=parts.StorageInfo(name, offset, length, transform_descriptors=descriptors or None),
        )


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What DCP's serial loader stores: detached, on the CPU, with storage of exactly its size."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().size() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor
