"""A sharded (FSDP2, 2 ranks, gloo on CPU) trainer publishes through ``shm``.

Both ranks run the same bucketed ``full_tensor()`` gathers; rank 0 alone writes the snapshot.
A sharded receiver on the same ranks copies only its shard's slice, and a plain receiver in
this process loads the whole model: both bit-exact with the trainer's full weights.
"""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from checkpointing import Checkpointer
from checkpointing.backends.memory.segments import channel_files
from tests.checkpointing.cases import make_config
from tests.helpers import assert_state_equal, build_titan_model

WORLD = 2
MODEL = dict(name="qwen3", dim=128, vocab_size=512)  # ~2 MB: several 1 MB buckets
SPAWN = mp.get_context("spawn")
pytestmark = pytest.mark.slow


def _config(channel: str):
    cfg = make_config("memory-shm", channel)
    cfg.memory.bucket_size_mb = 1
    cfg.memory.keep_versions = 2
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_titan_model(seed=seed, **MODEL)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_state(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def rank_main(rank: int, port: int, channel: str, published, done) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        trainer = _sharded(seed=0)
        assert any(hasattr(v, "placements") for v in trainer.state_dict().values()), "model is not sharded"
        publisher = Checkpointer(model_parts=[trainer], checkpoint_config=_config(channel), base_folder="")
        publisher.save(1)
        dist.barrier()  # rank 0 has written the snapshot

        receiver = _sharded(seed=1)
        reader = Checkpointer(model_parts=[receiver], checkpoint_config=_config(channel), base_folder="")
        assert reader.load() and reader.loaded_step == 1
        expected, got = _full_state(trainer), _full_state(receiver)
        assert_state_equal(expected, got)
        reader.close()

        if rank == 0:
            published.set()
            assert done.wait(120), "the test process never read the snapshot"
        dist.barrier()
        publisher.close()
    finally:
        dist.destroy_process_group()


def test_fsdp_publisher_to_sharded_and_plain_receivers(unique_channel):
    published, done = SPAWN.Event(), SPAWN.Event()
    port = _free_port()
    ranks = [SPAWN.Process(target=rank_main, args=(r, port, unique_channel, published, done)) for r in range(WORLD)]
    for p in ranks:
        p.start()
    try:
        expected = build_titan_model(seed=0, **MODEL)  # FSDP shards these very values
        receiver = build_titan_model(seed=2, **MODEL)
        while not published.wait(0.5):
            dead = [p.exitcode for p in ranks if not p.is_alive()]
            if dead:
                pytest.fail(f"a rank exited early with code {dead}")
        with Checkpointer(model_parts=[receiver], checkpoint_config=_config(unique_channel), base_folder="") as reader:
            assert reader.load() and reader.loaded_step == 1
        assert_state_equal(expected.state_dict(), receiver.state_dict())
        assert receiver.output.weight is receiver.tok_embeddings.weight
    finally:
        done.set()
        for p in ranks:
            p.join(120)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    assert channel_files(unique_channel) == []
