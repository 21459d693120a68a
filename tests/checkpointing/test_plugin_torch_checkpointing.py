"""The torch_checkpointing plugin (``plugins/torch_checkpointing``), beyond the contract and fault
suites that run on it whenever it is installed (``tests/checkpointing/cases.py`` picks up every
registered backend): its options table from both config loaders, that its steps really are
torch-checkpointing checkpoints, the training state it keeps exactly, what torch-checkpointing
0.1.1 cannot do and how that is refused, ``ckpt inspect | verify | convert`` on its steps, and the
main job trained and resumed on it.

Skipped when the plugin is not installed (``pip install -e plugins/torch_checkpointing``; the
README's test command and ``.ci/run`` install it).
"""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer, ConfigError, StateMismatchError, load_job_config
from checkpointing.cli import main as ckpt
from tests.helpers import assert_state_equal, build_titan_model, build_training_parts, train_steps

plugin = pytest.importorskip("titan_torch_checkpointing", reason="pip install -e plugins/torch_checkpointing")
from titan_torch_checkpointing import library  # noqa: E402

NAME = "torch_checkpointing"
STEP_FILES = {"manifest.json", library.MODEL_FILE, library.EXTRAS_FILE, library.LAYOUT_FILE}


def config(**kw) -> CheckpointConfig:
    return CheckpointConfig(**{"enable": True, "backend": NAME, "folder": "checkpoint", "interval": 1, **kw})


class Bag:
    """A Stateful holding whatever a test puts in it."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.sd = sd


def trained(seed: int = 0, steps: int = 2):
    model = build_titan_model(seed=seed)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=steps, seed=seed)
    return model, opts, scheds


# ------------------------------------------------------------------ its options table
TOML = textwrap.dedent("""
    [job]
    custom_config_module = "checkpointing.config"
    [checkpoint]
    enable = true
    backend = "torch_checkpointing"
    [checkpoint.torch_checkpointing]
    write_threads = 3
""")


def test_options_table_is_parsed_by_load_job_config_and_torchtitan(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(TOML)
    ours = load_job_config(job).checkpoint
    assert ours.backend == NAME and ours.torch_checkpointing.write_threads == 3

    from torchtitan.config import ConfigManager

    titan = ConfigManager().parse_args(["--job.config_file", str(job)])
    assert titan.checkpoint.backend == NAME and titan.checkpoint.torch_checkpointing.write_threads == 3
    assert load_job_config(job, ["--checkpoint.torch_checkpointing.write_threads=2"]).checkpoint.torch_checkpointing.write_threads == 2

    with Checkpointer(model_parts=[build_titan_model()], checkpoint_config=ours, base_folder=str(tmp_path)) as c:
        assert c.backend.options.write_threads == 3  # reaches the backend, validated
        assert c.backend.library.config.save.writer_config.file_write_max_threads == 3  # and torch-checkpointing


@pytest.mark.parametrize("body, named", [
    ("write_thread = 2", "unknown config key 'checkpoint.torch_checkpointing.write_thread' in"),
    ("write_threads = 0", "checkpoint.torch_checkpointing.write_threads = 0; allowed: 1 to 16"),
    ('write_threads = "two"', "checkpoint.torch_checkpointing.write_threads = 'two'"),
])
def test_a_bad_key_or_value_is_a_named_config_error(tmp_path, body, named):
    job = tmp_path / "job.toml"
    job.write_text(TOML.replace("write_threads = 3", body))
    with pytest.raises(ConfigError) as info:
        load_job_config(job)
    assert named in str(info.value)
    if body.startswith("write_thread "):
        assert "did you mean 'write_threads'" in str(info.value)


def test_bad_override_and_python_value_are_named_too():
    with pytest.raises(ConfigError, match="unknown override --checkpoint.torch_checkpointing.threads"):
        load_job_config(None, ["--checkpoint.torch_checkpointing.threads=2"])
    with pytest.raises(ConfigError, match=r"checkpoint.torch_checkpointing.write_threads = 99; allowed: 1 to 16"):
        CheckpointConfig(torch_checkpointing=plugin.TorchCheckpointingOptions(write_threads=99))


def test_weight_sync_has_the_table_too(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[job]\ncustom_config_module = "rl.config"\n[weight_sync]\nbackend = "torch_checkpointing"\n'
                   "[weight_sync.torch_checkpointing]\nwrite_threads = 2\n")
    cfg = load_job_config(job)
    assert cfg.weight_sync.backend == NAME and cfg.weight_sync.torch_checkpointing.write_threads == 2


# ------------------------------------------------------------------ what a step is
def test_a_step_is_a_torch_checkpointing_checkpoint_with_no_pickle_in_it(tmp_path):
    model, opts, scheds = trained()
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        c.save(4)
    step = tmp_path / "checkpoint" / "step-4"
    assert set(os.listdir(step)) == STEP_FILES
    layout = json.loads((step / library.LAYOUT_FILE).read_text())
    assert layout["writer"] == "torch_checkpointing 0.1.1"
    assert layout["model_aliases"] == {"output.weight": "tok_embeddings.weight"}  # tied: stored once

    # torch-checkpointing's own CheckpointManager, knowing nothing of the plugin, reads the step.
    from torch_checkpointing import CheckpointManager, ItemSpec

    own = CheckpointManager(CheckpointManager.Config(items={k: ItemSpec(layout=v, required=False) for k, v in library.ITEMS.items()}))
    try:
        got = own.load(str(step), into={library.MODEL: None, library.LAYOUT: None})
    finally:
        own.close()
    expected = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    assert_state_equal(expected, got[library.MODEL])
    assert got[library.LAYOUT] == layout
    for name in os.listdir(step):  # neither a zip (torch.save) nor a pickle stream
        head = (step / name).read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", name


def test_every_kind_of_training_state_comes_back_with_its_type(tmp_path):
    shared = torch.arange(4.0)
    rich = {
        "pair": (1, 2.5), "int_and_str_keys": {1: "one", "1": "string one"}, "blob": b"\x00\xff\x80",
        "none": None, "nan": float("nan"), "neg_inf": float("-inf"), "size": torch.Size([2, 3]),
        "nested": [torch.arange(3), {"bf16": torch.ones(2, dtype=torch.bfloat16)}], "scalar": torch.tensor(5),
        "mask": torch.tensor([True, False]), "tied_a": shared, "tied_b": shared, "big": 2**70,
    }
    model = build_titan_model()
    with Checkpointer(model_parts=[model], states={"bag": Bag(rich)}, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
    receiver_tensor = torch.zeros(3, dtype=torch.int64)
    receiver = Bag({"nested": [receiver_tensor, {"bf16": torch.zeros(2, dtype=torch.bfloat16)}], "pair": None})
    with Checkpointer(model_parts=[build_titan_model(seed=3)], states={"bag": receiver}, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        assert c.load()
    got = receiver.sd
    assert set(got) == set(rich)
    assert got["nested"][0] is receiver_tensor and torch.equal(receiver_tensor, torch.arange(3))  # filled in place
    for key in ("pair", "int_and_str_keys", "blob", "none", "neg_inf", "size", "big"):
        assert got[key] == rich[key] and type(got[key]) is type(rich[key]), key
    assert math.isnan(got["nan"])
    for key in ("scalar", "mask", "tied_a"):
        assert got[key].dtype == rich[key].dtype and torch.equal(got[key], rich[key]), key
    assert got["nested"][1]["bf16"].dtype == torch.bfloat16
    assert got["tied_a"] is got["tied_b"]  # one stored tensor, one loaded tensor


def test_a_value_torch_save_cannot_store_is_refused_at_save_and_nothing_is_committed(tmp_path):
    with Checkpointer(model_parts=[build_titan_model()], states={"bag": Bag({"fn": lambda: 1})},
                      checkpoint_config=config(), base_folder=str(tmp_path)) as c:
        with pytest.raises(ConfigError, match=r"bag/fn \(function\) cannot be stored"):
            c.save(1)
        assert c.backend.steps() == []
    folder = tmp_path / "checkpoint"
    assert not folder.exists() or os.listdir(folder) == []  # refused before a staging directory existed


def test_a_receiver_tensor_where_the_checkpoint_holds_a_number_is_a_named_mismatch(tmp_path):
    with Checkpointer(model_parts=[build_titan_model()], states={"bag": Bag({"step": 3})}, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
    receiver = Bag({"step": torch.zeros(())})
    with Checkpointer(model_parts=[build_titan_model()], states={"bag": receiver}, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        with pytest.raises(StateMismatchError) as info:
            c.load()
        assert info.value.keys == ["bag/step"] and c.loaded_step == -1


def test_dtensor_state_is_refused_on_save_and_load(tmp_path):
    """torch-checkpointing 0.1.1 keeps DTensor shards only through pickled metadata; the plugin
    says so instead of saving one rank's shard as if it were the whole tensor."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from checkpointing import BackendContext, StepState, backend_spec

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.arange(8.0).reshape(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        spec = backend_spec(NAME)
        backend = spec.factory(BackendContext(folder=str(tmp_path / "ckpt"), options=spec.default_options(), name=NAME))
        try:
            with pytest.raises(ConfigError, match="cannot keep DTensor shards .*use the dcp backend"):
                backend.write(1, StepState(model={"w": sharded}))
            assert backend.steps() == []
            backend.write(1, StepState(model={"w": torch.arange(8.0).reshape(4, 2)}))
            with pytest.raises(ConfigError, match="DTensor"):
                backend.read(1, StepState(model={"w": sharded}))
        finally:
            backend.close()
    finally:
        if owned:
            dist.destroy_process_group()


def _build_on_two_ranks(rank: int, folder: str) -> None:
    """A rank of a 2-process gloo job builds a Checkpointer on the plugin (spawned: module level)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    try:
        Checkpointer(model_parts=[torch.nn.Linear(2, 2)], checkpoint_config=config(), base_folder=folder)
        outcome = "built"
    except ConfigError as e:
        outcome = str(e)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.slow
def test_a_multi_rank_job_is_refused_on_every_rank(tmp_path):
    """One rank's files would silently drop the other ranks' state (their dataloader positions,
    their shards): refused with a typed error before anything is written."""
    import torch.multiprocessing as mp

    mp.spawn(_build_on_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "runs in one process only, but this job has 2 ranks" in outcome and "use the dcp backend" in outcome, outcome
    assert not (tmp_path / "checkpoint").exists()


# ------------------------------------------------------------------ ckpt on its steps
def _saved_folder(tmp_path) -> str:
    model, opts, scheds = trained()
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"bag": Bag({"step": 2})},
                      checkpoint_config=config(), base_folder=str(tmp_path)) as c:
        c.save(1)
        c.save(2)
    return str(tmp_path / "checkpoint")


def test_ckpt_inspect_and_verify_read_a_plugin_step(tmp_path, capsys):
    folder = _saved_folder(tmp_path)
    assert ckpt(["inspect", folder]) == 0
    out = capsys.readouterr().out
    assert "step-2: backend torch_checkpointing (manifest)" in out, out
    assert "tok_embeddings.weight" in out and "output.weight" in out and "(= tok_embeddings.weight)" in out, out
    assert "training state (extras.safetensors + layout.json)" in out and "optimizer/state.norm.weight.exp_avg" in out, out
    assert "bag (1 non-tensor values)" in out, out

    assert ckpt(["inspect", os.path.join(folder, "step-2"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)["steps"][0]
    rows = {r["name"]: r for r in described["tensors"]}
    assert rows["norm.weight"]["dtype"] == "float32" and rows["norm.weight"]["file"] == library.MODEL_FILE

    assert ckpt(["verify", folder]) == 0
    out = capsys.readouterr().out
    assert "step-2: ok (torch_checkpointing): 3 files match the manifest (checksum), none unlisted; 24 model tensors (1 tied); " in out, out
    assert "training state ['bag', 'lr_scheduler', 'optimizer']: 72 tensors, structure ok" in out, out


def test_ckpt_verify_finds_damage_the_manifest_and_the_structure_check_see(tmp_path, capsys):
    folder = _saved_folder(tmp_path)
    step = os.path.join(folder, "step-2")
    extras = os.path.join(step, library.EXTRAS_FILE)
    with open(extras, "r+b") as f:
        f.seek(os.path.getsize(extras) - 3)
        f.write(b"\xff")
    assert ckpt(["verify", step]) == 1
    assert "CORRUPT (torch_checkpointing)" in capsys.readouterr().out

    # A layout.json that names a tensor the file lacks, resealed so the manifest agrees: only the
    # plugin's own structure check (Inspects.check_structure) can see it.
    from checkpointing.commit import MANIFEST, Manifest

    step1 = os.path.join(folder, "step-1")
    layout_path = os.path.join(step1, library.LAYOUT_FILE)
    text = open(layout_path).read().replace('"optimizer/state.norm.weight.exp_avg"', '"optimizer/state.norm.weight.exp_avgX"')
    open(layout_path, "w").write(text)
    resealed = Manifest.build(step1, 1, NAME)
    open(os.path.join(step1, MANIFEST), "w").write(resealed.to_json())
    assert ckpt(["verify", step1]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "exp_avgX" in out, out


def test_a_layout_without_its_extras_entry_is_corrupt_not_a_key_error(tmp_path):
    """Found by the mutation fuzz: one flipped bit renames layout.json's "extras" key; with
    verify = "size" nothing else notices, and the load died with a bare KeyError."""
    from checkpointing import CorruptCheckpointError

    model, opts, scheds = trained(seed=0)
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
    layout = os.path.join(tmp_path, "checkpoint", "step-1", library.LAYOUT_FILE)
    text = open(layout).read()
    assert '"extras"' in text
    open(layout, "w").write(text.replace('"extras"', '"extrat"', 1))  # same size: verify = "size" passes
    other, other_opts, other_scheds = trained(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with Checkpointer(model_parts=[other], optimizers=other_opts, lr_schedulers=other_scheds,
                      checkpoint_config=config(verify="size"), base_folder=str(tmp_path)) as r:
        with pytest.raises(CorruptCheckpointError, match="no extras entry"):
            r.load()
    assert_state_equal(before, other.state_dict())


def test_a_fifo_in_a_step_is_refused_in_every_verify_mode_not_waited_on(tmp_path):
    """torch-checkpointing opens files with a plain open(): with verify = "off" nothing else
    looks at the files first, and a FIFO would block the load forever (found by the mutation
    fuzz). The plugin refuses anything but regular files before the library opens one."""
    import threading

    from checkpointing import UnsafeCheckpointError

    model, opts, scheds = trained(seed=0)
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, checkpoint_config=config(),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
    target = os.path.join(tmp_path, "checkpoint", "step-1", library.LAYOUT_FILE)
    os.remove(target)
    os.mkfifo(target)
    for verify in ("off", "size", "checksum"):
        outcome: list[BaseException | None] = []

        def load(verify=verify, outcome=outcome):
            try:
                other, other_opts, other_scheds = trained(seed=1)
                with Checkpointer(model_parts=[other], optimizers=other_opts, lr_schedulers=other_scheds,
                                  checkpoint_config=config(verify=verify), base_folder=str(tmp_path)) as r:
                    r.load()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(timeout=60)
        if worker.is_alive():  # unblock the reader so the test process can end
            with open(target, "wb"):
                pass
            pytest.fail(f"verify={verify}: the load blocked on a FIFO")
        assert isinstance(outcome[0], UnsafeCheckpointError), (verify, outcome)


def test_ckpt_convert_to_and_from_the_plugin_is_bit_exact(tmp_path, capsys):
    from tests.checkpointing.test_cli import TINY_ARGS, dcp_folder

    model, folder = dcp_folder(tmp_path, "llama3", full=True)
    ours, back = str(tmp_path / "as-tc"), str(tmp_path / "back-to-dcp")
    args = ["--model", "llama3", "--flavor", "debugmodel", *TINY_ARGS, "--no-progress"]
    assert ckpt(["convert", folder, ours, "--to", NAME, *args]) == 0
    assert ckpt(["verify", ours]) == 0 and "ok (torch_checkpointing)" in capsys.readouterr().out
    assert ckpt(["convert", ours, back, "--to", "dcp", *args]) == 0
    restored = build_titan_model("llama3", seed=9)
    cfg = CheckpointConfig(enable=True, folder="unused", initial_load_path=back, initial_load_model_only=True)
    with Checkpointer(model_parts=[restored], checkpoint_config=cfg, base_folder=str(tmp_path / "run")) as c:
        assert c.load()
    assert_state_equal(model.state_dict(), restored.state_dict())


# ------------------------------------------------------------------ the main job on it
@pytest.mark.slow
def test_main_job_publishes_trains_and_resumes_bit_exact_on_the_plugin(tmp_path, capsys):
    """``rl-train`` with both [weight_sync] and [checkpoint] on the plugin. Then the same job as
    if killed after its step-2 checkpoint (step-4 removed) is started again: it resumes from
    step 2 and writes a step-4 byte-identical to the uninterrupted run's, so every piece of
    training state (optimizer moments and param groups, lr scheduler, prompt sampler, train state)
    came back exactly."""
    import shutil

    from rl.cli import main as rl_main
    from tests.rl.rl_cases import DEFAULT_TOML, FAST

    def run(dump) -> int:
        return rl_main(["--config", DEFAULT_TOML, f"--job.dump_folder={dump}", "--training.steps=4",
                        f"--weight_sync.backend={NAME}", f"--checkpoint.backend={NAME}", "--checkpoint.interval=2",
                        "--checkpoint.keep_latest_k=0", "--export.no-enable", *FAST])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight) == 0
    assert sorted(os.listdir(straight / "checkpoint")) == ["step-2", "step-4"]
    assert set(os.listdir(straight / "weight_sync" / "step-4")) == {"manifest.json", library.MODEL_FILE, library.LAYOUT_FILE}
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint" / "step-4")
    capsys.readouterr()
    assert run(resumed) == 0
    assert "(resumed from step 2)" in capsys.readouterr().out
    with open(resumed / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    for name in (library.MODEL_FILE, library.EXTRAS_FILE, library.LAYOUT_FILE):
        a = (straight / "checkpoint" / "step-4" / name).read_bytes()
        b = (resumed / "checkpoint" / "step-4" / name).read_bytes()
        assert a == b, f"{name} differs after resuming"
