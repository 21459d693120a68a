"""``titan-train``: TorchTitan's own trainer with our Checkpointer, no torchrun, on CPU; bad
configs are one line and exit 2 before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from checkpointing.errors import ConfigError
from checkpointing.titan_train import check_config, single_process_env, split_config_file
from tests.torchtitan.runs import CONFIG, REPO, env

SMALL = ["--training.steps=2", "--training.seq_len=32", "--training.local_batch_size=2", "--checkpoint.interval=1"]


def titan_train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checkpointing.titan_train", *args],
        cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300,
    )


def test_readme_config_trains_on_cpu_and_checkpoints_through_the_toml_backend(tmp_path):
    proc = titan_train(tmp_path, "--job.config_file", str(CONFIG), f"--job.dump_folder={tmp_path / 'run'}", *SMALL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "CPU shims applied (checkpointing.torchtitan_cpu)" in out
    assert "Checkpointing active (titan-checkpointing, backend 'hf')" in out
    assert "Training completed" in out
    for step in (1, 2):
        step_dir = tmp_path / "run" / "checkpoint" / f"step-{step}"
        assert json.loads((step_dir / "manifest.json").read_text())["backend"] == "hf"
        assert (step_dir / "config.json").is_file() and (step_dir / "training_state").is_dir()


def test_unknown_backend_is_one_line_and_exit_2_before_training(tmp_path, monkeypatch, capsys):
    import checkpointing.titan_train as cli

    def must_not_start():
        raise AssertionError("TorchTitan was started despite a bad config")

    monkeypatch.setattr(cli, "_run_torchtitan", must_not_start)
    monkeypatch.setattr(sys, "argv", ["titan-train", "--job.config_file", str(CONFIG), "--checkpoint.backend=orbax"])
    assert cli.main() == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("titan-train: config error: checkpoint.backend = 'orbax' is not a registered backend; allowed: ")


@pytest.mark.parametrize("args, says", [
    (["--checkpoint.backend=memory"], "checkpoint.backend = 'memory' cannot checkpoint TorchTitan's trainer"),
    (["--checkpoint.interval=0"], "checkpoint.interval = 0"),
    ([], None),
])
def test_config_is_checked_before_torchtitan_starts(args, says):
    argv = ["--job.config_file", str(CONFIG), *args]
    if says is None:
        check_config(argv)
        return
    with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
        check_config(argv)


def test_a_toml_without_the_config_module_is_refused_with_the_line_to_add(tmp_path):
    toml = tmp_path / "bare.toml"
    toml.write_text("\n".join(ln for ln in CONFIG.read_text().splitlines() if "custom_config_module" not in ln and "backend" not in ln))
    with pytest.raises(ConfigError, match=r"custom_config_module = 'checkpointing\.config'"):
        check_config(["--job.config_file", str(toml)])


def test_config_file_flag_spellings():
    assert split_config_file(["--job.config_file", "a.toml", "--x=1"]) == ("a.toml", ["--x=1"])
    assert split_config_file(["--x", "--job.config-file=b.toml"]) == ("b.toml", ["--x"])
    assert split_config_file(["--x=1"]) == (None, ["--x=1"])


def test_single_process_env_fills_in_for_torchrun_and_leaves_torchrun_alone(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    single_process_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")
