"""Writing model weights as Hugging Face shards + index + config.json into a (staging) directory.

Plain tensors are written by rank 0 straight from tensor memory (no gather: they are already
whole). DTensor/FSDP shards are never gathered on one rank: every rank writes its own pieces
through DCP's ``HuggingFaceStorageWriter`` into a scratch subdirectory, then
``consolidate_safetensors_files_on_every_rank`` assembles the final
``model-XXXXX-of-YYYYY.safetensors`` files, each output file by one rank, exactly the path
TorchTitan's own ``last_save_in_hf`` export takes. The scratch directory is removed before the
step is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from ..._compat import consolidate_hf_safetensors
from ...checksum import FileDigest
from ...distributed import is_dtensor, rank
from .directory import CONFIG, INDEX, index_json, plan_shards, shard_name
from .hf_config import hf_config
from .safetensors_io import write_shard
from .state_mapping import HFNaming

SCRATCH = ".dcp-shards"


def tensor_nbytes(value: torch.Tensor) -> int:
    return value.numel() * value.element_size()  # global size for a DTensor


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_model(
    root: str,
    model_state: dict[str, Any],
    naming: HFNaming,
    max_shard_bytes: int,
    process_group: Any = None,
    progress: Callable[[int], None] | None = None,
    record_checksum: Callable[[str, int, FileDigest], None] | None = None,
) -> dict[str, Any]:
    """Write ``model_state`` (TorchTitan keys) under HF names into ``root``; returns the HF dict.

    Every rank calls this; only rank 0 writes plain tensors, every rank writes its DTensor shards.
    ``record_checksum(relpath, size, digest)`` receives what each shard's writer computed."""
    hf_state = naming.to_hf(model_state)
    bad = sorted(k for k, v in hf_state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise TypeError(f"model state entries that are not tensors cannot be stored as safetensors: {bad[:20]}")
    shards = plan_shards([(k, tensor_nbytes(v)) for k, v in hf_state.items()], max_shard_bytes)
    if any(is_dtensor(v) for v in hf_state.values()):
        _write_distributed(root, hf_state, shards, process_group)
    elif rank(process_group) == 0:
        _write_local(root, hf_state, shards, progress, record_checksum)
    if rank(process_group) == 0:
        config = hf_config(naming.model_args, hf_state)
        if config is not None:
            _write_text(os.path.join(root, CONFIG), json.dumps(config, indent=2, sort_keys=True))
    return hf_state


def _write_local(root: str, hf_state: dict[str, Any], shards: list[list[str]], progress, record_checksum) -> None:
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        rel = shard_name(i, len(shards))
        size, digest = write_shard(os.path.join(root, rel), [(n, hf_state[n]) for n in names], progress=progress)
        if record_checksum is not None:
            record_checksum(rel, size, digest)
        weight_map.update(dict.fromkeys(names, rel))
    total = sum(tensor_nbytes(v) for v in hf_state.values())
    _write_text(os.path.join(root, INDEX), index_json(weight_map, total))


def _write_distributed(root: str, hf_state: dict[str, Any], shards: list[list[str]], process_group: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from ..dcp_reader import dcp_failures_as

    mapping = {name: i for i, names in enumerate(shards, start=1) for name in names}
    scratch = os.path.join(root, SCRATCH)
    writer = HuggingFaceStorageWriter(path=scratch, fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=False)
    with dcp_failures_as(f"writing Hugging Face shards into {scratch}"):
        dcp.save(hf_state, storage_writer=writer, process_group=process_group)
    consolidate_hf_safetensors(scratch, root, mapping, process_group)  # ends in a barrier
    if rank(process_group) == 0:
        shutil.rmtree(scratch)
        weight_map = {name: shard_name(i, len(shards)) for name, i in mapping.items()}
        total = sum(tensor_nbytes(v) for v in hf_state.values())
        _write_text(os.path.join(root, INDEX), index_json(weight_map, total))
