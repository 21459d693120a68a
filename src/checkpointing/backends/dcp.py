"""``backend = "dcp"``: torch.distributed.checkpoint on disk, in TorchTitan's layout.

``{dump_folder}/{checkpoint.folder}/step-N/{__R_0.distcp, .metadata}`` plus our
``manifest.json``: TorchTitan's CheckpointManager loads these steps, and we load TorchTitan's
(without a manifest they cannot be checksum-verified, but are still read safely). DTensor/FSDP
shards saved from N ranks load on M ranks through DCP's own resharding.

Reading (:mod:`.dcp_reader`) never unpickles untrusted bytes: ``.metadata`` goes through a
restricted unpickler and non-tensor values through ``torch.load(weights_only=True)``; every file
path and byte range the metadata names must stay inside the step directory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .._compat import flatten_state_dict
from ..backend import BackendContext, BackendSpec, Capabilities, StepState
from ..commit import StepDirectory, StoredSteps, commit_directory, staged_directory, step_of
from ..distributed import world_size
from ..dtypes import dtype_name
from ..errors import ConfigError, CorruptCheckpointError, StateMismatchError
from ..staging import apply_state, stage
from ..untrusted import exists_here
from .dcp_reader import DCP_METADATA, SafeFileSystemReader, SafeLoadPlanner, dcp_failures_as, load_checked, read_metadata
from .dcp_writer import FileRecorder, RecordingFileSystemWriter

__all__ = [
    "DCPBackend", "DCPOptions", "SPEC", "DCP_METADATA", "SafeFileSystemReader", "SafeLoadPlanner", "read_metadata",
    "check_fits", "write_dcp_dir",
]

MAX_THREADS = 64


@dataclass
class DCPOptions:
    """``[checkpoint.dcp]``: torch.distributed.checkpoint on disk."""

    thread_count: int = 1
    """Writer threads per rank (FileSystemWriter ``thread_count``); each writes its own file."""
    single_file_per_rank: bool = True
    """One ``__R_0.distcp`` file per rank (per writer thread), as TorchTitan writes them."""

    def validate(self, prefix: str) -> None:
        if not 1 <= self.thread_count <= MAX_THREADS:
            raise ConfigError(
                f"{prefix}.thread_count = {self.thread_count}; allowed: 1 to {MAX_THREADS} "
                "(each thread writes its own file; more than the disk's queue depth only adds files)"
            )


def check_fits(metadata, flat: dict[str, Any], source: str) -> None:
    """Compare the checkpoint's tensors with the receiver's *before* reading any data, so a
    mismatch leaves the receiver untouched and names every offending key."""
    flattened = flatten_state_dict(flat)
    stored = metadata.state_dict_metadata
    missing = sorted(k for k in flattened if k not in stored)
    problems, bad = [], []
    for key, target in flattened.items():
        md = stored.get(key)
        if md is None or not isinstance(target, torch.Tensor):
            continue
        if not isinstance(md, TensorStorageMetadata):
            bad.append(key)
            problems.append(f"{key}: stored as a non-tensor value, receiver has a tensor")
            continue
        if tuple(md.size) != tuple(target.shape):
            bad.append(key)
            problems.append(f"{key}: shape {tuple(md.size)} stored, receiver has {tuple(target.shape)}")
    if missing or problems:
        lines = []
        if missing:
            lines.append(f"missing from the checkpoint: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        lines += problems[:20]
        raise StateMismatchError(f"{source} does not fit the receiving state: " + "; ".join(lines), missing + bad)


def not_a_step_dir_message(path: str) -> str:
    """Point at the step directories when given the folder that holds them (a common slip)."""
    steps = StepDirectory(path, "dcp", foreign_marker=DCP_METADATA).steps()
    hint = f"; it holds committed steps {steps}: did you mean {os.path.join(path, f'step-{steps[-1]}')!r}?" if steps else ""
    return (
        f"checkpoint.initial_load_path = {path!r} is not a DCP checkpoint step directory (no {DCP_METADATA}); "
        f"name a step-N directory{hint}"
    )


def write_dcp_dir(
    path: str, flat: dict[str, Any], options: DCPOptions, process_group: Any = None, record: FileRecorder | None = None
) -> None:
    """Write ``flat`` as DCP files into ``path`` (a staging directory the caller commits): a
    ``dcp`` step, or the training-state sidecar of an ``hf`` step. ``record`` receives each data
    file's digest, computed while it was written (:mod:`.dcp_writer`)."""
    writer = RecordingFileSystemWriter(
        path,
        single_file_per_rank=options.single_file_per_rank,
        thread_count=options.thread_count,
        # One process: the commit fsyncs every file itself, overlapped with the checksums.
        # Several ranks: each flushes its own files (on a network filesystem another
        # process's fsync does not flush this client's cache).
        sync_files=world_size(process_group) > 1,
        record=record,
    )
    with dcp_failures_as(f"writing DCP checkpoint {path}"):
        dcp.save(flat, storage_writer=writer, process_group=process_group)


def describe_dcp_dir(path: str) -> list[dict[str, Any]]:
    """One row per stored entry (name, dtype, shape, bytes) from the safely parsed metadata."""
    rows = []
    for key, md in sorted(read_metadata(path).state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for d in md.size:
                numel *= d
            dtype = md.properties.dtype
            rows.append({"name": key, "dtype": dtype_name(dtype), "shape": list(md.size),
                         "bytes": numel * dtype.itemsize})
        else:
            rows.append({"name": key, "dtype": "object", "shape": None, "bytes": 0})
    return rows


def check_dcp_structure(path: str) -> int:
    """Every byte range the (safely parsed) metadata names lies inside an existing file;
    returns the number of data files."""
    from ..safepath import safe_join

    sizes: dict[str, int] = {}
    for info in (read_metadata(path).storage_data or {}).values():
        rel = os.fspath(getattr(info, "relative_path", ""))
        file = safe_join(path, rel)
        if rel not in sizes:
            if not os.path.isfile(file):
                raise CorruptCheckpointError(f"DCP data file missing: {file}", file)
            sizes[rel] = os.path.getsize(file)
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if end > sizes[rel]:
            raise CorruptCheckpointError(f"{file} has {sizes[rel]} bytes, the metadata reads up to byte {end} (truncated)", file)
    return len(sizes)


class DCPBackend(StoredSteps):
    capabilities = Capabilities(persistent=True, non_tensor_state=True, cross_process=True)

    def __init__(self, ctx: BackendContext):
        self.ctx = ctx
        self.options: DCPOptions = ctx.options or DCPOptions()
        self.verify_mode = ctx.verify
        self.store = StepDirectory(ctx.folder, ctx.name or "dcp", foreign_marker=DCP_METADATA, process_group=ctx.process_group)

    # -- writing
    def write(self, step: int, state: StepState) -> None:
        with self.store.stage(step) as staging:
            record = functools.partial(self.store.record_checksum, staging)
            write_dcp_dir(staging, state.flat(), self.options, self.ctx.process_group, record=record)

    def write_path(self, path: str, state: StepState, progress: Callable[[int], None] | None = None) -> None:
        """A new DCP step directory outside the folder (``ckpt convert --to dcp``), committed
        like a step: staged, sealed with a manifest, one rename."""
        flat = state.flat()
        with staged_directory(path) as staging:
            write_dcp_dir(staging, flat, self.options, self.ctx.process_group)
            commit_directory(staging, path, step_of(path), self.ctx.name or "dcp")
        if progress is not None:
            progress(sum(v.numel() * v.element_size() for v in flat.values() if isinstance(v, torch.Tensor)))

    # -- inspecting (ckpt)
    def recognizes(self, path: str) -> bool:
        return exists_here(os.path.join(path, DCP_METADATA))  # of any kind: a FIFO is refused when read

    def describe(self, path: str) -> dict[str, Any]:
        return {"tensors": describe_dcp_dir(path)}

    def check_structure(self, path: str) -> str:
        return f"{check_dcp_structure(path)} data file(s) cover every stored entry"

    # -- reading
    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def read_path(self, path: str, state: StepState) -> None:
        """Read a DCP step directory outside our folder (``initial_load_path``)."""
        if not exists_here(os.path.join(path, DCP_METADATA)):
            raise ConfigError(not_a_step_dir_message(path))
        store = StepDirectory(os.path.dirname(os.path.abspath(path)), "dcp", foreign_marker=DCP_METADATA)
        store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def _read_dir(self, path: str, state: StepState) -> None:
        """Everything is read into a staged copy and checked first; the receiver is written
        only once the whole step has been read (:mod:`checkpointing.staging`)."""
        flat = state.flat()
        reader = SafeFileSystemReader(path)
        check_fits(reader.read_metadata(), flat, path)
        staged = flat if state.model_is_scratch and not state.extras else stage(flat)
        load_checked(staged, reader, path, self.ctx.process_group)
        apply_state(state, {k: staged[k] for k in state.model}, {k: staged[k] for k in state.extras})


SPEC = BackendSpec(
    name="dcp",
    factory=DCPBackend,
    capabilities=DCPBackend.capabilities,
    options=DCPOptions,
    summary="torch.distributed.checkpoint step directories, TorchTitan's layout; resharding N -> M ranks",
)
