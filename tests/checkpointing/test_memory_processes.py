"""``shm`` across real processes: a publisher in a child process, this process as the reader.

* every state a concurrent reader loads is exactly one published version (per-version SHA-256),
  and its final state is bit-exact with the last version;
* a publisher killed with SIGKILL in the middle of a publish: readers get a clear error (never
  its half-written version), a second publisher is refused while it lived, then takes over;
  cleanup leaves nothing in /dev/shm.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from checkpointing import Checkpointer, StepNotFoundError
from checkpointing.backends.memory import ChannelBusyError, PublisherGoneError
from checkpointing.backends.memory.segments import channel_files
from tests.checkpointing.cases import make_config
from tests.helpers import build_titan_model

# A bit bigger than the tiny model, so a copy takes long enough for publisher and reader to overlap.
MODEL = dict(name="qwen3", seed=0, dim=128, vocab_size=512)
SPAWN = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine every
    parallel region can wait a whole time slice for its second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def version_state(model: torch.nn.Module, base: dict, v: int) -> None:
    """Version ``v`` of the weights: every parameter is ``base + v`` (so any two versions differ
    in every tensor, and a mix of two is visible)."""
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(base[k] + v)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()


def _config(channel: str, **mem):
    cfg = make_config("memory-shm", channel)
    cfg.memory.keep_versions = 2
    for key, value in mem.items():
        setattr(cfg.memory, key, value)
    return cfg


# ------------------------------------------------------------------ child jobs (spawned)
def publish_versions(channel: str, versions: int, published, release) -> None:
    torch.set_num_threads(1)
    model = build_titan_model(**MODEL)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config(channel), base_folder="")
    for v in range(1, versions + 1):
        version_state(model, base, v)
        ckpt.save(v)
    published.set()
    release.wait(60)  # the channel lives as long as its publisher: let the reader finish
    ckpt.close()


def publish_then_die_mid_write(channel: str, published, go) -> None:
    torch.set_num_threads(1)
    model = build_titan_model(**MODEL)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=_config(channel), base_folder="")
    for v in (1, 2):
        version_state(model, base, v)
        ckpt.save(v)
    published.set()
    go.wait(60)
    version_state(model, base, 3)
    state = dict(model.state_dict())
    transport = ckpt.backend.transport
    from checkpointing.backends.memory.layout import Layout

    layout = Layout.for_state(state)
    with transport.writing(3, layout, False) as target:
        first = layout.entries[0]
        first.view(target.data).copy_(state[first.name])  # half a version in the slot...
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the publisher dies


# ------------------------------------------------------------------ tests
def test_concurrent_reader_only_ever_sees_whole_versions(tmp_path, unique_channel):
    versions = 150
    expected = {}
    reference = build_titan_model(**MODEL)
    base = {k: v.clone() for k, v in reference.state_dict().items()}
    for v in range(1, versions + 1):
        version_state(reference, base, v)
        expected[v] = digest(reference)
    published, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=publish_versions, args=(unique_channel, versions, published, release))
    child.start()
    receiver = build_titan_model(**{**MODEL, "seed": 1})
    reader = Checkpointer(model_parts=[receiver], checkpoint_config=_config(unique_channel), base_folder=str(tmp_path))
    loads, refused = [], 0
    last = digest(receiver)
    try:
        while not published.is_set():
            if not child.is_alive():
                pytest.fail(f"publisher exited early with code {child.exitcode}")
            try:
                if reader.load():
                    last = digest(receiver)
                    loads.append((reader.loaded_step, last))
                else:
                    time.sleep(0.002)  # nothing published yet: let the child start
            except StepNotFoundError:
                refused += 1  # the newest version was replaced three times in a row: nothing copied
                assert digest(receiver) == last
        assert reader.load() and reader.loaded_step == versions
        final = digest(receiver)
    finally:
        release.set()
        child.join(60)
        reader.close()
    assert child.exitcode == 0
    torn = [(v, d) for v, d in loads if expected.get(v) != d]
    assert not torn, f"{len(torn)} of {len(loads)} loads are not the version they claim: {[v for v, _ in torn][:10]}"
    assert len({v for v, _ in loads}) >= 2, f"the reader saw too few versions to prove anything: {loads}"
    print(f"{len(loads)} loads of {len({v for v, _ in loads})} versions, {refused} refused")
    assert final == expected[versions]
    assert channel_files(unique_channel) == []


def test_killed_publisher_gives_clear_errors_and_leaves_nothing_after_cleanup(tmp_path, unique_channel):
    reference = build_titan_model(**MODEL)
    base = {k: v.clone() for k, v in reference.state_dict().items()}
    version_state(reference, base, 2)
    v2 = digest(reference)

    published, go = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=publish_then_die_mid_write, args=(unique_channel, published, go))
    child.start()
    receiver = build_titan_model(**{**MODEL, "seed": 1})
    reader = Checkpointer(model_parts=[receiver], checkpoint_config=_config(unique_channel), base_folder=str(tmp_path))
    intruder_model = build_titan_model(**{**MODEL, "seed": 2})
    intruder = Checkpointer(model_parts=[intruder_model], checkpoint_config=_config(unique_channel), base_folder=str(tmp_path))
    try:
        assert published.wait(120), "publisher never published"
        assert reader.load() and reader.loaded_step == 2 and digest(receiver) == v2
        with pytest.raises(ChannelBusyError) as busy:  # a second publisher while the first lives
            intruder.save(9)
        assert busy.value.owner_pid == child.pid
        go.set()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL

        leftovers = channel_files(unique_channel)
        assert leftovers, "the killed publisher's segments should still be there before cleanup"
        with pytest.raises(PublisherGoneError, match=unique_channel) as gone:
            reader.load()
        assert gone.value.owner_pid == child.pid
        assert reader.loaded_step == 2 and digest(receiver) == v2  # untouched: no half version

        # Any new Checkpointer on the channel reclaims what the dead publisher left.
        Checkpointer(model_parts=[build_titan_model(**MODEL)], checkpoint_config=_config(unique_channel), base_folder="").close()
        assert channel_files(unique_channel) == []
        assert reader.load() is False and reader.loaded_step == 2

        intruder.save(9)  # now the channel is free: the second publisher takes it
        assert reader.load() and reader.loaded_step == 9
        assert digest(receiver) == digest(intruder_model)
    finally:
        go.set()
        if child.is_alive():
            child.kill()
        child.join(10)
        intruder.close()
        reader.close()
    assert channel_files(unique_channel) == []
