"""The RL job on several processes: ``torchrun`` starts 2 trainer ranks (an FSDP2-sharded policy),
each with its generator, and weights travel through ``[weight_sync] backend = "dist"``: nothing
else changes but TOML overrides. (Here each generator lives in its trainer rank's process, to
start two interpreters instead of four on a 2-core CI machine; the weights still cross the
dist backend's process groups. The documented run, docs/rl.md, puts every generator in a
process of its own with ``--rl.process_mode=separate``; test_dist_sync.py covers readers in
other processes and worlds.)

Every rank trains on the same rollouts, so the job must be the single-process job: the same
rewards and losses to the bit step by step (the gradient norm to rounding: FSDP2 sums squared
norms shard by shard), and a generator that sampled with exactly the trainer's weights
(``logprob_gap`` 0.0) after every sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from rl.loop import run
from tests.rl.rl_cases import DEFAULT_TOML, REPO, job_overrides, load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 2
COMPARED = ["step", "policy_version", "reward_mean", "loss", "clip_fraction", "entropy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_two_fsdp_trainer_ranks_with_their_generators_match_the_single_process_job(tmp_path):
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    overrides = job_overrides(
        dist_dir, "--weight_sync.backend=dist", "--weight_sync.dist.publishers=2", "--rl.process_mode=colocated",
        "--rl.threads=1", steps=STEPS,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "src"), REPO, os.environ.get("PYTHONPATH", "")]),
           "WEIGHT_SYNC_PORT": str(free_port())}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rl.cli",
              "--config", DEFAULT_TOML, *overrides]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = records(dist_dir / "metrics.jsonl"), records(dist_dir / "metrics.rank1.jsonl")
    assert [r["policy_version"] for r in rank0] == list(range(STEPS))
    assert all(r["logprob_gap"] == 0.0 for r in rank0 + rank1), [r["logprob_gap"] for r in rank0 + rank1]

    run(load(single_dir, "--rl.threads=1", steps=STEPS))
    single = records(single_dir / "metrics.jsonl")
    for mine, theirs, one in zip(rank0, rank1, single, strict=True):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED} == {k: one[k] for k in COMPARED}
        assert mine["grad_norm"] == theirs["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
