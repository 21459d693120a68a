"""Single-copy handoff: a pure reader adopts the published snapshot under a lease.

* a reader holding an adopted version keeps bit-exact weights while the publisher publishes
  several more (the publisher writes the other slots, never the held one);
* a sink receives views of the snapshot (no copy) under the same lease;
* where adoption cannot apply (a dtype cast, ``load_mode = "copy"``, a training reader) the
  load copies, and ``stats.last_load_path`` says which path ran;
* a publisher never blocks forever on readers: with every slot held it fails after a bounded
  wait (SlotsLeasedError), and a reader that vanished gives its slot back (``local``: when it is
  collected; ``shm``: a SIGKILLed reader process, whose lock the kernel drops).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import multiprocessing as mp
import os
import signal

import pytest
import torch

from checkpointing import Checkpointer
from checkpointing.backends.memory import SlotsLeasedError
from tests.checkpointing.cases import make_config
from tests.helpers import build_titan_model

TRANSPORTS = ["memory-local", "memory-shm"]
SPAWN = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(case: str, channel: str, reader: bool = False, **mem):
    cfg = make_config(case, channel)
    cfg.memory.keep_versions = 1  # the tightest case: one kept version + the spare
    for key, value in mem.items():
        setattr(cfg.memory, key, value)
    return dataclasses.replace(cfg, load_only=True) if reader else cfg


def _version(model, base: dict, v: int) -> dict:
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(base[k] + v)
    return {k: t.clone() for k, t in model.state_dict().items()}


def _equal(model, expected: dict) -> bool:
    return all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def _digest(state: dict) -> str:
    """Processes exchange digests, not tensors (a shared tensor dies with its killed sender)."""
    h = hashlib.sha256()
    for k, t in sorted(state.items()):
        h.update(k.encode())
        h.update(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()


def _owns_storage(model) -> bool:
    """Does every parameter still live in memory the module allocated (not in a snapshot)?"""
    return all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("case", TRANSPORTS)
def test_adopted_version_stays_bit_exact_while_the_publisher_publishes_more(case, unique_channel):
    model = build_titan_model(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[model], checkpoint_config=_config(case, unique_channel)) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=_config(case, unique_channel, reader=True)
    ) as reader:
        v1 = _version(model, base, 1)
        writer.save(1)
        assert reader.load() and reader.loaded_step == 1
        assert reader.stats.last_load_path == "adopt"
        assert not _owns_storage(receiver)  # its weights are views of the snapshot: no copy was made
        assert receiver.output.weight is receiver.tok_embeddings.weight  # ties survive adoption
        for v in range(2, 7):  # one kept version + the spare: every publish must avoid the held slot
            _version(model, base, v)
            writer.save(v)
            assert _equal(receiver, v1), f"the adopted version changed while version {v} was published"
        assert writer.latest_step() == 6
        assert reader.load() and reader.loaded_step == 6
        assert reader.stats.last_load_path == "adopt"
        assert _equal(receiver, {k: base[k] + 6 for k in base})
    # close() gave the receiver its own copy before letting the snapshot go
    assert _owns_storage(receiver)
    assert _equal(receiver, {k: base[k] + 6 for k in base})


@pytest.mark.parametrize("case", TRANSPORTS)
def test_a_sink_receives_views_of_the_snapshot(case, unique_channel):
    from checkpointing import TensorSpec

    model = build_titan_model(seed=0)
    specs = {k: TensorSpec.of(v) for k, v in model.state_dict().items()}
    seen: dict[str, torch.Tensor] = {}

    class Sink:
        def specs(self):
            return specs

        def receive(self, step, tensors):
            for name, t in tensors:
                seen[name] = t

    with Checkpointer(model_parts=[model], checkpoint_config=_config(case, unique_channel)) as writer, Checkpointer(
        sink=Sink(), checkpoint_config=_config(case, unique_channel, reader=True)
    ) as reader:
        writer.save(1)
        assert reader.load() and reader.stats.last_load_path == "sink"
        storages = {t.untyped_storage().data_ptr() for t in seen.values()}
        assert len(storages) == 1  # every tensor views the one snapshot buffer: nothing was copied
        assert all(torch.equal(seen[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", TRANSPORTS)
@pytest.mark.parametrize("why", ["dtype", "load_mode", "trainer"])
def test_where_adoption_cannot_apply_the_load_copies_and_says_so(case, why, unique_channel):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    reader_cfg = _config(case, unique_channel, reader=why != "trainer")
    if why == "dtype":
        receiver.to(torch.bfloat16)
    elif why == "load_mode":
        reader_cfg = dataclasses.replace(reader_cfg, load_mode="copy")
    with Checkpointer(model_parts=[model], checkpoint_config=_config(case, unique_channel)) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=reader_cfg
    ) as reader:
        writer.save(1)
        assert reader.load()
        assert reader.stats.last_load_path == "copy"
        assert _owns_storage(receiver)
        for k, t in receiver.state_dict().items():
            assert torch.equal(t, model.state_dict()[k].to(t.dtype)), k


def test_a_publish_snapshot_in_the_readers_dtype_is_adopted(unique_channel):
    """fp32 trainer, bf16 generator: publishing in bf16 (``dtype``) makes adoption possible."""
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1).to(torch.bfloat16)
    cfg = _config("memory-local", unique_channel, dtype="bfloat16")
    with Checkpointer(model_parts=[model], checkpoint_config=cfg) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=dataclasses.replace(cfg, load_only=True)
    ) as reader:
        writer.save(1)
        assert reader.load() and reader.stats.last_load_path == "adopt"
        assert _equal(receiver, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


@pytest.mark.parametrize("case", TRANSPORTS)
def test_a_copy_after_an_adoption_never_writes_into_the_snapshot(case, unique_channel):
    """Switching a reader to copies (e.g. its module became unadoptable) first gives it its
    own storage: a copy into an ``shm`` view would fault, into a ``local`` one corrupt the slot."""
    model = build_titan_model(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[model], checkpoint_config=_config(case, unique_channel)) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=_config(case, unique_channel, reader=True)
    ) as reader:
        _version(model, base, 1)
        writer.save(1)
        assert reader.load() and reader.stats.last_load_path == "adopt"
        reader.config = dataclasses.replace(reader.config, load_mode="copy")
        v2 = _version(model, base, 2)
        writer.save(2)
        assert reader.load() and reader.stats.last_load_path == "copy"
        assert _owns_storage(receiver) and _equal(receiver, v2)


def test_local_publisher_waits_bounded_then_fails_typed_and_a_collected_reader_frees_its_slot(unique_channel):
    model = build_titan_model(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    writer = Checkpointer(model_parts=[model], checkpoint_config=_config("memory-local", unique_channel))
    writer.backend.transport.write_timeout = 0.3
    readers = []
    for v in (1, 2):  # two readers hold the channel's two slots
        _version(model, base, v)
        writer.save(v)
        r = Checkpointer(model_parts=[build_titan_model(seed=1)], checkpoint_config=_config("memory-local", unique_channel, reader=True))
        assert r.load() and r.loaded_step == v and r.stats.last_load_path == "adopt"
        readers.append(r)
    _version(model, base, 3)
    with pytest.raises(SlotsLeasedError, match="held all 2 slots"):
        writer.save(3)
    # The first reader vanishes without close(): collecting it releases its lease.
    first_module = readers[0].model.parts[0]
    del readers[0]
    gc.collect()
    v3 = _version(model, base, 3)
    writer.save(3)
    assert writer.latest_step() == 3
    check = Checkpointer(model_parts=[build_titan_model(seed=2)], checkpoint_config=_config("memory-local", unique_channel, reader=True))
    assert check.load() and _equal(check.model.parts[0], v3)
    assert _equal(first_module, {k: base[k] + 1 for k in base})  # it got its own copy when it was collected
    check.close()
    readers[0].close()
    writer.close()


# ------------------------------------------------------------------ shm: a reader process
class SmallNet(torch.nn.Module):
    """A plain module with tied weights: the reader process needs no TorchTitan import."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(64, 32)
        self.hidden = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 64, bias=False)
        self.out.weight = self.embed.weight


def hold_a_version(channel: str, adopted, report, done) -> None:
    """A generator process: adopt the newest version, report it, hold it until told (or killed)."""
    torch.set_num_threads(1)
    receiver = SmallNet(seed=1)
    reader = Checkpointer(model_parts=[receiver], checkpoint_config=_config("memory-shm", channel, reader=True))
    assert reader.load() and reader.stats.last_load_path == "adopt"
    report.put((reader.loaded_step, _digest(receiver.state_dict())))
    adopted.set()
    done.wait(120)
    reader.close()


def test_shm_a_killed_reader_never_blocks_the_publisher(unique_channel):
    model = SmallNet(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    writer = Checkpointer(model_parts=[model], checkpoint_config=_config("memory-shm", unique_channel))
    writer.backend.transport.write_timeout = 1.0
    report, adopted, done = SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
    _version(model, base, 1)
    writer.save(1)
    proc = SPAWN.Process(target=hold_a_version, args=(unique_channel, adopted, report, done))
    proc.start()
    try:
        assert adopted.wait(180), "the reader process did not adopt"
        assert report.get(timeout=30) == (1, _digest({k: base[k] + 1 for k in base}))
        v2 = _version(model, base, 2)
        writer.save(2)  # into the spare: the reader process holds version 1's slot
        receiver = SmallNet(seed=2)
        with Checkpointer(model_parts=[receiver], checkpoint_config=_config("memory-shm", unique_channel, reader=True)) as reader:
            assert reader.load() and reader.loaded_step == 2 and reader.stats.last_load_path == "adopt"
            _version(model, base, 3)
            with pytest.raises(SlotsLeasedError, match="held all 2 slots"):
                writer.save(3)  # both slots held by live readers: a bounded wait, then a typed error
            os.kill(proc.pid, signal.SIGKILL)  # the process dies holding version 1
            proc.join(30)
            for v in (3, 4, 5):  # the dead reader's slot is written again, the live reader's never
                _version(model, base, v)
                writer.save(v)
                assert _equal(receiver, v2)
            assert writer.latest_step() == 5
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        writer.close()


def test_shm_views_survive_the_reader_dropping_its_mappings(unique_channel):
    """A publisher change makes a reader close its mappings; a lease keeps its own alive (an
    unmapped view would fault on the next forward pass)."""
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[model], checkpoint_config=_config("memory-shm", unique_channel)) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=_config("memory-shm", unique_channel, reader=True)
    ) as reader:
        writer.save(1)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        assert reader.load() and reader.stats.last_load_path == "adopt"
        reader.backend.transport._detach()  # what the reader does when a new publisher takes over
        gc.collect()
        assert _equal(receiver, expected)
        assert torch.isfinite(receiver(torch.zeros(1, 4, dtype=torch.long))).all()


@pytest.mark.parametrize("case", TRANSPORTS)
def test_after_an_adoption_a_publisher_with_other_shapes_is_still_refused(case, unique_channel):
    """An adopting reader checks the published layout against its specs once per layout, not
    once per load; a new publisher on the channel with other shapes is still refused by name,
    and the weights the reader holds stay as they were."""
    from checkpointing import StateMismatchError

    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[receiver], checkpoint_config=_config(case, unique_channel, reader=True)) as reader:
        first = build_titan_model(seed=0)
        with Checkpointer(model_parts=[first], checkpoint_config=_config(case, unique_channel)) as writer:
            writer.save(1)
            assert reader.load() and reader.stats.last_load_path == "adopt"
            held = {k: v.clone() for k, v in receiver.state_dict().items()}
            writer.save(2)
            assert reader.load() and reader.loaded_step == 2  # the same layout: the check is skipped
        wider = build_titan_model(seed=0, dim=first.model_args.dim * 2)
        with Checkpointer(model_parts=[wider], checkpoint_config=_config(case, unique_channel)) as writer:
            writer.save(3)
            with pytest.raises(StateMismatchError, match="shape") as err:
                reader.load()
            assert "tok_embeddings.weight" in err.value.keys
        assert _equal(receiver, held)


def test_owning_adopted_weights_keeps_one_copy_per_tied_weight(unique_channel):
    """When the lease goes, the receiver copies its weights out once per weight: tied keys share
    the one copy, and the state the Checkpointer saves or loads into *is* the module's weights."""
    from checkpointing.state import ModelState

    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[model], checkpoint_config=_config("memory-local", unique_channel)) as writer, Checkpointer(
        model_parts=[receiver], checkpoint_config=_config("memory-local", unique_channel, reader=True)
    ) as reader:
        writer.save(1)
        assert reader.load() and reader.stats.last_load_path == "adopt"
        state: ModelState = reader.model
    assert _owns_storage(receiver)
    assert receiver.output.weight is receiver.tok_embeddings.weight
    module_weights = dict(receiver.named_parameters(remove_duplicate=False))
    for key, held in state.state_dict().items():
        if key in module_weights:
            assert held.data_ptr() == module_weights[key].data_ptr(), f"{key} is not the module's weight after the copy-out"
    assert _equal(receiver, model.state_dict())
