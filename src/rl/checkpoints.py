"""Building the RL job's Checkpointers from their TOML tables.

Every role (``checkpoint``, ``weight_sync``, ``export``) is a plain
:class:`checkpointing.Checkpointer`; this module only turns construction failures into
ConfigErrors that name the table the user wrote, so the CLI can print them and exit 2.
"""

from __future__ import annotations

import os
from typing import Any

from checkpointing import Checkpointer, ConfigError, available_backends

from .config import retitle


def open_checkpointer(table: str, config: Any, base_folder: str, **parts: Any) -> Checkpointer:
    try:
        return Checkpointer(checkpoint_config=config, base_folder=base_folder, **parts)
    except ConfigError as e:
        raise ConfigError(retitle(str(e), table)) from None
    except ImportError as e:
        # Registered (e.g. through an entry point) but its module is missing or broken.
        raise ConfigError(
            f"{table}.backend = {config.backend!r} is registered but cannot be imported ({e}); "
            f"registered backends: {', '.join(available_backends())}"
        ) from None


def hf_assets_path(cfg: Any) -> str | None:
    """``[model] hf_assets_path`` for TorchTitan's state-dict adapter, only when it holds a
    safetensors index (the adapter's one use of it: shard names for HF saves)."""
    path = getattr(cfg.model, "hf_assets_path", None)
    return path if path and os.path.isfile(os.path.join(path, "model.safetensors.index.json")) else None
