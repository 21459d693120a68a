"""What crosses from the caller to vLLM's worker process: plain data only.

``LLM.init_weight_transfer_engine`` carries its ``init_info`` through vLLM's RPC (msgpack in the
multiprocess engine core), which takes numbers, strings, lists and dicts; anything else would
need vLLM's insecure (pickle) serialization, which we never turn on. So the three things the
worker needs to build its Checkpointer are encoded here as plain trees and rebuilt on the other
side:

* the ``[weight_sync]``-shaped checkpoint config, as nested tables of values (rebuilt from the
  worker's own ``CheckpointConfig`` class, whose ``[<backend>]`` tables come from the same
  backend registry, plugins included),
* the TorchTitan model args (a dataclass tree; the worker builds TorchTitan's state-dict adapter
  from them, and only from classes under ``torchtitan.``: no other code is imported by name),
* the specs of the published tensors (name -> shape, dtype), which a load must match exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from typing import Any

import torch

from ..dtypes import dtype_name, storable_dtypes
from ..errors import ConfigError
from ..receiver import TensorSpec

_DTYPES = storable_dtypes()
_CLASS = "__class__"
ALLOWED_MODULE_PREFIXES = ("torchtitan.",)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} cannot cross to the vLLM worker; allowed: {', '.join(_DTYPES)}") from None


def encode_dataclass(obj: Any) -> Any:
    """A dataclass tree as ``{"__class__": "module:Name", field: value, ...}``; leaves as is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {_CLASS: f"{type(obj).__module__}:{type(obj).__qualname__}"}
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = encode_dataclass(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [encode_dataclass(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(f"{type(obj).__name__} value {obj!r} cannot cross to the vLLM worker (plain data only)")


def decode_dataclass(tree: Any) -> Any:
    """Rebuild what :func:`encode_dataclass` wrote; classes only from TorchTitan."""
    if isinstance(tree, dict) and _CLASS in tree:
        cls = _resolve(tree[_CLASS])
        kwargs = {k: decode_dataclass(v) for k, v in tree.items() if k != _CLASS}
        return cls(**kwargs)
    if isinstance(tree, list):
        return [decode_dataclass(v) for v in tree]
    return tree


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(ALLOWED_MODULE_PREFIXES):
        raise ConfigError(
            f"the vLLM worker rebuilds dataclasses only from {', '.join(ALLOWED_MODULE_PREFIXES)}, not {path!r}"
        )
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{path!r} is not a dataclass")
    return cls


def encode_checkpoint_config(config: Any) -> dict[str, Any]:
    """A ``[checkpoint]``-shaped table (ours, TorchTitan's merged one, an RL role's subclass) as
    nested plain tables: its fields and its backends' option tables, no class names."""
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"a checkpoint config must be a dataclass, got {type(config).__name__}")
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"checkpoint config value {value!r} ({type(value).__name__}) cannot cross to the vLLM worker")


def decode_checkpoint_config(tree: Mapping[str, Any]) -> Any:
    """The worker's own ``CheckpointConfig`` (validated) from :func:`encode_checkpoint_config`'s
    tables; keys it does not know (a role's extra fields) are errors naming them."""
    from .. import config as config_module

    cls = config_module.CheckpointConfig
    return _build(cls, tree, "weight_sync")


def _build(cls: type, tree: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(tree) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}: keys {unknown} are not fields of the vLLM worker's {cls.__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in tree.items():
        tp = hints.get(name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = _build(tp, value, f"{prefix}.{name}")
        values[name] = value
    return cls(**values)


def encode_specs(specs: Mapping[str, TensorSpec]) -> dict[str, list]:
    return {name: [list(s.shape), dtype_name(s.dtype)] for name, s in specs.items()}


def decode_specs(tree: Mapping[str, list]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(int(d) for d in shape), parse_dtype(dtype)) for name, (shape, dtype) in tree.items()}
