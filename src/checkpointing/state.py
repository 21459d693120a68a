"""Turning live training objects into the plain state a backend stores, and back.

This is the one place that knows TorchTitan's state layout: the model flattened to FQN keys
(``ModelWrapper``), and optimizer / lr_scheduler / dataloader / user states as Stateful objects
beside it under their own keys.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
DATALOADER = "dataloader"
TRAIN_STATE = "train_state"


class ModelState:
    """The model parts as one flat state dict whose tensors *are* the parameters.

    Because the cached tensors alias the parameters (plain modules and FSDP2 alike), a backend
    that loads in place has already updated the model; ``load_state_dict`` then costs nothing.
    Only when a backend hands back new tensors do we fall back to ``set_model_state_dict``.
    """

    def __init__(self, model_parts: nn.Module | Iterable[nn.Module]):
        self.parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        if not self.parts:
            raise ValueError("model_parts is empty: give the Checkpointer at least one nn.Module")
        self._sd = self._collect()

    def _collect(self) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def state_dict(self) -> dict[str, Any]:
        return self._sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if all(state_dict.get(k) is v for k, v in self._sd.items()):
            return  # loaded in place into the parameters themselves
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))
        self._sd = self._collect()


def plain_state(obj: Any) -> Any:
    """A Stateful's ``state_dict()``; anything else as is."""
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


def apply_state(obj: Any, loaded: Any) -> Any:
    """Hand loaded state back to a Stateful; returns the value to keep for a plain entry."""
    if hasattr(obj, "load_state_dict") and callable(obj.load_state_dict):
        obj.load_state_dict(loaded)
        return obj
    return loaded


def cast_tensors(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors to ``dtype`` (an export), everything else untouched."""
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in state.items()}
