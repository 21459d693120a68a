"""Which backends a fault applies to, decided by what each backend *declares*
(``Capabilities``), never by its name, so a plugin backend lands in the right rows."""

from __future__ import annotations

import functools
import os
import tempfile
import uuid

import pytest
import torch

from checkpointing import Capabilities, Checkpointer
from tests.checkpointing.cases import backend_cases, make_config

CASES = backend_cases()


@functools.cache
def _probe(case: str) -> Capabilities:
    with tempfile.TemporaryDirectory() as folder:
        cfg = make_config(case, f"probe{uuid.uuid4().hex[:10]}", load_only=True)
        ckpt = Checkpointer(model_parts=[torch.nn.Linear(1, 1)], checkpoint_config=cfg, base_folder=folder)
        try:
            return ckpt.backend.capabilities
        finally:
            ckpt.close()


def capabilities(case: str) -> Capabilities:
    make_config(case, "probe")  # skips a backend whose module is not written yet
    return _probe(case)


def require_persistent(case: str, why: str) -> None:
    if not capabilities(case).persistent:
        pytest.skip(f"{case} keeps steps in memory only, so {why}")


def require_cross_process(case: str, why: str) -> None:
    if not capabilities(case).cross_process:
        pytest.skip(f"{case} serves readers in its own process only, so {why}")


def titan_find_load_step(folder: str) -> int:
    """TorchTitan 0.2.2's own choice of step to resume from (its real code, not a copy)."""
    from torchtitan.components.checkpoint import CheckpointManager

    return CheckpointManager._find_load_step(None, folder)  # uses only its ``folder`` argument


def titan_visible(step_dir: str) -> bool:
    """Would TorchTitan's scan consider this directory at all (its two probes)?"""
    return os.path.isfile(os.path.join(step_dir, ".metadata")) or os.path.isfile(
        os.path.join(step_dir, "model.safetensors.index.json")
    )

