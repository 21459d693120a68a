"""``engine = "torch"``: batched sampling with the TorchTitan model itself, CPU or GPU.

No KV cache, on purpose: TorchTitan's model has no cache API, so a cache would mean a second
attention implementation whose numerics drift from the trainer's; on these prompt + completion
lengths (~12 tokens) recomputing the prefix costs a few milliseconds per step. The behavior
logprobs come from one full forward over the finished sequences (:func:`rl.policy.token_logprobs`),
the same call the trainer makes, so with equal weights they are equal bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..checkpoints import hf_assets_path, open_checkpointer
from ..model import DTYPES, build_model, state_dict_adapter, vocab_size
from ..policy import banned_token_mask, completion_mask, log_probs, masked, token_logprobs
from . import Rollout, SamplingParams


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches ``top_p`` (nucleus sampling)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


class TorchEngine:
    def __init__(
        self, model: nn.Module, *, device: torch.device, pad_id: int, eos_id: int, banned: torch.Tensor | None, weights=None
    ):
        self.model = model.eval()
        self.weights = weights
        self.device = device
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.banned = banned

    @classmethod
    def build(cls, cfg, *, device: torch.device, tokenizer) -> TorchEngine:
        """The TorchTitan model in the generator dtype (NaN until the first load) and a
        ``[weight_sync]`` Checkpointer over it."""
        name, flavor = cfg.model.name, cfg.model.flavor
        model = build_model(name, flavor, device=device, dtype=DTYPES[cfg.rl.generator_dtype], seed=None)
        weights = open_checkpointer(
            "weight_sync",
            # A reader: never saves, and never "cleans up" the publisher's in-flight files.
            dataclasses.replace(cfg.weight_sync, load_only=True),
            cfg.job.dump_folder,
            model_parts=[model],
            sd_adapter=state_dict_adapter(name, flavor, hf_assets_path(cfg)),
        )
        banned = banned_token_mask(vocab_size(model), tokenizer)
        return cls(model, device=device, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, banned=banned, weights=weights)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, params: SamplingParams, seed: int) -> Rollout:
        rng = torch.Generator(device=self.device).manual_seed(seed)
        seq = prompts.to(self.device)
        prompt_length = seq.shape[1]
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(params.max_new_tokens):
            if done.all():
                nxt = torch.full_like(done, self.pad_id, dtype=torch.long)
            else:
                logits = self.model(seq)[:, -1, :]
                probs = top_p_filter(log_probs(logits, params.temperature, self.banned).exp(), params.top_p)
                nxt = torch.multinomial(probs, 1, generator=rng).squeeze(1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
        completions = seq[:, prompt_length:]
        mask = completion_mask(completions, self.eos_id)
        logprobs = masked(self.score(seq, prompt_length, params.temperature), mask)
        return Rollout(prompts=seq[:, :prompt_length], completions=completions, logprobs=logprobs, mask=mask)

    @torch.no_grad()
    def score(self, sequences: torch.Tensor, prompt_length: int, temperature: float) -> torch.Tensor:
        return token_logprobs(self.model, sequences.to(self.device), prompt_length, temperature, self.banned).float()

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()
