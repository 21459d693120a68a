"""The memory backend in one process: both transports, through the Checkpointer API.

What the contract suite cannot say for a backend that only hands weights over: tied weights,
receiver dtype casts, refused receivers left untouched, unknown channels, retired versions,
one publisher per channel, private segments that close() frees, and hostile segments.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading

import pytest
import torch

from checkpointing import (
    Checkpointer,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    StepNotFoundError,
    UnsafeCheckpointError,
)
from checkpointing.backend import StepState
from checkpointing.backends.memory import ChannelBusyError, ChannelNotFoundError
from checkpointing.backends.memory.layout import Layout
from checkpointing.backends.memory.segments import channel_files, control_path
from checkpointing.backends.memory.snapshot import buckets
from tests.checkpointing.cases import make_config
from tests.helpers import assert_state_equal, build_titan_model, build_training_parts

TRANSPORTS = ["memory-local", "memory-shm"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine every
    parallel region can wait a whole time slice for its second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=TRANSPORTS)
def case(request):
    return request.param


def _memory(case, channel, **mem):
    cfg = make_config(case, channel)
    for key, value in mem.items():
        setattr(cfg.memory, key, value)
    return cfg


def _ckpt(model, cfg, tmp_path):
    return Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path))


def _bump(model, by: float) -> dict:
    with torch.no_grad():
        for p in model.parameters():  # tied parameters come once
            p.add_(by)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _clone(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tied_weights_stay_tied_and_are_published_once(case, tmp_path, unique_channel):
    model = build_titan_model("qwen3", seed=0)
    assert model.output.weight is model.tok_embeddings.weight  # the debug model ties them
    receiver = build_titan_model("qwen3", seed=1)
    with _ckpt(model, _memory(case, unique_channel), tmp_path) as writer, _ckpt(
        receiver, _memory(case, unique_channel), tmp_path
    ) as reader:
        writer.save(1)
        assert reader.load() and reader.loaded_step == 1
        assert receiver.output.weight is receiver.tok_embeddings.weight
        assert_state_equal(model.state_dict(), receiver.state_dict())
        layout = Layout.for_state(dict(writer.model.state_dict()))
        assert layout.aliases == {"output.weight": "tok_embeddings.weight"}
        all_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        tied_bytes = model.output.weight.numel() * 4
        assert layout.nbytes <= all_bytes - tied_bytes + 64 * len(layout.entries)


def test_the_publish_layout_is_reused_only_for_the_same_tensors(unique_channel):
    """A trainer publishes the same tensors every step, so the layout is built once; any other
    tensor object (here: an untied weight where a tied one was) builds it again, ties included."""
    from checkpointing.backend import BackendContext
    from checkpointing.backends.memory import MemoryOptions
    from checkpointing.backends.memory.backend import MemoryBackend

    backend = MemoryBackend(BackendContext(folder="", options=MemoryOptions(channel=unique_channel)))
    try:
        shared, other = torch.ones(4, 3), torch.zeros(4, 3)
        tied = {"embed": shared, "output": shared}
        first = backend._layout_for(tied)
        assert first.aliases == {"output": "embed"}
        assert backend._layout_for(dict(tied)) is first  # same tensors: reused
        untied = backend._layout_for({"embed": shared, "output": other})
        assert untied is not first and untied.aliases == {} and len(untied.entries) == 2
        assert backend._layout_for({"embed": shared, "output": other.reshape(3, 4)}).entries[1].shape == (3, 4)
        assert backend._layout_for({"emb": shared, "output": other}).entries[0].name == "emb"
    finally:
        backend.close()


def test_tied_receiver_refuses_untied_publisher_with_different_values(case, tmp_path, unique_channel):
    untied = build_titan_model("llama3", seed=0, vocab_size=256)
    tied = build_titan_model("llama3", seed=1, vocab_size=256)
    tied.output.weight = tied.tok_embeddings.weight  # same shapes, now tied
    before = _clone(tied)
    with _ckpt(untied, _memory(case, unique_channel), tmp_path) as writer, _ckpt(
        tied, _memory(case, unique_channel), tmp_path
    ) as reader:
        writer.save(1)
        with pytest.raises(StateMismatchError, match="ties") as err:
            reader.load()
        assert {"tok_embeddings.weight", "output.weight"} <= set(err.value.keys)
        assert reader.loaded_step == -1
    assert_state_equal(before, tied.state_dict())


@pytest.mark.parametrize("snapshot_dtype", ["auto", "bfloat16"])
def test_fp32_publisher_to_bf16_receiver(case, tmp_path, unique_channel, snapshot_dtype):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=5).to(torch.bfloat16)
    cfg = _memory(case, unique_channel, dtype=snapshot_dtype)
    with _ckpt(model, cfg, tmp_path) as writer, _ckpt(receiver, cfg, tmp_path) as reader:
        writer.save(3)
        assert reader.load() and reader.loaded_step == 3
        expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        assert_state_equal(expected, receiver.state_dict())


def test_bf16_snapshot_halves_the_published_bytes():
    model = build_titan_model(seed=0)
    sd = dict(model.state_dict())
    assert Layout.for_state(sd, torch.bfloat16).nbytes <= Layout.for_state(sd).nbytes // 2 + 64 * len(sd)


@pytest.mark.parametrize(
    "receiver_kwargs, named",
    [
        ({"n_layers": 3}, "layers.2.attention.wq.weight"),  # a receiver key nobody published
        ({"n_layers": 1}, "layers.1.attention.wq.weight"),  # a published key the receiver lacks
        ({"vocab_size": 320}, "tok_embeddings.weight"),  # wrong shape
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_mismatched_receiver_is_refused_by_key_and_left_untouched(case, tmp_path, unique_channel, receiver_kwargs, named):
    model = build_titan_model(seed=0)
    other = build_titan_model(seed=2, **receiver_kwargs)
    before = _clone(other)
    with _ckpt(model, _memory(case, unique_channel), tmp_path) as writer, _ckpt(
        other, _memory(case, unique_channel), tmp_path
    ) as reader:
        writer.save(1)
        with pytest.raises(StateMismatchError) as err:
            reader.load()
        assert named in str(err.value) and named in err.value.keys
        assert reader.loaded_step == -1
    assert_state_equal(before, other.state_dict())


def test_failed_load_keeps_the_previous_version(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    with _ckpt(receiver, _memory(case, unique_channel), tmp_path) as reader:
        with _ckpt(model, _memory(case, unique_channel), tmp_path) as writer:
            writer.save(1)
            assert reader.load()
            v1 = _clone(receiver)
            with pytest.raises(StepNotFoundError):
                reader.load(step=7)
        # A new publisher takes the channel over with a model the receiver does not fit.
        with _ckpt(build_titan_model(seed=3, dim=96), _memory(case, unique_channel), tmp_path) as other:
            other.save(3)
            with pytest.raises(StateMismatchError, match="tok_embeddings.weight"):
                reader.load()
        assert reader.loaded_step == 1
        assert_state_equal(v1, receiver.state_dict())


def test_unknown_channel(case, tmp_path, unique_channel):
    model = build_titan_model()
    before = _clone(model)
    with _ckpt(model, _memory(case, unique_channel), tmp_path) as reader:
        assert reader.load() is False  # nothing published yet: a generator may start first
        with pytest.raises(StepNotFoundError):
            reader.load(step=3)
        with pytest.raises(ChannelNotFoundError, match=unique_channel) as err:
            reader.backend.read(3, StepState(model=dict(model.state_dict())))
        assert err.value.channel == unique_channel
    assert_state_equal(before, model.state_dict())


def test_version_no_longer_held_is_step_not_found(case, tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    cfg = _memory(case, unique_channel, keep_versions=2)
    with _ckpt(model, cfg, tmp_path) as writer, _ckpt(receiver, cfg, tmp_path) as reader:
        snapshots = {}
        for step in (1, 2, 3):
            snapshots[step] = _bump(model, 1.0)
            writer.save(step)
        assert writer.backend.steps() == [2, 3]
        assert reader.load(step=2) and reader.loaded_step == 2
        with pytest.raises(StepNotFoundError, match="version 1"):
            reader.backend.read(1, StepState(model=dict(receiver.state_dict())))
        with pytest.raises(StepNotFoundError):
            reader.load(step=1)
        assert reader.loaded_step == 2
        assert_state_equal(snapshots[2], receiver.state_dict())


def test_training_state_is_refused_with_a_clear_error(case, tmp_path, unique_channel):
    model = build_titan_model()
    opts, scheds = build_training_parts(model)
    with pytest.raises(ConfigError, match="model tensors only") as err:
        Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds,
                     checkpoint_config=_memory(case, unique_channel), base_folder=str(tmp_path))
    assert "optimizer" in str(err.value)


def test_second_publisher_is_refused_until_the_first_closes(case, tmp_path, unique_channel):
    first_model, second_model = build_titan_model(seed=0), build_titan_model(seed=1)
    receiver = build_titan_model(seed=2)
    first = _ckpt(first_model, _memory(case, unique_channel), tmp_path)
    second = _ckpt(second_model, _memory(case, unique_channel), tmp_path)
    first.save(1)
    with pytest.raises(ChannelBusyError, match=unique_channel):
        second.save(2)
    first.close()
    second.save(2)  # the channel is free again: the new publisher takes it
    with _ckpt(receiver, _memory(case, unique_channel), tmp_path) as reader:
        assert reader.load() and reader.loaded_step == 2
        assert_state_equal(second_model.state_dict(), receiver.state_dict())
    second.close()


def test_bad_channel_name_is_a_config_error(tmp_path):
    cfg = make_config("memory-shm", "ok")
    cfg.memory.channel = "a.b c"
    with pytest.raises(ConfigError, match="checkpoint.memory.channel"):
        _ckpt(build_titan_model(), cfg, tmp_path)


def test_buckets_bound_the_gather_size():
    layout = Layout.for_state(dict(build_titan_model(dim=128).state_dict()))
    bucket_bytes = 100_000
    groups = list(buckets(layout.entries, bucket_bytes))
    assert [e for g in groups for e in g] == list(layout.entries)
    assert all(sum(e.nbytes for e in g) <= bucket_bytes or len(g) == 1 for g in groups)
    assert len(groups) > 3


def test_local_readers_on_threads_never_see_a_torn_version(tmp_path, unique_channel):
    """A publisher thread and a reader thread in one process (``local``): each loaded state is
    exactly the version the reader reports."""
    model = build_titan_model(seed=0, dim=128)
    receiver = build_titan_model(seed=1, dim=128)
    cfg = _memory("memory-local", unique_channel, keep_versions=2)
    base = _clone(model)
    versions = 40
    writer = _ckpt(model, cfg, tmp_path)
    reader = _ckpt(receiver, cfg, tmp_path)
    done = threading.Event()

    def publish():
        try:
            for v in range(1, versions + 1):
                with torch.no_grad():
                    for k, p in model.state_dict().items():
                        p.copy_(base[k] + v)
                writer.save(v)
        finally:
            done.set()

    def is_version(v: int) -> bool:
        return all(torch.equal(t, base[k] + v) for k, t in receiver.state_dict().items())

    seen = set()
    thread = threading.Thread(target=publish)
    thread.start()
    while not done.is_set():
        try:
            loaded = reader.load()
        except StepNotFoundError:
            continue  # a fast publisher retired the newest version three times in a row: nothing copied
        if loaded:
            assert is_version(reader.loaded_step), f"torn or wrong state for version {reader.loaded_step}"
            seen.add(reader.loaded_step)
    thread.join()
    assert reader.load() and reader.loaded_step == versions and is_version(versions)
    writer.close()
    reader.close()


# ------------------------------------------------------------------ shm segments
def _shm(channel, **mem):
    return _memory("memory-shm", channel, **mem)


def test_shm_segments_are_private_and_close_frees_them(tmp_path, unique_channel):
    model = build_titan_model()
    writer = _ckpt(model, _shm(unique_channel, keep_versions=2), tmp_path)
    writer.save(1)
    files = channel_files(unique_channel)
    assert len(files) == 1 + 2 + 1  # control + keep_versions slots + the spare (so a lease never blocks a publish)
    for path in files:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600, path
        assert st.st_uid == os.geteuid()
    writer.close()
    assert channel_files(unique_channel) == []


def test_shm_refuses_a_symlinked_or_shared_segment(tmp_path, unique_channel):
    model = build_titan_model()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 64)
    os.symlink(target, control_path(unique_channel))
    try:  # the constructor's cleanup already refuses it, as would a publish or a load
        with pytest.raises(UnsafeCheckpointError, match="symlink"):
            _ckpt(model, _shm(unique_channel), tmp_path / "r")
    finally:
        os.unlink(control_path(unique_channel))
    assert target.read_bytes() == b"x" * 64
    fd = os.open(control_path(unique_channel), os.O_CREAT | os.O_WRONLY, 0o644)
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        with pytest.raises(UnsafeCheckpointError, match="0644"):
            _ckpt(model, _shm(unique_channel), tmp_path / "r2")
    finally:
        os.unlink(control_path(unique_channel))


def _slot_mapping(channel):
    """The test plays a hostile same-user process: map the newest slot segment writable."""
    slot = [p for p in channel_files(channel) if p.endswith(".0")][0]
    fd = os.open(slot, os.O_RDWR)
    mm = mmap.mmap(fd, os.fstat(fd).st_size)
    os.close(fd)
    return mm


@pytest.mark.parametrize("damage", ["manifest", "header-bounds"])
def test_shm_damaged_slot_is_a_typed_error_and_receiver_is_untouched(tmp_path, unique_channel, damage):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    before = _clone(receiver)
    with _ckpt(model, _shm(unique_channel), tmp_path) as writer, _ckpt(receiver, _shm(unique_channel), tmp_path) as reader:
        writer.save(1)
        mm = _slot_mapping(unique_channel)
        if damage == "manifest":
            mm[140] ^= 0xFF
        else:
            data_at, data_len = struct.unpack_from("<QQ", mm, 40)
            struct.pack_into("<Q", mm, 48, data_len + 10 * mmap.PAGESIZE)
        mm.close()
        with pytest.raises(CorruptCheckpointError) as err:
            reader.load()
        assert err.value.path and unique_channel in err.value.path
        assert reader.loaded_step == -1
    assert_state_equal(before, receiver.state_dict())


@pytest.mark.parametrize("digest", ["checksum", "words_digest"])
def test_data_checksums_see_two_flips_that_cancel_in_a_sum(digest):
    """Found by the mutation fuzz: the same bit set in one 8-byte word and cleared in another
    leaves a plain sum of the words unchanged. Both digests (host: xxh3; device: a plain and a
    position-weighted sum, run here on the CPU) must see it, and a single flip too."""
    from checkpointing.backends.memory import snapshot

    fn = getattr(snapshot, digest)
    raw = torch.zeros(128, dtype=torch.uint8)
    raw[88] = 40
    before = fn(raw)
    raw[40] ^= 40
    raw[88] ^= 40  # word 5 gains what word 11 loses
    assert int(raw.view(torch.int64).sum()) == 40  # a plain sum cannot tell
    assert fn(raw) != before
    raw[3] ^= 1
    assert fn(raw) != before


def test_shm_verify_data_catches_a_flipped_byte_before_copying(tmp_path, unique_channel):
    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    cfg = _shm(unique_channel, verify_data=True)
    with _ckpt(model, cfg, tmp_path) as writer, _ckpt(receiver, cfg, tmp_path) as reader:
        writer.save(1)
        assert reader.load()  # intact: verifies and loads
        assert_state_equal(model.state_dict(), receiver.state_dict())
        with torch.no_grad():
            for p in receiver.parameters():
                p.fill_(7.0)  # a known "previous" state
        previous = _clone(receiver)
        mm = _slot_mapping(unique_channel)
        data_at = struct.unpack_from("<Q", mm, 40)[0]
        mm[data_at + 1000] ^= 0x40  # inside tok_embeddings.weight
        mm.close()
        with pytest.raises(CorruptCheckpointError, match="tok_embeddings.weight"):
            reader.load(step=1)
        assert_state_equal(previous, receiver.state_dict())


def test_publisher_changing_layout_between_versions(case, tmp_path, unique_channel):
    """A last-step export in bf16 after fp32 versions: the slot is re-laid out, and both kinds
    of receiver find the version that fits them."""
    model = build_titan_model(seed=0)
    cfg = _memory(case, unique_channel, keep_versions=2)
    cfg.last_save_model_only, cfg.export_dtype = True, "bfloat16"
    fp32_receiver, bf16_receiver = build_titan_model(seed=1), build_titan_model(seed=2).to(torch.bfloat16)
    with _ckpt(model, cfg, tmp_path) as writer, _ckpt(fp32_receiver, cfg, tmp_path) as a, _ckpt(bf16_receiver, cfg, tmp_path) as b:
        for step in (1, 2, 3):
            _bump(model, 1.0)
            writer.save(step)
        writer.save(4, last_step=True)
        assert writer.backend.steps() == [3, 4]
        assert a.load(step=3)
        assert_state_equal(model.state_dict(), fp32_receiver.state_dict())
        assert b.load() and b.loaded_step == 4
        assert_state_equal({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, bf16_receiver.state_dict())


def test_shm_explicit_reclaim_frees_a_dead_publishers_segments(tmp_path, unique_channel):
    from checkpointing.backends.memory import PublisherGoneError, reclaim_stale_segments

    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    writer = _ckpt(model, _shm(unique_channel), tmp_path)
    writer.save(1)
    with _ckpt(receiver, _shm(unique_channel), tmp_path) as reader:
        assert reader.load()
        assert reclaim_stale_segments(unique_channel) == []  # a live publisher's segments stay
        # Simulate the publisher's death in this process: its lock goes, its files stay.
        transport = writer.backend.transport
        os.close(transport._own.fd)
        for seg in transport._own_segments:
            seg.map.close()
        for fd in transport._own.slot_fds:
            os.close(fd)
        transport._own, transport._own_segments = None, []
        with pytest.raises(PublisherGoneError):
            reader.load()
        removed = reclaim_stale_segments(unique_channel)  # not all channels: other tests run beside us
        assert len(set(removed)) == len(removed) == 1 + 4 + 1  # control + keep_versions (4) slots + the spare
        assert channel_files(unique_channel) == []
        assert reader.load() is False
    writer.close()


def test_a_publish_that_fails_midway_leaves_the_other_versions_and_the_next_publish_works(case, tmp_path, unique_channel, monkeypatch):
    from checkpointing.backends.memory import backend as memory_backend

    model = build_titan_model(seed=0)
    receiver = build_titan_model(seed=1)
    cfg = _memory(case, unique_channel, keep_versions=2)
    with _ckpt(model, cfg, tmp_path) as writer, _ckpt(receiver, cfg, tmp_path) as reader:
        v1 = _bump(model, 1.0)
        writer.save(1)
        real_fill = memory_backend.fill_snapshot

        def half_then_fail(layout, state, data, bucket_bytes):
            layout.entries[0].view(data).fill_(float("nan"))
            raise RuntimeError("device lost mid-publish")

        monkeypatch.setattr(memory_backend, "fill_snapshot", half_then_fail)
        _bump(model, 1.0)
        with pytest.raises(RuntimeError, match="mid-publish"):
            writer.save(2)
        assert writer.backend.steps() == [1]  # the failed version is not listed
        assert reader.load() and reader.loaded_step == 1
        assert_state_equal(v1, receiver.state_dict())
        monkeypatch.setattr(memory_backend, "fill_snapshot", real_fill)
        writer.save(3)
        assert reader.load() and reader.loaded_step == 3
        assert_state_equal(model.state_dict(), receiver.state_dict())


def test_shm_publishers_racing_for_one_channel_never_share_it(unique_channel):
    """Publishers claiming, publishing and closing one channel in a loop, a cleaner reclaiming
    it and a reader reading it, all at once (threads: flock locks separate open files just as it
    separates processes). At every moment at most one publisher owns the channel, every read is
    a whole version, and nothing is left over."""
    from checkpointing.backends.memory import reclaim_stale_segments
    from checkpointing.backends.memory.shm import ShmTransport

    values = {"w": torch.zeros(4096)}
    layout = Layout.for_state(values)
    owners, errors, reads = [0], [], [0]
    stop = threading.Event()

    def publisher(tag: int) -> None:
        try:
            while not stop.is_set():
                transport = ShmTransport(unique_channel, keep_versions=2)
                try:
                    for step in range(3):
                        with transport.writing(step, layout, False) as target:
                            owners[0] += 1
                            assert owners[0] == 1, "two publishers own the channel"
                            layout.entries[0].view(target.data).fill_(tag * 100 + step)
                            owners[0] -= 1
                        owners[0] += 1  # still the owner between publishes
                        owners[0] -= 1
                except ChannelBusyError:
                    pass
                finally:
                    transport.close()
        except BaseException as e:
            errors.append(e)

    def cleaner() -> None:
        try:
            while not stop.is_set():
                reclaim_stale_segments(unique_channel)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        transport = ShmTransport(unique_channel, keep_versions=2)
        try:
            while not stop.is_set():
                try:
                    steps = transport.versions()
                    if not steps:
                        continue
                    with transport.reading(steps[-1]) as source:
                        got = source.layout.entries[0].view(source.data).clone()
                    assert torch.all(got == got[0]) and int(got[0]) % 100 == steps[-1], "torn or mislabelled"
                    reads[0] += 1
                except (StepNotFoundError, ChannelNotFoundError):
                    pass
        except BaseException as e:
            errors.append(e)
        finally:
            transport.close()

    threads = [threading.Thread(target=publisher, args=(t,)) for t in (1, 2)]
    threads += [threading.Thread(target=cleaner), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    stop.wait(2.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert reads[0] > 0
    assert channel_files(unique_channel) == []
