"""The generator: an engine plus its own Checkpointer over the engine's model.

It never receives tensors from the trainer directly. Before every rollout it is told which policy
version the trainer published and pulls it with ``Checkpointer.load()``; it then checks
``loaded_step`` against that version, so a stale or foreign policy is an error, never a silent
rollout with old weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from checkpointing import CheckpointError

from .checkpoints import hf_assets_path, open_checkpointer
from .engines import Rollout, SamplingParams, engine_class
from .model import DTYPES, build_model, state_dict_adapter
from .policy import banned_token_mask


class StalePolicyError(CheckpointError):
    """The generator could not get the policy version the trainer published."""


class Generator:
    def __init__(self, cfg: Any, device: torch.device, tokenizer: Any):
        name, flavor = cfg.model.name, cfg.model.flavor
        model = build_model(name, flavor, device=device, dtype=DTYPES[cfg.rl.generator_dtype], seed=None)
        banned = banned_token_mask(model.model_args.vocab_size, tokenizer)
        self.engine = engine_class(cfg.rl.engine).build(model, device=device, tokenizer=tokenizer, banned=banned, cfg=cfg)
        self.checkpointer = open_checkpointer(
            "weight_sync",
            # A reader: never saves, and never "cleans up" the publisher's in-flight files.
            dataclasses.replace(cfg.weight_sync, load_only=True),
            cfg.job.dump_folder,
            model_parts=[self.engine.model],
            sd_adapter=state_dict_adapter(name, flavor, hf_assets_path(cfg)),
        )
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
        self.engine.weights_updated()
        self.version = loaded
        return time.monotonic() - begin

    def rollout(self, prompts: torch.Tensor, params: SamplingParams, seed: int, expected_version: int) -> tuple[Rollout, float]:
        sync_seconds = self.sync(expected_version)
        rollout = self.engine.generate(prompts, params, seed)
        rollout.policy_version = self.version
        return rollout.to("cpu"), sync_seconds

    def close(self) -> None:
        self.checkpointer.close()
