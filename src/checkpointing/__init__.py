"""titan-checkpointing: one Checkpointer API for TorchTitan trainers and RL generators.

The backend (``dcp``, ``hf``, ``memory`` or a plugin's) is chosen by ``[checkpoint] backend`` in
the TorchTitan TOML job config; code that calls ``save``/``load`` never changes.

Names are imported on first use (PEP 562), so ``import checkpointing`` costs no torch and no
TorchTitan import: ``ckpt --help`` starts at once, and a program pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AsyncSaveError,
    BackendNotFoundError,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    StepNotFoundError,
    UnsafeCheckpointError,
)

_LAZY = {
    "Checkpointer": "manager",
    "CheckpointStats": "manager",
    "CheckpointConfig": "config",
    "JobConfig": "config",
    "load_job_config": "config",
    "Backend": "backend",
    "BackendContext": "backend",
    "BackendSpec": "backend",
    "Capabilities": "backend",
    "StepState": "backend",
    "Lease": "backend",
    "CleansPartials": "backend",
    "ReadsExternal": "backend",
    "WritesExternal": "backend",
    "Inspects": "backend",
    "ViewReader": "backend",
    "register_backend": "backend",
    "available_backends": "backend",
    "backend_spec": "backend",
    "ENTRY_POINT_GROUP": "backend",
    "TensorSink": "receiver",
    "TensorSpec": "receiver",
}

__all__ = [
    "Checkpointer",
    "CheckpointStats",
    "CheckpointConfig",
    "JobConfig",
    "load_job_config",
    "Backend",
    "BackendContext",
    "BackendSpec",
    "Capabilities",
    "StepState",
    "Lease",
    "CleansPartials",
    "ReadsExternal",
    "WritesExternal",
    "Inspects",
    "ViewReader",
    "register_backend",
    "available_backends",
    "backend_spec",
    "ENTRY_POINT_GROUP",
    "TensorSink",
    "TensorSpec",
    "CheckpointError",
    "ConfigError",
    "BackendNotFoundError",
    "StepNotFoundError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "StateMismatchError",
    "AsyncSaveError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .backend import (
        ENTRY_POINT_GROUP,
        Backend,
        BackendContext,
        BackendSpec,
        Capabilities,
        CleansPartials,
        Inspects,
        Lease,
        ReadsExternal,
        StepState,
        ViewReader,
        WritesExternal,
        available_backends,
        backend_spec,
        register_backend,
    )
    from .config import CheckpointConfig, JobConfig, load_job_config
    from .manager import Checkpointer, CheckpointStats
    from .receiver import TensorSink, TensorSpec
