"""The trainer -> generator handoff, once per weight_sync backend, changing only the TOML.

After every step the generator pulls the published version through its own Checkpointer; its
weights must equal the trainer's bit for bit (in the generator's dtype), and its per-token
logprobs for a fixed sequence must equal the trainer model's."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rl.loop import run
from rl.model import DTYPES, cast_parameters
from rl.policy import token_logprobs
from rl.remote import ConfigSource
from tests.rl.rl_cases import DEFAULT_TOML, WEIGHT_SYNC_CASES, job_overrides, load, weight_sync_overrides

FIXED = "1234>4321"


def fixed_sequence(tokenizer) -> tuple[torch.Tensor, int]:
    ids = tokenizer.encode(FIXED, add_bos=True, add_eos=True)
    return torch.tensor([ids, ids[:1] + ids[1:5][::-1] + ids[5:]]), 6  # <bos> + 4 digits + '>'


def reference_model(trainer, dtype: torch.dtype):
    """The trainer's policy in the generator's dtype: what the generator must hold."""
    if dtype == torch.float32:
        return trainer.model
    ref = copy.deepcopy(trainer.model)
    cast_parameters(ref, dtype)
    return ref


class HandoffChecker:
    def __init__(self, cfg, load_path: str | None = None):
        from rl.tokenizer import load_tokenizer

        self.load_path = load_path
        """How the generator's Checkpointer must have received each version (stats)."""
        self.dtype = DTYPES[cfg.rl.generator_dtype]
        self.temperature = cfg.rl.temperature
        self.sequence, self.prompt_length = fixed_sequence(load_tokenizer())
        self.checked_versions: list[int] = []

    def __call__(self, record, trainer, generator):
        # The loop pulls lazily before the next rollout; pull now to check this step's version.
        generator.sync(trainer.published_version)
        assert generator.version == trainer.published_version == record["step"]
        assert generator.checkpointer.loaded_step == record["step"]
        if self.load_path is not None:
            assert generator.checkpointer.stats.last_load_path == self.load_path
        ref = reference_model(trainer, self.dtype)
        theirs = dict(ref.state_dict())
        mine = dict(generator.engine.model.state_dict())
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key].dtype == self.dtype, key
            assert torch.equal(mine[key], value.detach()), f"{key} differs after sync of step {record['step']}"
        with torch.no_grad():
            expected = token_logprobs(ref, self.sequence, self.prompt_length, self.temperature, trainer.banned).float()
        got = generator.engine.score(self.sequence, self.prompt_length, self.temperature)
        assert torch.equal(got, expected), (got - expected).abs().max()
        self.checked_versions.append(generator.version)


@pytest.mark.parametrize("case", WEIGHT_SYNC_CASES)
def test_generator_matches_trainer_after_every_sync(case, tmp_path):
    cfg = load(tmp_path, *weight_sync_overrides(case), steps=3)
    # The default memory handoff is single-copy: the generator adopts the published snapshot.
    checker = HandoffChecker(cfg, "adopt" if case.startswith("memory") else "copy")
    summary = run(cfg, on_step=checker)
    assert checker.checked_versions == [1, 2, 3]
    records = [json.loads(line) for line in open(summary.metrics_path)]
    # The loop's own live check: the trainer scores the rollout exactly as the generator did.
    assert [r["policy_version"] for r in records] == [0, 1, 2]
    assert all(r["logprob_gap"] == 0.0 for r in records), [r["logprob_gap"] for r in records]


@pytest.mark.parametrize("case", ["memory-local", "dcp"])
def test_bfloat16_generator_is_bit_exact_in_its_dtype(case, tmp_path):
    extra = ["--rl.generator_dtype=bfloat16"]
    if case.startswith("memory"):
        extra.append("--weight_sync.memory.dtype=bfloat16")  # publish already cast: half the bytes
    cfg = load(tmp_path, *weight_sync_overrides(case), *extra, steps=2)
    checker = HandoffChecker(cfg, "adopt" if case.startswith("memory") else "copy")
    run(cfg, on_step=checker)
    assert checker.checked_versions == [1, 2]


def test_a_generator_never_samples_with_an_unpublished_version(tmp_path):
    """Stale detection: asking for a version nobody published is an error after the timeout,
    not a rollout with the weights the generator happens to hold."""
    from rl.generator import Generator, StalePolicyError
    from rl.tasks import get_task
    from rl.tokenizer import load_tokenizer
    from rl.trainer import PolicyTrainer

    cfg = load(tmp_path, "--weight_sync.backend=dcp", "--rl.sync_timeout_s=0.2")
    tok = load_tokenizer()
    trainer = PolicyTrainer(cfg, torch.device("cpu"), get_task("reverse", 4), tok)
    generator = Generator(cfg, torch.device("cpu"), tok)
    try:
        trainer.publish(0, force=True)
        assert generator.sync(0) > 0 and generator.version == 0
        with pytest.raises(StalePolicyError, match="published policy version 1"):
            generator.sync(1)
        assert generator.version == 0
        trainer.publish(1)
        trainer.publish(2)  # the generator is now two versions behind and sees the newest
        with pytest.raises(StalePolicyError, match="loaded policy version 2, expected 1"):
            generator.sync(1)
        assert generator.sync(2) > 0 and generator.version == 2
    finally:
        generator.close()
        trainer.close()


def test_separate_generator_process_pulls_through_the_same_config(tmp_path):
    """process_mode = separate: a spawned generator process; weights only through [weight_sync]."""
    case = "memory-shm"
    try:
        ws = weight_sync_overrides(case)
    except pytest.skip.Exception:
        ws = weight_sync_overrides("dcp")
    overrides = job_overrides(tmp_path, *ws, "--rl.process_mode=separate", "--rl.threads=1", steps=3)
    from rl.cli import load_config

    cfg = load_config(DEFAULT_TOML, overrides)
    summary = run(cfg, ConfigSource(DEFAULT_TOML, tuple(overrides)))
    records = [json.loads(line) for line in open(summary.metrics_path)]
    assert [r["policy_version"] for r in records] == [0, 1, 2]
    # The generator process sampled with exactly the trainer's weights of that version.
    assert all(r["logprob_gap"] == 0.0 for r in records), [r["logprob_gap"] for r in records]
    assert all(r["sync_seconds"] > 0 for r in records)


def test_separate_mode_refuses_a_same_process_transport(tmp_path):
    from checkpointing import ConfigError

    ws = weight_sync_overrides("memory-local")
    cfg = load(tmp_path, *ws, "--rl.process_mode=separate")
    with pytest.raises(ConfigError, match="cannot reach another process"):
        run(cfg, ConfigSource(DEFAULT_TOML, ()))
