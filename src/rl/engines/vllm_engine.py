"""``engine = "vllm"``: sampling with vLLM (optional extra: ``pip install -e '.[vllm]'``, GPU).

The generator's Checkpointer still loads into a TorchTitan-layout module (``self.model``, on the
GPU in the generator dtype): that keeps the weight handoff identical for every engine. After each
load, :meth:`weights_updated` converts that state dict to Hugging Face names with TorchTitan's
state-dict adapter and hands it to the vLLM model's own ``load_weights`` (the path vLLM uses to
read a checkpoint). vLLM only samples token ids; the behavior logprobs are scored with
``self.model`` through :func:`rl.policy.token_logprobs`, so they follow exactly the trainer's
definition (temperature, banned tokens) whatever vLLM's logprob mode is.

Not exercised on the CPU-only development machine; its test skips without vllm and a GPU.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn as nn

from checkpointing import ConfigError

from ..model import state_dict_adapter
from ..policy import completion_mask, masked, token_logprobs
from . import Rollout, SamplingParams


def hf_config(name: str, model: nn.Module) -> dict:
    """A transformers ``config.json`` for the TorchTitan model (what vLLM builds its model from)."""
    args = model.model_args
    first_ffn = next(iter(model.layers.values())).feed_forward
    common = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=first_ffn.w1.weight.shape[0],
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
    )
    if name == "qwen3":
        return dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=args.head_dim,
                    tie_word_embeddings=args.enable_weight_tying)
    if name == "llama3":
        scaling = args.rope_scaling_args  # TorchTitan's llama3 always applies llama3 rope scaling
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False,
                    rope_scaling=dict(rope_type="llama3", factor=scaling.scaling_factor,
                                      low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                                      original_max_position_embeddings=scaling.original_max_position_embeddings))
    raise ConfigError(f"rl.engine = 'vllm' supports model.name qwen3 and llama3, not {name!r}")


class VLLMEngine:
    def __init__(self, model: nn.Module, *, device: torch.device, tokenizer, banned: torch.Tensor | None, cfg):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"rl.engine = 'vllm' needs the vllm extra (pip install -e '.[vllm]'): {e}") from None
        if device.type != "cuda":
            raise ConfigError("rl.engine = 'vllm' needs a CUDA device (rl.device = 'auto' or 'cuda')")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        from vllm import LLM

        self.model = model.eval()
        self.device = device
        self.banned = banned
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self.allowed_ids = [i for i in range(model.model_args.vocab_size) if banned is None or not banned[i]]
        self.adapter = state_dict_adapter(cfg.model.name, cfg.model.flavor)
        self._config_dir = tempfile.mkdtemp(prefix="rl-vllm-")
        with open(os.path.join(self._config_dir, "config.json"), "w") as f:
            json.dump(hf_config(cfg.model.name, model), f)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(
            model=self._config_dir,
            load_format="dummy",  # real weights arrive through weights_updated()
            skip_tokenizer_init=True,
            dtype=dtype,
            enforce_eager=True,
            gpu_memory_utilization=cfg.rl.vllm_gpu_memory_utilization,
            seed=cfg.rl.seed,
        )

    @classmethod
    def build(cls, model: nn.Module, *, device: torch.device, tokenizer, banned, cfg) -> "VLLMEngine":
        return cls(model, device=device, tokenizer=tokenizer, banned=banned, cfg=cfg)

    def weights_updated(self) -> None:
        hf_state = self.adapter.to_hf({k: v.detach() for k, v in self.model.state_dict().items()})

        def load(vllm_model):
            vllm_model.load_weights(weights=hf_state.items())

        self.llm.apply_model(load)

    def generate(self, prompts: torch.Tensor, params: SamplingParams, seed: int) -> Rollout:
        import vllm

        requests = [{"prompt_token_ids": row} for row in prompts.tolist()]
        sampling = [
            vllm.SamplingParams(
                n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                stop_token_ids=[self.eos_id], allowed_token_ids=self.allowed_ids, seed=seed * 100_003 + i,
                detokenize=False,
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = torch.full((len(requests), params.max_new_tokens), self.pad_id, dtype=torch.long)
        for i, out in enumerate(outputs):
            ids = list(out.outputs[0].token_ids)[: params.max_new_tokens]
            completions[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask = completion_mask(completions, self.eos_id)
        sequences = torch.cat([prompts.cpu(), completions], dim=1)
        logprobs = masked(self.score(sequences, prompts.shape[1], params.temperature).cpu(), mask)
        return Rollout(prompts=prompts.cpu(), completions=completions, logprobs=logprobs, mask=mask)

    @torch.no_grad()
    def score(self, sequences: torch.Tensor, prompt_length: int, temperature: float) -> torch.Tensor:
        return token_logprobs(self.model, sequences.to(self.device), prompt_length, temperature, self.banned).float()
