"""The policy distribution, defined once for the trainer and the generator.

Both sides turn logits into log-probabilities here (temperature, banned token ids), so "the
generator's logprobs equal the trainer's" is a statement about weights, not about two slightly
different formulas.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def banned_token_mask(model_vocab: int, tokenizer, keep_eos: bool = True) -> torch.Tensor:
    """True for ids the policy may never emit: padding, BOS, UNK, and model rows beyond the
    tokenizer's vocabulary (a flavor may have a larger embedding table)."""
    banned = torch.zeros(model_vocab, dtype=torch.bool)
    banned[tokenizer.get_vocab_size():] = True
    for idx in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id):
        banned[idx] = True
    if not keep_eos:
        banned[tokenizer.eos_id] = True
    return banned


BANNED_LOGIT = -1e9
"""Finite on purpose: exp() of it is exactly 0 in float32 (never sampled), while p * log p and
every gradient through it stay finite, which -inf would not (0 * -inf is NaN)."""


def log_probs(logits: torch.Tensor, temperature: float, banned: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float() / temperature
    if banned is not None:
        logits = logits.masked_fill(banned.to(logits.device), BANNED_LOGIT)
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(
    model: nn.Module,
    sequences: torch.Tensor,
    prompt_length: int,
    temperature: float,
    banned: torch.Tensor | None,
    with_entropy: bool = False,
):
    """log p(sequences[:, t] | sequences[:, :t]) for every completion position t >= prompt_length
    (and the policy's entropy at each of those positions, if asked)."""
    logits = model(sequences[:, :-1])[:, prompt_length - 1 :, :]
    lp = log_probs(logits, temperature, banned)
    chosen = lp.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1)
    if not with_entropy:
        return chosen
    return chosen, -(lp.exp() * lp).sum(dim=-1)


def masked(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero outside the completion (padding after EOS is a banned token with a huge negative
    logprob that must not reach the loss)."""
    return torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 up to and including the first EOS, 0.0 after it."""
    is_eos = (completions == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).float()
