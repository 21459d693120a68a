"""Interop with TorchTitan 0.2.2's own ``CheckpointManager``, both ways, bit-exact.

Both sides get the same components: a TorchTitan model, TorchTitan's OptimizersContainer and
LRSchedulersContainer, a dataloader-like Stateful and a ``train_state`` Stateful. (TorchTitan
stores ``dataloader: None`` when given None, so giving both sides the same dataloader keeps the
key sets equal.) TorchTitan's manager needs a process group: a 1-rank gloo group on a FileStore,
destroyed after each test so no other test sees it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from checkpointing import CheckpointConfig, Checkpointer
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps

pytestmark = pytest.mark.slow


class DataLoaderState:
    """Stands in for TorchTitan's ParallelAwareDataloader: a Stateful with a position."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self):
        return {"position": self.position, "dataset": "synthetic"}

    def load_state_dict(self, sd):
        assert sd["dataset"] == "synthetic"
        self.position = sd["position"]


@pytest.fixture
def one_rank_group(tmp_path):
    assert not dist.is_initialized(), "a previous test leaked a process group"
    store = dist.FileStore(str(tmp_path / "pg-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Parts:
    """One side's training components, trained a little so no state is trivial."""

    def __init__(self, seed: int, train: int = 2):
        self.model = build_titan_model(seed=seed)
        self.opts, self.scheds = build_training_parts(self.model)
        train_steps(self.model, self.opts, self.scheds, n=train, seed=seed)
        self.dataloader = DataLoaderState(position=100 * seed)
        self.train_state = TrainState(step=seed)
        self.train_state.losses = [float(seed), seed / 2]

    def kwargs(self) -> dict:
        return dict(dataloader=self.dataloader, model_parts=[self.model], optimizers=self.opts,
                    lr_schedulers=self.scheds, states={"train_state": self.train_state})

    def assert_same_as(self, other: Parts) -> None:
        assert_state_equal(other.model.state_dict(), self.model.state_dict())
        assert_state_equal(other.opts.state_dict(), self.opts.state_dict())
        assert self.scheds.state_dict() == other.scheds.state_dict()
        assert self.dataloader.position == other.dataloader.position
        assert self.train_state.state_dict() == other.train_state.state_dict()


def ours(parts: Parts, base: str, **cfg) -> Checkpointer:
    config = CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0, **cfg)
    return Checkpointer(**parts.kwargs(), checkpoint_config=config, base_folder=base)


def titans(parts: Parts, base: str, **cfg):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import Checkpoint as TitanCheckpoint

    config = TitanCheckpoint(enable=True, folder="checkpoint", interval=1, keep_latest_k=0, **cfg)
    return CheckpointManager(**parts.kwargs(), checkpoint_config=config, sd_adapter=None, base_folder=base)


def test_torchtitan_loads_what_we_saved(one_rank_group, tmp_path):
    saved = Parts(seed=1)
    with ours(saved, str(tmp_path)) as ckpt:
        ckpt.save(10)
    # An abandoned half-written step must not fool TorchTitan's own step scan.
    os.makedirs(tmp_path / "checkpoint" / ".inflight-20")

    loaded = Parts(seed=2, train=1)
    manager = titans(loaded, str(tmp_path))
    try:
        assert manager.load() is True
    finally:
        manager.close()
    loaded.assert_same_as(saved)


def test_we_load_what_torchtitan_saved(one_rank_group, tmp_path):
    saved = Parts(seed=3)
    manager = titans(saved, str(tmp_path))
    try:
        manager.save(7)
    finally:
        manager.close()
    step_dir = tmp_path / "checkpoint" / "step-7"
    assert sorted(os.listdir(step_dir)) == [".metadata", "__0_0.distcp"]  # no manifest of ours

    loaded = Parts(seed=4, train=1)
    with ours(loaded, str(tmp_path)) as ckpt:
        assert ckpt.backend.steps() == [7]
        assert ckpt.load() is True and ckpt.loaded_step == 7
    loaded.assert_same_as(saved)


def test_round_trip_through_both_keeps_resuming(one_rank_group, tmp_path):
    """Ours -> TorchTitan resumes and saves the next step -> ours resumes from TorchTitan's."""
    first = Parts(seed=5)
    with ours(first, str(tmp_path)) as ckpt:
        ckpt.save(1)
    middle = Parts(seed=6, train=1)
    manager = titans(middle, str(tmp_path))
    try:
        assert manager.load() is True
        train_steps(middle.model, middle.opts, middle.scheds, n=1, seed=9)
        middle.train_state.step = 2
        manager.save(2)
    finally:
        manager.close()
    last = Parts(seed=8, train=1)
    with ours(last, str(tmp_path)) as ckpt:
        assert ckpt.backend.steps() == [1, 2]
        assert ckpt.load() is True and ckpt.loaded_step == 2
    last.assert_same_as(middle)
    assert last.train_state.step == 2


def test_torchtitan_loads_our_seed_and_model_only_export(one_rank_group, tmp_path):
    """Step 0 (a seed checkpoint) is model-only in TorchTitan; so is our last-step export."""
    saved = Parts(seed=1)
    with ours(saved, str(tmp_path / "seed")) as ckpt:
        ckpt.create_seed_checkpoint()
    loaded = Parts(seed=2, train=1)
    opt_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in loaded.opts.state_dict().items()}
    manager = titans(loaded, str(tmp_path / "seed"))
    try:
        assert manager.load() is True
    finally:
        manager.close()
    assert_state_equal(saved.model.state_dict(), loaded.model.state_dict())
    assert_state_equal(opt_before, loaded.opts.state_dict())  # model only: optimizer untouched

    # The last-step export is the initial checkpoint of a next TorchTitan job.
    with ours(saved, str(tmp_path / "export"), last_save_model_only=True, export_dtype="bfloat16") as ckpt:
        ckpt.save(4, last_step=True)
    receiver = Parts(seed=9, train=0)
    receiver.model.to(torch.bfloat16)
    manager = titans(receiver, str(tmp_path / "next-job"),
                     initial_load_path=str(tmp_path / "export" / "checkpoint" / "step-4"), initial_load_model_only=True)
    try:
        assert manager.load() is True
    finally:
        manager.close()
    expected = {k: v.to(torch.bfloat16) for k, v in saved.model.state_dict().items()}
    assert_state_equal(expected, receiver.model.state_dict())
