"""Property-based: mutate real checkpoints of every backend and hold every load to the promise

    a typed error or a bit-exact load; the receiver untouched on error; no hang; bounded time
    and memory

(:mod:`tests.checkpointing.faults.judge` says exactly what each part means). The mutations
(:mod:`tests.checkpointing.faults.mutations`) edit bytes, JSON fields, pickle opcodes, file
kinds and names of a step a real backend wrote; one to three per example, shrunk by hypothesis
to the smallest edit that breaks the promise when one does.

Budget. In CI each backend runs a fixed, derandomized set of examples (seconds). A longer,
random search:

    CKPT_FUZZ_SECONDS=600 pytest tests/checkpointing/test_faults_mutation.py -p no:cacheprovider

spreads 600 s over the backends, in rounds of fresh random examples (``CKPT_FUZZ_EXAMPLES``
sets the examples per backend in CI mode instead). Each run prints how many examples it judged.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpointing import Checkpointer, CheckpointError
from tests.checkpointing.cases import make_config
from tests.checkpointing.faults import mutations
from tests.checkpointing.faults.bench import save_pristine
from tests.checkpointing.faults.judge import LOAD_LIMIT_S, LoadWorker, Verdict, problems
from tests.checkpointing.faults.matrix import CASES, capabilities
from tests.checkpointing.faults.versions import (
    BASE_SEED,
    STRANGER_SEED,
    base_weights,
    expected_tensor,
    set_version,
    snapshot,
)
from tests.helpers import build_titan_model

CI_EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "20"))
LONG_SECONDS = float(os.environ.get("CKPT_FUZZ_SECONDS", "0"))
ROUND_EXAMPLES = 40
HANG_TIMEOUT_S = 60.0
"""A child still loading after this long is hung (a load takes ~0.2 s; LOAD_LIMIT_S is the
bound on time, this only decides when to stop waiting)."""

FILE_CASES = [c for c in CASES if capabilities(c).persistent]
SHM_CASES = [c for c in CASES if not capabilities(c).persistent and capabilities(c).cross_process]
LOCAL_CASES = [c for c in CASES if not capabilities(c).cross_process]
FUZZED = len(FILE_CASES) + len(SHM_CASES) + len(LOCAL_CASES)

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


class Budget:
    """CI: a fixed derandomized set. Long run: random rounds until this backend's share of
    CKPT_FUZZ_SECONDS is spent. Counts the examples judged and prints the count."""

    def __init__(self, label: str):
        self.label = label
        self.examples = 0

    def run(self, check) -> None:
        begin = time.monotonic()
        if LONG_SECONDS <= 0:
            settings(max_examples=CI_EXAMPLES, derandomize=True, database=None, **SETTINGS)(check)()
        else:
            stop = begin + LONG_SECONDS / FUZZED
            rounds = settings(max_examples=ROUND_EXAMPLES, derandomize=False, **SETTINGS)(check)
            while time.monotonic() < stop:
                rounds()  # a fresh random seed each call
        print(f"\n[mutation fuzz] {self.label}: {self.examples} examples judged in {time.monotonic() - begin:.0f} s, "
              "none broke the promise")


@pytest.fixture(scope="module")
def worker():
    w = LoadWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def base():
    return base_weights()


def _same_bytes(a: str, b: str) -> bool:
    if not (os.path.isfile(a) and not os.path.islink(a) and os.path.isfile(b)):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# ------------------------------------------------------------------------------ file backends
@pytest.mark.parametrize("case", FILE_CASES)
def test_mutated_steps_give_a_typed_error_or_an_exact_load(case, worker, base, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"fuzz-{case}"))
    pristine = save_pristine(case, os.path.join(root, "pristine"), base)
    run_root = os.path.join(root, "run")
    folder = os.path.join(run_root, "checkpoint")
    outside = os.path.join(root, "outside")
    channel = f"f{uuid.uuid4().hex[:10]}"
    budget = Budget(case)

    @given(edits=mutations.file_backend_mutations(), verify=st.sampled_from(["checksum", "size", "off"]))
    def check(edits, verify):
        budget.examples += 1
        step_dir = mutations.restore(pristine, folder)
        applied = mutations.apply(step_dir, edits, outside)
        manifest_intact = _same_bytes(os.path.join(applied.step_dir, "manifest.json"), os.path.join(pristine, "manifest.json"))
        exact_owed = verify == "checksum" and manifest_intact
        _, found = worker.judge(HANG_TIMEOUT_S, exact_owed, case=case, base_folder=run_root, channel=channel, verify=verify)
        shutil.rmtree(outside, ignore_errors=True)
        assert not found, f"{case}, verify={verify}, edits={edits}: " + "; ".join(found)

    budget.run(check)


# ------------------------------------------------------------------------------ shm channels
@pytest.mark.parametrize("case", SHM_CASES)
def test_mutated_shm_channels_give_a_typed_error_or_an_exact_load(case, worker, base, tmp_path_factory):
    from checkpointing.backends.memory.segments import channel_files, channel_prefix, shm_dir

    root = str(tmp_path_factory.mktemp(f"fuzz-{case}"))
    outside = os.path.join(root, "outside")
    model = build_titan_model(seed=BASE_SEED)
    set_version(model, base, 1)
    budget = Budget(case)

    @given(edits=mutations.shm_mutations)
    def check(edits):
        budget.examples += 1
        channel = f"z{uuid.uuid4().hex[:12]}"
        cfg = make_config(case, channel)
        cfg.memory.verify_data = True
        publisher = Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=root)
        try:
            publisher.save(1)
            mutations.apply_segments(channel_files(channel), edits, outside)
            _, found = worker.judge(HANG_TIMEOUT_S, True, case=case, base_folder=root, channel=channel,
                                    verify="checksum", verify_data=True)
        finally:
            for name in os.listdir(shm_dir()):
                if name.startswith(channel_prefix(channel)):
                    mutations._remove(os.path.join(shm_dir(), name))
            publisher.close()
            shutil.rmtree(outside, ignore_errors=True)
        assert not found, f"{case}, edits={edits}: " + "; ".join(found)

    budget.run(check)


# ------------------------------------------------------------------------------ in-process channels
@pytest.mark.parametrize("case", LOCAL_CASES)
def test_mutated_local_snapshots_give_a_typed_error_or_an_exact_load(case, base):
    """A ``local`` snapshot lives in the publisher's memory: the edits are to its bytes and its
    recorded checksums, and the load is judged in this process (nothing it does can block)."""
    model = build_titan_model(seed=BASE_SEED)
    set_version(model, base, 1)
    receiver = build_titan_model(seed=STRANGER_SEED)
    stranger = snapshot(receiver)
    expected = {k: expected_tensor(base[k], 1) for k in stranger}
    budget = Budget(case)

    @given(
        flips=st.lists(st.tuples(mutations.positions, st.integers(1, 255)), max_size=3),
        checksum_edits=st.lists(st.tuples(mutations.positions, st.sampled_from(mutations.HUGE_INTS)), max_size=2),
    )
    def check(flips, checksum_edits):
        budget.examples += 1
        channel = f"l{uuid.uuid4().hex[:12]}"
        cfg = make_config(case, channel)
        cfg.memory.verify_data = True
        with torch.no_grad():
            for k, v in receiver.state_dict().items():
                v.copy_(stranger[k])
        with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder="") as publisher:
            publisher.save(1)
            slot = next(s for s in publisher.backend.transport._owned.slots if s.step == 1)
            for pos, mask in flips:
                i = pos % slot.data.numel()
                slot.data[i] ^= mask
            for pos, value in checksum_edits:
                slot.checksums[pos % len(slot.checksums)] = value
            read_cfg = make_config(case, channel, load_only=True)
            read_cfg.memory.verify_data = True
            with Checkpointer(model_parts=[receiver], checkpoint_config=read_cfg, base_folder="") as reader:
                verdict = _judge_here(reader, receiver, stranger, expected)
        assert not problems(verdict, exact_owed=True), f"{case}, flips={flips}, checksums={checksum_edits}: {problems(verdict, True)}"

    budget.run(check)


def _judge_here(reader, receiver, before, expected) -> Verdict:
    verdict = Verdict()
    out: dict = {}

    def load():
        try:
            out["loaded"] = reader.load()
        except BaseException as e:
            out["error"] = e

    begin = time.monotonic()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(LOAD_LIMIT_S * 2)
    assert not thread.is_alive(), "an in-process load hung"
    verdict.seconds = time.monotonic() - begin
    error = out.get("error")
    if error is not None:
        verdict.error_type = type(error).__name__
        verdict.error_typed = isinstance(error, CheckpointError)
        verdict.error_message = str(error)[:300]
    verdict.loaded = out.get("loaded")
    verdict.loaded_step = reader.loaded_step
    after = receiver.state_dict()
    verdict.untouched = all(torch.equal(v, before[k]) for k, v in after.items()) and reader.loaded_step == -1
    verdict.exact = all(torch.equal(v, expected[k]) for k, v in after.items())
    verdict.stale = sum(int(((v == before[k]) & (expected[k] != before[k])).sum()) for k, v in after.items())
    return verdict
