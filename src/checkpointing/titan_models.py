"""TorchTitan models by name, flavor and overrides, without their weights.

``ckpt convert`` (and anything else that must know a checkpoint's model without training it)
builds the model on the *meta* device: its state-dict keys, shapes and dtypes, its args and its
state-dict adapter, and no memory for weights.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from ._compat import torchtitan_model_names
from .errors import ConfigError
from .receiver import TensorSpec

MAX_ARG_TEXT = 4096


@dataclasses.dataclass
class TitanModel:
    """What conversion needs to know about a TorchTitan model, without its weights."""

    name: str
    flavor: str
    args: Any
    adapter: Any
    specs: dict[str, TensorSpec]
    """TorchTitan FQN -> shape and dtype of every model tensor."""

    def empty_state(self, floating_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """CPU tensors to read a checkpoint into; floating ones in ``floating_dtype`` if given."""
        return {
            k: torch.empty(s.shape, dtype=floating_dtype if floating_dtype and s.dtype.is_floating_point else s.dtype)
            for k, s in self.specs.items()
        }


def _parse_value(text: str) -> Any:
    """A ``--model-arg`` value: JSON when it parses (numbers, booleans, lists), else the text."""
    if len(text) > MAX_ARG_TEXT:
        raise ConfigError(f"--model-arg value of {len(text)} characters; allowed: at most {MAX_ARG_TEXT}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def titan_model(name: str, flavor: str, overrides: list[str] | tuple[str, ...] = ()) -> TitanModel:
    """Resolve ``--model``/``--flavor``/``--model-arg KEY=VALUE`` into args, adapter and shapes."""
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(name)
    except (ValueError, ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"--model {name!r} is not a TorchTitan model ({e}); allowed: {', '.join(torchtitan_model_names())}") from None
    if flavor not in spec.model_args:
        raise ConfigError(f"--flavor {flavor!r} is not a flavor of {name}; allowed: {', '.join(spec.model_args)}")
    args = spec.model_args[flavor]
    names = {f.name for f in dataclasses.fields(args)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(
                f"--model-arg {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(n for n in names if not n.startswith('_')))}"
            )
        changes[key] = _parse_value(value)
    try:
        args = dataclasses.replace(args, **changes)
        with torch.device("meta"):
            model = spec.model_cls(args)
    except Exception as e:  # bad override values surface here, e.g. heads not dividing dim
        raise ConfigError(f"cannot build {name}/{flavor} with {changes}: {e}") from None
    specs = {k: TensorSpec.of(v) for k, v in model.state_dict().items()}
    adapter = spec.state_dict_adapter(args, None) if spec.state_dict_adapter is not None else None
    return TitanModel(name, flavor, args, adapter, specs)
