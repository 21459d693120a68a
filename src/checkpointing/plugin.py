"""The plugin kit: everything a third-party backend needs to be as safe as the built-in ones.

A backend published as its own distribution imports from here (and from ``checkpointing``),
never from this package's private modules, so its steps get what ``dcp`` and ``hf`` steps get
without copying a line:

* the seam: :class:`BackendSpec` (what its entry point names), :class:`BackendContext`,
  :class:`Capabilities`, :class:`StepState`, and the optional :class:`Inspects` protocol that
  makes ``ckpt inspect | verify`` understand its files; :func:`rank`, :func:`world_size` and
  :func:`is_dtensor`, the questions about torch.distributed a backend asks;
* the commit protocol: a ``step-N`` appears only complete, fsynced and checksummed
  (:class:`StepDirectory`, :class:`StoredSteps`, :class:`Manifest`, :func:`seal`), and a
  directory outside the step folder is committed the same way (:func:`staged_directory`,
  :func:`commit_directory`);
* safe readers for bytes a backend did not just write: :func:`safe_join` and
  :func:`check_no_escaping_links` keep paths inside the step, :func:`parse_json_strict` refuses
  ambiguous JSON, :func:`read_safetensors_header` checks a safetensors header (sizes, ranges,
  dtypes) before a byte of tensor data is touched;
* the receiver check every load makes first: :class:`TensorSpec` and :func:`check_fit`;
* the typed errors callers and the CLIs understand.

Every name is a re-export (the same object as in its home module), so a fix there reaches
every plugin. Names load on first use, like ``checkpointing`` itself, so a plugin pays only for
the modules it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import Home, lazy_exports

_HOMES: dict[str, Home] = {
    # the seam
    "BackendSpec": "checkpointing.backend",
    "BackendContext": "checkpointing.backend",
    "Capabilities": "checkpointing.backend",
    "StepState": "checkpointing.backend",
    "Inspects": "checkpointing.backend",
    "rank": "checkpointing.distributed",
    "world_size": "checkpointing.distributed",
    "is_dtensor": "checkpointing.distributed",
    # the commit protocol
    "StepDirectory": "checkpointing.commit",
    "StoredSteps": "checkpointing.commit",
    "Manifest": "checkpointing.commit",
    "MANIFEST": "checkpointing.commit",
    "seal": "checkpointing.commit",
    "staged_directory": "checkpointing.commit",
    "commit_directory": "checkpointing.commit",
    "step_of": "checkpointing.commit",
    # safe readers
    "safe_join": "checkpointing.safepath",
    "check_no_escaping_links": "checkpointing.safepath",
    "check_plain_files": "checkpointing.safepath",
    "read_regular": "checkpointing.untrusted",
    "parse_json_strict": "checkpointing.backends.hf.safetensors_io",
    "read_safetensors_header": ("checkpointing.backends.hf.safetensors_io", "read_header"),
    # receivers
    "TensorSpec": "checkpointing.receiver",
    "check_fit": "checkpointing.receiver",
    # typed errors
    "CheckpointError": "checkpointing.errors",
    "ConfigError": "checkpointing.errors",
    "CorruptCheckpointError": "checkpointing.errors",
    "UnsafeCheckpointError": "checkpointing.errors",
    "StateMismatchError": "checkpointing.errors",
    "StepNotFoundError": "checkpointing.errors",
}

__all__ = [
    "BackendSpec",
    "BackendContext",
    "Capabilities",
    "StepState",
    "Inspects",
    "rank",
    "world_size",
    "is_dtensor",
    "StepDirectory",
    "StoredSteps",
    "Manifest",
    "MANIFEST",
    "seal",
    "staged_directory",
    "commit_directory",
    "step_of",
    "safe_join",
    "check_no_escaping_links",
    "check_plain_files",
    "read_regular",
    "parse_json_strict",
    "read_safetensors_header",
    "TensorSpec",
    "check_fit",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "StateMismatchError",
    "StepNotFoundError",
]


__getattr__, __dir__ = lazy_exports(globals(), _HOMES, __all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .backend import BackendContext, BackendSpec, Capabilities, Inspects, StepState
    from .backends.hf.safetensors_io import parse_json_strict
    from .backends.hf.safetensors_io import read_header as read_safetensors_header
    from .commit import (
        MANIFEST,
        Manifest,
        StepDirectory,
        StoredSteps,
        commit_directory,
        seal,
        staged_directory,
        step_of,
    )
    from .distributed import is_dtensor, rank, world_size
    from .errors import (
        CheckpointError,
        ConfigError,
        CorruptCheckpointError,
        StateMismatchError,
        StepNotFoundError,
        UnsafeCheckpointError,
    )
    from .receiver import TensorSpec, check_fit
    from .safepath import check_no_escaping_links, check_plain_files, safe_join
    from .untrusted import read_regular
