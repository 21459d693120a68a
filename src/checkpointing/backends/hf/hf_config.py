"""``config.json`` for a saved step, derived from the TorchTitan model args, so
``transformers.AutoModelForCausalLM.from_pretrained(step_dir)`` (and vLLM) build the same network.

Only architectures whose TorchTitan and transformers implementations compute the same function
are described: dense Qwen3 (``Qwen3ForCausalLM``) and Llama 3 (``LlamaForCausalLM``, whose
TorchTitan RoPE always applies Llama 3 frequency scaling, so the config must carry it or logits
drift). Other args get no config.json, with a warning; the weights still round-trip through
this backend.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ...dtypes import FLOAT_DTYPE_NAMES, dtype_name

log = logging.getLogger(__name__)

def _dtype_name(hf_state: dict[str, Any]) -> str:
    """``torch_dtype`` for config.json: the weights' floating dtype (float32 when unusual)."""
    for value in hf_state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            name = dtype_name(value.dtype)
            return name if name in FLOAT_DTYPE_NAMES else "float32"
    return "float32"


def _shape(hf_state: dict[str, Any], name: str) -> tuple[int, ...] | None:
    value = hf_state.get(name)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _llama_ffn_dim(args: Any) -> int:
    """TorchTitan's FeedForward sizing (llama3/model/model.py)."""
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * math.ceil(hidden / args.multiple_of)


def _token_id(token: int, vocab_size: int) -> int | None:
    """transformers rejects special-token ids outside the vocabulary (debug models shrink it)."""
    return token if 0 <= token < vocab_size else None


def _rope(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """Both spellings: ``rope_theta``/``rope_scaling`` (transformers 4.x, vLLM) and
    ``rope_parameters`` (transformers 5)."""
    params = {"rope_type": "default", "rope_theta": float(theta)}
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if scaling:
        out["rope_scaling"] = dict(scaling)
        params = {**scaling, "rope_theta": float(theta)}
    out["rope_parameters"] = params
    return out


def _common(args: Any, hf_state: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _qwen3(args: Any, hf_state: dict[str, Any], dtype: str) -> dict[str, Any] | None:
    if getattr(args, "moe_enabled", False):
        log.warning("hf backend: no config.json for a Qwen3 MoE model (only dense Qwen3 is described)")
        return None
    if not getattr(args, "qk_norm", True):
        log.warning("hf backend: no config.json for Qwen3 without qk_norm (transformers' Qwen3 always has it)")
        return None
    gate = _shape(hf_state, "model.layers.0.mlp.gate_proj.weight")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_common(args, hf_state, dtype),
        "head_dim": args.head_dim,
        "intermediate_size": gate[0] if gate else args.hidden_dim,
        "tie_word_embeddings": bool(args.enable_weight_tying),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.n_layers,
        "attention_dropout": 0.0,
        "eos_token_id": _token_id(args.eos_id, args.vocab_size),
        **_rope(args.rope_theta, None),
    }


def _llama3(args: Any, hf_state: dict[str, Any], dtype: str) -> dict[str, Any]:
    gate = _shape(hf_state, "model.layers.0.mlp.gate_proj.weight")
    s = args.rope_scaling_args
    scaling = None
    if s.scaling_factor != 1.0:  # factor 1 leaves every frequency as it is
        scaling = {
            "rope_type": "llama3",
            "factor": float(s.scaling_factor),
            "low_freq_factor": float(s.low_freq_factor),
            "high_freq_factor": float(s.high_freq_factor),
            "original_max_position_embeddings": int(s.original_max_position_embeddings),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_common(args, hf_state, dtype),
        "head_dim": args.dim // args.n_heads,
        "intermediate_size": gate[0] if gate else _llama_ffn_dim(args),
        "tie_word_embeddings": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "attention_dropout": 0.0,
        "eos_token_id": _token_id(args.eos_id, args.vocab_size),
        **_rope(args.rope_theta, scaling),
    }


def hf_config(model_args: Any, hf_state: dict[str, Any]) -> dict[str, Any] | None:
    """The config.json dict for ``model_args``, or None for an architecture not described here."""
    if model_args is None:
        return None
    dtype = _dtype_name(hf_state)
    kind = f"{type(model_args).__module__}.{type(model_args).__name__}"
    if kind.startswith("torchtitan.models.qwen3."):
        return _qwen3(model_args, hf_state, dtype)
    if kind.startswith("torchtitan.models.llama3."):
        return _llama3(model_args, hf_state, dtype)
    log.warning("hf backend: no config.json for model args %s (only qwen3 and llama3 are described)", kind)
    return None
