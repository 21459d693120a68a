"""Interop with the real ``transformers``: our ``hf`` steps are Hugging Face models, and Hugging
Face models are initial loads for TorchTitan. Agreement is checked on logits, which catches
every silent mistake a key-by-key comparison would miss (q/k permutation, RoPE scaling, tied
heads, norms)."""

from __future__ import annotations

import pytest
import torch

from checkpointing import Checkpointer
from tests.checkpointing.test_hf_backend import adapter_for, hf_config, save_model_step
from tests.helpers import build_titan_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _tokens(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _assert_same_logits(titan_model, hf_model) -> None:
    tokens = _tokens()
    with torch.no_grad():
        ours = titan_model(tokens)
        theirs = hf_model(tokens).logits
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff}"


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    model, step_dir = save_model_step(tmp_path, name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(step_dir)
    expected = {"qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM"}[name]
    assert type(hf_model).__name__ == expected
    _assert_same_logits(model, hf_model)


def _hf_config(name: str, tied: bool = True):
    if name == "qwen3":
        return transformers.Qwen3Config(
            vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied, rope_theta=1000000.0, rms_norm_eps=1e-6,
            max_position_embeddings=4096,
        )
    # TorchTitan's llama3 always applies Llama 3 RoPE scaling with these defaults.
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def _save_pretrained(tmp_path, name: str, tied: bool = True):
    torch.manual_seed(1)
    hf_model = transformers.AutoModelForCausalLM.from_config(_hf_config(name, tied)).eval()
    path = tmp_path / f"{name}-pretrained"
    hf_model.save_pretrained(str(path))
    return hf_model, str(path)


def _initial_load(tmp_path, name: str, path: str, **model_overrides):
    model = build_titan_model(name, seed=7, **model_overrides)
    cfg = hf_config(initial_load_path=path, initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, name), base_folder=str(tmp_path / "run")) as c:
        assert c.load() is True
    return model


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_save_pretrained_directory_loads_into_torchtitan_with_the_same_logits(tmp_path, name):
    hf_model, path = _save_pretrained(tmp_path, name)
    model = _initial_load(tmp_path, name, path)
    _assert_same_logits(model, hf_model)


def test_tied_hf_model_without_lm_head_fills_an_untied_torchtitan_head(tmp_path):
    hf_model, path = _save_pretrained(tmp_path, "qwen3", tied=True)
    model = _initial_load(tmp_path, "qwen3", path, enable_weight_tying=False)
    assert model.output.weight is not model.tok_embeddings.weight
    assert torch.equal(model.output.weight, hf_model.get_input_embeddings().weight)
    _assert_same_logits(model, hf_model)
