"""Typed errors: callers (and the CLIs) tell *what kind* of failure happened without parsing text.

Every error names the thing that is wrong (a config key, a file, a state-dict key) and, where
there is a closed set, the values that are allowed.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(CheckpointError, ValueError):
    """A config key has a bad value, an unknown name or a wrong type; a file is missing."""


class BackendNotFoundError(ConfigError):
    """No backend is registered under the requested name."""


class StepNotFoundError(CheckpointError, FileNotFoundError):
    """The requested step is not (or no longer) committed."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on disk (or in shared memory) differ from what the writer recorded.

    ``path`` names the file (or segment) that is damaged.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint tries something a loader must never do: run code while unpickling, or
    reach a path outside its own directory."""


class StateMismatchError(CheckpointError):
    """The stored state does not fit the receiving state dict (missing/unexpected keys, shape or
    dtype mismatch). The receiver is left as it was."""

    def __init__(self, message: str, keys: list[str] | None = None):
        super().__init__(message)
        self.keys = list(keys or [])


class AsyncSaveError(CheckpointError):
    """A background save failed; raised at the next save / wait / close so it is never lost."""
