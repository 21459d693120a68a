"""titan-checkpointing: one Checkpointer API for TorchTitan trainers and RL generators.

The backend (``dcp``, ``hf``, ``memory`` or a plugin's) is chosen by ``[checkpoint] backend`` in
the TorchTitan TOML job config; code that calls ``save``/``load`` never changes.
"""

from .backend import (
    ENTRY_POINT_GROUP,
    Backend,
    BackendContext,
    Capabilities,
    StepState,
    available_backends,
    register_backend,
)
from .config import CheckpointConfig, JobConfig, load_job_config
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
from .manager import Checkpointer

__all__ = [
    "Checkpointer",
    "CheckpointConfig",
    "JobConfig",
    "load_job_config",
    "Backend",
    "BackendContext",
    "Capabilities",
    "StepState",
    "register_backend",
    "available_backends",
    "ENTRY_POINT_GROUP",
    "CheckpointError",
    "ConfigError",
    "BackendNotFoundError",
    "StepNotFoundError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "StateMismatchError",
    "AsyncSaveError",
]
