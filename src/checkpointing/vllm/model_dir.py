"""What vLLM is started from, derived from the TorchTitan model args alone (no weights).

vLLM builds its network from a Hugging Face ``config.json``; the ``hf`` backend already writes
one for every checkpoint it saves (:mod:`checkpointing.backends.hf.hf_config`), and the vLLM
generator uses the very same function, so the network vLLM builds and the one an ``hf`` export
describes cannot drift apart. The published tensors' names and shapes come from the TorchTitan
model built on the meta device: no memory, no second copy of the weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..backends.hf.hf_config import hf_config
from ..errors import ConfigError
from ..receiver import TensorSpec


def meta_model(model_name: str, model_args: Any) -> torch.nn.Module:
    from torchtitan.protocols.train_spec import get_train_spec

    with torch.device("meta"):
        return get_train_spec(model_name).model_cls(model_args)


def published_specs(model_name: str, model_args: Any) -> dict[str, TensorSpec]:
    """Name -> shape, dtype of every tensor a TorchTitan trainer of this model publishes."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in meta_model(model_name, model_args).state_dict().items()}


def write_model_config(folder: str, model_name: str, model_args: Any, sd_adapter: Any) -> str:
    """Write ``folder/config.json`` for vLLM (``LLM(model=folder, load_format="dummy")``)."""
    state = meta_model(model_name, model_args).state_dict()
    config = hf_config(model_args, sd_adapter.to_hf(dict(state)))
    if config is None:
        raise ConfigError(
            f"no Hugging Face config.json for TorchTitan model {model_name!r} ({type(model_args).__name__}): "
            "vLLM can serve dense qwen3 and llama3 from this library"
        )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return folder
