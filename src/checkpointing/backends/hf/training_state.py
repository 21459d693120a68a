"""Optimizer, lr scheduler, dataloader and train state beside the safetensors, in the same step.

A Hugging Face directory has no place for them, so an ``hf`` step that must resume training
keeps them in a DCP sidecar, ``step-N/training_state/``, committed with the weights under one
manifest. DCP (not safetensors) because this state is nested, partly non-tensor, and sharded
like the model under FSDP. It is read through the DCP backend's safe reader: restricted
metadata unpickling, ``weights_only`` values, paths confined to the directory. A model-only
step has no sidecar and is a plain HF directory.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ...errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from ...safepath import safe_join
from ..dcp import SafeFileSystemReader, SafeLoadPlanner, check_fits, first_failure

SIDECAR = "training_state"


def sidecar_path(step_dir: str) -> str:
    return safe_join(step_dir, SIDECAR)


def has_sidecar(step_dir: str) -> bool:
    return os.path.isdir(sidecar_path(step_dir))


def check_sidecar(step_dir: str, extras: dict[str, Any]) -> None:
    """Before anything is read: the sidecar exists and holds every requested entry, shapes fitting."""
    if not has_sidecar(step_dir):
        raise StateMismatchError(
            f"{step_dir} holds model weights only (no {SIDECAR}/), so it cannot restore {sorted(extras)}; "
            "load it model-only or list them in checkpoint.exclude_from_loading",
            sorted(extras),
        )
    path = sidecar_path(step_dir)
    check_fits(SafeFileSystemReader(path).read_metadata(), dict(extras), path)


def read_sidecar(step_dir: str, extras: dict[str, Any], process_group: Any = None) -> None:
    """Load into ``extras`` in place: tensors copied into, non-tensor leaves replaced."""
    path = sidecar_path(step_dir)
    holder = dict(extras)
    try:
        dcp.load(holder, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), process_group=process_group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        first = first_failure(e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CorruptCheckpointError(f"reading training state {path} failed: {first!r}", path) from first
    extras.update(holder)
