"""The policy model: whatever TorchTitan's train spec builds for ``[model] name / flavor``.

We add one flavor, ``rl_tiny``, to TorchTitan's own flavor tables (qwen3 and llama3): the same
architecture and code path as ``debugmodel``, sized for the shipped 45-token tokenizer so the
default job learns on 2 CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
import torch.nn as nn

from checkpointing import ConfigError

from .config import DTYPES as DTYPE_NAMES

RL_TINY = "rl_tiny"
_TINY_SIZES = dict(vocab_size=48, dim=128, n_layers=2, n_heads=4, max_seq_len=64)
_registered = False


def train_spec(name: str):
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        return get_train_spec(name)
    except ValueError as e:
        raise ConfigError(f"model.name = {name!r}: {e}") from None


def register_rl_flavors() -> None:
    """Add ``rl_tiny`` to qwen3's and llama3's flavor tables (idempotent)."""
    global _registered
    if _registered:
        return
    qwen3 = train_spec("qwen3").model_args
    if RL_TINY not in qwen3:
        qwen3[RL_TINY] = dataclasses.replace(
            qwen3["debugmodel"], **_TINY_SIZES, head_dim=32, n_kv_heads=2, hidden_dim=256, enable_weight_tying=False
        )
    llama3 = train_spec("llama3").model_args
    if RL_TINY not in llama3:
        llama3[RL_TINY] = dataclasses.replace(llama3["debugmodel"], **_TINY_SIZES, n_kv_heads=2)
    _registered = True


def resolve_model_args(name: str, flavor: str):
    register_rl_flavors()
    flavors = train_spec(name).model_args
    if flavor not in flavors:
        raise ConfigError(
            f"model.flavor = {flavor!r} is not a flavor of model {name!r}; allowed: {', '.join(sorted(flavors))}"
        )
    return flavors[flavor]


def build_model(name: str, flavor: str, *, device: torch.device, dtype: torch.dtype, seed: int | None) -> nn.Module:
    """Build on the meta device, materialize on ``device``, initialize.

    ``seed=None`` is for a receiver (the generator): its parameters are filled with NaN so a
    weight that a sync failed to write poisons every logit instead of passing unnoticed."""
    args = resolve_model_args(name, flavor)
    spec = train_spec(name)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device=device)
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights(buffer_device=device)
        if seed is None:
            for p in model.parameters():
                p.fill_(math.nan)
    cast_parameters(model, dtype)
    if seed is None:
        model.requires_grad_(False)
    return model


def vocab_size(model: nn.Module) -> int:
    """The vocabulary size a model from :func:`build_model` was built for. Its TorchTitan
    ``model_args`` is a plain attribute, which the type of ``nn.Module.__getattr__`` (a tensor or
    a submodule) does not describe: hence the cast."""
    return cast(Any, model).model_args.vocab_size


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype``; buffers (RoPE tables, complex for llama3) stay as built, since
    ``Module.to(dtype)`` would drop the imaginary part of a complex buffer. Tied weights stay tied:
    the shared Parameter is one object."""
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def state_dict_adapter(name: str, flavor: str, hf_assets_path: str | None = None):
    """TorchTitan's state-dict adapter instance for the model (``hf`` backends need it), or None."""
    spec = train_spec(name)
    if spec.state_dict_adapter is None:
        return None
    return spec.state_dict_adapter(resolve_model_args(name, flavor), hf_assets_path)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("rl.device = 'cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(setting)


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""The generator dtypes ``[rl] generator_dtype`` may name (rl.config), as torch dtypes."""
