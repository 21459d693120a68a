"""A third-party checkpoint backend, as an outside package would write one.

It reaches this library only through the ``titan_checkpointing.backends`` entry point group
(the plugin test gives it a ``*.dist-info`` with ``entry_points.txt``) and imports nothing but
the public plugin kit, :mod:`checkpointing.plugin`. It keeps each step as one ``state.pt`` read
back with ``weights_only=True``, and borrows the kit's commit protocol (``StepDirectory``,
``StoredSteps``) so its steps are atomic and checksummed like the built-in ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from checkpointing.plugin import (
    BackendSpec,
    Capabilities,
    ConfigError,
    StateMismatchError,
    StepDirectory,
    StepState,
    StoredSteps,
)

STATE_FILE = "state.pt"


@dataclass
class ToyOptions:
    """``[checkpoint._toy]``: the toy plugin's own table."""

    file_name: str = STATE_FILE
    """Name of the one file each step keeps its state in."""

    def validate(self, prefix: str) -> None:
        if not self.file_name.endswith(".pt") or "/" in self.file_name or self.file_name.startswith("."):
            raise ConfigError(f"{prefix}.file_name = {self.file_name!r}; allowed: a plain name ending in .pt")


class ToyBackend(StoredSteps):
    capabilities = Capabilities(persistent=True, non_tensor_state=True)

    def __init__(self, ctx):
        self.store = StepDirectory(ctx.folder, ctx.name)
        self.verify_mode = ctx.verify
        self.options: ToyOptions = ctx.options

    def write(self, step: int, state: StepState) -> None:
        with self.store.stage(step) as staging:
            torch.save({"model": state.model, "extras": state.extras}, os.path.join(staging, self.options.file_name))

    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        saved = torch.load(os.path.join(path, self.options.file_name), weights_only=True)
        bad = [k for k, t in state.model.items() if k not in saved["model"] or saved["model"][k].shape != t.shape]
        bad += [k for k in state.extras if k not in saved["extras"]]
        if bad:
            raise StateMismatchError(f"{path} does not fit the receiver: {bad}", bad)
        for key, target in state.model.items():
            target.copy_(saved["model"][key])
        for key in state.extras:
            state.extras[key] = saved["extras"][key]


SPEC = BackendSpec("_toy", ToyBackend, ToyBackend.capabilities, ToyOptions, "a test plugin: one torch.save file per step")
