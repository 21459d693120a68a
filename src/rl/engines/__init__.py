"""Generation engines: what samples completions for the generator, behind one small protocol.

An engine owns its weights and how they arrive: ``engine.weights`` is the reader the generator
pulls each published version with (``latest_step()``, ``load()``, ``loaded_step``, ``close()``),
built from the ``[weight_sync]`` table. ``torch`` keeps a TorchTitan module and reads with a
``Checkpointer`` over it; ``vllm`` (optional extra, imported only when selected) keeps no
TorchTitan copy at all: its Checkpointer lives in vLLM's worker and feeds vLLM's own reload.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from checkpointing import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Rollout:
    """Completions for a batch of equal-length prompts.

    ``logprobs[b, t]`` is log p(completion[b, t] | prefix) under ``softmax(logits / temperature)``
    of the policy version that sampled it; ``mask`` is 1 up to and including the first EOS."""

    prompts: torch.Tensor  # [B, P] long
    completions: torch.Tensor  # [B, T] long, pad after EOS
    logprobs: torch.Tensor  # [B, T] float32
    mask: torch.Tensor  # [B, T] float32
    policy_version: int = -1

    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompts, self.completions], dim=1)

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            self.prompts.to(device), self.completions.to(device), self.logprobs.to(device), self.mask.to(device),
            self.policy_version,
        )


@runtime_checkable
class WeightReader(Protocol):
    """The generator's side of ``[weight_sync]``: a ``checkpointing.Checkpointer`` or anything
    with its reader surface."""

    loaded_step: int

    def latest_step(self) -> int: ...

    def load(self, step: int = -1) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    weights: WeightReader
    """Pulls published versions into the engine's weights."""

    @classmethod
    def build(cls, cfg, *, device: torch.device, tokenizer) -> Engine:
        """Everything from the job config: model, weights reader, sampler, on ``device``."""

    def generate(self, prompts: torch.Tensor, params: SamplingParams, seed: int) -> Rollout:
        """Sample one completion per prompt row (rows repeat for a GRPO group), with the
        behaviour policy's per-token logprobs."""

    def close(self) -> None:
        """Release the weights reader (and the engine's processes)."""


_ENGINES = {"torch": ("rl.engines.torch_engine", "TorchEngine"), "vllm": ("rl.engines.vllm_engine", "VLLMEngine")}


def available_engines() -> list[str]:
    return sorted(_ENGINES)


def engine_class(name: str):
    if name not in _ENGINES:
        raise ConfigError(f"rl.engine = {name!r} is not a known engine; allowed: {', '.join(available_engines())}")
    module, cls = _ENGINES[name]
    return getattr(importlib.import_module(module), cls)
