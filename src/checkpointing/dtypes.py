"""The floating dtypes a config or command line may name (``export_dtype``, ``--dtype``, a
snapshot's ``dtype``), by TorchTitan's names, in one place. No torch import until a name is
turned into a dtype, so the CLI's argument parser stays light."""

from __future__ import annotations

from typing import Any

FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; only the names in :data:`FLOAT_DTYPE_NAMES`."""
    if name not in FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}; allowed: {', '.join(FLOAT_DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling configs, manifests and HF use)."""
    return str(dtype).removeprefix("torch.")
