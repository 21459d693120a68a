"""Stand-in for seam v2's receiver API until it lands on main (then this module goes).

Seam v2 (``/work/team/SEAM_V2.md``) adds ``TensorSpec``, ``TensorSink`` and
``Checkpointer(checkpoint_config=..., base_folder=..., sink=...)`` to ``checkpointing``. The
vLLM integration is written against exactly that; this module gives the same three names on the
current seam: a load reads into transient tensors shaped by the sink's specs (the backend's own
checks all run first: names both ways, shapes, dtypes, checksums) and only then hands them to
the sink, which is what seam v2 does for a backend without zero-copy views. Nothing is kept
between loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..manager import Checkpointer


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@runtime_checkable
class TensorSink(Protocol):
    def specs(self) -> Mapping[str, TensorSpec]: ...

    def receive(self, step: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def staging_module(specs: Mapping[str, TensorSpec], device: str | torch.device) -> nn.Module:
    """An ``nn.Module`` whose state dict has exactly ``specs``' names, shapes and dtypes."""
    root = nn.Module()
    for name, spec in specs.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.register_parameter(leaf, nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device=device), requires_grad=False))
    return root


class SinkCheckpointer:
    """``Checkpointer(checkpoint_config=..., base_folder=..., sink=...)`` as seam v2 will have it:
    ``load(step=-1) -> bool``, ``loaded_step``, ``latest_step()``, ``close()``."""

    def __init__(self, checkpoint_config: Any, base_folder: str, sink: TensorSink, sd_adapter: Any = None):
        self.config = checkpoint_config
        self.base_folder = base_folder
        self.sd_adapter = sd_adapter
        self.sink = sink
        self.loaded_step = -1
        # Lists steps only; its meta tensors hold no memory and are never loaded into.
        self._lister = Checkpointer(
            model_parts=[staging_module(sink.specs(), "meta")], checkpoint_config=checkpoint_config, base_folder=base_folder,
            sd_adapter=sd_adapter,
        )

    def latest_step(self) -> int:
        return self._lister.latest_step()

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        staging = staging_module(self.sink.specs(), "cpu")
        reader = Checkpointer(
            model_parts=[staging], checkpoint_config=self.config, base_folder=self.base_folder, sd_adapter=self.sd_adapter
        )
        try:
            if not reader.load(step):
                return False
            loaded = reader.loaded_step
            try:
                self.sink.receive(loaded, staging.state_dict().items())
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{type(self.sink).__name__}.receive failed on step {loaded}: {e!r}") from e
        finally:
            reader.close()
        self.loaded_step = loaded
        return True

    def close(self) -> None:
        self._lister.close()
