"""``ckpt inspect | verify | convert``: in-process through ``main(argv)`` for most cases, and as a
real subprocess (the installed console script's module) where exit codes and the absence of
tracebacks are the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer
from checkpointing.cli import main
from tests.checkpointing.test_hf_backend import hf_config, save_model_step
from tests.helpers import assert_state_equal, build_titan_model, build_training_parts, train_steps

TINY_ARGS = ["--model-arg", "dim=64", "--model-arg", "n_layers=2", "--model-arg", "n_heads=4",
             "--model-arg", "n_kv_heads=2", "--model-arg", "vocab_size=256"]
QWEN3_TINY = TINY_ARGS + ["--model-arg", "head_dim=16", "--model-arg", "hidden_dim=192"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def start_subprocess(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "checkpointing.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_subprocess(*argv) -> subprocess.CompletedProcess:
    return finish(start_subprocess(*argv))


def dcp_folder(tmp_path, name: str = "llama3", full: bool = True):
    """A ``dcp`` checkpoint folder with step 2 (model + training state); returns (model, folder)."""
    model = build_titan_model(name, seed=0)
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="checkpoint", interval=1)
    parts = {}
    if full:
        opts, scheds = build_training_parts(model)
        train_steps(model, opts, scheds, n=1)
        parts = dict(optimizers=opts, lr_schedulers=scheds)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path), **parts) as c:
        c.save(2)
    return model, str(tmp_path / "checkpoint")


def full_hf_folder(tmp_path):
    """An ``hf`` folder whose step 1 carries a training_state sidecar."""
    from tests.checkpointing.test_hf_backend import adapter_for

    model = build_titan_model("qwen3")
    opts, scheds = build_training_parts(model)
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, checkpoint_config=hf_config(),
                      sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path)) as c:
        c.save(1)
    return str(tmp_path / "checkpoint")


def flip_byte(path: str, from_end: int = 50) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - from_end)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


# ---------------------------------------------------------------------------------- inspect
def test_inspect_hf_folder_lists_steps_tensors_and_sidecar(tmp_path, capsys):
    folder = full_hf_folder(tmp_path)
    code, out, _ = run(capsys, "inspect", folder)
    assert code == 0
    assert "step-1: backend hf (manifest)" in out
    assert "model.embed_tokens.weight" in out and "float32" in out and "[256, 64]" in out
    assert "training_state/ (DCP sidecar)" in out and "optimizer" in out

    code, out, _ = run(capsys, "inspect", "--json", os.path.join(folder, "step-1"))
    report = json.loads(out)
    (step,) = report["steps"]
    assert step["backend"] == "hf" and step["foreign"] is False
    names = {t["name"]: t for t in step["tensors"]}
    assert names["model.norm.weight"]["shape"] == [64] and names["model.norm.weight"]["dtype"] == "float32"
    assert step["tensor_bytes"] >= sum(t["bytes"] for t in step["tensors"]) > 0
    assert step["disk_bytes"] > step["tensor_bytes"] * 0.5


def test_inspect_detects_dcp_and_foreign_steps(tmp_path, capsys):
    _, folder = dcp_folder(tmp_path, full=False)
    step_dir = os.path.join(folder, "step-2")
    code, out, _ = run(capsys, "inspect", "--json", step_dir)
    assert code == 0 and json.loads(out)["steps"][0]["backend"] == "dcp"
    os.remove(os.path.join(step_dir, "manifest.json"))  # now it looks like TorchTitan wrote it
    code, out, _ = run(capsys, "inspect", folder)
    assert code == 0 and "backend dcp (foreign" in out and "layers.0.attention.wq.weight" in out

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "pretrained"))
    code, out, _ = run(capsys, "inspect", "--json", str(tmp_path / "pretrained"))
    step = json.loads(out)["steps"][0]
    assert code == 0 and step["backend"] == "hf" and step["foreign"] is True
    assert any(t["name"] == "model.layers.0.mlp.up_proj.weight" for t in step["tensors"])


# ---------------------------------------------------------------------------------- verify
def test_verify_ok_then_each_kind_of_damage(tmp_path, capsys):
    _, step_dir = save_model_step(tmp_path, "qwen3")
    folder = os.path.dirname(step_dir)
    shard = os.path.join(step_dir, "model-00001-of-00001.safetensors")
    code, out, _ = run(capsys, "verify", folder)
    assert code == 0 and "step-1: ok (hf)" in out

    original = open(shard, "rb").read()
    flip_byte(shard)
    code, out, err = run(capsys, "verify", folder)
    assert code == 1 and "CORRUPT" in out and "checksum" in out and shard in out
    assert run(capsys, "verify", "--mode", "size", folder)[0] == 0  # a flipped byte keeps the size

    open(shard, "wb").write(original[:-10])
    code, out, _ = run(capsys, "verify", step_dir)
    assert code == 1 and "truncated" in out and shard in out

    os.remove(shard)
    code, out, _ = run(capsys, "verify", step_dir)
    assert code == 1 and "missing" in out and shard in out


def test_verify_checks_structure_of_foreign_steps(tmp_path, capsys):
    _, step_dir = save_model_step(tmp_path, "qwen3")
    os.remove(os.path.join(step_dir, "manifest.json"))
    code, out, _ = run(capsys, "verify", step_dir)
    assert code == 0 and "structure only" in out
    shard = os.path.join(step_dir, "model-00001-of-00001.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 4)  # no manifest, but the header knows the size
    code, out, _ = run(capsys, "verify", step_dir)
    assert code == 1 and "truncated" in out

    _, folder = dcp_folder(tmp_path / "dcp", full=False)
    dcp_step = os.path.join(folder, "step-2")
    os.remove(os.path.join(dcp_step, "manifest.json"))
    assert run(capsys, "verify", dcp_step)[0] == 0
    os.remove(os.path.join(dcp_step, "__0_0.distcp"))
    code, out, _ = run(capsys, "verify", dcp_step)
    assert code == 1 and "__0_0.distcp" in out


def test_verify_damaged_sidecar(tmp_path, capsys):
    folder = full_hf_folder(tmp_path)
    sidecar_data = os.path.join(folder, "step-1", "training_state", "__0_0.distcp")
    flip_byte(sidecar_data, from_end=10)
    code, out, _ = run(capsys, "verify", folder)
    assert code == 1 and "training_state/__0_0.distcp" in out


# ---------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["frobnicate", "x"], "invalid choice"),
        (["inspect"], "required"),
        (["verify", "/no/such/ckpt"], "no such file or directory"),
        (["convert", "a", "b", "--to", "safetensors", "--model", "qwen3", "--flavor", "debugmodel"], "unknown checkpoint backend 'safetensors'"),
        (["convert", "a", "b", "--to", "hf", "--model", "qwen3", "--flavor", "x", "--max-shard-size-mb", "0"], "positive"),
    ],
)
def test_usage_errors_exit_2_with_a_message(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_convert_refuses_bad_model_flavor_arg_and_destination(tmp_path, capsys):
    _, folder = dcp_folder(tmp_path, full=False)
    dst = str(tmp_path / "out")
    cases = [
        (["--model", "gpt17", "--flavor", "debugmodel"], "allowed: "),
        (["--model", "llama3", "--flavor", "huge"], "allowed: debugmodel"),
        (["--model", "llama3", "--flavor", "debugmodel", "--model-arg", "depth=3"], "KEY one of"),
        (["--model", "llama3", "--flavor", "debugmodel"], "does not fit"),  # debugmodel is bigger than TINY
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "convert", folder, dst, "--to", "hf", *extra, "--no-progress")
        assert code == 2 and message in err, (extra, err)
        assert not os.path.exists(dst)
    code, _, err = run(capsys, "convert", folder, dst, "--to", "dcp", "--model", "llama3", "--flavor", "debugmodel", "--no-progress")
    assert code == 2 and "already a dcp checkpoint" in err
    os.makedirs(dst)
    code, _, err = run(capsys, "convert", folder, dst, "--to", "hf", "--model", "llama3", "--flavor", "debugmodel", *TINY_ARGS, "--no-progress")
    assert code == 2 and "already exists" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".inflight")], "staging leftovers"


# ---------------------------------------------------------------------------------- convert
def test_convert_dcp_to_hf_to_dcp_is_bit_exact(tmp_path, capsys):
    model, folder = dcp_folder(tmp_path, "llama3", full=True)
    hf_dir, dcp_dir = str(tmp_path / "as-hf"), str(tmp_path / "back-to-dcp")
    code, out, _ = run(capsys, "convert", folder, hf_dir, "--to", "hf", "--model", "llama3", "--flavor", "debugmodel", *TINY_ARGS, "--no-progress")
    assert code == 0 and "not converted (not model weights)" in out  # the optimizer stays behind
    assert run(capsys, "verify", hf_dir)[0] == 0
    code, _, _ = run(capsys, "convert", hf_dir, dcp_dir, "--to", "dcp", "--model", "llama3", "--flavor", "debugmodel", *TINY_ARGS, "--no-progress")
    assert code == 0 and run(capsys, "verify", dcp_dir)[0] == 0

    back = build_titan_model("llama3", seed=9)
    cfg = CheckpointConfig(enable=True, backend="dcp", folder="unused", initial_load_path=dcp_dir, initial_load_model_only=True)
    with Checkpointer(model_parts=[back], checkpoint_config=cfg, base_folder=str(tmp_path / "run")) as c:
        assert c.load() is True
    assert_state_equal(model.state_dict(), back.state_dict())

    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf_model(tokens).logits, model(tokens), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- as a real process
def test_subprocess_exit_codes_and_no_tracebacks(tmp_path):
    _, step_dir = save_model_step(tmp_path, "qwen3")
    flip_byte(os.path.join(step_dir, "model-00001-of-00001.safetensors"))
    started = [  # concurrently: each pays the torch import
        start_subprocess("verify", step_dir),
        start_subprocess("convert", step_dir, str(tmp_path / "x"), "--to", "dcp", "--model", "nosuchmodel", "--flavor", "f"),
    ]
    corrupt, usage = (finish(p) for p in started)
    assert corrupt.returncode == 1 and "CORRUPT" in corrupt.stdout, corrupt.stderr
    assert usage.returncode == 2 and "nosuchmodel" in usage.stderr and "allowed:" in usage.stderr
    for proc in (corrupt, usage):
        assert "Traceback" not in proc.stderr, proc.stderr


def test_subprocess_convert_writes_a_verifiable_hf_directory(tmp_path):
    model, folder = dcp_folder(tmp_path, "qwen3", full=False)
    dst = str(tmp_path / "qwen3-hf")
    proc = run_subprocess("convert", folder, dst, "--to", "hf", "--model", "qwen3", "--flavor", "debugmodel", *QWEN3_TINY,
                          "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert "writing hf" in proc.stderr  # the tqdm bar
    config = json.loads(open(os.path.join(dst, "config.json")).read())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    from checkpointing.backends.hf.directory import HFDirectory

    directory = HFDirectory.open(dst)
    embed = directory.tensors["model.embed_tokens.weight"][1]
    assert embed.dtype == torch.bfloat16 and embed.shape == (256, 64)
    assert main(["verify", dst]) == 0


def test_convert_refuses_a_damaged_source(tmp_path, capsys):
    _, folder = dcp_folder(tmp_path, full=False)
    flip_byte(os.path.join(folder, "step-2", "__0_0.distcp"))
    dst = str(tmp_path / "out")
    code, _, err = run(capsys, "convert", folder, dst, "--to", "hf", "--model", "llama3", "--flavor", "debugmodel", *TINY_ARGS, "--no-progress")
    assert code == 1 and "checksum" in err and "__0_0.distcp" in err
    assert not os.path.exists(dst)
