"""Turning live training objects into the plain state a backend stores, and back.

This is the one place that knows TorchTitan's state layout: the model flattened to FQN keys
(``ModelWrapper``), and optimizer / lr_scheduler / dataloader / user states as Stateful objects
beside it under their own keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .distributed import is_dtensor
from .receiver import TensorSpec, specs_of

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
        self._specs: dict[str, TensorSpec] | None = None
        self._slots = self._weight_slots()
        self._ties = self._tie_groups()
        self._tied_followers = {k for keys in self._ties for k in keys[1:]}

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
        self._specs = None

    # -- adopting tensors instead of copying into them
    def specs(self) -> dict[str, TensorSpec]:
        """The receiver's shapes and dtypes, computed once: adopting or owning weights keeps
        both (adopt refuses any other), so only a load that replaces tensors recomputes them.
        One object across loads, which lets a backend skip a check it already made."""
        if self._specs is None:
            self._specs = specs_of(self._sd)
        return self._specs

    def _weight_slots(self) -> dict[str, tuple[nn.Module, str]] | None:
        """State-dict key -> (module, attribute) of the parameter or buffer behind it; None
        when some key has no such slot (a wrapped or sharded model), which rules adoption out."""
        slots: dict[str, tuple[nn.Module, str]] = {}
        for part in self.parts:
            named = [*part.named_parameters(remove_duplicate=False), *part.named_buffers(remove_duplicate=False)]
            for fqn, _ in named:
                owner, _, attr = fqn.rpartition(".")
                slots[fqn] = (part.get_submodule(owner) if owner else part, attr)
        if any(k not in slots or is_dtensor(v) for k, v in self._sd.items()):
            return None
        return {k: slots[k] for k in self._sd}

    def _tie_groups(self) -> list[list[str]]:
        """Keys whose slots hold one and the same tensor (tied weights), found once: after an
        adoption a tied buffer is two view objects, but still one weight."""
        if self._slots is None:
            return []
        groups: dict[int, list[str]] = {}
        for key, (module, attr) in self._slots.items():
            groups.setdefault(id(getattr(module, attr)), []).append(key)
        return [keys for keys in groups.values() if len(keys) > 1]

    @property
    def adoptable(self) -> bool:
        """Every weight is a plain tensor in a slot the module lets us re-point."""
        return self._slots is not None

    def adopt(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Make the module's weights *be* ``tensors`` (views of a published snapshot): no copy.
        Refused (False, nothing changed) unless every tensor matches its weight's shape, dtype
        and device exactly; parameters stay the same objects, so optimizers and hooks that
        hold them keep working."""
        if self._slots is None or tensors.keys() != self._sd.keys():
            return False
        for key, current in self._sd.items():
            new = tensors[key]
            if new.shape != current.shape or new.dtype != current.dtype or new.device != current.device:
                return False
        for keys in self._ties:
            first = tensors[keys[0]]
            if any((t := tensors[k]) is not first and (t.data_ptr(), t.stride()) != (first.data_ptr(), first.stride()) for k in keys):
                return False  # the receiver ties these keys, the version stores them apart
        self._repoint(tensors)
        return True

    def own_weights(self) -> None:
        """Give adopted weights storage of their own (before the snapshot they view goes away)."""
        if self._slots is not None:
            owned = {k: v.clone() for k, v in self._sd.items() if k not in self._tied_followers}
            for keys in self._ties:  # one copy per tied weight, shared as before the adoption
                owned.update(dict.fromkeys(keys[1:], owned[keys[0]]))
            self._repoint(owned)

    def _repoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        assert self._slots is not None
        for key, (module, attr) in self._slots.items():
            current = getattr(module, attr)
            if isinstance(current, nn.Parameter):
                current.data = tensors[key]
            else:
                setattr(module, attr, tensors[key])
        # What _collect() would return for these plain slots, without its cost (~0.2 ms per
        # tensor, as much as the rest of a handoff): each weight's data, which the tensors are
        # (plain tensors that need no grad; a parameter now shares their storage).
        self._sd = {k: tensors[k].detach() if tensors[k].requires_grad else tensors[k] for k in self._slots}


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


def tensor_bytes(state: Any) -> int:
    """Bytes of every tensor in a (nested) state dict; a DTensor counts its global size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0
