"""The vLLM engine (optional extra): needs vllm and a CUDA device, skipped cleanly otherwise."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]


def test_vllm_engine_runs_the_loop_with_published_weights(tmp_path):
    pytest.importorskip("vllm", reason="vllm is an optional extra (pip install -e '.[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("the vllm engine needs a CUDA device")
    from rl.loop import run
    from tests.rl.rl_cases import load

    cfg = load(tmp_path, "--rl.engine=vllm", "--rl.generator_dtype=bfloat16", "--rl.device=cuda",
               "--weight_sync.backend=memory", "--weight_sync.memory.transport=local", steps=3)
    summary = run(cfg)
    records = [json.loads(line) for line in open(summary.metrics_path)]
    assert [r["policy_version"] for r in records] == [0, 1, 2]
    # bf16 generator vs fp32 trainer: close, not equal; a missed weight push would be far off.
    assert all(r["logprob_gap"] < 0.5 for r in records), [r["logprob_gap"] for r in records]
