"""``vllm.general_plugins`` entry point: registers the engine in every process vLLM starts.

vLLM calls every function of that entry-point group in its own process, its engine-core process
and each worker process (``vllm.plugins.load_general_plugins``), before a worker creates its
weight-transfer engine. Registration is by module path, so nothing here imports torch or the
engine until a vLLM configured with ``weight_transfer_config={"backend": "titan_checkpointing"}``
asks for it, and it is idempotent (vLLM may call a plugin more than once per process).
"""

from __future__ import annotations

ENGINE_NAME = "titan_checkpointing"
ENGINE_MODULE = "checkpointing.vllm.engine"
ENGINE_CLASS = "CheckpointerWeightTransferEngine"


def register() -> None:
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(ENGINE_NAME, ENGINE_MODULE, ENGINE_CLASS)
    except ValueError:
        pass  # already registered in this process
