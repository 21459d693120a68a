"""A Hugging Face model directory: ``model-XXXXX-of-YYYYY.safetensors`` shards and the
``model.safetensors.index.json`` that maps each tensor name to its shard (or one
``model.safetensors`` without an index, as ``save_pretrained`` writes small models).

The index is untrusted input: every shard name must stay inside the directory
(:func:`~checkpointing.safepath.safe_join` refuses ``..``, absolute paths and symlinks out),
every named shard must exist and hold the tensors the index sends to it, and no tensor may be
defined twice. :meth:`HFDirectory.open` checks all of it, and every shard header, before a
single tensor byte is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ...errors import CorruptCheckpointError, UnsafeCheckpointError
from ...safepath import safe_join
from ...untrusted import describe, exists_here, open_regular, read_regular
from .safetensors_io import ShardHeader, TensorEntry, parse_json_strict, read_header

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG = "config.json"
SUFFIX = ".safetensors"
MAX_INDEX_BYTES = 64 << 20


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}{SUFFIX}"


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor
    gets a shard of its own), the way ``save_pretrained`` splits them."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[-1] else shards[:-1]


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2, sort_keys=True)


def is_hf_dir(path: str) -> bool:
    """An index or a single shard is *there* (of whatever kind: a FIFO index is refused when
    read, not taken for "no index")."""
    return exists_here(os.path.join(path, INDEX)) or exists_here(os.path.join(path, SINGLE_FILE))


@dataclass
class HFDirectory:
    """A checked model directory: tensor name -> (shard path, byte range, dtype, shape)."""

    root: str
    shards: dict[str, ShardHeader]  # relative shard name -> checked header
    tensors: dict[str, tuple[str, TensorEntry]]  # tensor name -> (relative shard name, entry)
    config: dict

    @classmethod
    def open(cls, root: str) -> HFDirectory:
        weight_map = _read_weight_map(root)
        shards: dict[str, ShardHeader] = {}
        for rel in sorted(set(weight_map.values())):
            path = safe_join(root, rel)
            if not exists_here(path):
                raise CorruptCheckpointError(f"{os.path.join(root, INDEX)} names shard {describe(rel)}, which is missing: {path}", path)
            shards[rel] = read_header(path)
        tensors: dict[str, tuple[str, TensorEntry]] = {}
        owner: dict[str, str] = {}
        for rel, header in shards.items():
            for name in header.entries:
                if name in owner:
                    raise CorruptCheckpointError(
                        f"tensor {describe(name)} is defined in both {owner[name]} and {rel} in {root}", header.path
                    )
                owner[name] = rel
        for name, rel in weight_map.items():
            entry = shards[rel].entries.get(name)
            if entry is None:
                where = f" (it is in {owner[name]})" if name in owner else ""
                raise CorruptCheckpointError(
                    f"{os.path.join(root, INDEX)} maps {describe(name)} to {rel}, which does not hold it{where}", shards[rel].path
                )
            tensors[name] = (rel, entry)
        return cls(root, shards, tensors, _read_config(root))

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def total_bytes(self) -> int:
        return sum(entry.nbytes for _, entry in self.tensors.values())

    def describe(self) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
        return [(name, e.dtype, e.shape, rel) for name, (rel, e) in sorted(self.tensors.items())]

    def open_shard(self, rel: str) -> int:
        """A descriptor on a checked shard, opened as every untrusted file is (a FIFO or link
        swapped in after the header check is refused, not waited on)."""
        return open_regular(self.shards[rel].path, "safetensors file")


def _read_bounded(path: str, limit: int) -> bytes:
    try:
        return read_regular(path, limit, os.path.basename(path))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing", path) from None


def _read_weight_map(root: str) -> dict[str, str]:
    index_path = os.path.join(root, INDEX)
    if not exists_here(safe_join(root, INDEX)):
        if exists_here(safe_join(root, SINGLE_FILE)):
            return {name: SINGLE_FILE for name in read_header(os.path.join(root, SINGLE_FILE)).entries}
        raise CorruptCheckpointError(f"{root} is not a Hugging Face model directory: no {INDEX} and no {SINGLE_FILE}", root)
    index = parse_json_strict(_read_bounded(index_path, MAX_INDEX_BYTES), index_path, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{index_path} has no weight_map of tensor names to shard files", index_path)
    for rel in set(weight_map.values()):
        try:
            safe_join(root, rel)  # refuse '..', absolute paths and symlinks out before any open()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{index_path}: weight_map entry refused: {e}", index_path) from None
        if not rel.endswith(SUFFIX):
            raise CorruptCheckpointError(f"{index_path} names {describe(rel)}; shard files must end in {SUFFIX}", index_path)
    return weight_map


def _read_config(root: str) -> dict:
    path = safe_join(root, CONFIG)
    if not exists_here(path):
        return {}
    config = parse_json_strict(_read_bounded(path, MAX_INDEX_BYTES), path, CONFIG)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object", path)
    return config
