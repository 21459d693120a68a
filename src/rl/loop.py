"""The GRPO loop: roll out, score, update, checkpoint, publish; repeat.

Per step ``s`` (policy version ``s - 1`` samples, version ``s`` is published)::

    problems = sampler.next_batch()                          # resumable "dataloader"
    rollout  = generator.rollout(prompts, expected_version)  # load() + version check, then sample
    rewards  = task.reward(...); advantages = group-normalized
    trainer.train_step(rollout, advantages)                  # GRPO, optimizer + lr step
    trainer.checkpointer.save(s, last_step=s == steps)       # [checkpoint]: every K steps
    trainer.publish(s)                                       # [weight_sync]: save(s)

Nothing here depends on which backend a Checkpointer uses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from checkpointing import ConfigError

from . import data_parallel
from .checkpoints import hf_assets_path, open_checkpointer
from .engines import SamplingParams
from .generator import Generator
from .grpo import group_advantages
from .metrics import MetricsLog, plot, reward_margin
from .model import resolve_device, state_dict_adapter
from .remote import ConfigSource, RemoteGenerator
from .tasks import Problem, get_task
from .tokenizer import load_tokenizer
from .trainer import PolicyTrainer


@dataclass
class RunSummary:
    steps: int
    resumed_from: int
    reward_first: float
    reward_last: float
    margin: float
    wall_seconds: float
    metrics_path: str
    plot_path: str | None
    export_path: str | None


def configure_threads(cfg: Any) -> None:
    if cfg.rl.threads > 0:
        torch.set_num_threads(cfg.rl.threads)


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of one step: independent of history, so a resumed run samples the same."""
    return seed * 1_000_003 + step


def encode_prompts(problems: list[Problem], tokenizer: Any, group_size: int) -> torch.Tensor:
    rows = torch.tensor([tokenizer.encode(p.prompt, add_bos=True) for p in problems], dtype=torch.long)
    return rows.repeat_interleave(group_size, dim=0)


def score(problems: list[Problem], completions: torch.Tensor, task: Any, tokenizer: Any, group_size: int) -> torch.Tensor:
    rewards = []
    for i, row in enumerate(completions.tolist()):
        text, _ = tokenizer.decode_until_eos(row)
        rewards.append(task.reward(problems[i // group_size], text))
    return torch.tensor(rewards, dtype=torch.float32)


def exact_fraction(rewards: torch.Tensor) -> float:
    return (rewards >= 1.0 - 1e-6).float().mean().item()


def check_process_mode(cfg: Any, trainer: PolicyTrainer) -> None:
    caps = trainer.publisher.capabilities
    if cfg.rl.process_mode == "separate" and not caps.cross_process:
        raise ConfigError(
            f"rl.process_mode = 'separate', but weight_sync.backend = {cfg.weight_sync.backend!r} as configured "
            "cannot reach another process; choose a weight_sync backend (or transport) that can"
        )


def run(cfg: Any, source: ConfigSource | None = None, *, on_step=None) -> RunSummary:
    """Train ``cfg.training.steps`` steps (resuming from ``[checkpoint]`` if it holds any).

    ``on_step(record, trainer, generator)`` is a hook for tests (weights and logprob checks)."""
    begin = time.monotonic()
    configure_threads(cfg)
    device = resolve_device(cfg.rl.device)
    data_parallel.init(device)  # trainer ranks under torchrun (rl.data_parallel); one process otherwise
    rl = cfg.rl
    tokenizer = load_tokenizer()
    task = get_task(rl.task, rl.task_length, rl.alphabet_size)
    dump = cfg.job.dump_folder
    os.makedirs(dump, exist_ok=True)

    trainer = PolicyTrainer(cfg, device, task, tokenizer)
    generator: Generator | RemoteGenerator | None = None
    exporter = metrics = None
    try:
        check_process_mode(cfg, trainer)
        exporter = build_exporter(cfg, trainer)  # before training: a bad [export] fails now, not at the end
        trainer.resume()
        start = trainer.train_state.step
        trainer.clear_handoff()
        trainer.publish(start, force=True)
        if rl.process_mode == "separate":
            if source is None:
                raise ConfigError("rl.process_mode = 'separate' needs the config source (path + overrides)")
            generator = RemoteGenerator(source)
        else:
            generator = Generator(cfg, device, tokenizer)
        metrics = MetricsLog(os.path.join(dump, data_parallel.rank_file("metrics.jsonl")), start)
        params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p)
        loop(cfg, trainer, generator, metrics, task, tokenizer, params, start, on_step)
        export_path = None
        if exporter is not None:
            exporter.save(cfg.training.steps, last_step=True)
            export_path = os.path.join(dump, cfg.export.folder)
        plot_path = os.path.join(dump, data_parallel.rank_file("metrics.png")) if rl.plot and metrics.records else None
        if plot_path:
            plot(metrics.records, plot_path, f"GRPO {rl.task} ({cfg.model.name}/{cfg.model.flavor}), weight_sync={cfg.weight_sync.backend}")
        margin = reward_margin(metrics.records)
        summary = RunSummary(
            steps=cfg.training.steps,
            resumed_from=start,
            reward_first=margin["first"],
            reward_last=margin["last"],
            margin=margin["margin"],
            wall_seconds=time.monotonic() - begin,
            metrics_path=metrics.path,
            plot_path=plot_path,
            export_path=export_path,
        )
        with open(os.path.join(dump, data_parallel.rank_file("summary.json")), "w") as f:
            json.dump(summary.__dict__, f, indent=2)
        return summary
    finally:
        for closeable in (metrics, generator, exporter):
            if closeable is not None:
                closeable.close()
        trainer.close()
        data_parallel.close()


def build_exporter(cfg: Any, trainer: PolicyTrainer):
    if not cfg.export.enable:
        return None
    return open_checkpointer(
        "export",
        cfg.export,
        cfg.job.dump_folder,
        model_parts=[trainer.model],
        sd_adapter=state_dict_adapter(cfg.model.name, cfg.model.flavor, hf_assets_path(cfg)),
    )


def loop(cfg, trainer, generator, metrics, task, tokenizer, params, start, on_step) -> None:
    rl = cfg.rl
    steps = cfg.training.steps
    bar = None
    if rl.progress and data_parallel.rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="rl-train", unit="step", dynamic_ncols=True)
    checkpoint_seconds = 0.0  # the training-checkpoint save that closed the previous step
    try:
        for step in range(start + 1, steps + 1):
            t0 = time.monotonic()
            problems = trainer.sampler.next_batch(rl.prompts_per_step)
            prompts = encode_prompts(problems, tokenizer, rl.group_size)
            rollout, sync_seconds = generator.rollout(prompts, params, step_seed(rl.seed, step), trainer.published_version)
            t1 = time.monotonic()
            rewards = score(problems, rollout.completions, task, tokenizer, rl.group_size)
            advantages = group_advantages(rewards, rl.group_size, rl.normalize_std)
            stats = trainer.train_step(rollout, advantages)
            t2 = time.monotonic()
            publish_seconds = trainer.publish(step)
            t4 = time.monotonic()
            record = {
                "step": step,
                "policy_version": rollout.policy_version,
                "published_version": trainer.published_version,
                "reward_mean": rewards.mean().item(),
                "reward_std": rewards.std().item(),
                "exact_fraction": exact_fraction(rewards),
                **stats,
                "completion_tokens": int(rollout.mask.sum().item()),
                "sync_seconds": sync_seconds,
                "publish_seconds": publish_seconds,
                "rollout_seconds": t1 - t0 - sync_seconds,
                "train_seconds": t2 - t1,
                "checkpoint_seconds": checkpoint_seconds,
                "step_seconds": t4 - t0 + checkpoint_seconds,
            }
            # The record goes out before this step's training checkpoint is committed: a run
            # killed in between redoes the step and rewrites its record (MetricsLog drops records
            # past the resumed step), so no step is ever missing from the history.
            metrics.write(record)
            t5 = time.monotonic()
            trainer.checkpointer.save(step, last_step=step == steps)
            checkpoint_seconds = time.monotonic() - t5
            if on_step is not None:
                on_step(record, trainer, generator)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    reward=f"{record['reward_mean']:.3f}",
                    exact=f"{record['exact_fraction']:.2f}",
                    sync_ms=f"{1e3 * (publish_seconds + sync_seconds):.1f}",
                )
    finally:
        if bar is not None:
            bar.close()
