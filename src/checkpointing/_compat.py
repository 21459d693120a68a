"""Every private torch / TorchTitan API this library leans on, in one place.

Private names move between releases without notice. Keeping each behind one small function
here means an upgrade breaks in one file, and ``tests/checkpointing/test_compat.py`` checks each
of them against the installed versions (torch 2.13, TorchTitan 0.2.2) by behaviour, not just by
name. Imports happen inside the functions so that importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import _StorageInfo


def merge_job_configs(base: type, custom: type) -> type:
    """TorchTitan's JobConfig merged with a ``custom_config_module``'s, exactly as its
    ``ConfigManager`` merges them (``ConfigManager._merge_configs``, a private staticmethod)."""
    from torchtitan.config import ConfigManager

    return ConfigManager._merge_configs(base, custom)


def cpu_state_dict_like(state: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    """Empty CPU tensors shaped like ``state``'s (pinned on request): the staging buffers of an
    async save (``torch.distributed._state_dict_utils._create_cpu_state_dict``)."""
    from torch.distributed._state_dict_utils import _create_cpu_state_dict

    return _create_cpu_state_dict(state, pin_memory=pin_memory)


def copy_state_dict(source: dict[str, Any], target: dict[str, Any], non_blocking: bool) -> None:
    """Copy every tensor of ``source`` into ``target``'s, in place, non-tensors by value
    (``torch.distributed._state_dict_utils._copy_state_dict``)."""
    from torch.distributed._state_dict_utils import _copy_state_dict

    _copy_state_dict(source, target, non_blocking=non_blocking)


def local_shard_box(dtensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of the part of a DTensor's global tensor that this rank holds
    (``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh, dtensor.placements)
    return tuple(shape), tuple(offset)


def local_shard_slices(dtensor: Any) -> tuple[slice, ...]:
    """The same box as index slices of the global tensor."""
    shape, offset = local_shard_box(dtensor)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def flatten_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """DCP's flattening of a nested state dict into dotted keys, as its planners see them
    (``torch.distributed.checkpoint._nested_dict.flatten_state_dict``)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict as flatten

    flat, _ = flatten(state)
    return flat


def torchtitan_model_names() -> list[str]:
    """Model names TorchTitan's registry knows (``torchtitan.models._supported_models``)."""
    from torchtitan.models import _supported_models

    return sorted(_supported_models)


def narrow_tensor_by_index(tensor: Any, offsets: Any, sizes: Any) -> Any:
    """The region of ``tensor`` one DCP read item covers
    (``torch.distributed._shard._utils.narrow_tensor_by_index``)."""
    from torch.distributed._shard._utils import narrow_tensor_by_index as narrow

    return narrow(tensor, offsets, sizes)


def set_element(root: dict[str, Any], path: Any, value: Any) -> None:
    """Put ``value`` at a DCP object path inside a nested state dict
    (``torch.distributed.checkpoint._traverse.set_element``)."""
    from torch.distributed.checkpoint._traverse import set_element as set_at

    set_at(root, path, value)


def create_file_view(stream: Any, offset: int, length: int) -> Any:
    """A read-only window of ``length`` bytes at ``offset`` of an open file
    (``torch.distributed.checkpoint.utils._create_file_view``)."""
    from torch.distributed.checkpoint.utils import _create_file_view

    return _create_file_view(stream, offset, length)


def storage_info_class() -> type[_StorageInfo]:
    """The record DCP's filesystem layer keeps per stored item: relative path, offset, length
    (``torch.distributed.checkpoint.filesystem._StorageInfo``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


def consolidate_hf_safetensors(scratch: str, root: str, mapping: dict[str, int], process_group: Any) -> None:
    """Merge the per-rank safetensors DCP's HF writer left in ``scratch`` into full shards in
    ``root``, every rank taking part
    (``torch.distributed.checkpoint._consolidate_hf_safetensors``)."""
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank

    consolidate_safetensors_files_on_every_rank(scratch, root, mapping, process_group=process_group)


def foreach_copy(targets: list[Any], sources: list[Any]) -> None:
    """``targets[i].copy_(sources[i])`` for all i in one call (``torch._foreach_copy_``, what
    torch.optim's foreach paths use): a model of a few thousand small tensors otherwise spends
    more time in Python dispatch than in copying. Casts like ``copy_``."""
    import torch

    if targets:
        torch._foreach_copy_(targets, sources)


def standalone_process_group(backend: str, store: Any, rank: int, size: int, timeout: Any, device: Any) -> Any:
    """A process group over ``store`` that is *not* this process's torch.distributed world.

    A trainer already has its world (FSDP's); the dist backend's groups span the trainer's
    ranks and a reader that is in no world of theirs. ``dist.new_group`` can only carve groups
    out of the default world, so the backend object is built directly (``ProcessGroupGloo`` /
    ``ProcessGroupNCCL``, constructed the way ``torch.distributed._dist2`` does, NCCL's timeout
    through its private ``Options._timeout``) and driven through its own ``send``/``recv``; it
    is never registered globally."""
    import torch.distributed as dist

    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
        pg.eager_connect_single_device(device)
        return pg
    raise ValueError(f"unknown process group backend {backend!r}")


def save_without_record_crc(obj: Any, stream: Any) -> None:
    """``torch.save(obj, stream)`` byte for byte, except that the zip records carry no CRC32
    (``torch.serialization._save`` through a ``torch._C.PyTorchFileWriter`` made for this call
    with ``compute_crc32=False``). ``torch.save`` reads that choice from a process-wide setting
    (``set_crc32_options``); a writer of our own leaves every other ``torch.save`` alone.
    ``torch.load`` (TorchTitan's DCP reader included) reads the result as it reads any save."""
    import pickle

    import torch
    from torch.serialization import DEFAULT_PROTOCOL, _get_storage_alignment, _save

    writer = torch._C.PyTorchFileWriter(stream, False, _get_storage_alignment())
    _save(obj, writer, pickle, DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    stream.flush()


def dcp_storage_writer_parts() -> Any:
    """What a FileSystemWriter subclass needs to write its files itself, as DCP's own does
    (``torch.distributed.checkpoint.filesystem``: ``_StorageInfo`` (the record per item),
    ``_split_by_size_and_type`` (files per writer thread), ``_item_size``)."""
    from types import SimpleNamespace

    from torch.distributed.checkpoint import filesystem

    return SimpleNamespace(
        StorageInfo=filesystem._StorageInfo,
        split_by_size_and_type=filesystem._split_by_size_and_type,
        item_size=filesystem._item_size,
        suffix=filesystem.DEFAULT_SUFFIX,
    )
