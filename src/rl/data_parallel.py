"""Several trainer ranks, started the way TorchTitan jobs are: ``torchrun --nproc-per-node=N``.

Under torchrun (``WORLD_SIZE`` > 1) every rank runs the same GRPO loop, and the trainer's model
is FSDP2-sharded over the ranks (each holds 1/N of the weights, gradients and optimizer state).
Every rank draws the same prompts and samples with the same per-step seeds, so every rank's
generator (its own process with ``rl.process_mode = "separate"``) produces the same rollouts and
FSDP2's gradient average is the single-process gradient: the job learns exactly as one process
does, with its weights spread over N ranks. Rank 0 writes the job's files (metrics, summary,
plot); the other ranks write theirs under a ``.rank<r>`` name.

How the weights reach each generator is still only ``[weight_sync]``: with ``backend = "dist"``
(and ``publishers = N``) every rank publishes its shards and every generator pulls the whole
model from all of them; with a file backend every rank writes its part of one step.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init(device: torch.device) -> None:
    """Join the trainer ranks' world (``env://``, as torchrun sets it up); a no-op for one rank."""
    import torch.distributed as dist

    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def rank_file(name: str) -> str:
    """``name`` on rank 0 (the job's file); ``stem.rank<r>.ext`` on the others."""
    if rank() == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.rank{rank()}{dot}{ext}" if dot else f"{name}.rank{rank()}"


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over all ranks (each transformer block, then the root), as TorchTitan's
    ``apply_fsdp`` does; the model as it is on one rank."""
    if world_size() == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    blocks = model.layers
    assert isinstance(blocks, nn.ModuleDict)  # TorchTitan's transformer blocks, by layer id
    for block in blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def as_float(value) -> float:
    """A scalar that may be a DTensor (the grad norm of sharded parameters)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def close() -> None:
    import torch.distributed as dist

    if launched() and dist.is_initialized():
        dist.destroy_process_group()
