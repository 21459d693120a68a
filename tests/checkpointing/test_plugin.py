"""A third-party backend plugs in through the ``titan_checkpointing.backends`` entry point group
and is chosen from the TOML, with no edit to this package.

Discovery is real: the test writes a ``*.dist-info`` (``METADATA`` + ``entry_points.txt``, what
pip installs) for the toy package in ``plugin_pkg/`` and starts a fresh interpreter with both on
its path, so ``importlib.metadata`` finds the plugin exactly as it would an installed one, and
the registry of this test process is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from checkpointing import available_backends

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SRC = Path(__file__).resolve().parent / "plugin_pkg"

pytestmark = pytest.mark.slow


def _install_dist_info(site: Path) -> None:
    info = site / "titan_toy_backend-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: titan-toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[titan_checkpointing.backends]\n"
        "_toy = titan_toy_backend:SPEC\n"
        "_broken = titan_toy_backend_missing_module:SPEC\n"
    )


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from checkpointing import Checkpointer, ConfigError, available_backends, load_job_config
    from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps

    work = sys.argv[1]
    assert {"_toy", "_broken", "dcp"} <= set(available_backends()), available_backends()

    # Chosen from TOML, through our loader and through TorchTitan's own ConfigManager.
    cfg = load_job_config(os.path.join(work, "toy.toml")).checkpoint
    assert cfg.backend == "_toy", cfg.backend
    assert cfg._toy.file_name == "weights.pt", cfg._toy  # the plugin's own [checkpoint._toy] table
    from torchtitan.config import ConfigManager
    titan = ConfigManager().parse_args(["--job.config_file", os.path.join(work, "toy.toml")])
    assert titan.checkpoint.backend == "_toy" and titan.checkpoint._toy.file_name == "weights.pt"
    assert load_job_config(os.path.join(work, "toy.toml"), ["--checkpoint._toy.file_name=w.pt"]).checkpoint._toy.file_name == "w.pt"
    for bad, named in (("bad_key.toml", "checkpoint._toy.file_nam"), ("bad_value.toml", "checkpoint._toy.file_name = '../x.pt'")):
        try:
            load_job_config(os.path.join(work, bad))
        except ConfigError as e:
            assert named in str(e), e
        else:
            raise AssertionError(f"{bad} was accepted")

    model = build_titan_model(seed=0)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=2)
    ts = TrainState(step=2); ts.losses = [0.5, 0.25]
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
                      checkpoint_config=cfg, base_folder=work) as ckpt:
        ckpt.save(1); ckpt.save(2); ckpt.save(3)
        assert type(ckpt.backend).__module__ == "titan_toy_backend"
        assert ckpt.backend.steps() == [2, 3], ckpt.backend.steps()  # keep_latest_k = 2 from the TOML
    assert sorted(os.listdir(os.path.join(work, "toy-ckpt", "step-3"))) == ["manifest.json", "weights.pt"]

    # ckpt knows the plugin's steps through the registry: the manifest names the backend.
    import contextlib, io
    from checkpointing.cli import main as ckpt_cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ckpt_cli(["inspect", os.path.join(work, "toy-ckpt")]) == 0
        assert ckpt_cli(["verify", os.path.join(work, "toy-ckpt")]) == 0
        assert ckpt_cli(["backends"]) == 0
    text = out.getvalue()
    assert "step-3: backend _toy (manifest)" in text and "weights.pt" in text, text
    assert "step-3: ok (_toy): 1 files match the manifest" in text, text
    assert "[checkpoint._toy]" in text and "file_name = 'state.pt'" in text and "one file each step" in text, text

    other = build_titan_model(seed=5)
    o_opts, o_scheds = build_training_parts(other)
    o_ts = TrainState()
    with Checkpointer(model_parts=[other], optimizers=o_opts, lr_schedulers=o_scheds, states={"train_state": o_ts},
                      checkpoint_config=cfg, base_folder=work) as ckpt:
        assert ckpt.load() and ckpt.loaded_step == 3
    assert_state_equal(model.state_dict(), other.state_dict())
    assert_state_equal(opts.state_dict(), o_opts.state_dict())
    assert o_scheds.state_dict() == scheds.state_dict() and o_ts.state_dict() == ts.state_dict()

    # A broken plugin fails only when selected, with an error that names it.
    try:
        load_job_config(os.path.join(work, "broken.toml"))
    except ConfigError as e:
        assert "_broken" in str(e) and "titan_toy_backend_missing_module" in str(e), e
    else:
        raise AssertionError("a backend whose module is missing was accepted")
    with open(os.path.join(work, "toy-ckpt", "step-3", "weights.pt"), "r+b") as f:
        f.seek(100); byte = f.read(1); f.seek(100); f.write(bytes([byte[0] ^ 1]))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert ckpt_cli(["verify", os.path.join(work, "toy-ckpt", "step-3")]) == 1
    print("PLUGIN-OK")
    """
)


def test_entry_point_backend_is_selected_from_toml_and_round_trips(tmp_path):
    site = tmp_path / "site"
    _install_dist_info(site)
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.toml").write_text(textwrap.dedent("""
        [job]
        custom_config_module = "checkpointing.config"
        [checkpoint]
        enable = true
        backend = "_toy"
        folder = "toy-ckpt"
        interval = 1
        keep_latest_k = 2
        [checkpoint._toy]
        file_name = "weights.pt"
    """))
    (work / "bad_key.toml").write_text('[checkpoint]\nbackend = "_toy"\n[checkpoint._toy]\nfile_nam = "a.pt"\n')
    (work / "bad_value.toml").write_text('[checkpoint]\nbackend = "_toy"\n[checkpoint._toy]\nfile_name = "../x.pt"\n')
    (work / "broken.toml").write_text('[checkpoint]\nbackend = "_broken"\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(PLUGIN_SRC), str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "PLUGIN-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_plugin_is_invisible_without_its_distribution():
    """Control: nothing here registers it, so the discovery above is what made it appear."""
    assert "_toy" not in available_backends()
