"""The vLLM weight-transfer engine whose data plane is a ``Checkpointer``.

vLLM 0.32's RL API (``LLM.init_weight_transfer_engine / start_weight_update / update_weights /
finish_weight_update``) drives a per-worker engine chosen by ``weight_transfer_config.backend``.
This one does not receive bytes over vLLM's RPC at all: at ``init`` it builds a load-only
``Checkpointer`` from the ``[weight_sync]`` table it is given, over a :class:`~.sink.VLLMSink`,
and each ``update_weights({"step": N})`` is ``checkpointer.load(N)``: the worker pulls the
published version itself, from whatever backend the table names (memory/shm, dcp, hf, a
plugin's). So every backend is a vLLM weight-transfer engine, unchanged.

Never half-applied: ``start_weight_update`` and ``finish_weight_update`` do nothing to the
model; the whole reload happens inside the sink, after the Checkpointer has verified the
version. A failed update raises (typed, and remembered for :meth:`last_error`, because vLLM's
multiprocess RPC passes only the message on), vLLM's weight version is not advanced, and the
model still holds the previous version.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from ..errors import CheckpointError, ConfigError
from .sink import VLLMSink
from .wire import decode_checkpoint_config, decode_dataclass, decode_specs

log = logging.getLogger(__name__)


@dataclass
class CheckpointerInitInfo(WeightTransferInitInfo):
    """Built by :func:`checkpointing.vllm.init_info` in the caller (plain data)."""

    checkpoint: dict[str, Any] = field(default_factory=dict)
    """The ``[weight_sync]``-shaped CheckpointConfig as plain tables (:mod:`.wire`)."""
    base_folder: str = ""
    model_name: str = ""
    """TorchTitan train-spec name (``qwen3``, ``llama3``): whose state-dict adapter renames."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """TorchTitan model args of the published model (for its state-dict adapter)."""
    specs: dict[str, list] = field(default_factory=dict)
    """Published tensor name -> [shape, dtype]."""
    hf_assets_path: str | None = None


@dataclass
class CheckpointerUpdateInfo(WeightTransferUpdateInfo):
    step: int = -1
    """The published step to load; -1: the newest (or the config's initial load when none)."""


class CheckpointerWeightTransferEngine(WeightTransferEngine[CheckpointerInitInfo, CheckpointerUpdateInfo]):
    init_info_cls = CheckpointerInitInfo
    update_info_cls = CheckpointerUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.checkpointer: Any = None
        self.sink: VLLMSink | None = None
        self.error: dict[str, Any] | None = None
        """The last update's failure as plain data (vLLM's multiprocess RPC passes on only a message)."""
        self.loaded = False
        """Whether the last update found a version to load (False: nothing published yet)."""

    def init_transfer_engine(self, init_info: CheckpointerInitInfo) -> None:
        from ..manager import Checkpointer

        self.shutdown()
        self.error = None
        # A reader: never saves, never cleans up the publisher's files.
        config = dataclasses.replace(decode_checkpoint_config(init_info.checkpoint), load_only=True)
        adapter = state_dict_adapter(init_info.model_name, decode_dataclass(init_info.model_args), init_info.hf_assets_path)
        self.sink = VLLMSink(lambda: (self.model, self.model_config), adapter, decode_specs(init_info.specs))
        self.checkpointer = Checkpointer(
            checkpoint_config=config, base_folder=init_info.base_folder, sd_adapter=adapter, sink=self.sink
        )

    def start_weight_update(self) -> None:
        self._require_init()

    def finish_weight_update(self) -> None:
        pass  # the reload finished inside receive_weights, after every check passed

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which has no device to sync on
        # a CPU-only machine; the sink synchronizes CUDA itself before the lease is released.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: CheckpointerUpdateInfo) -> None:
        self._require_init()
        self.error = None
        self.loaded = False
        try:
            self.loaded = self.checkpointer.load(update_info.step)
        except CheckpointError as e:
            self.error = describe_error(e)
            raise

    def latest_step(self) -> int:
        self._require_init()
        return self.checkpointer.latest_step()

    def loaded_step(self) -> int:
        return self.checkpointer.loaded_step if self.checkpointer is not None else -1

    def _require_init(self) -> None:
        if self.checkpointer is None:
            raise ConfigError("the titan_checkpointing engine needs init_weight_transfer_engine(...) before an update")

    def shutdown(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.checkpointer = None
        self.sink = None


def state_dict_adapter(model_name: str, model_args: Any, hf_assets_path: str | None) -> Any:
    """TorchTitan's state-dict adapter of train spec ``model_name``, built over ``model_args``."""
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(model_name)
    except ValueError as e:
        raise ConfigError(f"vLLM weight transfer: model {model_name!r}: {e}") from None
    if spec.state_dict_adapter is None:
        raise ConfigError(f"TorchTitan model {model_name!r} has no state-dict adapter: its names cannot be mapped to vLLM's")
    return spec.state_dict_adapter(model_args, hf_assets_path)


def describe_error(e: BaseException) -> dict[str, Any]:
    """A typed error as plain data, to cross vLLM's RPC (see :func:`.client.raise_described`)."""
    return {
        "types": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "keys": list(getattr(e, "keys", []) or []),
        "path": getattr(e, "path", None),
    }
