"""A TensorSink that feeds vLLM's own layer-wise reload, renaming through TorchTitan's adapter.

Why layer-wise reload and not ``model.load_weights`` or in-place copies: after start-up vLLM
post-processes weights into kernel formats (on CPU it repacks every linear layer into oneDNN
handles and leaves a ``(0,)`` parameter behind; quantized GPU layers do the same kind of thing),
so neither copying into parameters nor calling ``load_weights`` on the running model can work.
``initialize_layerwise_reload`` puts the checkpoint-format parameters back, ``load_weights``
fills them layer by layer (each layer is re-processed as soon as it is complete), and
``finalize_layerwise_reload`` finishes the rest. That is the path vLLM's own checkpoint-format
weight-transfer engines take.

That reload cannot be rolled back, so everything that can fail is checked before it starts:
the Checkpointer has already matched the published version against :meth:`VLLMSink.specs`
(names both ways, shapes, castable dtypes) and verified its bytes; here every published name
must map to a Hugging Face name (TorchTitan's ``to_hf`` drops names it does not know, which would
be a silent no-update), and after the load vLLM must report every one of its parameters loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..errors import StateMismatchError
from ..receiver import TensorSpec

log = logging.getLogger(__name__)

MAX_LISTED = 20


class VLLMSink:
    """Takes one verified version of TorchTitan-named tensors into a running vLLM model.

    ``target()`` returns ``(model, model_config)``: the module vLLM runs and the config its
    reload needs (a callable, because vLLM can retarget an update at a draft model).
    ``sd_adapter`` is TorchTitan's state-dict adapter for the published model; ``specs`` the
    published tensors (TorchTitan FQNs). The sink keeps no tensor between calls."""

    def __init__(self, target: Callable[[], tuple[Any, Any]], sd_adapter: Any, specs: Mapping[str, TensorSpec]):
        self._target = target
        self._adapter = sd_adapter
        self._specs = dict(specs)
        self._hf_names = self._map_names()
        self.last_seconds = 0.0
        self.updates = 0

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def _map_names(self) -> dict[str, list[str]]:
        """Published name -> the Hugging Face names ``to_hf`` makes of it (checked once, on
        meta tensors: no memory). A name that maps to nothing is an error, except the output
        projection of a model with tied embeddings (HF stores it once, as the embedding)."""
        tied = bool(getattr(getattr(self._adapter, "model_args", None), "enable_weight_tying", False))
        mapped: dict[str, list[str]] = {}
        lost: list[str] = []
        for name, spec in self._specs.items():
            hf = list(self._adapter.to_hf({name: torch.empty(spec.shape, dtype=spec.dtype, device="meta")}))
            if not hf and not (tied and name == "output.weight"):
                lost.append(name)
            mapped[name] = hf
        if lost:
            raise StateMismatchError(
                f"TorchTitan's {type(self._adapter).__name__} maps no Hugging Face name to {lost[:MAX_LISTED]}: vLLM would "
                "silently keep its old values for them",
                lost,
            )
        return mapped

    def receive(self, step: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        begin = time.perf_counter()
        hf_state = self._adapter.to_hf(dict(tensors))
        model, model_config = self._target()
        initialize_layerwise_reload(model)
        loaded = model.load_weights(iter(hf_state.items()))
        finalize_layerwise_reload(model, model_config)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the tensors may be a lease's views: no copy from them may still be queued
        del hf_state
        self._check_all_loaded(model, loaded, step)
        self.updates += 1
        self.last_seconds = time.perf_counter() - begin
        log.debug("vLLM took step %d in %.1f ms", step, 1e3 * self.last_seconds)

    @staticmethod
    def _check_all_loaded(model: Any, loaded: Any, step: int) -> None:
        """vLLM's ``load_weights`` returns the parameters it wrote; one it did not write kept its
        old value (layer-wise reload puts the old kernel tensors back and only logs it)."""
        if loaded is None:
            return
        missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
        if missing:
            raise StateMismatchError(
                f"step {step}: vLLM's model has parameters no published tensor fed: {missing[:MAX_LISTED]} (they kept their "
                "old values); the published model does not match the one vLLM serves",
                missing,
            )
