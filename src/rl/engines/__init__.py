"""Generation engines: what samples completions for the generator, behind one small protocol.

An engine owns an ``nn.Module`` in TorchTitan's layout (``engine.model``): that is what the
generator's Checkpointer loads published weights into. ``torch`` is pure PyTorch and the default;
``vllm`` is an optional extra (imported only when selected).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

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

    def to(self, device: torch.device | str) -> "Rollout":
        return Rollout(
            self.prompts.to(device), self.completions.to(device), self.logprobs.to(device), self.mask.to(device),
            self.policy_version,
        )


@runtime_checkable
class Engine(Protocol):
    model: nn.Module
    """The TorchTitan-layout module the generator's Checkpointer loads into."""

    @classmethod
    def build(cls, model: nn.Module, *, device: torch.device, tokenizer, banned: torch.Tensor | None, cfg) -> "Engine":
        """Wrap ``model`` (already on ``device`` in the generator dtype); ``cfg`` is the job config."""

    def generate(self, prompts: torch.Tensor, params: SamplingParams, seed: int) -> Rollout:
        """Sample one completion per prompt row (rows repeat for a GRPO group)."""

    def score(self, sequences: torch.Tensor, prompt_length: int, temperature: float) -> torch.Tensor:
        """Per-token logprobs of ``sequences[:, prompt_length:]`` under the engine's weights."""

    def weights_updated(self) -> None:
        """Called after the Checkpointer loaded new weights into ``model`` (an engine that keeps
        its own copy, like vLLM, pushes them here)."""


_ENGINES = {"torch": ("rl.engines.torch_engine", "TorchEngine"), "vllm": ("rl.engines.vllm_engine", "VLLMEngine")}


def available_engines() -> list[str]:
    return sorted(_ENGINES)


def engine_class(name: str):
    if name not in _ENGINES:
        raise ConfigError(f"rl.engine = {name!r} is not a known engine; allowed: {', '.join(available_engines())}")
    module, cls = _ENGINES[name]
    return getattr(importlib.import_module(module), cls)
