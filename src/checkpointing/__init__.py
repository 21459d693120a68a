"""titan-checkpointing: one Checkpointer API for TorchTitan trainers and RL generators.

The backend (``dcp``, ``hf``, ``memory`` or a plugin's) is chosen by ``[checkpoint] backend`` in
the TorchTitan TOML job config; code that calls ``save``/``load`` never changes.

Names are imported on first use (PEP 562), so ``import checkpointing`` costs no torch and no
TorchTitan import: ``ckpt --help`` starts at once, and a program pays only for what it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import Home, lazy_exports
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

_LAZY: dict[str, Home] = {
    "Checkpointer": "checkpointing.manager",
    "CheckpointStats": "checkpointing.manager",
    "CheckpointConfig": "checkpointing.config",
    "JobConfig": "checkpointing.config",
    "load_job_config": "checkpointing.config",
    "Backend": "checkpointing.backend",
    "BackendContext": "checkpointing.backend",
    "BackendSpec": "checkpointing.backend",
    "Capabilities": "checkpointing.backend",
    "StepState": "checkpointing.backend",
    "Lease": "checkpointing.backend",
    "CleansPartials": "checkpointing.backend",
    "ReadsExternal": "checkpointing.backend",
    "WritesExternal": "checkpointing.backend",
    "Inspects": "checkpointing.backend",
    "ViewReader": "checkpointing.backend",
    "register_backend": "checkpointing.backend",
    "available_backends": "checkpointing.backend",
    "backend_spec": "checkpointing.backend",
    "ENTRY_POINT_GROUP": "checkpointing.backend",
    "TensorSink": "checkpointing.receiver",
    "TensorSpec": "checkpointing.receiver",
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


__getattr__, __dir__ = lazy_exports(globals(), _LAZY, __all__)


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
