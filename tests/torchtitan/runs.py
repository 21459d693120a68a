"""Helpers for driving TorchTitan's own trainer in tests: run plans, TOMLs, reading steps back.

Sizes: TorchTitan's llama3 ``debugmodel`` (6.2M parameters, as the README command trains),
4 steps of 2 x 32 tokens, a checkpoint every 2 steps: a run is a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "titan_llama3_debug.toml"
HARNESS = pathlib.Path(__file__).resolve().parent / "harness.py"
STEPS = 4

SMALL = [
    f"--training.steps={STEPS}",
    "--training.seq_len=32",
    "--training.local_batch_size=2",
    "--checkpoint.interval=2",
    "--checkpoint.keep_latest_k=0",
    "--debug.seed=0",
]
OUR_LINES = ("custom_config_module", "custom_import", "backend")


def env(tmp: pathlib.Path) -> dict[str, str]:
    src = str(REPO / "src")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_DATASETS_CACHE": str(tmp / "hf_datasets_cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
    }


def stock_toml(tmp: pathlib.Path) -> pathlib.Path:
    """The shipped TOML without our three lines: TorchTitan's stock CheckpointManager runs it."""
    lines = [ln for ln in CONFIG.read_text().splitlines() if not ln.strip().startswith(OUR_LINES)]
    path = tmp / "stock.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ours(folder: pathlib.Path, backend: str, *extra: str) -> list[str]:
    return ["--job.config_file", str(CONFIG), f"--job.dump_folder={folder}", *SMALL, f"--checkpoint.backend={backend}", *extra]


def stock(tmp: pathlib.Path, folder: pathlib.Path, *extra: str) -> list[str]:
    return ["--job.config_file", str(stock_toml(tmp)), f"--job.dump_folder={folder}", *SMALL, *extra]


def run_plan(tmp: pathlib.Path, name: str, runs: list[dict], timeout: float = 300) -> tuple[dict[str, dict], str]:
    """Run ``runs`` in one harness process; (results by run name, the process's output)."""
    plan = tmp / f"{name}.json"
    plan.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(plan)],
        cwd=REPO, env=env(tmp), capture_output=True, text=True, timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    results_path = tmp / f"{name}.results.json"
    if not results_path.exists():
        raise AssertionError(f"harness {name} wrote no results (exit {proc.returncode}):\n{output[-4000:]}")
    results = {r["name"]: r for r in json.loads(results_path.read_text())}
    missing = [r["name"] for r in runs if r["name"] not in results]
    assert not missing, f"harness {name} stopped before {missing} (exit {proc.returncode}):\n{output[-4000:]}"
    return results, output


def losses(result: dict) -> dict[int, float]:
    return {int(k): v for k, v in result["losses"].items()}


def assert_ran(result: dict, output: str = "") -> None:
    assert result["error"] is None, f"{result['name']} failed: {result.get('traceback', '')}\n{output[-3000:]}"


# ------------------------------------------------------------------ reading steps back
def debug_model():
    """TorchTitan's llama3 debugmodel with NaN weights, for a load to fill: a load that missed a
    tensor leaves NaN there, and the comparisons fail. (Built on the CPU, not meta + init_weights:
    the constructor computes the RoPE buffer, and the trunc-normal init would cost seconds.)"""
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec("llama3")
    args = spec.model_args["debugmodel"]
    model = spec.model_cls(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model, spec.state_dict_adapter(args, None)


class TrainState:
    """The trainer's ``train_state`` entry (``Trainer.state_dict()``), as a receiver."""

    def __init__(self):
        self.sd = {"step": -1, "ntokens_seen": -1}

    def state_dict(self):
        return dict(self.sd)

    def load_state_dict(self, sd):
        self.sd = dict(sd)


def load_step(folder: pathlib.Path, backend: str, step: int, full: bool = False) -> dict[str, object]:
    """A committed step read back with our Checkpointer: the model (TorchTitan names) and, with
    ``full``, the optimizer, lr scheduler and train state TorchTitan's trainer saved."""
    from checkpointing import Checkpointer
    from checkpointing.config import CheckpointConfig
    from tests.helpers import build_training_parts

    model, adapter = debug_model()
    parts: dict[str, object] = {}
    if full:
        opts, scheds = build_training_parts(model, steps=STEPS)
        parts = {"optimizers": opts, "lr_schedulers": scheds, "states": {"train_state": TrainState()}}
    cfg = CheckpointConfig(enable=True, backend=backend, folder="checkpoint", load_only=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter, base_folder=str(folder), **parts) as ckpt:
        assert ckpt.load(step) is True
    out: dict[str, object] = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if full:
        out.update(flatten("optimizer", parts["optimizers"].state_dict()))
        out.update(flatten("lr_scheduler", parts["lr_schedulers"].state_dict()))
        out.update(flatten("train_state", parts["states"]["train_state"].state_dict()))
    return out


def flatten(prefix: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}", sub).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, sub in enumerate(value) for k, v in flatten(f"{prefix}.{i}", sub).items()}
    return {prefix: value}


def assert_same_state(a: dict[str, object], b: dict[str, object], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:10]}"
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, f"{what}: {key}"
            assert torch.equal(x, y), f"{what}: {key} differs (max {((x.double() - y.double()).abs().max().item())})"
        else:
            assert x == y, f"{what}: {key}: {x!r} != {y!r}"


def newest_step(folder: pathlib.Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (folder / "checkpoint").glob("step-*")]
    return max(steps)
