"""TorchTitan 0.2.2's own trainer (``torchtitan.train.main(Trainer)``, unmodified, run as
``python -m torchtitan.train`` runs it) checkpointing through our Checkpointer, switched on by
the TOML alone (``custom_config_module`` + ``custom_import``), on CPU.

Every run below is a real TorchTitan training run of the llama3 debug model (tests/torchtitan/
harness.py runs several per process to save the ~6 s import each). Crashes are real: the
process SIGKILLs itself right after the trainer's ``save(2)`` returned, mid-run, so nothing
is closed or flushed. Training is deterministic (``debug.seed``, ``debug.deterministic``), so
a resumed run must reproduce the uninterrupted run's losses and final parameters bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from tests.torchtitan.runs import (
    STEPS,
    assert_ran,
    assert_same_state,
    debug_model,
    load_step,
    losses,
    ours,
    run_plan,
    stock,
)

OURS = "checkpointing.manager.Checkpointer"
STOCK = "torchtitan.components.checkpoint.CheckpointManager"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("titan_runs")
    d = {name: tmp / name for name in ("r0", "t0", "seed", "r3", "r4", "e1", "e2", "r1", "r2", "x1", "x2")}
    results, out1 = run_plan(tmp, "plan1", [
        {"name": "reference", "argv": ours(d["r0"], "dcp")},
        {"name": "stock", "argv": stock(tmp, d["t0"])},
        {"name": "seed_create", "argv": ours(d["seed"], "dcp", "--checkpoint.create_seed_checkpoint")},
        # A different seed: only a real load of the seed checkpoint reproduces the reference.
        {"name": "seed_train", "argv": ours(d["seed"], "dcp", "--debug.seed=1")},
        {"name": "async", "argv": ours(d["r3"], "dcp", "--checkpoint.async_mode=async")},
        {"name": "async_pinned", "argv": ours(d["r4"], "hf", "--checkpoint.async_mode=async_with_pinned_mem")},
        {"name": "memory", "argv": ours(d["e1"], "memory")},
        {"name": "unknown", "argv": ours(d["e2"], "orbax")},
        {"name": "dcp_crash", "argv": ours(d["r1"], "dcp"), "kill_after_save": 2},
    ])
    # Ours -> stock: TorchTitan's stock trainer resumes from the step our dcp run committed.
    shutil.copytree(d["r1"] / "checkpoint", d["x1"] / "checkpoint")
    # Stock -> ours: our run resumes from the step TorchTitan's stock run committed at step 2.
    shutil.copytree(d["t0"] / "checkpoint" / "step-2", d["x2"] / "checkpoint" / "step-2")
    more, out2 = run_plan(tmp, "plan2", [
        {"name": "dcp_resume", "argv": ours(d["r1"], "dcp")},
        {"name": "ours_to_stock", "argv": stock(tmp, d["x1"])},
        {"name": "stock_to_ours", "argv": ours(d["x2"], "dcp")},
        {"name": "hf_crash", "argv": ours(d["r2"], "hf"), "kill_after_save": 2},
    ])
    results.update(more)
    last, out3 = run_plan(tmp, "plan3", [{"name": "hf_resume", "argv": ours(d["r2"], "hf")}])
    results.update(last)
    return {"results": results, "dirs": d, "output": out1 + out2 + out3}


def result(runs, name: str) -> dict:
    r = runs["results"][name]
    if name not in ("memory", "unknown"):
        assert_ran(r, runs["output"])
    return r


@pytest.fixture(scope="module")
def reference(runs):
    """The uninterrupted run: losses of steps 1..4 and the final (step 4) parameters."""
    r = result(runs, "reference")
    assert sorted(losses(r)) == list(range(1, STEPS + 1))
    return losses(r), load_step(runs["dirs"]["r0"], "dcp", STEPS)


def test_the_toml_switches_the_trainer_to_our_checkpointer(runs):
    for name in ("reference", "seed_create", "async", "async_pinned", "dcp_resume", "stock_to_ours", "hf_resume"):
        assert result(runs, name)["checkpointer"] == OURS, name
    for name in ("stock", "ours_to_stock"):
        assert result(runs, name)["checkpointer"] == STOCK, name
    assert "Checkpointing active (titan-checkpointing, backend 'dcp')" in runs["output"]
    assert "CPU shims applied (checkpointing.torchtitan_cpu)" in runs["output"]


@pytest.mark.parametrize("folder, backend, files", [
    ("r0", "dcp", {".metadata", "__0_0.distcp", "manifest.json"}),
    ("r2", "hf", {"config.json", "model.safetensors.index.json", "manifest.json", "training_state"}),
])
def test_steps_are_written_by_our_backend(runs, folder, backend, files):
    step_dir = runs["dirs"][folder] / "checkpoint" / "step-2"
    assert files <= {p.name for p in step_dir.iterdir()}
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["backend"] == backend and manifest["step"] == 2


def test_our_checkpointer_leaves_training_exactly_as_torchtitans(runs, reference):
    ref_losses, ref_final = reference
    assert losses(result(runs, "stock")) == ref_losses
    assert_same_state(load_step(runs["dirs"]["t0"], "dcp", STEPS), ref_final, "stock run's final step vs ours")


@pytest.mark.parametrize("backend", ["dcp", "hf"])
def test_crash_after_a_save_then_rerun_resumes_bit_identically(runs, reference, backend):
    ref_losses, ref_final = reference
    crashed, resumed = result(runs, f"{backend}_crash"), result(runs, f"{backend}_resume")
    assert crashed["killed_after_save"] == 2
    assert losses(crashed) == {s: ref_losses[s] for s in (1, 2)}
    assert resumed["loaded"] == {"returned": True, "step": 2}
    assert losses(resumed) == {s: ref_losses[s] for s in (3, 4)}, "resume must start at step 3 and match"
    folder = runs["dirs"]["r1" if backend == "dcp" else "r2"]
    assert_same_state(load_step(folder, backend, STEPS), ref_final, f"{backend}: resumed final step vs uninterrupted")


def test_hf_step_of_a_torchtitan_run_loads_in_transformers_with_the_same_logits(runs, reference):
    transformers = pytest.importorskip("transformers")
    step_dir = runs["dirs"]["r2"] / "checkpoint" / f"step-{STEPS}"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(step_dir)).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    model, _ = debug_model()
    _, ref_final = reference
    model.load_state_dict({k.removeprefix("model."): v for k, v in ref_final.items()})
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ by {diff}"


def test_seed_checkpoint_is_written_by_our_backend_and_starts_the_run(runs, reference):
    ref_losses, ref_final = reference
    created = result(runs, "seed_create")
    assert created["losses"] == {}, "creating a seed checkpoint trains nothing"
    step0 = runs["dirs"]["seed"] / "checkpoint" / "step-0"
    assert json.loads((step0 / "manifest.json").read_text())["step"] == 0
    trained = result(runs, "seed_train")
    assert trained["loaded"] == {"returned": True, "step": 0}
    # debug.seed = 1 would initialize other weights: matching the seed-0 reference bit for bit
    # means the weights came from step-0.
    assert losses(trained) == ref_losses
    assert_same_state(load_step(runs["dirs"]["seed"], "dcp", STEPS), ref_final, "run started from the seed checkpoint")


@pytest.mark.parametrize("name, folder, backend, twin", [
    ("async", "r3", "dcp", ("r0", "dcp")),            # vs the reference's synchronous step-2
    ("async_pinned", "r4", "hf", ("r2", "hf")),       # vs the hf crash run's synchronous step-2
])
def test_async_modes_write_the_same_steps_as_synchronous_saves(runs, reference, name, folder, backend, twin):
    ref_losses, ref_final = reference
    assert losses(result(runs, name)) == ref_losses
    d = runs["dirs"]
    assert_same_state(load_step(d[folder], backend, 2, full=True), load_step(d[twin[0]], twin[1], 2, full=True), f"{name} step-2")
    assert_same_state(load_step(d[folder], backend, STEPS), ref_final, f"{name} final step")


@pytest.mark.parametrize("name, says", [
    ("memory", r"checkpoint\.backend = 'memory'.*(model weights|model tensors)"),
    ("unknown", r"checkpoint\.backend = 'orbax' is not a registered backend; allowed: .*dcp.*hf"),
])
def test_unsuitable_or_unknown_backend_fails_at_start_with_a_named_error(runs, name, says):
    r = result(runs, name)
    assert r["error"] is not None, f"{name} ran"
    assert (r["error"]["module"], r["error"]["type"]) == ("checkpointing.errors", "ConfigError")
    assert re.search(says, r["error"]["message"]), r["error"]["message"]
    assert r["losses"] == {} and "checkpointer" not in r, "no step may run"
    assert not (runs["dirs"]["e1" if name == "memory" else "e2"] / "checkpoint").exists()


@pytest.mark.parametrize("name, first", [("ours_to_stock", "dcp_crash"), ("stock_to_ours", "stock")])
def test_steps_resume_across_torchtitans_checkpointer_and_ours(runs, reference, name, first):
    ref_losses, ref_final = reference
    r = result(runs, name)
    assert r["loaded"]["returned"] is True
    assert losses(r) == {s: ref_losses[s] for s in (3, 4)}
    folder = runs["dirs"]["x1" if name == "ours_to_stock" else "x2"]
    assert_same_state(load_step(folder, "dcp", STEPS), ref_final, f"{name}: final step")


def test_saves_and_loads_are_logged_in_torchtitans_style(runs):
    """TorchTitan users read these lines to know a save happened and a resume took place."""
    out = runs["output"]
    folder = re.escape(str(runs["dirs"]["r1"] / "checkpoint"))
    for verb in ("saving", "loading"):
        pattern = (rf"\[titan\] .* - checkpointing\.manager - INFO - Finished {verb} the checkpoint step 2 "
                   rf"\(backend dcp, {folder}[^)]*\) in \d+\.\d\d seconds, \d+(\.\d+)? (B|KiB|MiB|GiB)\.")
        assert re.search(pattern, out), f"no '{verb}' line for step 2 in the runs' log"
