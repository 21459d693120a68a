"""Copying a snapshot into a receiver's own tensors, in place, all checks first.

The receiver's state-dict tensors alias its parameters, so an in-place ``copy_`` *is* the
model update: no second copy, no ``load_state_dict``. Because the copy is destructive, every
check (names both ways, shapes, dtypes, tied weights) runs on the whole plan before the first
byte moves: a receiver that does not fit is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...distributed import local_part
from ...errors import StateMismatchError
from ...receiver import castable, describe_mismatch
from .layout import Layout, SnapshotViews, TensorEntry, storage_key


@dataclass(frozen=True)
class Copy:
    """One stored tensor into one receiver tensor (tied receiver keys share a single Copy)."""

    entry: TensorEntry
    target: torch.Tensor
    keys: tuple[str, ...]


def plan_load(layout: Layout, target: Mapping[str, Any], source: str, data: torch.Tensor) -> list[Copy]:
    """The copies that fill every tensor of ``target`` from ``layout`` (over the snapshot
    bytes ``data``), or a StateMismatchError naming every key that does not fit."""
    problems: list[str] = []
    keys: list[str] = []

    def refuse(key: str, why: str) -> None:
        keys.append(key)
        problems.append(f"{key}: {why}")

    published = set(layout.names())
    missing = [k for k in target if k not in published]
    unexpected = [k for k in layout.names() if k not in target]
    groups: dict[Any, list[str]] = {}
    for key, value in target.items():
        if key in published and not isinstance(value, torch.Tensor):
            refuse(key, f"the receiver holds a {type(value).__name__}; the memory backend carries tensors only")
            continue
        if key not in published:
            continue
        entry = layout.entry(key)
        assert entry is not None
        shape = tuple(value.shape)
        if shape != entry.shape:
            refuse(key, f"shape {entry.shape} published, receiver has {shape}")
        elif not castable(entry.dtype, value.dtype):
            refuse(key, f"dtype {entry.dtype} published, receiver has {value.dtype} (only floating types are cast)")
        groups.setdefault(storage_key(value) or ("untied", key), []).append(key)
    for tied in (g for g in groups.values() if len(g) > 1 and not keys):
        if not _same_values([layout.entry(k) for k in tied], data):  # type: ignore[misc]
            for k in tied:
                refuse(k, f"the receiver ties {tied}, but the published version holds different values for them")
    if missing or unexpected or problems:
        raise StateMismatchError(describe_mismatch(source, missing, unexpected, problems, stored="published"), missing + unexpected + keys)
    plan = [Copy(layout.entry(group[0]), target[group[0]], tuple(group)) for group in groups.values()]  # type: ignore[arg-type]
    written = {k for c in plan for k in c.keys}
    if written != set(target):  # every target tensor has exactly one writer: never a silent no-op
        raise StateMismatchError(f"{source}: no copy planned for {sorted(set(target) - written)}", sorted(set(target) - written))
    return plan


def _same_values(entries: list[TensorEntry], data: torch.Tensor) -> bool:
    """Tied in the snapshot too, or stored apart with equal bytes (an export that cast each
    key on its own): either way one copy keeps the receiver's tie truthful."""
    first = entries[0]
    return all(e.name == first.name or torch.equal(e.view(data), first.view(data)) for e in entries[1:])


def apply_plan(plan: list[Copy], data: torch.Tensor) -> None:
    """Run the copies; casting to the receiver's dtype happens inside ``copy_``."""
    views = SnapshotViews(data)
    for copy in plan:
        _copy_into(copy.target, views(copy.entry))


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    local, box = local_part(target)
    if box is None:
        target.copy_(source)
    elif local.numel():
        local.copy_(source[box])
