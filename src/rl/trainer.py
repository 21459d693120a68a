"""The policy trainer: a TorchTitan model, TorchTitan's optimizer and lr-scheduler builders,
the GRPO update, and two Checkpointers over the same model.

* ``checkpointer`` (``[checkpoint]``): model + optimizers + lr_schedulers + the prompt sampler
  (the job's dataloader) + train_state, so ``rl-train`` resumes where it stopped.
* ``publisher`` (``[weight_sync]``): model only; ``save(step)`` after each optimizer step is how
  a new policy version reaches the generator.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from . import data_parallel
from .checkpoints import hf_assets_path, open_checkpointer
from .engines import Rollout
from .grpo import grpo_loss
from .model import build_model, state_dict_adapter, train_spec, vocab_size
from .policy import banned_token_mask, masked, token_logprobs
from .tasks import PromptSampler, Task


class TrainState:
    """Stateful like TorchTitan's TrainState. ``step`` optimizer steps done; the policy the
    trainer holds is version ``step``."""

    def __init__(self) -> None:
        self.step = 0

    @property
    def policy_version(self) -> int:
        return self.step

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def single_process_dims():
    from torchtitan.distributed import ParallelDims

    return ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


class PolicyTrainer:
    def __init__(self, cfg: Any, device: torch.device, task: Task, tokenizer: Any):
        self.cfg = cfg
        self.device = device
        name, flavor = cfg.model.name, cfg.model.flavor
        model = build_model(name, flavor, device=device, dtype=torch.float32, seed=cfg.rl.seed).train()
        self.banned = banned_token_mask(vocab_size(model), tokenizer)
        # The reference policy is the seeded initial model, so a resumed run rebuilds it exactly.
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.rl.kl_coef > 0 else None
        self.model = data_parallel.shard(model, device)  # FSDP2 under torchrun; as is on one rank
        spec = train_spec(name)
        self.optimizers = spec.build_optimizers_fn([self.model], cfg.optimizer, single_process_dims())
        self.lr_schedulers = spec.build_lr_schedulers_fn(self.optimizers, cfg.lr_scheduler, cfg.training.steps)
        self.sampler = PromptSampler(task, cfg.rl.seed)
        self.train_state = TrainState()
        adapter = state_dict_adapter(name, flavor, hf_assets_path(cfg))
        folder = cfg.job.dump_folder
        self.checkpointer = open_checkpointer(
            "checkpoint",
            cfg.checkpoint,
            folder,
            dataloader=self.sampler,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=adapter,
        )
        self.publisher = open_checkpointer("weight_sync", cfg.weight_sync, folder, model_parts=[self.model], sd_adapter=adapter)
        self.published_version = -1

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> bool:
        """Load the newest committed training checkpoint, if any (``[checkpoint] enable``)."""
        return self.checkpointer.load() if self.checkpointer.enable else False

    def clear_handoff(self) -> None:
        """Drop handoff steps left by an earlier (possibly killed) run: they may be *newer* than
        the step we resume from, and a generator must never pull them."""
        self.publisher.clear()

    def publish(self, step: int, force: bool = False) -> float:
        """``save(step)`` on the weight-sync Checkpointer; returns seconds. The interval decides
        unless ``force`` (the first version, so the generator has something to pull)."""
        begin = time.monotonic()
        self.publisher.save(step, last_step=force)
        self.published_version = self.publisher.latest_step()
        return time.monotonic() - begin

    # ------------------------------------------------------------------ the update
    def train_step(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        rl = self.cfg.rl
        sequences = rollout.sequences().to(self.device)
        prompt_length = rollout.prompts.shape[1]
        mask = rollout.mask.to(self.device)
        new, entropy = token_logprobs(self.model, sequences, prompt_length, rl.temperature, self.banned, with_entropy=True)
        new = masked(new, mask)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = masked(token_logprobs(self.reference, sequences, prompt_length, rl.temperature, self.banned), mask)
        loss, stats = grpo_loss(
            new, rollout.logprobs.to(self.device), advantages.to(self.device), mask, rl.clip_eps, ref, rl.kl_coef,
            entropy, rl.entropy_coef,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        self.train_state.step += 1
        stats.update(loss=loss.item(), grad_norm=data_parallel.as_float(grad_norm), lr=self.lr_schedulers.schedulers[0].get_last_lr()[0])
        return stats

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.publisher.close()
