"""Read a step aside, then apply it in one pass that cannot fail halfway.

A file backend reads into tensors that are not the receiver's: every byte is read, every item
parsed, every check passed, and only then is the receiver overwritten, by plain ``copy_``s
between tensors of equal shape and dtype (nothing left that can fail on the checkpoint's
account). So a load that fails for any reason (a damaged second item, a file that changed or
vanished under us, an I/O error, a crafted value the checks refuse late) leaves the receiver
exactly as it was, whatever the verify mode and whether or not the step has a manifest.

The price is memory: one staged copy of what is being loaded, allocated from the *receiver's*
shapes (never from sizes a checkpoint declares), freed when the load returns. Plain tensors are
staged in contiguous CPU memory, so the DCP reader's one-copy path reads file bytes straight
into them; DTensor shards are staged like their receiver (same mesh and placements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from .backend import StepState

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _is_dtensor(value: Any) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def stage_tensor(value: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(value):
        return torch.empty_like(value)
    return torch.empty(tuple(value.shape), dtype=value.dtype)


def stage(tree: Any) -> Any:
    """A structural copy of ``tree`` (dicts, lists, tuples) with a fresh, uninitialised tensor
    in place of every tensor; other leaves are kept (a reader replaces them)."""
    if isinstance(tree, torch.Tensor):
        return stage_tensor(tree)
    if isinstance(tree, dict):
        return {k: stage(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [stage(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(stage(v) for v in tree)
    return tree


def copy_tensor(receiver: torch.Tensor, staged: torch.Tensor) -> None:
    """Shard to shard for DTensors (same mesh and placements: no collective), else a plain copy
    (to the receiver's device)."""
    if _is_dtensor(receiver) and _is_dtensor(staged):
        receiver, staged = receiver.to_local(), staged.to_local()
    receiver.copy_(staged)


def apply(receiver: Any, staged: Any) -> Any:
    """Copy ``staged`` into ``receiver``'s tensors in place and return the value that takes
    ``receiver``'s place: the receiver's own tensors (now refreshed) inside the staged
    structure, with the non-tensor leaves the reader produced."""
    if isinstance(receiver, torch.Tensor) and isinstance(staged, torch.Tensor):
        copy_tensor(receiver, staged)
        return receiver
    if isinstance(receiver, dict) and isinstance(staged, dict):
        return {k: apply(receiver[k], v) if k in receiver else v for k, v in staged.items()}
    if isinstance(receiver, (list, tuple)) and isinstance(staged, (list, tuple)) and len(receiver) == len(staged):
        applied = [apply(r, s) for r, s in zip(receiver, staged, strict=True)]
        return applied if isinstance(staged, list) else tuple(applied)
    return staged


def apply_model(model: dict[str, Any], staged: dict[str, Any]) -> None:
    """Model tensors alias the parameters, so copying in place *is* the model update."""
    for key, value in model.items():
        if key in staged and isinstance(value, torch.Tensor):
            copy_tensor(value, staged[key])


def apply_extras(extras: dict[str, Any], staged: dict[str, Any]) -> None:
    for key in list(extras):
        if key in staged:
            extras[key] = apply(extras[key], staged[key])


def apply_state(state: StepState, staged_model: dict[str, Any] | None, staged_extras: dict[str, Any] | None) -> None:
    """The last step of a read: nothing here can fail on the checkpoint's account."""
    if staged_model is not None:
        apply_model(state.model, staged_model)
    if staged_extras is not None:
        apply_extras(state.extras, staged_extras)
