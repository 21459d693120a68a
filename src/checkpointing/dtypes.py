"""Dtype names in one place: the floating dtypes a config or command line may name
(``export_dtype``, ``--dtype``, a snapshot's ``dtype``), and every dtype a tensor may have in a
snapshot or a transfer record, by torch's (and TorchTitan's) names. No torch import until a name
is turned into a dtype, so the CLI's argument parser stays light. (safetensors' own codes,
``F32`` and so on, are a file format's and live with its parser.)"""

from __future__ import annotations

import functools
from typing import Any

FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16")
STORABLE_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint8", "bool",
)


@functools.cache
def storable_dtypes() -> dict[str, Any]:
    """name -> torch dtype for :data:`STORABLE_DTYPE_NAMES` (a snapshot's layout, a dist
    transfer record, the specs that cross to a vLLM worker)."""
    import torch

    return {name: getattr(torch, name) for name in STORABLE_DTYPE_NAMES}


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; only the names in :data:`FLOAT_DTYPE_NAMES`."""
    if name not in FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}; allowed: {', '.join(FLOAT_DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling configs, manifests and HF use)."""
    return str(dtype).removeprefix("torch.")
