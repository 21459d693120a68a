"""``backend = "dcp"``: torch.distributed.checkpoint on disk, in TorchTitan's layout.

``{dump_folder}/{checkpoint.folder}/step-N/{__R_0.distcp, .metadata}`` plus our
``manifest.json``: TorchTitan's CheckpointManager loads these steps, and we load TorchTitan's
(without a manifest they cannot be checksum-verified, but are still read safely). DTensor/FSDP
shards saved from N ranks load on M ranks through DCP's own resharding.

Reading never unpickles untrusted bytes: ``.metadata`` goes through a restricted unpickler and
non-tensor values through ``torch.load(weights_only=True)``; every file path the metadata names
must stay inside the step directory.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from ..backend import BackendContext, Capabilities, StepState
from ..commit import StepDirectory
from ..errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from ..safepath import safe_join
from .safe_metadata import safe_load_metadata

DCP_METADATA = ".metadata"


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is parsed without executing code and whose file names
    are confined to the checkpoint directory."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        root = os.fspath(self.path)
        path = safe_join(root, DCP_METADATA)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CorruptCheckpointError(f"DCP metadata missing: {path}", path) from None
        metadata = safe_load_metadata(data, path)
        for info in (metadata.storage_data or {}).values():
            safe_join(root, os.fspath(getattr(info, "relative_path", "")))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (ints, strings, lists in train/lr state) come back through
    ``torch.load(weights_only=True)``, which cannot construct arbitrary objects."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CorruptCheckpointError(
                f"non-tensor value {read_item.dest_index.fqn!r} is not loadable with weights_only=True: {e}"
            ) from None
        value = io.BytesIO()
        torch.save(obj, value)
        value.seek(0)
        super().load_bytes(read_item, value)


def read_metadata(step_dir: str):
    return SafeFileSystemReader(step_dir).read_metadata()


def check_fits(metadata, flat: dict[str, Any], source: str) -> None:
    """Compare the checkpoint's tensors with the receiver's *before* reading any data, so a
    mismatch leaves the receiver untouched and names every offending key."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flattened, _ = flatten_state_dict(flat)
    stored = metadata.state_dict_metadata
    missing = sorted(k for k in flattened if k not in stored)
    problems = []
    for key, target in flattened.items():
        md = stored.get(key)
        if md is None or not isinstance(target, torch.Tensor):
            continue
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"{key}: stored as a non-tensor value, receiver has a tensor")
            continue
        if tuple(md.size) != tuple(target.shape):
            problems.append(f"{key}: shape {tuple(md.size)} stored, receiver has {tuple(target.shape)}")
    if missing or problems:
        lines = []
        if missing:
            lines.append(f"missing from the checkpoint: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        lines += problems[:20]
        raise StateMismatchError(f"{source} does not fit the receiving state: " + "; ".join(lines), missing + problems)


class DCPBackend:
    capabilities = Capabilities(persistent=True, non_tensor_state=True, cross_process=True)

    def __init__(self, ctx: BackendContext):
        self.ctx = ctx
        self.options = ctx.options("dcp")
        self.verify_mode = getattr(ctx.config, "verify", "checksum")
        self.store = StepDirectory(ctx.folder, "dcp", foreign_marker=DCP_METADATA, process_group=ctx.process_group)

    # -- writing
    def write(self, step: int, state: StepState) -> None:
        with self.store.stage(step) as staging:
            self.write_dir(staging, state.flat())

    def write_dir(self, path: str, flat: dict[str, Any]) -> None:
        writer = FileSystemWriter(
            path,
            single_file_per_rank=getattr(self.options, "single_file_per_rank", True),
            thread_count=getattr(self.options, "thread_count", 1),
            sync_files=True,
        )
        dcp.save(flat, storage_writer=writer, process_group=self.ctx.process_group)

    # -- reading
    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def read_path(self, path: str, state: StepState) -> None:
        store = StepDirectory(os.path.dirname(os.path.abspath(path)), "dcp", foreign_marker=DCP_METADATA)
        store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def _read_dir(self, path: str, state: StepState) -> None:
        flat = state.flat()
        reader = SafeFileSystemReader(path)
        check_fits(reader.read_metadata(), flat, path)
        try:
            dcp.load(flat, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), process_group=self.ctx.process_group)
        except CheckpointError:
            raise
        except Exception as e:
            # DCP wraps per-rank failures in CheckpointException; surface the first cause.
            cause = getattr(e, "failures", None)
            first = next(iter(cause.values())) if isinstance(cause, dict) and cause else e
            if isinstance(first, CheckpointError):
                raise first from e
            raise CorruptCheckpointError(f"reading DCP checkpoint {path} failed: {first!r}", path) from e
        for key in state.extras:
            state.extras[key] = flat[key]

    # -- listing, deleting
    def steps(self) -> list[int]:
        return self.store.steps()

    def delete(self, step: int) -> None:
        self.store.delete(step)

    def cleanup_partials(self) -> list[str]:
        return self.store.cleanup_partials()

    def close(self) -> None:
        pass
