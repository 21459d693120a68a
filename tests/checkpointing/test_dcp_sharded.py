"""Sharded DCP checkpoints: FSDP2 shards saved from 2 ranks load on 1 rank, and back.

Real processes (torch.multiprocessing, gloo, CPU) run the FSDP2 side, so the commit protocol's
barriers, rank-0 commit and DCP's own resharding are all exercised. The non-distributed side
runs in the test process. Every comparison is bit-exact against tensors the other side wrote
with ``torch.save`` (read back with ``weights_only=True``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from checkpointing import CheckpointConfig, Checkpointer
from tests.helpers import TrainState, build_titan_model, build_training_parts, train_steps

WORLD = 2
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**overrides) -> CheckpointConfig:
    return CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0, **overrides)


def _full(value):
    """A DTensor's full value (a collective: every rank must call it in the same order)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _full_state(model, opts, scheds, train_state) -> dict:
    """Everything a checkpoint holds, as plain full tensors and Python values, in a fixed order."""
    out = {f"model/{k}": _full(v).detach().clone() for k, v in sorted(model.state_dict().items())}
    for k, v in sorted(opts.state_dict().items()):
        out[f"optimizer/{k}"] = _full(v).detach().clone() if isinstance(v, torch.Tensor) else v
    out["lr_scheduler"] = scheds.state_dict()
    out["train_state"] = train_state.state_dict()
    return out


def _assert_same(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, torch.Tensor):
            assert want.dtype == got.dtype and want.shape == got.shape, key
            assert torch.equal(want, got), f"{key} differs"
        else:
            assert want == got, f"{key}: {want!r} != {got!r}"


def _fsdp_parts(seed: int):
    """A TorchTitan model sharded with FSDP2 over all ranks, plus TorchTitan optimizer/lr."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_titan_model(seed=seed)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opts, scheds = build_training_parts(model)
    return model, opts, scheds


def _rank_main(rank: int, port: int, role: str, base: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        if role == "save":
            model, opts, scheds = _fsdp_parts(seed=0)
            train_steps(model, opts, scheds, n=2, seed=0)
            ts = TrainState(step=2)
            ts.losses = [2.0, 1.5]
            parts = dict(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts})
            with Checkpointer(**parts, checkpoint_config=_config(), base_folder=base) as ckpt:
                ckpt.save(1)
            train_steps(model, opts, scheds, n=1, seed=1)  # step 2 must differ from step 1
            # Step 2 is written in the background: its collectives run on a group of their own.
            with Checkpointer(**parts, checkpoint_config=_config(async_mode="async"), base_folder=base) as ckpt:
                ckpt.save(2)
                ckpt.maybe_wait_for_staging()
            with Checkpointer(**parts, checkpoint_config=_config(), base_folder=base) as ckpt:
                assert ckpt.backend.steps() == [1, 2], ckpt.backend.steps()
            reference = _full_state(model, opts, scheds, ts)
            if rank == 0:
                torch.save(reference, os.path.join(base, "reference.pt"))
        else:
            model, opts, scheds = _fsdp_parts(seed=7)
            train_steps(model, opts, scheds, n=1, seed=7)  # same structure, other values
            ts = TrainState()
            with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds,
                              states={"train_state": ts}, checkpoint_config=_config(), base_folder=base) as ckpt:
                assert ckpt.load() is True and ckpt.loaded_step == 3
            loaded = _full_state(model, opts, scheds, ts)
            expected = torch.load(os.path.join(base, "reference.pt"), weights_only=True)
            _assert_same(expected, loaded)
            # The loaded shards really are shards: each rank holds half of a sharded weight.
            weight = model.state_dict()["tok_embeddings.weight"]
            assert weight.to_local().shape[0] * WORLD == weight.shape[0]
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(role: str, base: str) -> None:
    mp.spawn(_rank_main, args=(_free_port(), role, base), nprocs=WORLD, join=True)


def test_two_rank_fsdp_save_loads_bit_exact_on_one_rank(tmp_path):
    _spawn("save", str(tmp_path))
    step_dir = tmp_path / "checkpoint" / "step-2"
    names = sorted(os.listdir(step_dir))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"], names
    assert not [n for n in os.listdir(tmp_path / "checkpoint") if n.startswith(".")], "staging leftovers"

    model = build_titan_model(seed=5)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1, seed=5)
    ts = TrainState()
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
                      checkpoint_config=_config(), base_folder=str(tmp_path)) as ckpt:
        assert ckpt.load() is True and ckpt.loaded_step == 2
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    _assert_same(expected, _full_state(model, opts, scheds, ts))


def test_one_rank_save_loads_bit_exact_on_two_fsdp_ranks(tmp_path):
    model = build_titan_model(seed=3)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=2, seed=3)
    ts = TrainState(step=3)
    ts.losses = [3.0, 2.5, 2.25]
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
                      checkpoint_config=_config(), base_folder=str(tmp_path)) as ckpt:
        ckpt.save(3)
    torch.save(_full_state(model, opts, scheds, ts), tmp_path / "reference.pt")
    _spawn("load", str(tmp_path))
