"""Shared pieces of the RL tests: a tiny, fast version of the default job, changed only by
TorchTitan-style overrides (exactly what a user would type), and the weight_sync cases."""

from __future__ import annotations

import importlib.util
import os
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TOML = os.path.join(REPO, "configs", "rl_default.toml")

# Small batches: a test checks the plumbing, not learning.
FAST = [
    "--rl.prompts_per_step=4",
    "--rl.group_size=4",
    "--rl.no-progress",
    "--rl.no-plot",
    "--rl.threads=2",
]


def weight_sync_overrides(case: str) -> list[str]:
    """The only thing that differs between weight_sync cases: the ``[weight_sync]`` table."""
    backend = case.split("-", 1)[0]
    if importlib.util.find_spec(f"checkpointing.backends.{backend}") is None:
        pytest.skip(f"backend module checkpointing.backends.{backend} is not written yet")
    args = [f"--weight_sync.backend={backend}"]
    if backend == "memory":
        transport = case.split("-", 1)[1]
        args += [f"--weight_sync.memory.transport={transport}", f"--weight_sync.memory.channel=rl{uuid.uuid4().hex[:10]}"]
    return args


WEIGHT_SYNC_CASES = ["memory-local", "memory-shm", "dcp", "hf"]


def job_overrides(tmp_path, *extra: str, steps: int = 3) -> list[str]:
    return [
        f"--job.dump_folder={tmp_path}",
        f"--training.steps={steps}",
        "--checkpoint.no-enable",
        "--export.no-enable",
        *FAST,
        *extra,
    ]


def load(tmp_path, *extra: str, steps: int = 3):
    from rl.cli import load_config

    return load_config(DEFAULT_TOML, job_overrides(tmp_path, *extra, steps=steps))
