"""A third-party checkpoint backend, as an outside package would write one.

It reaches this library only through the ``titan_checkpointing.backends`` entry point group
(the plugin test gives it a ``*.dist-info`` with ``entry_points.txt``). It keeps each step as one
``state.pt`` read back with ``weights_only=True``, and borrows the library's commit protocol so
its steps are atomic and checksummed like the built-in ones.
"""

from __future__ import annotations

import os

import torch

from checkpointing import Capabilities, StateMismatchError, StepState
from checkpointing.commit import StepDirectory

STATE_FILE = "state.pt"


class ToyBackend:
    capabilities = Capabilities(persistent=True, non_tensor_state=True)

    def __init__(self, ctx):
        self.store = StepDirectory(ctx.folder, "_toy")
        self.verify_mode = getattr(ctx.config, "verify", "checksum")

    def write(self, step: int, state: StepState) -> None:
        with self.store.stage(step) as staging:
            torch.save({"model": state.model, "extras": state.extras}, os.path.join(staging, STATE_FILE))

    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        saved = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
        bad = [k for k, t in state.model.items() if k not in saved["model"] or saved["model"][k].shape != t.shape]
        bad += [k for k in state.extras if k not in saved["extras"]]
        if bad:
            raise StateMismatchError(f"{path} does not fit the receiver: {bad}", bad)
        for key, target in state.model.items():
            target.copy_(saved["model"][key])
        for key in state.extras:
            state.extras[key] = saved["extras"][key]

    def steps(self) -> list[int]:
        return self.store.steps()

    def delete(self, step: int) -> None:
        self.store.delete(step)

    def close(self) -> None:
        pass
