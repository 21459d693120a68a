"""A folder holding our ``hf`` steps crashes TorchTitan's stock CheckpointManager (its scan takes
any ``step-N`` with a ``model.safetensors.index.json`` and loads it as DCP). We keep hf steps
standard Hugging Face directories and warn instead: ``ckpt inspect`` and the Checkpointer that
TorchTitan's trainer builds both name the folder, the steps and the fix."""

from __future__ import annotations

import json
import logging

import pytest

from checkpointing import Checkpointer
from checkpointing.cli import main as ckpt_main
from checkpointing.config import CheckpointConfig
from checkpointing.mixed_folder import scan, warning
from tests.helpers import build_titan_model, build_training_parts


def adapter(model):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec("llama3").state_dict_adapter(model.model_args, None)


def save(folder, backend: str, step: int, model) -> None:
    cfg = CheckpointConfig(enable=True, backend=backend, folder="checkpoint")
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter(model), base_folder=str(folder)) as c:
        c.save(step, last_step=True)


@pytest.fixture
def model():
    return build_titan_model("llama3")


def test_torchtitans_stock_checkpointmanager_fails_on_a_folder_with_our_hf_step(tmp_path, model):
    """Why the warning exists (TorchTitan 0.2.2 behaviour, not ours)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import Checkpoint

    save(tmp_path, "dcp", 2, model)
    save(tmp_path, "hf", 4, model)
    opts, scheds = build_training_parts(model)
    stock = CheckpointManager(
        dataloader=None, model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={},
        checkpoint_config=Checkpoint(enable=True, folder="checkpoint"), sd_adapter=adapter(model), base_folder=str(tmp_path),
    )
    with pytest.raises(BaseException) as failure:  # DCP wraps it in CheckpointException, a BaseException
        stock.load()
    assert "AssertionError: metadata is None" in str(failure.value)


def test_scan_sees_steps_as_torchtitans_scan_does(tmp_path, model):
    save(tmp_path, "dcp", 2, model)
    save(tmp_path, "hf", 4, model)
    (tmp_path / "checkpoint" / ".inflight-6").mkdir()  # our staging: never a step
    formats = scan(str(tmp_path / "checkpoint"))
    assert (formats.dcp, formats.hf, formats.mixed) == ([2], [4], True)


def test_ckpt_inspect_warns_on_a_mixed_folder_only(tmp_path, model, capsys):
    save(tmp_path / "pure", "hf", 1, model)
    assert ckpt_main(["inspect", str(tmp_path / "pure" / "checkpoint")]) == 0
    assert "warning" not in capsys.readouterr().err
    save(tmp_path / "mixed", "dcp", 2, model)
    save(tmp_path / "mixed", "hf", 4, model)
    folder = str(tmp_path / "mixed" / "checkpoint")
    assert ckpt_main(["inspect", folder]) == 0
    err = capsys.readouterr().err
    assert f"ckpt: warning: {folder} mixes hf steps [4] with DCP steps [2]" in err
    assert "AssertionError: metadata is None" in err and "checkpoint.folder" in err
    assert ckpt_main(["inspect", "--json", folder]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning(folder)]


@pytest.mark.parametrize("existing, backend, load_only, warns", [
    ("dcp", "hf", False, True),     # an hf job about to write into a DCP (e.g. stock TorchTitan) folder
    ("hf", "dcp", False, True),     # a DCP job (ours or stock) in a folder of hf steps
    ("hf", "hf", False, False),
    ("dcp", "dcp", False, False),
    ("dcp", "hf", True, False),     # a reader writes nothing
])
def test_the_trainers_checkpointer_warns_before_a_folder_becomes_mixed(tmp_path, model, caplog, existing, backend, load_only, warns):
    from checkpointing.torchtitan import build_checkpointer

    save(tmp_path, existing, 2, model)
    cfg = CheckpointConfig(enable=True, backend=backend, folder="checkpoint", load_only=load_only)
    with caplog.at_level(logging.WARNING, logger="checkpointing.torchtitan"):
        ckpt = build_checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter(model), base_folder=str(tmp_path))
        ckpt.close()
    said = [r.getMessage() for r in caplog.records if "TorchTitan's stock CheckpointManager" in r.getMessage()]
    assert bool(said) == warns, said
    if warns:
        assert str(tmp_path / "checkpoint") in said[0] and "[2]" in said[0]


@pytest.mark.parametrize("mine, theirs, resumes", [
    ([2], [4], 2),       # the backend changed from dcp to hf and back: hf step 4 is newer
    ([], [4], None),     # only the other format's steps: a silent fresh start without the warning
    ([4], [2], 4),       # the other format's steps are older: nothing is passed over, no warning
])
def test_every_checkpointer_warns_when_a_resume_passes_over_newer_steps_of_another_backend(
    tmp_path, model, caplog, mine, theirs, resumes
):
    """A Checkpointer lists only its own backend's steps; a resume that passes over newer steps
    another backend wrote in the same folder says so, naming them, whatever built the Checkpointer."""
    for step in mine:
        save(tmp_path, "dcp", step, model)
    for step in theirs:
        save(tmp_path, "hf", step, model)
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", load_only=True)
    with caplog.at_level(logging.WARNING, logger="checkpointing"), Checkpointer(
        model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)
    ) as reader:
        loaded = reader.load()
        assert (reader.loaded_step if loaded else None) == resumes
    said = [r.getMessage() for r in caplog.records if "newer than any dcp step" in r.getMessage()]
    if theirs[0] < (mine or [-1])[-1]:
        assert said == []
        return
    assert len(said) == 1, said
    assert f"hf steps {theirs}" in said[0] and str(tmp_path / "checkpoint") in said[0]
    assert ("resumes from step 2" if mine else "finds nothing to resume from") in said[0]
    assert "checkpoint.backend" in said[0]
