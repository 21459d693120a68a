"""What a load delivers into: a module's own tensors, or a sink that takes named tensors.

A trainer or a plain PyTorch generator loads into its ``nn.Module``: backends copy into the
tensors of its state dict, which alias its parameters. An engine that owns its weights in its
own layout (vLLM, a remote server) cannot offer such tensors; it offers a :class:`TensorSink`
instead: it says which tensors it needs (:class:`TensorSpec` by published name) and takes one
complete, verified version at a time. Every check a load makes (names both ways, shapes,
dtypes) is made against the specs *before* the first tensor is delivered, so a sink that cannot
roll back is never handed half a version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import StateMismatchError

MAX_LISTED = 20


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a receiver expects under one name."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Any) -> TensorSpec:
        return cls(tuple(int(d) for d in tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class TensorSink(Protocol):
    """A receiver that is not an ``nn.Module``: vLLM's weight loader, a remote engine."""

    def specs(self) -> Mapping[str, TensorSpec]:
        """Every tensor the sink needs, by the publisher's names (TorchTitan FQNs). A load
        delivers exactly these names; floating dtypes may differ (the sink casts)."""

    def receive(self, step: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take one complete, verified version. The tensors may be views of the backend's
        buffers, valid only during this call: copy what you keep."""


def specs_of(state: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """The specs of a state dict's tensors (DTensors by their global shape)."""
    return {k: TensorSpec.of(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def castable(stored: torch.dtype, wanted: torch.dtype) -> bool:
    """A load may cast between floating types (an fp32 publisher, a bf16 generator), never
    between integer, boolean and floating data."""
    return stored == wanted or (stored.is_floating_point and wanted.is_floating_point)


def check_fit(wanted: Mapping[str, TensorSpec], stored: Mapping[str, TensorSpec], source: str) -> None:
    """Raise StateMismatchError naming every key that keeps ``stored`` from filling ``wanted``
    exactly: missing or unexpected names, other shapes, dtypes that cannot be cast."""
    missing = [k for k in wanted if k not in stored]
    unexpected = [k for k in stored if k not in wanted]
    problems: list[str] = []
    bad: list[str] = []
    for key, spec in wanted.items():
        have = stored.get(key)
        if have is None:
            continue
        if have.shape != spec.shape:
            bad.append(key)
            problems.append(f"{key}: shape {have.shape} stored, receiver has {spec.shape}")
        elif not castable(have.dtype, spec.dtype):
            bad.append(key)
            problems.append(f"{key}: dtype {have.dtype} stored, receiver has {spec.dtype} (only floating types are cast)")
    if missing or unexpected or problems:
        raise StateMismatchError(describe_mismatch(source, missing, unexpected, problems), missing + unexpected + bad)


def describe_mismatch(
    source: str, missing: list[str], unexpected: list[str], problems: list[str], stored: str = "stored"
) -> str:
    """One message for every kind of misfit, each list cut at :data:`MAX_LISTED`."""

    def listed(items: list[str]) -> str:
        return f"{items[:MAX_LISTED]}{' ...' if len(items) > MAX_LISTED else ''}"

    parts = []
    if missing:
        parts.append(f"receiver keys not {stored}: {listed(missing)}")
    if unexpected:
        parts.append(f"{stored} keys the receiver lacks: {listed(unexpected)}")
    parts += problems[:MAX_LISTED]
    return f"{source} does not fit the receiver: " + "; ".join(parts)
