"""Between TorchTitan's state dict and Hugging Face tensor names, for writing and for loading.

The model's TorchTitan state-dict adapter (``to_hf`` / ``from_hf``) owns the names and the
layout changes (Llama's q/k permutation, Qwen3's tied ``lm_head``). Without an adapter the
backend still works, storing TorchTitan names as they are (a resumable checkpoint, but not one
``transformers`` can load).

Loading is planned on *meta* stand-ins before any byte is read: the adapter maps their names and
shapes, so a missing, unexpected or misshapen tensor is a
:class:`~checkpointing.errors.StateMismatchError` naming the keys while the receiver is still
untouched. A tensor the adapter passes through unchanged (the same object comes back) is read
straight into the receiving parameter; only the ones it transforms go through a temporary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..._compat import local_shard_box
from ...distributed import is_dtensor
from ...errors import StateMismatchError
from .directory import HFDirectory
from .safetensors_io import TensorEntry, read_into, read_region

log = logging.getLogger(__name__)

TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
"""A tied HF model may omit ``lm_head.weight``: it *is* the embedding."""
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
"""Buffers some older HF checkpoints carry that no TorchTitan model has a slot for."""


class HFNaming:
    """``to_hf`` / ``from_hf`` through the adapter, or the identity without one."""

    def __init__(self, adapter: Any = None):
        self.adapter = adapter

    @property
    def model_args(self) -> Any:
        return getattr(self.adapter, "model_args", None)

    def to_hf(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.adapter.to_hf(dict(state)) if self.adapter is not None else dict(state)

    def from_hf(self, hf_state: dict[str, Any]) -> dict[str, Any]:
        # Adapters add keys to the dict they get (qwen3's tied lm_head): hand them a copy.
        return self.adapter.from_hf(dict(hf_state)) if self.adapter is not None else dict(hf_state)


def local_box(target: Any) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """(the tensor this rank fills, its offset in the global tensor or None when it is whole)."""
    if not is_dtensor(target):
        return target, None
    _, offset = local_shard_box(target)
    return target.to_local(), offset


def _meta(value: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")


@dataclass
class LoadPlan:
    proxies: dict[str, torch.Tensor]
    """TorchTitan key -> meta stand-in (global shape) that went through ``to_hf``."""
    hf_view: dict[str, torch.Tensor]
    """HF name -> what ``to_hf`` made of the stand-ins."""
    naming: HFNaming = field(default_factory=HFNaming)
    source: dict[str, str] = field(default_factory=dict)
    """HF name -> the tensor name in the files that feeds it (differs for a tied lm_head)."""
    direct: dict[str, str] = field(default_factory=dict)
    """HF name -> TorchTitan key, for tensors read straight into the receiver."""


def plan_load(directory: HFDirectory, targets: dict[str, Any], naming: HFNaming) -> LoadPlan:
    proxies = {k: _meta(v) for k, v in targets.items() if isinstance(v, torch.Tensor)}
    not_tensors = sorted(set(targets) - set(proxies))
    hf_view = naming.to_hf(proxies)
    owner = {id(v): k for k, v in proxies.items()}
    plan = LoadPlan(proxies=proxies, hf_view=hf_view, naming=naming)
    missing, problems, misfits = [], [], []
    for name, value in hf_view.items():
        src = name if name in directory.tensors else None
        if src is None and directory.tied_embeddings and TIED_ALIASES.get(name) in directory.tensors:
            src = TIED_ALIASES[name]
        if src is None:
            missing.append(name)
            continue
        plan.source[name] = src
        entry = directory.tensors[src][1]
        if tuple(value.shape) != entry.shape:
            problems.append(f"{name}: shape {list(entry.shape)} stored, receiver has {list(value.shape)}")
            misfits.append(owner.get(id(value), name))
        if id(value) in owner:
            plan.direct[name] = owner[id(value)]
    covered = naming.from_hf(hf_view)
    uncovered = sorted(set(proxies) - set(covered))
    extra = [name for name in directory.tensors if name not in hf_view and not name.endswith(IGNORED_SUFFIXES)]
    tied_away = [name for name in extra if TIED_ALIASES.get(name) in hf_view]
    if tied_away:  # as transformers does for a tied config: the embedding is the head
        log.warning("%s: the receiving model ties %s to %s; the stored copy is not loaded",
                    directory.root, tied_away, [TIED_ALIASES[n] for n in tied_away])
    unexpected = sorted(set(extra) - set(tied_away))
    if missing or problems or uncovered or unexpected or not_tensors:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_few(missing)}")
        if uncovered:
            parts.append(f"receiver keys the adapter's from_hf does not produce: {_few(uncovered)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the receiving model: {_few(unexpected)}")
        if not_tensors:
            parts.append(f"receiver entries that are not tensors: {_few(not_tensors)}")
        parts += problems[:20]
        raise StateMismatchError(
            f"{directory.root} does not fit the receiving model: " + "; ".join(parts),
            missing + uncovered + unexpected + not_tensors + misfits,
        )
    return plan


def _few(keys: list[str], n: int = 20) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def _copy_into(target: Any, full: torch.Tensor) -> None:
    """``full`` holds the whole (global) tensor: copy this rank's part into ``target``."""
    local, offset = local_box(target)
    if offset is not None:
        full = full[tuple(slice(o, o + s) for o, s in zip(offset, local.shape, strict=True))]
    if local.data_ptr() == full.data_ptr() and local.shape == full.shape and local.dtype == full.dtype:
        return  # tied: already the same memory
    local.copy_(full)


def load_model(directory: HFDirectory, plan: LoadPlan, targets: dict[str, Any], progress=None) -> None:
    """Fill ``targets`` from a checked directory along a checked plan (``progress(nbytes)``
    is called after each tensor)."""
    fds: dict[str, int] = {}

    def fd_for(rel: str) -> int:
        if rel not in fds:
            fds[rel] = directory.open_shard(rel)
        return fds[rel]

    def entry(name: str) -> tuple[str, TensorEntry]:
        return directory.tensors[plan.source[name]]

    try:
        transformed: dict[str, Any] = {}
        for name, value in plan.hf_view.items():
            rel, e = entry(name)
            path = directory.shards[rel].path
            if name in plan.direct:
                local, offset = local_box(targets[plan.direct[name]])
                read_into(fd_for(rel), e, local, path, offset)
                transformed[name] = value  # the stand-in: from_hf hands it back untouched
            else:
                transformed[name] = read_region(fd_for(rel), e, path)
            if progress is not None:
                progress(e.nbytes)
    finally:
        for fd in fds.values():
            os.close(fd)
    owner = {id(v): k for k, v in plan.proxies.items()}
    for key, value in plan.naming.from_hf(transformed).items():
        if key not in targets:
            continue
        source_key = owner.get(id(value))
        if source_key == key:
            continue  # read in place above
        if source_key is not None:  # another receiver tensor (tied weights)
            _copy_between(targets[source_key], targets[key])
        else:
            _copy_into(targets[key], value)


def _copy_between(src: Any, dst: Any) -> None:
    src_local, src_offset = local_box(src)
    dst_local, dst_offset = local_box(dst)
    if src_local.data_ptr() == dst_local.data_ptr() and src_local.shape == dst_local.shape:
        return  # truly tied: one memory
    if src_offset == dst_offset and src_local.shape == dst_local.shape:
        dst_local.copy_(src_local)
    else:
        _copy_into(dst, src.full_tensor() if is_dtensor(src) else src)
