"""The ``hf`` backend on its own: what a step directory holds, and what comes back.

The contract suite (test_contract.py) already runs ``hf`` through every Checkpointer policy
without an adapter; these tests add what is specific to Hugging Face directories: names through
the TorchTitan adapter, shard splitting, config.json, the training-state sidecar, export
dtypes, tied embeddings, initial loads of foreign directories.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer, StateMismatchError
from checkpointing.backends.hf import HFOptions
from checkpointing.backends.hf.directory import HFDirectory, plan_shards
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps


# ---------------------------------------------------------------------------------- helpers
def adapter_for(model, name: str):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec(name).state_dict_adapter(model.model_args, None)


def hf_config(**overrides) -> CheckpointConfig:
    base = dict(enable=True, backend="hf", folder="checkpoint", interval=1, keep_latest_k=0)
    base.update(overrides)
    return CheckpointConfig(**base)


def save_model_step(base, name: str = "qwen3", step: int = 1, seed: int = 0, **model_overrides):
    """A model-only hf step written through the adapter; returns (model, step_dir)."""
    model = build_titan_model(name, seed=seed, **model_overrides)
    with Checkpointer(model_parts=[model], checkpoint_config=hf_config(), sd_adapter=adapter_for(model, name), base_folder=str(base)) as c:
        c.save(step)
    return model, os.path.join(str(base), "checkpoint", f"step-{step}")


def load_model_step(base, name: str = "qwen3", seed: int = 9, step: int = -1, **model_overrides):
    """A fresh model of the same shape with other values, loaded from ``base``; returns it."""
    model = build_titan_model(name, seed=seed, **model_overrides)
    with Checkpointer(model_parts=[model], checkpoint_config=hf_config(), sd_adapter=adapter_for(model, name), base_folder=str(base)) as c:
        assert c.load(step) is True
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_model_step_is_a_plain_hf_directory_and_round_trips(tmp_path, name):
    model, step_dir = save_model_step(tmp_path, name)
    assert sorted(os.listdir(step_dir)) == [
        "config.json", "manifest.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"
    ]
    directory = HFDirectory.open(step_dir)
    assert "model.embed_tokens.weight" in directory.tensors
    assert not any(k.startswith(("layers.", "tok_embeddings")) for k in directory.tensors), "TorchTitan names leaked"
    loaded = load_model_step(tmp_path, name)
    assert_state_equal(model.state_dict(), loaded.state_dict())


def test_config_json_describes_the_model(tmp_path):
    qwen, qdir = save_model_step(tmp_path / "q", "qwen3")
    llama, ldir = save_model_step(tmp_path / "l", "llama3")
    q = json.loads(open(os.path.join(qdir, "config.json")).read())
    assert q["architectures"] == ["Qwen3ForCausalLM"] and q["model_type"] == "qwen3"
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"], q["head_dim"]) == (64, 2, 4, 2, 16)
    assert q["tie_word_embeddings"] is True and q["torch_dtype"] == "float32" and q["vocab_size"] == 256
    assert "lm_head.weight" not in HFDirectory.open(qdir).tensors  # tied: stored once, as HF does
    lcfg = json.loads(open(os.path.join(ldir, "config.json")).read())
    assert lcfg["architectures"] == ["LlamaForCausalLM"] and lcfg["tie_word_embeddings"] is False
    assert lcfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert lcfg["rope_theta"] == 500000.0
    assert lcfg["intermediate_size"] == llama.layers["0"].feed_forward.w1.weight.shape[0]


def test_shards_split_at_max_shard_size(tmp_path):
    model = build_titan_model("qwen3", dim=256)  # ~5 MiB of fp32 weights
    cfg = hf_config(hf=HFOptions(max_shard_size_mb=1))
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path)) as c:
        c.save(1)
    step_dir = tmp_path / "checkpoint" / "step-1"
    shards = sorted(n for n in os.listdir(step_dir) if n.endswith(".safetensors"))
    assert len(shards) >= 4
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((step_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    directory = HFDirectory.open(str(step_dir))
    largest = max(e.nbytes for _, e in directory.tensors.values())
    for rel, header in directory.shards.items():
        data = sum(e.nbytes for e in header.entries.values())
        assert data <= max(1 << 20, largest), rel
    assert index["metadata"]["total_size"] == directory.total_bytes()
    loaded = load_model_step(tmp_path, "qwen3", dim=256)
    assert_state_equal(model.state_dict(), loaded.state_dict())


def test_plan_shards_keeps_order_and_isolates_big_tensors():
    plan = plan_shards([("a", 40), ("b", 40), ("c", 150), ("d", 10), ("e", 95)], 100)
    assert plan == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards([], 100) == []


# ---------------------------------------------------------------------------------- training state
def test_full_state_goes_to_a_dcp_sidecar_and_resumes_exactly(tmp_path):
    model = build_titan_model("llama3", seed=0)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=2)
    ts = TrainState(step=2)
    ts.losses = [3.0, 2.0]
    parts = dict(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts})
    with Checkpointer(**parts, checkpoint_config=hf_config(), sd_adapter=adapter_for(model, "llama3"), base_folder=str(tmp_path)) as c:
        c.save(2)
    step_dir = tmp_path / "checkpoint" / "step-2"
    assert (step_dir / "training_state" / ".metadata").is_file()
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert any(rel.startswith("training_state/") for rel in manifest["files"]), "sidecar not under the step's checksums"

    rmodel = build_titan_model("llama3", seed=4)
    ropts, rscheds = build_training_parts(rmodel)
    train_steps(rmodel, ropts, rscheds, n=1, seed=4)
    rts = TrainState()
    with Checkpointer(model_parts=[rmodel], optimizers=ropts, lr_schedulers=rscheds, states={"train_state": rts},
                      checkpoint_config=hf_config(), sd_adapter=adapter_for(rmodel, "llama3"), base_folder=str(tmp_path)) as r:
        assert r.load() and r.loaded_step == 2
    assert_state_equal(model.state_dict(), rmodel.state_dict())
    assert_state_equal(opts.state_dict(), ropts.state_dict())
    assert rscheds.state_dict() == scheds.state_dict()
    assert (rts.step, rts.losses) == (2, [3.0, 2.0])
    # Resumed training continues identically.
    train_steps(model, opts, scheds, n=1, seed=11)
    train_steps(rmodel, ropts, rscheds, n=1, seed=11)
    assert_state_equal(model.state_dict(), rmodel.state_dict())


def test_model_only_step_cannot_restore_training_state(tmp_path):
    model, _ = save_model_step(tmp_path, "qwen3")
    rmodel = build_titan_model("qwen3", seed=3)
    ropts, rscheds = build_training_parts(rmodel)
    before = snapshot(rmodel)
    with Checkpointer(model_parts=[rmodel], optimizers=ropts, lr_schedulers=rscheds, checkpoint_config=hf_config(),
                      sd_adapter=adapter_for(rmodel, "qwen3"), base_folder=str(tmp_path)) as r:
        with pytest.raises(StateMismatchError, match="model weights only") as err:
            r.load(1)
        assert "optimizer" in err.value.keys
    assert_state_equal(before, rmodel.state_dict())  # nothing applied


def test_last_step_export_in_bfloat16_is_a_bf16_hf_directory(tmp_path):
    model = build_titan_model("qwen3")
    opts, scheds = build_training_parts(model)
    cfg = hf_config(last_save_model_only=True, export_dtype="bfloat16")
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, checkpoint_config=cfg,
                      sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path)) as c:
        c.save(10, last_step=True)
    step_dir = tmp_path / "checkpoint" / "step-10"
    assert not (step_dir / "training_state").exists()
    assert json.loads((step_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {e.dtype for _, e in HFDirectory.open(str(step_dir)).tensors.values()} == {torch.bfloat16}
    # An fp32 trainer can start from the bf16 export: values are cast on the way in.
    fp32 = load_model_step(tmp_path, "qwen3", step=10)
    expected = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert_state_equal(expected, fp32.state_dict())


def test_tied_embeddings_stay_tied_after_load(tmp_path):
    save_model_step(tmp_path, "qwen3")
    loaded = load_model_step(tmp_path, "qwen3")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        loaded.tok_embeddings.weight[0, 0] = 123.0
    assert loaded.output.weight[0, 0].item() == 123.0


def test_receiver_of_another_shape_is_refused_untouched(tmp_path):
    save_model_step(tmp_path, "llama3")
    other = build_titan_model("llama3", seed=2, n_layers=3)  # one layer more than stored
    before = snapshot(other)
    with Checkpointer(model_parts=[other], checkpoint_config=hf_config(), sd_adapter=adapter_for(other, "llama3"), base_folder=str(tmp_path)) as c:
        with pytest.raises(StateMismatchError, match="model.layers.2") as err:
            c.load()
        assert c.loaded_step == -1
    assert any("layers.2" in k for k in err.value.keys)
    assert_state_equal(before, other.state_dict())


def test_without_adapter_names_stay_torchtitan_and_no_config(tmp_path):
    model = build_titan_model("qwen3")
    with Checkpointer(model_parts=[model], checkpoint_config=hf_config(), base_folder=str(tmp_path)) as c:
        c.save(1)
    step_dir = tmp_path / "checkpoint" / "step-1"
    assert not (step_dir / "config.json").exists()
    assert "tok_embeddings.weight" in HFDirectory.open(str(step_dir)).tensors


# ---------------------------------------------------------------------------------- foreign directories
def test_initial_load_of_a_save_pretrained_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    hf_dir = tmp_path / "pretrained"
    hf_model.save_pretrained(str(hf_dir))
    assert (hf_dir / "model.safetensors").is_file() and not (hf_dir / "model.safetensors.index.json").exists()

    model = build_titan_model("qwen3", seed=3)
    cfg = hf_config(initial_load_path=str(hf_dir), initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path / "run")) as c:
        assert c.load() is True
    hf_sd = hf_model.state_dict()
    assert torch.equal(model.tok_embeddings.weight, hf_sd["model.embed_tokens.weight"])
    assert torch.equal(model.layers["1"].attention.wk.weight, hf_sd["model.layers.1.self_attn.k_proj.weight"])
    assert model.output.weight is model.tok_embeddings.weight


def test_initial_load_in_hf_of_a_dcp_directory_is_a_config_error(tmp_path):
    from checkpointing import ConfigError

    model = build_titan_model("qwen3")
    dcp_cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", interval=1)
    with Checkpointer(model_parts=[model], checkpoint_config=dcp_cfg, base_folder=str(tmp_path / "dcp")) as c:
        c.save(1)
    dcp_step = str(tmp_path / "dcp" / "checkpoint" / "step-1")
    cfg = hf_config(initial_load_path=dcp_step, initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path / "run")) as c:
        with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
            c.load()


def test_manifest_checksums_computed_while_writing_match_the_files(tmp_path):
    from checkpointing.checksum import FileDigest, digest_file

    _, step_dir = save_model_step(tmp_path, "llama3")
    manifest = json.loads(open(os.path.join(step_dir, "manifest.json")).read())
    for rel, entry in manifest["files"].items():
        assert (entry["size"], FileDigest.from_entry(entry)) == digest_file(os.path.join(step_dir, rel)), rel


# ---------------------------------------------------------------------------------- TorchTitan's HF keys
def test_last_save_in_hf_exports_the_last_step_as_a_hugging_face_directory(tmp_path):
    """TorchTitan's ``last_save_in_hf``: whatever backend writes the steps, the last one is a
    model-only HF directory in the same folder, in ``export_dtype``."""
    model = build_titan_model("llama3", seed=0)
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", interval=1, last_save_model_only=True,
                           last_save_in_hf=True, export_dtype="bfloat16")
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "llama3"),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
        c.save(2, last_step=True)
    folder = tmp_path / "checkpoint"
    assert (folder / "step-1" / ".metadata").is_file()
    assert (folder / "step-2" / "model.safetensors.index.json").is_file() and (folder / "step-2" / "config.json").is_file()
    other = build_titan_model("llama3", seed=5).to(torch.bfloat16)
    read = hf_config(initial_load_path=str(folder / "step-2"), initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[other], checkpoint_config=read, sd_adapter=adapter_for(other, "llama3"),
                      base_folder=str(tmp_path / "run")) as r:
        assert r.load()
    assert_state_equal({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, other.state_dict())


def test_a_dcp_checkpointer_resumes_from_its_own_steps_beside_the_hf_export(tmp_path):
    """The folder holds dcp step-1 and the hf export step-2: the dcp Checkpointer resumes from
    step-1 (step-2 is another backend's, by its manifest) and its retention never purges it."""
    model = build_titan_model("llama3", seed=0)
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", interval=1, last_save_model_only=True,
                           last_save_in_hf=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "llama3"),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
        c.save(2, last_step=True)
    other = build_titan_model("llama3", seed=5)
    resume = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", interval=1, keep_latest_k=2)
    with Checkpointer(model_parts=[other], checkpoint_config=resume, base_folder=str(tmp_path)) as r:
        assert r.load() and r.loaded_step == 1
        assert_state_equal(model.state_dict(), other.state_dict())
        r.save(3)
        r.save(4)
        r.save(5)
    left = sorted(os.listdir(tmp_path / "checkpoint"))
    assert left == ["step-2", "step-4", "step-5"], left  # dcp step-1 and step-3 purged; the hf export kept
    hf_reader = CheckpointConfig(enable=True, backend="hf", folder="checkpoint", load_only=True)
    with Checkpointer(model_parts=[build_titan_model("llama3", seed=6)], checkpoint_config=hf_reader,
                      sd_adapter=adapter_for(model, "llama3"), base_folder=str(tmp_path)) as h:
        assert h.load() and h.loaded_step == 2


def test_last_save_in_hf_needs_model_only_and_an_adapter(tmp_path):
    from checkpointing import ConfigError

    with pytest.raises(ConfigError, match="last_save_in_hf = true needs checkpoint.last_save_model_only"):
        CheckpointConfig(last_save_in_hf=True, last_save_model_only=False)
    cfg = CheckpointConfig(enable=True, last_save_in_hf=True, last_save_model_only=True)
    with pytest.raises(ConfigError, match="state-dict adapter"):
        Checkpointer(model_parts=[build_titan_model()], checkpoint_config=cfg, base_folder=str(tmp_path))


def test_initial_load_in_hf_without_a_path_reads_the_adapters_hf_assets_path(tmp_path):
    """As TorchTitan: with no initial_load_path, HF weights come from model.hf_assets_path."""
    from torchtitan.protocols.train_spec import get_train_spec

    model, step_dir = save_model_step(tmp_path / "src", "qwen3", seed=0)
    other = build_titan_model("qwen3", seed=7)
    adapter = get_train_spec("qwen3").state_dict_adapter(other.model_args, step_dir)
    cfg = hf_config(initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[other], checkpoint_config=cfg, sd_adapter=adapter, base_folder=str(tmp_path / "run")) as c:
        assert c.load() and c.stats.last_load_path == "initial"
    assert_state_equal(model.state_dict(), other.state_dict())
    with Checkpointer(model_parts=[other], checkpoint_config=cfg, sd_adapter=adapter_for(other, "qwen3"),
                      base_folder=str(tmp_path / "run2")) as c:
        from checkpointing import ConfigError

        with pytest.raises(ConfigError, match="hf_assets_path"):
            c.load()
