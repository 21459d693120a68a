"""Offline DCP <-> Hugging Face conversion of model weights, through the TorchTitan adapter.

``ckpt convert`` uses this. The TorchTitan model is built on the *meta* device only to learn
its state-dict keys and shapes (no weights are allocated twice), so the checkpoint is checked
against ``--model``/``--flavor`` before any data is read. The output directory appears
atomically with a manifest, exactly like a committed step, so ``ckpt verify`` can check it.
Only model weights are converted: an HF directory has no place for optimizer state, and a DCP
directory made from HF weights is what TorchTitan's seed checkpoints are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Callable

import torch

from ...commit import MANIFEST, STEP_RE, Manifest, fsync_path, seal
from ...errors import ConfigError, UnsafeCheckpointError
from ...safepath import check_no_escaping_links
from .directory import HFDirectory
from .model_writer import tensor_nbytes, write_model
from .state_mapping import HFNaming, load_model, plan_load

@dataclasses.dataclass
class TitanModel:
    """What conversion needs to know about a TorchTitan model, without its weights."""

    name: str
    flavor: str
    args: Any
    adapter: Any
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def titan_model(name: str, flavor: str, overrides: list[str] | tuple[str, ...] = ()) -> TitanModel:
    """Resolve ``--model``/``--flavor``/``--model-arg KEY=VALUE`` into args, adapter and shapes."""
    from torchtitan.models import _supported_models
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(name)
    except (ValueError, ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"--model {name!r} is not a TorchTitan model ({e}); allowed: {', '.join(sorted(_supported_models))}") from None
    if flavor not in spec.model_args:
        raise ConfigError(f"--flavor {flavor!r} is not a flavor of {name}; allowed: {', '.join(spec.model_args)}")
    if spec.state_dict_adapter is None:
        raise ConfigError(f"TorchTitan model {name!r} has no state-dict adapter, so it has no Hugging Face form")
    args = spec.model_args[flavor]
    names = {f.name for f in dataclasses.fields(args)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(
                f"--model-arg {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(n for n in names if not n.startswith('_')))}"
            )
        changes[key] = _parse_value(value)
    try:
        args = dataclasses.replace(args, **changes)
        with torch.device("meta"):
            model = spec.model_cls(args)
    except Exception as e:  # bad override values surface here, e.g. heads not dividing dim
        raise ConfigError(f"cannot build {name}/{flavor} with {changes}: {e}") from None
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return TitanModel(name, flavor, args, spec.state_dict_adapter(args, None), shapes)


def check_source(path: str) -> None:
    """The same integrity a load gets: checksums when there is a manifest, no symlinks out."""
    if os.path.islink(path):
        raise UnsafeCheckpointError(f"{path} is a symlink; refusing to follow it", path)
    check_no_escaping_links(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        Manifest.read(path).verify(path, "checksum")


def step_of(path: str) -> int:
    m = STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else 0


def commit_directory(staging: str, final: str, step: int, backend: str) -> None:
    """The commit protocol for a directory that is not a ``step-N``: seal, then one rename."""
    seal(staging, step, backend)
    os.rename(staging, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


class _Staged:
    """A hidden sibling of ``dst`` that becomes ``dst`` on success and disappears on failure."""

    def __init__(self, dst: str):
        if os.path.lexists(dst):
            raise ConfigError(f"destination {dst} already exists; choose a new directory")
        parent = os.path.dirname(os.path.abspath(dst))
        if not os.path.isdir(parent):
            raise ConfigError(f"the parent directory of {dst} does not exist")
        self.dst = dst
        self.path = os.path.join(parent, f".inflight-convert-{uuid.uuid4().hex[:12]}")

    def __enter__(self) -> str:
        os.makedirs(self.path)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def dcp_to_hf(src: str, dst: str, model: TitanModel, max_shard_bytes: int, dtype: torch.dtype | None = None,
              progress_factory: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
    """A DCP step (ours or TorchTitan's) -> an HF model directory loadable by transformers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..dcp import SafeFileSystemReader, SafeLoadPlanner, check_fits

    check_source(src)
    metadata = SafeFileSystemReader(src).read_metadata()
    wanted = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in model.shapes.items()}
    check_fits(metadata, wanted, src)
    stored = metadata.state_dict_metadata
    state = {}
    for key, (shape, _) in model.shapes.items():
        md = stored[key]
        assert isinstance(md, TensorStorageMetadata)
        state[key] = torch.empty(shape, dtype=md.properties.dtype)
    dcp.load(state, storage_reader=SafeFileSystemReader(src), planner=SafeLoadPlanner())
    state = _cast(state, dtype)
    naming = HFNaming(model.adapter)
    total = sum(tensor_nbytes(v) for v in naming.to_hf(state).values())
    bar = progress_factory(total, "writing safetensors") if progress_factory else None
    with _Staged(dst) as staging:
        hf_state = write_model(staging, state, naming, max_shard_bytes, progress=bar.update if bar else None)
        commit_directory(staging, dst, step_of(src), "hf")
    if bar:
        bar.close()
    return {"tensors": len(hf_state), "bytes": total, "skipped": sorted(k for k in stored if k not in state)}


def hf_to_dcp(src: str, dst: str, model: TitanModel, dtype: torch.dtype | None = None,
              progress_factory: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
    """An HF model directory (ours or ``save_pretrained``'s) -> a DCP step in TorchTitan's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    check_source(src)
    directory = HFDirectory.open(src)
    floating = [e.dtype for _, e in directory.tensors.values() if e.dtype.is_floating_point]
    target_dtype = dtype or (floating[0] if floating else torch.float32)
    state = {k: torch.empty(shape, dtype=target_dtype if dt.is_floating_point else dt) for k, (shape, dt) in model.shapes.items()}
    naming = HFNaming(model.adapter)
    plan = plan_load(directory, state, naming)
    bar = progress_factory(directory.total_bytes(), "reading safetensors") if progress_factory else None
    load_model(directory, plan, state, progress=bar.update if bar else None)
    if bar:
        bar.close()
    with _Staged(dst) as staging:
        dcp.save(state, storage_writer=FileSystemWriter(staging, single_file_per_rank=True, sync_files=True))
        commit_directory(staging, dst, step_of(src), "dcp")
    return {"tensors": len(state), "bytes": sum(tensor_nbytes(v) for v in state.values()), "skipped": []}



