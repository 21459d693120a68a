"""SIGKILL ``rl-train`` mid-run, start it again: it resumes from the newest committed training
checkpoint with the same policy version, optimizer and lr state, and finishes bit-identical to a
run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from checkpointing import CheckpointConfig, Checkpointer
from tests.rl.rl_cases import DEFAULT_TOML, REPO, job_overrides, weight_sync_overrides

STEPS = 24
INTERVAL = 4


def command(dump: str, weight_sync: list[str]) -> list[str]:
    overrides = job_overrides(dump, *weight_sync, "--rl.threads=1", steps=STEPS)
    overrides = [o for o in overrides if o not in ("--checkpoint.no-enable", "--rl.threads=2")]
    return [
        sys.executable, "-m", "rl.cli", "--config", DEFAULT_TOML, *overrides,
        "--checkpoint.enable", "--checkpoint.backend=dcp", f"--checkpoint.interval={INTERVAL}", "--checkpoint.keep_latest_k=0",
    ]


def committed_steps(dump: str) -> list[int]:
    """What a reader sees, through the public API (load_only: never cleans the writer's files)."""
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", load_only=True)
    ckpt = Checkpointer(model_parts=[nn.Linear(1, 1)], checkpoint_config=cfg, base_folder=dump)
    try:
        return ckpt.backend.steps() if os.path.isdir(os.path.join(dump, "checkpoint")) else []
    finally:
        ckpt.close()


def final_state(dump: str, cmd_overrides: list[str]):
    """Load the final (step STEPS) training checkpoint into fresh trainer objects."""
    from rl.cli import load_config
    from rl.tasks import get_task
    from rl.tokenizer import load_tokenizer
    from rl.trainer import PolicyTrainer

    cfg = load_config(DEFAULT_TOML, cmd_overrides)
    trainer = PolicyTrainer(cfg, torch.device("cpu"), get_task(cfg.rl.task, cfg.rl.task_length), load_tokenizer())
    try:
        assert trainer.checkpointer.load(STEPS)
        return {
            "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizers.state_dict(),
            "lr": trainer.lr_schedulers.state_dict(),
            "train_state": trainer.train_state.state_dict(),
            "sampler": trainer.sampler.state_dict(),
        }
    finally:
        trainer.close()


def assert_nested_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def records(dump: str) -> list[dict]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_resumes_from_newest_committed_step(tmp_path):
    try:
        weight_sync = weight_sync_overrides("memory-local")
    except pytest.skip.Exception:
        weight_sync = weight_sync_overrides("dcp")
    reference, victim = str(tmp_path / "reference"), str(tmp_path / "victim")

    # The victim first, killed as soon as a training checkpoint is committed.
    proc = subprocess.Popen(command(victim, weight_sync), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not committed_steps(victim):
        assert proc.poll() is None, f"rl-train exited early: {proc.communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, "no training checkpoint committed in 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    newest = committed_steps(victim)[-1]
    assert INTERVAL <= newest < STEPS, newest

    restart = subprocess.run(command(victim, weight_sync), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"(resumed from step {newest})" in restart.stdout, restart.stdout
    history = records(victim)
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))  # killed steps redone once
    first_redone = history[newest]
    assert first_redone["step"] == newest + 1
    assert first_redone["policy_version"] == newest  # the generator got the resumed policy
    assert first_redone["logprob_gap"] == 0.0

    done = subprocess.run(command(reference, weight_sync), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" not in done.stdout

    # Same model, optimizer moments, lr schedule, sampler and train state as never interrupted.
    overrides = command(reference, weight_sync)[5:]
    want = final_state(reference, overrides)
    got = final_state(victim, command(victim, weight_sync)[5:])
    assert_nested_equal(got, want)
    assert got["train_state"]["step"] == STEPS
    assert [r["reward_mean"] for r in history] == [r["reward_mean"] for r in records(reference)]
