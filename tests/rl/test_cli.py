"""``rl-train`` config handling: TorchTitan-style overrides reach the right tables; a bad config
is one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rl.cli import load_config, main
from tests.rl.rl_cases import DEFAULT_TOML, REPO

BAD = [
    (["--rl.engine=jax"], "rl.engine = 'jax' is not a known engine; allowed: torch, vllm"),
    (["--weight_sync.backend=nccl"], "weight_sync.backend = 'nccl' is not a registered backend; allowed: dcp"),
    (["--checkpoint.backend=nope"], "checkpoint.backend = 'nope' is not a registered backend"),
    (["--rl.task=chess"], "rl.task = 'chess' is not a known task; allowed: copy, pattern, reverse, sort"),
    (["--model.flavor=huge"], "model.flavor = 'huge' is not a flavor of model 'qwen3'; allowed:"),
    (["--model.name=gpt9"], "model.name = 'gpt9'"),
    (["--rl.process_mode=both"], "rl.process_mode = 'both'; allowed: colocated, separate"),
    (["--rl.group_size=1"], "rl.group_size = 1; GRPO needs >= 2"),
    (["--rl.tsk=reverse"], "unknown override --rl.tsk (did you mean 'task'?)"),
    (["--weight_sync.folder=checkpoint"], "weight_sync.folder = 'checkpoint' is also checkpoint.folder"),
    (["--rl.max_new_tokens=3"], "rl.max_new_tokens = 3; task 'copy' answers need 4 tokens"),
    (["--weight_sync.no-enable"], "weight_sync.enable = false"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_exits_2_with_a_clear_message(overrides, message, tmp_path, capsys):
    code = main(["--config", DEFAULT_TOML, f"--job.dump_folder={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_bad_toml_file_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[rl]\nengine = "torch"\nunknown_key = 1\n')
    assert main(["--config", str(bad)]) == 2
    assert "unknown config key 'rl.unknown_key'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_memory_backend_cannot_hold_training_checkpoints(tmp_path, capsys):
    """A config the registry accepts but the Checkpointer refuses: still exit 2, named table."""
    code = main(["--config", DEFAULT_TOML, f"--job.dump_folder={tmp_path}", "--checkpoint.backend=memory", "--rl.no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint.backend = 'memory' holds model tensors only" in err, err
    assert "Traceback" not in err


def test_the_real_console_script_exits_2_without_a_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "rl-train")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "rl.cli"]
    proc = subprocess.run(
        [*cmd, "--config", DEFAULT_TOML, f"--job.dump_folder={tmp_path}", "--rl.engine=jax"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2
    assert "rl.engine = 'jax' is not a known engine; allowed: torch, vllm" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_overrides_reach_every_table(tmp_path):
    cfg = load_config(
        DEFAULT_TOML,
        [
            f"--job.dump_folder={tmp_path}",
            "--weight_sync.backend=hf",
            "--training.steps=20",
            "--checkpoint.interval=7",
            "--weight_sync.memory.transport=shm",
            "--rl.generator_dtype=bfloat16",
            "--export.export_dtype=float32",
        ],
    )
    assert cfg.weight_sync.backend == "hf" and cfg.weight_sync.memory.transport == "shm"
    assert cfg.training.steps == 20 and cfg.checkpoint.interval == 7
    assert cfg.rl.generator_dtype == "bfloat16" and cfg.export.export_dtype == "float32"
    # Everything else comes from the TOML.
    assert cfg.model.flavor == "rl_tiny" and cfg.checkpoint.backend == "dcp" and cfg.rl.task == "copy"


def test_weight_sync_defaults_apply_when_the_table_is_partial(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text(
        '[job]\ncustom_config_module = "rl.config"\n[model]\nname = "qwen3"\nflavor = "rl_tiny"\n'
        '[weight_sync]\nbackend = "dcp"\n'
    )
    cfg = load_config(str(toml), [])
    ws = cfg.weight_sync
    assert (ws.enable, ws.interval, ws.folder, ws.keep_latest_k) == (True, 1, "weight_sync", 2)
    assert cfg.export.backend == "hf" and cfg.export.last_save_model_only
