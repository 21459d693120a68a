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

from ...errors import StateMismatchError
from ...safepath import safe_join
from ...staging import stage
from ..dcp import SafeFileSystemReader, check_fits
from ..dcp_reader import load_checked

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


def read_sidecar(step_dir: str, extras: dict[str, Any], process_group: Any = None) -> dict[str, Any]:
    """Read the training state into a staged copy shaped like ``extras`` and return it;
    ``extras`` itself is not touched (the caller applies the copy once the model part of the
    step has been read too: :func:`checkpointing.staging.apply_state`)."""
    path = sidecar_path(step_dir)
    staged = stage(dict(extras))
    load_checked(staged, SafeFileSystemReader(path), path, process_group)
    return staged
