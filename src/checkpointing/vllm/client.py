"""The caller's side: start vLLM with the engine, point it at a ``[weight_sync]`` table, pull.

::

    llm = LLM(model=hf_dir_with_config_json, **engine_kwargs(), ...)
    sync = VLLMWeightSync(llm, cfg.weight_sync, cfg.job.dump_folder,
                          model_name="qwen3", model_args=args, specs=specs)
    sync.load()            # the newest published step (or initial_load_path), into vLLM
    sync.loaded_step       # vLLM's own weight version, as an int

Each :meth:`VLLMWeightSync.load` is vLLM's ``start_weight_update`` / ``update_weights`` /
``finish_weight_update(weight_version)`` followed by ``reset_prefix_cache()``: a reload does not
invalidate vLLM's prefix cache, and KV computed with the previous weights must never be reused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .. import errors
from ..errors import CheckpointError
from ..receiver import TensorSpec
from .model_dir import published_specs
from .plugin import ENGINE_NAME
from .wire import encode_checkpoint_config, encode_dataclass, encode_specs

WORKER_EXTENSION = "checkpointing.vllm.worker.CheckpointerWorkerExtension"
INITIAL_VERSION = "initial"
"""vLLM's weight version after a load from ``initial_load_path`` (no published step yet)."""


def engine_kwargs() -> dict[str, Any]:
    """The ``LLM(...)`` / ``EngineArgs`` arguments that select this engine and its worker
    extension. Nothing process-wide: no environment variable, no insecure serialization."""
    from vllm.config import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend=ENGINE_NAME), "worker_extension_cls": WORKER_EXTENSION}


def init_info(
    checkpoint_config: Any,
    base_folder: str,
    *,
    model_name: str,
    model_args: Any,
    specs: Mapping[str, TensorSpec] | None = None,
    hf_assets_path: str | None = None,
) -> dict[str, Any]:
    """The plain-data ``init_info`` the worker builds its Checkpointer from. ``specs``: the
    published tensors (default: those of the TorchTitan model ``model_name`` over ``model_args``)."""
    config = dataclasses.replace(checkpoint_config, load_only=True)
    if specs is None:
        specs = published_specs(model_name, model_args)
    return {
        "checkpoint": encode_checkpoint_config(config),
        "base_folder": base_folder,
        "model_name": model_name,
        "model_args": encode_dataclass(model_args),
        "specs": encode_specs(specs),
        "hf_assets_path": hf_assets_path,
    }


class VLLMWeightSync:
    """A running ``vllm.LLM`` whose weights come from a Checkpointer in its worker."""

    def __init__(self, llm: Any, checkpoint_config: Any, base_folder: str, **model: Any):
        self.llm = llm
        self.folder = f"{base_folder}/{checkpoint_config.folder}" if base_folder else checkpoint_config.folder
        self._rpc_or_raise("init_weight_transfer_engine", {"init_info": init_info(checkpoint_config, base_folder, **model)})

    def load(self, step: int = -1) -> bool:
        """Load ``step`` (-1: the newest; the initial load when nothing is published) into vLLM.
        False when there is nothing to load; a typed CheckpointError when the version is damaged
        or does not fit, and then vLLM still serves the previous version, unchanged."""
        self.llm.start_weight_update()
        self._rpc_or_raise("update_weights", {"update_info": {"step": step}})
        status = self.status()
        if not status["loaded"]:
            self.llm.finish_weight_update()  # closes the session; the version stays
            return False
        loaded = status["loaded_step"]
        self.llm.finish_weight_update(weight_version=str(loaded) if loaded >= 0 else INITIAL_VERSION)
        self.llm.reset_prefix_cache()  # KV computed with the previous weights must never be reused
        return True

    @property
    def loaded_step(self) -> int:
        """The published step vLLM serves (vLLM's weight version); -1 before any or after an
        initial load."""
        version = self.llm.get_weight_version()
        return int(version) if isinstance(version, str) and version.lstrip("-").isdigit() else -1

    def latest_step(self) -> int:
        return self._worker("titan_latest_step")

    def status(self) -> dict[str, Any]:
        return self._worker("titan_weight_status")

    def weight_digests(self) -> dict[str, str]:
        """sha256 per vLLM weight, of the values vLLM computes with (see ``worker.weight_digests``)."""
        return self._worker("titan_weight_digests")

    def model_census(self) -> dict[str, int]:
        """TorchTitan modules and parameter bytes held in vLLM's worker process."""
        return self._worker("titan_model_census")

    def close(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def _worker(self, method: str) -> Any:
        return self.llm.collective_rpc(method)[0]  # one worker: tensor/pipeline parallel size 1

    def _rpc_or_raise(self, method: str, request: dict[str, Any]) -> None:
        """Call an RL method of the LLM; a failure in the worker comes back typed.

        In process, the worker's exception arrives as it is. Through the multiprocess engine
        core vLLM passes on only its message, so the worker's engine keeps the error as plain
        data and it is raised again here, as the same ``checkpointing.errors`` type."""
        try:
            getattr(self.llm, method)(request)
        except CheckpointError:
            raise
        except Exception as e:
            described = self.status().get("error") if method == "update_weights" else None
            if described:
                raise rebuild_error(described) from e
            raise


def rebuild_error(described: Mapping[str, Any]) -> CheckpointError:
    """The most specific public ``checkpointing.errors`` class the worker's error is an
    instance of, with its message, keys and path."""
    public = {name: getattr(errors, name) for name in dir(errors) if isinstance(getattr(errors, name), type)}
    cls = next((public[n] for n in described["types"] if n in public and issubclass(public[n], CheckpointError)), CheckpointError)
    message = f"in vLLM's worker: {described['message']}"
    if issubclass(cls, errors.StateMismatchError):
        return cls(message, described.get("keys"))
    if issubclass(cls, errors.CorruptCheckpointError):
        return cls(message, described.get("path"))
    return cls(message)
