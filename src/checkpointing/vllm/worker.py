"""Worker extension: what the caller asks vLLM's worker about its weights, by method name.

``LLM(worker_extension_cls=WORKER_EXTENSION)`` mixes these methods into vLLM's worker, so the
caller reaches them with ``llm.collective_rpc("titan_...")``: by name, with plain-data answers,
in the multiprocess engine core and in process alike, without vLLM's insecure serialization
(sending functions) and without a tensor crossing the RPC.
"""

from __future__ import annotations

import gc
import hashlib
import typing
from typing import Any

import torch
import torch.nn as nn


class CheckpointerWorkerExtension:
    def _titan_engine(self) -> Any:
        from .engine import CheckpointerWeightTransferEngine

        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, CheckpointerWeightTransferEngine):
            from ..errors import ConfigError

            raise ConfigError(
                "vLLM was started without the titan_checkpointing weight-transfer engine "
                "(weight_transfer_config={'backend': 'titan_checkpointing'}; see checkpointing.vllm.engine_kwargs)"
            )
        return engine

    def titan_weight_status(self) -> dict[str, Any]:
        """The last update's outcome: loaded (bool), loaded_step, error (plain data or None),
        updates, and the seconds the last reload took inside vLLM."""
        engine = self._titan_engine()
        sink = engine.sink
        return {
            "loaded": engine.loaded,
            "loaded_step": engine.loaded_step(),
            "error": engine.error,
            "updates": sink.updates if sink is not None else 0,
            "reload_seconds": sink.last_seconds if sink is not None else 0.0,
        }

    def titan_latest_step(self) -> int:
        return self._titan_engine().latest_step()

    def titan_weight_digests(self) -> dict[str, str]:
        return weight_digests(self.model_runner.get_model())  # type: ignore[attr-defined]

    def titan_model_census(self) -> dict[str, int]:
        return model_census()


@torch.no_grad()
def weight_digests(model: nn.Module) -> dict[str, str]:
    """A sha256 per weight of the running vLLM model, of the values it *computes with*.

    A linear layer's parameter may be a ``(0,)`` placeholder once vLLM has repacked it into a
    kernel format (oneDNN on CPU), so its matrix is read back through the layer's own kernel:
    ``apply(identity)`` is exactly ``W^T`` (each output is one weight times 1 plus zeros).
    Everything else is hashed from its parameter."""
    from vllm.model_executor.layers.linear import LinearBase

    digests: dict[str, str] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, param in module.named_parameters(recurse=False):
            name = prefix + param_name
            if isinstance(module, LinearBase) and param_name == "weight":
                rows = typing.cast(int, module.input_size_per_partition)  # set as an int by LinearBase; nn.Module types it Tensor | Module
                eye = torch.eye(rows, dtype=module.params_dtype, device=_device(module))
                value = module.quant_method.apply(module, eye)
            else:
                value = param
            digests[name] = _sha256(value)
    return digests


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters() if p.numel()), torch.device("cpu"))


def _sha256(t: torch.Tensor) -> str:
    if t.numel() == 0:
        return "empty"
    raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    # numpy's stubs declare ndarray's buffer protocol (__buffer__) for Python >= 3.12 only
    return hashlib.sha256(raw).hexdigest()  # type: ignore[arg-type]


def model_census() -> dict[str, int]:
    """What this process holds of TorchTitan's model: its modules and their parameter bytes.
    A vLLM generator fed by the Checkpointer should hold none (the sink keeps no tensor)."""
    # vLLM freezes the heap at start-up (gc.freeze) and get_objects() skips frozen objects: look
    # at them too, then freeze again (everything alive now, as vLLM's own freeze would).
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        # type(), not isinstance(): the heap holds dead weak proxies, which raise on isinstance().
        modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module) and type(o).__module__.startswith("torchtitan.")]
    finally:
        if frozen:
            gc.freeze()
    params = {id(p): p for m in modules for p in m.parameters() if p.device.type != "meta"}
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    return {"torchtitan_modules": len(modules), "torchtitan_parameter_bytes": nbytes}
