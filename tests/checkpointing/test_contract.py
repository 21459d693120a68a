"""The contract every backend keeps, run against each registered backend through one API."""

from __future__ import annotations

import pytest
import torch

from checkpointing import Checkpointer, StateMismatchError, StepNotFoundError
from tests.checkpointing.cases import backend_cases, make_config
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps

CASES = backend_cases()


def _holds_training_state(ckpt: Checkpointer) -> bool:
    return ckpt.backend.capabilities.non_tensor_state


@pytest.fixture(params=CASES)
def case(request):
    return request.param


def _trainer(case, tmp_path, channel, seed=0, **cfg):
    model = build_titan_model(seed=seed)
    config = make_config(case, channel, **cfg)
    probe = Checkpointer(model_parts=[model], checkpoint_config=make_config(case, channel + "p", **cfg), base_folder=str(tmp_path / "probe"))
    full = probe.backend.capabilities.non_tensor_state
    probe.close()
    if not full:
        return model, None, None, None, Checkpointer(model_parts=[model], checkpoint_config=config, base_folder=str(tmp_path))
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=2, seed=seed)
    ts = TrainState(step=2)
    ts.losses = [1.5, 1.25]
    ckpt = Checkpointer(
        model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
        checkpoint_config=config, base_folder=str(tmp_path),
    )
    return model, opts, scheds, ts, ckpt


def _receiver(case, tmp_path, channel, with_training: bool, seed=1, **cfg):
    model = build_titan_model(seed=seed)
    config = make_config(case, channel, **cfg)
    if not with_training:
        return model, None, None, None, Checkpointer(model_parts=[model], checkpoint_config=config, base_folder=str(tmp_path))
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1, seed=seed + 10)  # different state, same structure
    ts = TrainState()
    ckpt = Checkpointer(
        model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
        checkpoint_config=config, base_folder=str(tmp_path),
    )
    return model, opts, scheds, ts, ckpt


def test_round_trip_is_bit_exact(case, tmp_path, unique_channel):
    model, opts, scheds, ts, writer = _trainer(case, tmp_path, unique_channel)
    full = opts is not None
    writer.save(5)
    rmodel, ropts, rscheds, rts, reader = _receiver(case, tmp_path, unique_channel, full)
    assert reader.load() is True
    assert reader.loaded_step == 5
    assert_state_equal(model.state_dict(), rmodel.state_dict())
    if full:
        assert_state_equal(opts.state_dict(), ropts.state_dict())
        assert rscheds.state_dict() == scheds.state_dict()
        assert (rts.step, rts.losses) == (2, [1.5, 1.25])
    reader.close()
    writer.close()


def test_load_with_nothing_saved_returns_false(case, tmp_path, unique_channel):
    model = build_titan_model()
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as c:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert c.load() is False
        assert c.loaded_step == -1
        assert_state_equal(before, model.state_dict())


def test_newest_step_wins_and_named_step_loads(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    w = Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path))
    snapshots = {}
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        w.save(step)
    rmodel = build_titan_model(seed=3)
    r = Checkpointer(model_parts=[rmodel], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path))
    assert r.load() and r.loaded_step == 2
    assert_state_equal(snapshots[2], rmodel.state_dict())
    assert r.load(step=1) and r.loaded_step == 1
    assert_state_equal(snapshots[1], rmodel.state_dict())
    with pytest.raises(StepNotFoundError, match="step 7"):
        r.load(step=7)
    assert r.loaded_step == 1
    r.close()
    w.close()


def test_keep_latest_k_retains_newest(case, tmp_path, unique_channel):
    model = build_titan_model()
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel, keep_latest_k=2), base_folder=str(tmp_path)) as c:
        for step in range(1, 6):
            c.save(step)
        assert c.backend.steps() == [4, 5]


def test_interval_policy(case, tmp_path, unique_channel):
    model = build_titan_model()
    cfg = make_config(case, unique_channel, interval=3, enable_first_step_checkpoint=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
        for step in range(1, 8):
            c.save(step)
        c.save(8, last_step=True)
        assert c.backend.steps() == [1, 3, 6, 8]


def test_load_only_never_saves(case, tmp_path, unique_channel):
    model = build_titan_model()
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel, load_only=True), base_folder=str(tmp_path)) as c:
        c.save(1, last_step=True)
        assert c.backend.steps() == []


def test_last_step_model_only_export_dtype(case, tmp_path, unique_channel):
    model = build_titan_model()
    cfg = make_config(case, unique_channel, last_save_model_only=True, export_dtype="bfloat16")
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as w:
        w.save(9, last_step=True)
        rmodel = build_titan_model(seed=4).to(torch.bfloat16)
        with Checkpointer(model_parts=[rmodel], checkpoint_config=cfg, base_folder=str(tmp_path)) as r:
            assert r.load() and r.loaded_step == 9
        expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        assert_state_equal(expected, rmodel.state_dict())


def test_mismatched_receiver_is_refused_and_untouched(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as w:
        w.save(1)
        other = build_titan_model(seed=2, dim=96)  # every matrix has another shape
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with Checkpointer(model_parts=[other], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as r:
            with pytest.raises(StateMismatchError) as err:
                r.load()
            assert "tok_embeddings.weight" in str(err.value)
            assert r.loaded_step == -1
        assert_state_equal(before, other.state_dict())


def test_exclude_from_loading_keeps_excluded_state(case, tmp_path, unique_channel):
    model, opts, scheds, ts, writer = _trainer(case, tmp_path, unique_channel)
    if opts is None:
        pytest.skip("backend holds model tensors only")
    writer.save(3)
    rmodel, ropts, rscheds, rts, _ = _receiver(case, tmp_path, unique_channel, True)
    opt_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ropts.state_dict().items()}
    cfg = make_config(case, unique_channel, exclude_from_loading=["optimizer", "train_state"])
    reader = Checkpointer(
        model_parts=[rmodel], optimizers=ropts, lr_schedulers=rscheds, states={"train_state": rts},
        checkpoint_config=cfg, base_folder=str(tmp_path),
    )
    assert reader.load()
    assert_state_equal(model.state_dict(), rmodel.state_dict())
    assert_state_equal(opt_before, ropts.state_dict())
    assert rts.step == 0
    assert rscheds.state_dict() == scheds.state_dict()
    reader.close()
    writer.close()


# ------------------------------------------------------------------ a receiver that is not an nn.Module
class RecordingSink:
    """A TensorSink that keeps a copy of what it was handed (tensors may be views valid only
    during ``receive``), and can be told to fail midway."""

    def __init__(self, specs, fail_after: int | None = None):
        self._specs = specs
        self.fail_after = fail_after
        self.received: dict[int, dict[str, torch.Tensor]] = {}

    def specs(self):
        return self._specs

    def receive(self, step, tensors):
        got = {}
        for i, (name, tensor) in enumerate(tensors):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("the engine rejected the update")
            got[name] = tensor.clone()
        self.received[step] = got


def _sink_for(model, dtype=None):
    from checkpointing import TensorSpec

    return RecordingSink({k: TensorSpec(tuple(v.shape), dtype or v.dtype) for k, v in model.state_dict().items()})


def test_a_sink_receives_every_published_tensor_exactly(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as w:
        w.save(1)
        sink = _sink_for(model)
        reader_cfg = make_config(case, unique_channel, load_only=True)
        with Checkpointer(checkpoint_config=reader_cfg, base_folder=str(tmp_path), sink=sink) as r:
            assert r.load() and r.loaded_step == 1
            assert r.stats.last_load_path == "sink"
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-1)
            w.save(2)
            assert r.load() and r.loaded_step == 2
    assert set(sink.received) == {1, 2}
    assert_state_equal(model.state_dict(), sink.received[2])
    assert set(sink.received[1]) == set(model.state_dict())
    assert all(not torch.equal(sink.received[1][k], sink.received[2][k]) for k in sink.received[1] if sink.received[1][k].abs().sum() > 0)


def test_a_sink_gets_its_own_dtype_names_are_checked_before_delivery(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as w:
        w.save(1)
        reader_cfg = make_config(case, unique_channel, load_only=True)
        bf16 = _sink_for(model, torch.bfloat16)
        with Checkpointer(checkpoint_config=reader_cfg, base_folder=str(tmp_path), sink=bf16) as r:
            assert r.load()
        got = bf16.received[1]
        assert all(got[k].to(torch.bfloat16).equal(v.to(torch.bfloat16)) for k, v in model.state_dict().items())

        from checkpointing import TensorSpec

        wrong = _sink_for(model)
        wrong._specs = dict(wrong._specs, **{"tok_embeddings.weight": TensorSpec((3, 3), torch.float32)})
        with Checkpointer(checkpoint_config=reader_cfg, base_folder=str(tmp_path), sink=wrong) as r:
            with pytest.raises(StateMismatchError) as err:
                r.load()
            assert "tok_embeddings.weight" in err.value.keys
            assert r.loaded_step == -1
        assert wrong.received == {}


def test_a_failing_sink_is_a_typed_error_and_the_version_does_not_advance(case, tmp_path, unique_channel):
    from checkpointing import CheckpointError

    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path)) as w:
        w.save(1)
        sink = _sink_for(model)
        sink.fail_after = 3
        with Checkpointer(checkpoint_config=make_config(case, unique_channel, load_only=True),
                          base_folder=str(tmp_path), sink=sink) as r:
            with pytest.raises(CheckpointError, match="rejected the update"):
                r.load()
            assert r.loaded_step == -1
            sink.fail_after = None
            assert r.load() and r.loaded_step == 1


def test_a_sink_checkpointer_only_loads(case, tmp_path, unique_channel):
    from checkpointing import ConfigError

    with pytest.raises(ConfigError, match="load_only"):
        Checkpointer(checkpoint_config=make_config(case, unique_channel), base_folder=str(tmp_path),
                     sink=_sink_for(build_titan_model()))
