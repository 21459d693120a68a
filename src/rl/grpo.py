"""GRPO: group-relative advantages and the clipped policy-gradient loss.

Each prompt is sampled ``group_size`` times; a completion's advantage is its reward minus its
group's mean (divided by the group's std unless ``normalize_std`` is off), so no value model is
needed. The loss is PPO's clipped surrogate against the behavior policy's logprobs (the
generator's, i.e. the policy version that sampled), with an optional k3 KL penalty to a frozen
reference policy.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``rewards`` is [num_prompts * group_size], groups contiguous."""
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over sequences of the mean over each sequence's completion tokens.

    ``entropy`` (per token, full distribution) with ``entropy_coef`` > 0 adds PPO's entropy
    bonus: on a tiny model a few confident updates can collapse the policy to one answer per
    position before it has learned to read the prompt."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    kl = torch.zeros((), device=new_logprobs.device)
    if ref_logprobs is not None and kl_coef > 0:
        ref_log_ratio = ref_logprobs - new_logprobs
        kl_tokens = ref_log_ratio.exp() - ref_log_ratio - 1  # k3 estimator of KL(new || ref), >= 0
        per_token = per_token + kl_coef * kl_tokens
        kl = _masked_mean(kl_tokens.detach(), mask)
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {
            "clip_fraction": _masked_mean(clipped, mask).item(),
            "kl": float(kl),
            # Mean surprise of the sampled tokens: an entropy estimate; near 0 means collapse.
            "sampled_nll": -_masked_mean(old_logprobs, mask).item(),
            "entropy": _masked_mean(entropy.detach(), mask).item() if entropy is not None else float("nan"),
            # Before the update the trainer and the behavior policy should agree: a large value
            # means the generator sampled with other weights than the trainer's.
            "logprob_gap": (log_ratio.abs() * mask).max().item(),
        }
    return loss, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
