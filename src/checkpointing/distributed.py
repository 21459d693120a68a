"""The few facts about torch.distributed every backend asks: is a job running, which rank is
this, how many are there, wait for the others; and what part of a DTensor this rank holds.

A single process (no process group) is rank 0 of 1 everywhere, so backends write one code path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

from . import _compat

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    return _dist() is not None


def rank(group: Any = None) -> int:
    dist = _dist()
    return dist.get_rank(group) if dist else 0


def world_size(group: Any = None) -> int:
    dist = _dist()
    return dist.get_world_size(group) if dist else 1


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group``; nothing to wait for in a single process."""
    dist = _dist()
    if dist and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def is_dtensor(value: Any) -> TypeGuard[DTensor]:
    """A DTensor (FSDP2 / tensor-parallel shard) rather than a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(value, DTensor)


def local_part(value: Any) -> tuple[Any, tuple[slice, ...] | None]:
    """(the tensor this rank fills, the slices of the global tensor it covers, or None when it
    holds the whole tensor)."""
    if not is_dtensor(value):
        return value, None
    return value.to_local(), _compat.local_shard_slices(value)
