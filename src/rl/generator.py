"""The generator: an engine plus its `[weight_sync]` reader (the engine's Checkpointer).

It never receives tensors from the trainer directly. Before every rollout it is told which policy
version the trainer published and pulls it with ``Checkpointer.load()``; it then checks
``loaded_step`` against that version, so a stale or foreign policy is an error, never a silent
rollout with old weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from checkpointing import CheckpointError

from .engines import Rollout, SamplingParams, engine_class


class StalePolicyError(CheckpointError):
    """The generator could not get the policy version the trainer published."""


class Generator:
    def __init__(self, cfg: Any, device: torch.device, tokenizer: Any):
        self.engine = engine_class(cfg.rl.engine).build(cfg, device=device, tokenizer=tokenizer)
        self.checkpointer = self.engine.weights
        """The ``[weight_sync]`` reader: a Checkpointer (torch engine) or vLLM's worker-side one."""
        self.timeout_s = cfg.rl.sync_timeout_s
        self.version = -1
        """Policy version the engine's weights hold; -1 before the first pull."""

    def sync(self, expected_version: int) -> float:
        """Hold ``expected_version`` when this returns; the seconds spent pulling (0 if held)."""
        if self.version == expected_version:
            return 0.0
        begin = time.monotonic()
        deadline = begin + self.timeout_s
        while self.checkpointer.latest_step() < expected_version:  # a publish still in flight
            if time.monotonic() > deadline:
                raise StalePolicyError(
                    f"the trainer published policy version {expected_version}, but after {self.timeout_s:.0f} s the "
                    f"newest step the generator sees is {self.checkpointer.latest_step()} (rl.sync_timeout_s)"
                )
            time.sleep(0.005)
        self.checkpointer.load()
        loaded = self.checkpointer.loaded_step
        if loaded != expected_version:
            raise StalePolicyError(
                f"the generator loaded policy version {loaded}, expected {expected_version}: another writer shares "
                "the weight_sync folder/channel, or a publish was lost"
            )
        self.version = loaded
        return time.monotonic() - begin

    def rollout(self, prompts: torch.Tensor, params: SamplingParams, seed: int, expected_version: int) -> tuple[Rollout, float]:
        sync_seconds = self.sync(expected_version)
        rollout = self.engine.generate(prompts, params, seed)
        rollout.policy_version = self.version
        return rollout.to("cpu"), sync_seconds

    def close(self) -> None:
        self.engine.close()
