"""The final export: a model-only ``[export]`` Checkpointer at the last step. With the ``hf``
backend that is a Hugging Face directory that transformers loads with the policy's logits."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from rl.loop import run
from tests.rl.rl_cases import load


def test_final_hf_export_loads_in_transformers_with_the_policy_logits(tmp_path):
    if importlib.util.find_spec("checkpointing.backends.hf") is None:
        pytest.skip("backend module checkpointing.backends.hf is not written yet")
    transformers = pytest.importorskip("transformers")
    cfg = load(tmp_path, "--weight_sync.backend=dcp", "--export.enable", "--export.backend=hf",
               "--export.export_dtype=float32", steps=2)
    final = {}

    def keep_final(record, trainer, generator):
        final["model"] = copy.deepcopy(trainer.model).eval()

    summary = run(cfg, on_step=keep_final)
    step_dir = os.path.join(summary.export_path, "step-2")
    assert os.path.isfile(os.path.join(step_dir, "config.json")), os.listdir(summary.export_path)
    assert not os.path.exists(os.path.join(step_dir, "training_state"))  # model only
    hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 8, 14, 8, 7]])
    with torch.no_grad():
        want = final["model"](tokens)
        got = hf(tokens).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(want, torch.zeros_like(want))


def test_export_disabled_writes_nothing(tmp_path):
    cfg = load(tmp_path, "--weight_sync.backend=dcp", steps=1)
    summary = run(cfg)
    assert summary.export_path is None and not os.path.exists(tmp_path / cfg.export.folder)
