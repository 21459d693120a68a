"""Where a job's first weights come from, and which step a resume picks: ``initial_load_path``
(a DCP step directory, model-only or full), ``load_step``, seed checkpoints (step 0, model only)
and a step saved again after resuming from an earlier one.

(``initial_load_in_hf`` belongs with the HF backend's tests.)
"""

from __future__ import annotations

import os

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer, ConfigError, StepNotFoundError
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps


def _config(**overrides) -> CheckpointConfig:
    base = dict(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    base.update(overrides)
    return CheckpointConfig(**base)


def _clone(sd: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}


class Job:
    """One training job's parts and its Checkpointer."""

    def __init__(self, base, seed: int, train: int = 1, **cfg):
        self.model = build_titan_model(seed=seed)
        self.opts, self.scheds = build_training_parts(self.model)
        train_steps(self.model, self.opts, self.scheds, n=train, seed=seed)
        self.ts = TrainState(step=seed)
        self.ckpt = Checkpointer(model_parts=[self.model], optimizers=self.opts, lr_schedulers=self.scheds,
                                 states={"train_state": self.ts}, checkpoint_config=_config(**cfg), base_folder=str(base))

    def snapshot(self) -> dict:
        return {"model": _clone(self.model.state_dict()), "opt": _clone(self.opts.state_dict()),
                "lr": self.scheds.state_dict(), "ts": self.ts.state_dict()}

    def assert_holds(self, snap: dict, model=True, training=True) -> None:
        if model:
            assert_state_equal(snap["model"], self.model.state_dict())
        if training:
            assert_state_equal(snap["opt"], self.opts.state_dict())
            assert self.scheds.state_dict() == snap["lr"]
            assert self.ts.state_dict() == snap["ts"]

    def close(self):
        self.ckpt.close()


@pytest.fixture
def old_step(tmp_path):
    """A previous run's committed step 6 and the state it holds."""
    old = Job(tmp_path / "old-run", seed=1, train=2)
    old.ts.losses = [1.0, 0.75]
    old.ckpt.save(6)
    snap = old.snapshot()
    old.close()
    return tmp_path / "old-run" / "checkpoint" / "step-6", snap


# ------------------------------------------------------------------ initial_load_path
def test_initial_load_model_only(tmp_path, old_step):
    path, snap = old_step
    job = Job(tmp_path / "new-run", seed=2, initial_load_path=str(path))  # model only is the default
    mine = job.snapshot()
    assert job.ckpt.load() is True
    assert job.ckpt.loaded_step == -1  # an initial load is no step of this run
    job.assert_holds(snap, training=False)
    job.assert_holds(mine, model=False)  # optimizer, lr, train_state: this run's own
    job.ckpt.save(1)  # the new run saves into its own folder...
    assert job.ckpt.backend.steps() == [1]
    job.close()
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "manifest.json"]  # ...and leaves the old alone


def test_initial_load_full_training_state(tmp_path, old_step):
    path, snap = old_step
    job = Job(tmp_path / "new-run", seed=2, initial_load_path=str(path), initial_load_model_only=False)
    assert job.ckpt.load() is True
    job.assert_holds(snap)
    job.close()


def test_initial_load_full_honours_exclude_from_loading(tmp_path, old_step):
    path, snap = old_step
    job = Job(tmp_path / "new-run", seed=2, initial_load_path=str(path), initial_load_model_only=False,
              exclude_from_loading=["optimizer"])
    mine = job.snapshot()
    assert job.ckpt.load() is True
    assert_state_equal(snap["model"], job.model.state_dict())
    assert_state_equal(mine["opt"], job.opts.state_dict())
    assert job.ts.state_dict() == snap["ts"]
    job.close()


def test_initial_load_is_ignored_once_the_run_has_its_own_steps(tmp_path, old_step):
    path, _ = old_step
    first = Job(tmp_path / "new-run", seed=3)
    first.ckpt.save(2)
    own = first.snapshot()
    first.close()
    job = Job(tmp_path / "new-run", seed=4, initial_load_path=str(path), initial_load_model_only=False)
    assert job.ckpt.load() is True and job.ckpt.loaded_step == 2
    job.assert_holds(own)
    job.close()


def test_initial_load_path_errors_name_the_path(tmp_path, old_step):
    path, _ = old_step
    job = Job(tmp_path / "a", seed=2, initial_load_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="initial_load_path = .*missing.* is not a directory"):
        job.ckpt.load()
    job.close()
    job = Job(tmp_path / "b", seed=2, initial_load_path=str(path.parent))  # the folder, not a step
    with pytest.raises(ConfigError, match=r"not a DCP checkpoint step directory.*did you mean .*step-6"):
        job.ckpt.load()
    job.close()


# ------------------------------------------------------------------ load_step
def test_load_step_picks_that_step_and_refuses_a_missing_one(tmp_path):
    job = Job(tmp_path, seed=1)
    snaps = {}
    for step in (1, 2, 3):
        train_steps(job.model, job.opts, job.scheds, n=1, seed=step)
        job.ts.step = step
        job.ckpt.save(step)
        snaps[step] = job.snapshot()
    job.close()
    pinned = Job(tmp_path, seed=5, load_step=2)
    assert pinned.ckpt.load() is True and pinned.ckpt.loaded_step == 2
    pinned.assert_holds(snaps[2])
    assert pinned.ckpt.load(step=3) and pinned.ckpt.loaded_step == 3  # an explicit step wins
    pinned.assert_holds(snaps[3])
    pinned.close()
    missing = Job(tmp_path, seed=5, load_step=9)
    with pytest.raises(StepNotFoundError, match=r"step 9 .*committed steps: \[1, 2, 3\]"):
        missing.ckpt.load()
    missing.close()
    empty = Job(tmp_path / "empty", seed=5, load_step=1)
    with pytest.raises(StepNotFoundError, match="load_step = 1"):
        empty.ckpt.load()
    empty.close()


# ------------------------------------------------------------------ seed checkpoints
@pytest.mark.parametrize("how", ["create_seed_checkpoint", "save(0, last_step=True)"])
def test_seed_checkpoint_is_model_only_and_starts_a_run(tmp_path, how):
    seed = Job(tmp_path, seed=1, train=0)
    if how == "create_seed_checkpoint":
        seed.ckpt.create_seed_checkpoint()
    else:  # what TorchTitan's trainer does with checkpoint.create_seed_checkpoint
        seed.ckpt.save(0, last_step=True)
    weights = seed.snapshot()["model"]
    seed.close()

    run = Job(tmp_path, seed=2)
    mine = run.snapshot()
    assert run.ckpt.load() is True and run.ckpt.loaded_step == 0
    run.assert_holds({"model": weights}, training=False)
    run.assert_holds(mine, model=False)  # step 0 is model only: the optimizer starts fresh
    train_steps(run.model, run.opts, run.scheds, n=1, seed=7)
    run.ckpt.save(1)
    after = run.snapshot()
    run.close()

    resumed = Job(tmp_path, seed=3)
    assert resumed.ckpt.load() is True and resumed.ckpt.loaded_step == 1
    resumed.assert_holds(after)
    resumed.close()


# ------------------------------------------------------------------ resaving a step
def test_a_step_saved_again_after_resuming_replaces_the_old_one(tmp_path):
    job = Job(tmp_path, seed=1)
    for step in (1, 2, 3):
        train_steps(job.model, job.opts, job.scheds, n=1, seed=step)
        job.ckpt.save(step)
    job.close()

    rewound = Job(tmp_path, seed=4, load_step=2)  # e.g. step 3 diverged: go back to 2
    assert rewound.ckpt.load() and rewound.ckpt.loaded_step == 2
    train_steps(rewound.model, rewound.opts, rewound.scheds, n=1, seed=99)
    rewound.ts.step = 3
    rewound.ckpt.save(3)
    new_three = rewound.snapshot()
    assert rewound.ckpt.backend.steps() == [1, 2, 3]
    rewound.close()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1", "step-2", "step-3"]  # no trash left

    reader = Job(tmp_path, seed=5)
    assert reader.ckpt.load() and reader.ckpt.loaded_step == 3
    reader.assert_holds(new_three)
    reader.close()
