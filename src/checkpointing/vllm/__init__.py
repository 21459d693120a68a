"""vLLM as a Checkpointer reader: every backend becomes a vLLM weight-transfer engine.

The generator's Checkpointer lives *inside* vLLM's worker process and loads each published
version itself (shared memory, DCP or safetensors files, a plugin's storage) straight into
vLLM's layer-wise reload, renamed by TorchTitan's state-dict adapter on the way; no tensor goes
through vLLM's RPC, and the generator keeps no TorchTitan copy of the model.

* :func:`engine_kwargs`: the ``LLM(...)`` arguments that select the engine (registered in
  every vLLM process by the ``vllm.general_plugins`` entry point, :mod:`.plugin`).
* :func:`write_model_config`: the ``config.json`` vLLM starts from (the ``hf`` backend's).
* :class:`VLLMWeightSync`: init the engine from a ``[weight_sync]`` table, ``load()`` versions.

Needs vLLM 0.32 (``pip install -e '.[vllm]'`` on CUDA, ``tools/install.sh`` on CPU). Importing
this package does not import vLLM.
"""

from .client import INITIAL_VERSION, WORKER_EXTENSION, VLLMWeightSync, engine_kwargs, init_info
from .model_dir import published_specs, write_model_config
from .plugin import ENGINE_NAME

__all__ = [
    "ENGINE_NAME",
    "WORKER_EXTENSION",
    "INITIAL_VERSION",
    "VLLMWeightSync",
    "engine_kwargs",
    "init_info",
    "published_specs",
    "write_model_config",
]
