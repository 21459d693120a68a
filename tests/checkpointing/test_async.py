"""Async saves (``async_mode = "async"`` / ``"async_with_pinned_mem"``): the step on disk is the
state at ``save()`` time even while training goes on, staging can be waited for, and a failed
background save is raised at the next save / load / close, never lost.

On a CPU-only machine ``async_with_pinned_mem`` stages into ordinary memory (pinning needs CUDA)
but keeps its contract: staging runs in the background until ``maybe_wait_for_staging()``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from checkpointing import AsyncSaveError, CheckpointConfig, Checkpointer
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps

MODES = ["async", "async_with_pinned_mem"]


def _config(mode: str, **overrides) -> CheckpointConfig:
    base = dict(enable=True, folder="checkpoint", interval=1, keep_latest_k=0, async_mode=mode)
    base.update(overrides)
    return CheckpointConfig(**base)


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def _read_back(base, step: int, seed: int = 9) -> dict:
    model = build_titan_model(seed=seed)
    with Checkpointer(model_parts=[model], checkpoint_config=_config("disabled"), base_folder=str(base)) as r:
        assert r.load(step=step) and r.loaded_step == step
    return model.state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_async_step_holds_the_state_at_save_time(mode, tmp_path):
    model = build_titan_model(seed=0)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1)
    ts = TrainState(step=1)
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
                      checkpoint_config=_config(mode), base_folder=str(tmp_path)) as ckpt:
        expected = {}
        for step in (1, 2):
            expected[step] = _snapshot(model)
            ts.step = step
            ckpt.save(step)
            ckpt.maybe_wait_for_staging()  # from here the live tensors may change
            _perturb(model)  # the next "optimizer step" races the background write
    for step in (1, 2):
        assert_state_equal(expected[step], _read_back(tmp_path, step))
    # The full training state went through the background path too.
    ropts_model = build_titan_model(seed=4)
    ropts, rscheds = build_training_parts(ropts_model)
    rts = TrainState()
    with Checkpointer(model_parts=[ropts_model], optimizers=ropts, lr_schedulers=rscheds, states={"train_state": rts},
                      checkpoint_config=_config("disabled"), base_folder=str(tmp_path)) as r:
        assert r.load() and r.loaded_step == 2
    assert rts.step == 2 and rscheds.state_dict() == scheds.state_dict()
    assert_state_equal(opts.state_dict(), ropts.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_load_waits_for_the_save_in_flight(mode, tmp_path):
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=_config(mode), base_folder=str(tmp_path)) as ckpt:
        expected = _snapshot(model)
        ckpt.save(3)
        ckpt.maybe_wait_for_staging()
        _perturb(model)
        assert ckpt.load() is True and ckpt.loaded_step == 3  # not False, not an older step
        assert_state_equal(expected, model.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_retention_with_async_saves_keeps_the_newest(mode, tmp_path):
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=_config(mode, keep_latest_k=2), base_folder=str(tmp_path)) as ckpt:
        for step in range(1, 6):
            ckpt.save(step)
            ckpt.maybe_wait_for_staging()
    with Checkpointer(model_parts=[model], checkpoint_config=_config("disabled"), base_folder=str(tmp_path)) as ckpt:
        assert ckpt.backend.steps() == [4, 5]
    assert not [n for n in os.listdir(tmp_path / "checkpoint") if n.startswith(".")]


def test_last_step_is_written_before_save_returns(tmp_path):
    model = build_titan_model(seed=0)
    cfg = _config("async", last_save_model_only=True, export_dtype="bfloat16")
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path))
    ckpt.save(4)
    ckpt.save(5, last_step=True)
    assert ckpt.latest_step() == 5  # no wait, no close: the final export is synchronous
    ckpt.close()


def _break_folder(base) -> None:
    """A real I/O failure for the background writer: the checkpoint folder becomes a file."""
    folder = base / "checkpoint"
    if folder.exists():
        os.rename(folder, base / "moved-away")
    folder.write_text("not a directory")


def _repair_folder(base) -> None:
    os.remove(base / "checkpoint")
    os.rename(base / "moved-away", base / "checkpoint")


@pytest.mark.parametrize("mode", MODES)
def test_background_failure_surfaces_at_the_next_save_then_clears(mode, tmp_path):
    model = build_titan_model(seed=0)
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config(mode, interval=2), base_folder=str(tmp_path))
    ckpt.save(2)
    ckpt.load()  # waits: step 2 is committed
    _break_folder(tmp_path)
    ckpt.save(4)  # returns at once; the write fails in the background
    ckpt.maybe_wait_for_staging()
    with pytest.raises(AsyncSaveError, match="background checkpoint save failed") as info:
        ckpt.save(6)
    assert isinstance(info.value.__cause__, OSError)
    _repair_folder(tmp_path)
    ckpt.save(8)  # the failure was reported once; saving works again
    ckpt.close()
    with Checkpointer(model_parts=[model], checkpoint_config=_config("disabled"), base_folder=str(tmp_path)) as r:
        assert r.backend.steps() == [2, 8]


def test_background_failure_surfaces_between_intervals(tmp_path):
    """A save() call that saves nothing still reports a background failure once it is known,
    without waiting for the write in flight."""
    model = build_titan_model(seed=0)
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config("async", interval=100), base_folder=str(tmp_path))
    _break_folder(tmp_path)
    ckpt.save(100)
    deadline = time.monotonic() + 30
    with pytest.raises(AsyncSaveError):
        while time.monotonic() < deadline:
            ckpt.save(101)  # not a save step
            time.sleep(0.02)
    ckpt.close()


@pytest.mark.parametrize("mode", MODES)
def test_background_failure_surfaces_at_close(mode, tmp_path):
    model = build_titan_model(seed=0)
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config(mode), base_folder=str(tmp_path))
    _break_folder(tmp_path)
    ckpt.save(1)
    with pytest.raises(AsyncSaveError):
        ckpt.close()
    ckpt.close()  # closed for good: a second close is a no-op


def test_context_manager_raises_a_background_failure_on_exit(tmp_path):
    model = build_titan_model(seed=0)
    with pytest.raises(AsyncSaveError):
        with Checkpointer(model_parts=[model], checkpoint_config=_config("async"), base_folder=str(tmp_path)) as ckpt:
            _break_folder(tmp_path)
            ckpt.save(1)


@pytest.fixture
def gated_backend():
    """A real DCP backend whose writes wait for a gate: lets a test hold a save in flight."""
    import threading

    from checkpointing import BackendSpec, register_backend
    from checkpointing.backend import unregister_backend
    from checkpointing.backends.dcp import DCPBackend, DCPOptions

    gate = threading.Event()

    class GatedDCP(DCPBackend):
        def write(self, step, state):
            assert gate.wait(timeout=60), "gate never opened"
            super().write(step, state)

    register_backend(BackendSpec("_gated_dcp", GatedDCP, GatedDCP.capabilities, DCPOptions), replace=True)
    yield gate
    gate.set()
    unregister_backend("_gated_dcp")


def test_steps_between_intervals_do_not_wait_for_the_write_in_flight(tmp_path, gated_backend):
    """Like TorchTitan: only the next *saving* step waits, so a write overlaps many steps."""
    import threading

    model = build_titan_model(seed=0)
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config("async", interval=10, backend="_gated_dcp"),
                        base_folder=str(tmp_path))
    ckpt.save(10)  # staged; the write now waits on the gate
    returned = threading.Event()
    worker = threading.Thread(target=lambda: ([ckpt.save(s) for s in range(11, 15)], returned.set()))
    worker.start()
    worker.join(timeout=20)
    assert returned.is_set(), "save() of a non-saving step blocked on the write in flight"
    assert ckpt.latest_step() == -1  # still in flight
    gated_backend.set()
    ckpt.save(20)  # a saving step waits for step 10, then writes 20
    ckpt.close()
    with Checkpointer(model_parts=[model], checkpoint_config=_config("disabled"), base_folder=str(tmp_path)) as r:
        assert r.backend.steps() == [10, 20]
