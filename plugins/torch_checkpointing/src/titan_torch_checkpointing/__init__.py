"""A titan-checkpointing backend on Meta's torch-checkpointing library: ``[checkpoint] backend =
"torch_checkpointing"`` (or ``[weight_sync]``), options in ``[checkpoint.torch_checkpointing]``.

Installed as its own distribution; titan-checkpointing finds it through the
``titan_checkpointing.backends`` entry point group, which names :data:`SPEC`. See
:mod:`.backend` for the step layout and :mod:`.library` for how torch-checkpointing is driven.
"""

from .spec import SPEC, TorchCheckpointingOptions

__all__ = ["SPEC", "TorchCheckpointingOptions"]
