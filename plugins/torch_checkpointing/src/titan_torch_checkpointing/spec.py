"""What the registry knows about this backend: its name, options table and capabilities.

Kept free of torch-checkpointing (and of the backend's own imports), because the registry
imports every installed plugin's spec to build the ``[checkpoint]`` config class: the library is
imported only when a ``torch_checkpointing`` backend is actually built.
"""

# No ``from __future__ import annotations``: TorchTitan's ConfigManager (tyro) reads these
# field types, like the built-in backends' options tables.
from dataclasses import dataclass

from checkpointing.plugin import BackendContext, BackendSpec, Capabilities, ConfigError

NAME = "torch_checkpointing"
MAX_WRITE_THREADS = 16


@dataclass
class TorchCheckpointingOptions:
    """``[checkpoint.torch_checkpointing]``: steps written and read by torch-checkpointing 0.1.1."""

    write_threads: int = 1
    """Threads torch-checkpointing's CheckpointWriter writes a step's files with (its ``file_write_max_threads``); a step has at most three files: the model, the training-state tensors and the layout."""

    def validate(self, prefix: str) -> None:
        if not 1 <= self.write_threads <= MAX_WRITE_THREADS:
            raise ConfigError(
                f"{prefix}.write_threads = {self.write_threads}; allowed: 1 to {MAX_WRITE_THREADS} "
                "(one thread per file; a step has at most three)"
            )


CAPABILITIES = Capabilities(persistent=True, non_tensor_state=True, cross_process=True)


def build(ctx: BackendContext):
    from .backend import TorchCheckpointingBackend

    return TorchCheckpointingBackend(ctx)


SPEC = BackendSpec(
    name=NAME,
    factory=build,
    capabilities=CAPABILITIES,
    options=TorchCheckpointingOptions,
    summary="steps written and read by torch-checkpointing 0.1.1 (safetensors + JSON, no pickle); one process",
)
