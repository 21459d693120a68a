"""Issue 11: eight classes of crafted or damaged input that used to get through, one section
each. Every test here fails on the code before the fix (checked by running this file against
that commit's ``src``) and holds after it; the property-based test in
``test_faults_mutation.py`` generalises them.

1. chunks that do not tile their tensor        5. untyped exceptions, CLI tracebacks
2. a failed load that half-applies             6. unbounded sizes, counts, depths, repr
3. FIFOs (and other special files) that hang    7. non-canonical step names
4. a manifest not held against its directory    8. config loaders
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from checkpointing import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from checkpointing.cli import main as ckpt_main
from tests.checkpointing.faults import crafted
from tests.checkpointing.test_hf_backend import adapter_for
from tests.helpers import TrainState, assert_state_equal, build_titan_model, build_training_parts, train_steps

HANG_S = 20.0
"""A load that has not finished after this long is hung (they take well under a second here)."""


# ------------------------------------------------------------------------------ helpers
def bounded(fn, seconds: float = HANG_S, release=None):
    """Run ``fn`` in a daemon thread: (result, error). A call still running after ``seconds``
    is a hang: ``release()`` (e.g. opening a FIFO's other end) lets the thread go, and the test
    fails."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # judged by the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if release is not None:
            release()
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {seconds}s: it hangs")
    return out.get("result"), out.get("error")


def release_fifo(path: str):
    def release():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    return release


def cfg(backend: str = "dcp", **overrides) -> CheckpointConfig:
    return CheckpointConfig(enable=True, backend=backend, folder="checkpoint", interval=1, keep_latest_k=0, **overrides)


def save_dcp(root, step: int = 1, seed: int = 0, **config):
    model = build_titan_model(seed=seed)
    ts = TrainState(step=step)
    ts.losses = [0.5, 0.25]
    with Checkpointer(model_parts=[model], states={"train_state": ts}, checkpoint_config=cfg(**config), base_folder=str(root)) as c:
        c.save(step)
    return model, os.path.join(str(root), "checkpoint", f"step-{step}")


def save_hf(root, step: int = 1, seed: int = 0, with_optimizer: bool = False):
    model = build_titan_model(seed=seed)
    opts = None
    if with_optimizer:
        opts, scheds = build_training_parts(model)
        train_steps(model, opts, scheds, n=1)
    ts = TrainState(step=step)
    with Checkpointer(model_parts=[model], optimizers=opts, states={"train_state": ts}, checkpoint_config=cfg("hf"),
                      sd_adapter=adapter_for(model, "qwen3"), base_folder=str(root)) as c:
        c.save(step)
    return model, opts, os.path.join(str(root), "checkpoint", f"step-{step}")


def clone(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def load_refused(root, error=CorruptCheckpointError, backend="dcp", seconds=HANG_S, release=None, **config):
    """Load into a fresh receiver: ``error`` is raised (within ``seconds``) and the receiver,
    its train state and its policy version are exactly as before."""
    model = build_titan_model(seed=7)
    ts = TrainState(step=-3)
    before = clone(model.state_dict())
    adapter = adapter_for(model, "qwen3") if backend == "hf" else None
    ckpt = Checkpointer(model_parts=[model], states={"train_state": ts}, checkpoint_config=cfg(backend, **config),
                        sd_adapter=adapter, base_folder=str(root))
    try:
        loaded, err = bounded(ckpt.load, seconds, release)
        assert isinstance(err, error), f"expected {error.__name__}, got {err!r} (load returned {loaded})"
        assert ckpt.loaded_step == -1
        assert_state_equal(before, model.state_dict())  # receiver untouched
        assert ts.step == -3 and ts.losses == []
        return err
    finally:
        ckpt.close()


def read_metadata_trusted(step_dir: str):
    with open(os.path.join(step_dir, ".metadata"), "rb") as f:
        return pickle.load(f)  # written by this test a moment ago


def write_metadata(step_dir: str, metadata) -> None:
    with open(os.path.join(step_dir, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def drop_manifest(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "manifest.json"))


def run_ckpt(*argv: str, seconds: float = HANG_S) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def call():
        with redirect_stdout(out), redirect_stderr(err):
            return ckpt_main(list(argv))

    code, error = bounded(call, seconds)
    assert error is None, f"ckpt {' '.join(argv)} raised {type(error).__name__} instead of exiting: {error}"
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def flip_zip_magic_of_last_item(step_dir: str, kind: str = "tensor") -> str:
    """Damage the item read last from ``__0_0.distcp`` (its zip signature), so everything read
    before it passes: the reader finds the damage only mid-load."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = read_metadata_trusted(step_dir)
    items = [
        (info.offset, index.fqn)
        for index, info in md.storage_data.items()
        if (kind == "tensor") != isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata)
    ]
    offset, fqn = max(items)
    path = os.path.join(step_dir, "__0_0.distcp")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"XX")
    return fqn


# ============================================================================== 1. tiling
def _set_chunks(step_dir, key: str, make):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    md = read_metadata_trusted(step_dir)
    entry = md.state_dict_metadata[key]
    entry.chunks = make(entry.size, ChunkStorageMetadata)
    write_metadata(step_dir, md)


TILINGS = {
    "empty": lambda size, C: [],
    "partial": lambda size, C: [C(offsets=torch.Size([0, 0]), sizes=torch.Size([size[0] // 2, size[1]]))],
    "overlapping": lambda size, C: [C(offsets=torch.Size([0, 0]), sizes=torch.Size(size))] * 2,
}


@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_1_chunks_must_tile_each_tensor_exactly(tmp_path, tiling):
    """A chunk list that is empty or covers part of a tensor used to load "successfully",
    leaving the receiver's old values in the rest; `ckpt verify` said ok."""
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)  # TorchTitan's steps have none: the metadata is all there is
    _set_chunks(step_dir, "tok_embeddings.weight", TILINGS[tiling])
    err = load_refused(tmp_path)
    assert "tok_embeddings.weight" in str(err) and "exactly" in str(err)
    code, out, _ = run_ckpt("verify", step_dir)
    assert code == 1 and "CORRUPT" in out and "tok_embeddings.weight" in out


# ============================================================================== 2. never half-apply
@pytest.mark.parametrize("verify", ["no_manifest", "size", "off"])
def test_2_a_failed_dcp_load_never_half_applies(tmp_path, verify):
    """Damage to the item read last surfaces only mid-load; by then the earlier tensors used
    to be in the receiver already."""
    _, step_dir = save_dcp(tmp_path)
    if verify == "no_manifest":
        drop_manifest(step_dir)
    flip_zip_magic_of_last_item(step_dir)
    load_refused(tmp_path, **({} if verify == "no_manifest" else {"verify": verify}))


def test_2_a_failed_hf_load_leaves_optimizer_state_untouched(tmp_path):
    """hf: the training-state sidecar (optimizer state) used to be copied in place before the
    damaged item after it was found."""
    _, _, step_dir = save_hf(tmp_path, with_optimizer=True)
    sidecar = os.path.join(step_dir, "training_state")
    flip_zip_magic_of_last_item(sidecar)
    model = build_titan_model(seed=7)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1, seed=5)
    before_model = clone(model.state_dict())
    flat_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _flat(opts.state_dict()).items()}
    with Checkpointer(model_parts=[model], optimizers=opts, states={"train_state": TrainState()}, checkpoint_config=cfg("hf", verify="size"),
                      sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path)) as c:
        _, err = bounded(c.load)
        assert isinstance(err, CorruptCheckpointError), repr(err)
    assert_state_equal(before_model, model.state_dict())
    after = _flat(opts.state_dict())
    changed = [k for k, v in flat_before.items() if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])]
    assert not changed, f"optimizer state changed by a failed load: {changed[:5]}"


def _flat(tree, prefix="") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix] = tree
    return out


# ============================================================================== 3. special files
def _fifo(path: str) -> str:
    if os.path.lexists(path):
        os.remove(path)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["metadata_no_manifest", "metadata_in_manifest", "data_in_manifest", "manifest"])
def test_3_a_fifo_in_a_dcp_step_is_refused_not_waited_on(tmp_path, where):
    _, step_dir = save_dcp(tmp_path)
    if where == "metadata_no_manifest":
        drop_manifest(step_dir)
    name = {"metadata_no_manifest": ".metadata", "metadata_in_manifest": ".metadata",
            "data_in_manifest": "__0_0.distcp", "manifest": "manifest.json"}[where]
    fifo = _fifo(os.path.join(step_dir, name))
    err = load_refused(tmp_path, UnsafeCheckpointError, release=release_fifo(fifo))
    assert "FIFO" in str(err) and name in str(err)
    for command in ("inspect", "verify"):
        code, out, errout = run_ckpt(command, step_dir)
        assert code == 1 and "FIFO" in out + errout


@pytest.mark.parametrize("name", ["model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.json",
                                  "training_state/.metadata", "training_state/__0_0.distcp"])
def test_3_a_fifo_in_an_hf_step_is_refused_not_waited_on(tmp_path, name):
    _, _, step_dir = save_hf(tmp_path, with_optimizer=False)
    drop_manifest(step_dir)  # a downloaded directory: no manifest to catch it first
    fifo = _fifo(os.path.join(step_dir, name))
    load_refused(tmp_path, UnsafeCheckpointError, backend="hf", release=release_fifo(fifo))


def test_3_a_fifo_planted_at_the_shm_channel_is_refused_not_waited_on(tmp_path, unique_channel):
    """Another local user can create the FIFO under our channel's name in /dev/shm; the
    reader's constructor (which reclaims stale segments) used to block on it forever."""
    from checkpointing.backends.memory import MemoryOptions
    from checkpointing.backends.memory.segments import control_path

    path = _fifo(control_path(unique_channel))
    os.chmod(path, 0o666)
    try:
        memory = MemoryOptions(transport="shm", channel=unique_channel)
        _, err = bounded(lambda: Checkpointer(model_parts=[build_titan_model()], checkpoint_config=cfg("memory", memory=memory),
                                              base_folder=str(tmp_path)), release=release_fifo(path))
        assert isinstance(err, UnsafeCheckpointError) and "FIFO" in str(err), repr(err)
    finally:
        os.remove(path)


def test_3_a_fifo_as_config_file_is_a_config_error(tmp_path):
    from checkpointing import load_job_config

    path = _fifo(str(tmp_path / "job.toml"))
    _, err = bounded(lambda: load_job_config(path), release=release_fifo(path))
    assert isinstance(err, ConfigError) and "FIFO" in str(err), repr(err)


# ============================================================================== 4. manifest vs directory
def _edit_manifest(step_dir, edit) -> None:
    path = os.path.join(step_dir, "manifest.json")
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _flip_middle(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def test_4_a_data_file_missing_from_the_manifest_is_never_loaded_unverified(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    _edit_manifest(step_dir, lambda doc: doc["files"].pop("__0_0.distcp"))
    _flip_middle(os.path.join(step_dir, "__0_0.distcp"))
    err = load_refused(tmp_path)
    assert "__0_0.distcp" in str(err) and "not in the step's manifest" in str(err)


def test_4_an_empty_file_table_cannot_pass(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    _edit_manifest(step_dir, lambda doc: doc.__setitem__("files", {}))
    load_refused(tmp_path)
    code, out, _ = run_ckpt("verify", step_dir)
    assert code == 1 and "0 files" not in out


def test_4_an_unlisted_extra_file_is_refused(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    with open(os.path.join(step_dir, "__1_0.distcp"), "wb") as f:
        f.write(b"extra")
    err = load_refused(tmp_path)
    assert "__1_0.distcp" in str(err)
    code, out, _ = run_ckpt("verify", step_dir)
    assert code == 1 and "__1_0.distcp" in out


# ============================================================================== 5. typed errors, exit codes
@pytest.mark.parametrize("step", ["seven", 1e400, [1], 2**70, True, -5])
def test_5_manifest_step_of_a_wrong_type_is_corrupt(tmp_path, step):
    _, step_dir = save_dcp(tmp_path)
    path = os.path.join(step_dir, "manifest.json")
    text = open(path).read()
    doc = json.loads(text)
    doc["step"] = "@@STEP@@"
    raw = json.dumps(doc).replace('"@@STEP@@"', "1e400" if step == 1e400 else json.dumps(step))
    with open(path, "w") as f:
        f.write(raw)
    load_refused(tmp_path)
    code, out, _ = run_ckpt("verify", step_dir)
    assert code == 1 and "CORRUPT" in out


def test_5_deeply_nested_manifest_is_corrupt(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    with open(os.path.join(step_dir, "manifest.json"), "w") as f:
        f.write('{"format": "titan-checkpointing/1", "files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    load_refused(tmp_path)


def _deep_list(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_5_deeply_nested_tensor_size_in_metadata_is_corrupt_for_load_and_cli(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    md = read_metadata_trusted(step_dir)
    md.state_dict_metadata["tok_embeddings.weight"].size = _deep_list(3000)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        write_metadata(step_dir, md)
    finally:
        sys.setrecursionlimit(limit)
    load_refused(tmp_path)
    for command in ("verify", "inspect"):
        code, _, _ = run_ckpt(command, step_dir)
        assert code == 1


def test_5_checkpoint_exception_never_escapes_ckpt_convert(tmp_path):
    """DCP's CheckpointException is a BaseException: it used to escape `ckpt convert` as a
    traceback (and exit 1 only because Python does on a crash)."""
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    flip_zip_magic_of_last_item(step_dir)
    tiny = [f"--model-arg={k}={v}" for k, v in {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "head_dim": 16,
                                                 "n_kv_heads": 2, "hidden_dim": 192}.items()]
    code, _, err = run_ckpt("convert", step_dir, str(tmp_path / "out"), "--to", "hf", "--model", "qwen3", "--flavor",
                            "debugmodel", "--no-progress", *tiny, seconds=120)
    assert code == 1 and "damaged" in err
    assert not os.path.exists(tmp_path / "out")


def test_5_shm_step_out_of_int64_is_a_typed_error(tmp_path, unique_channel):
    from checkpointing.backends.memory import MemoryOptions

    memory = MemoryOptions(transport="shm", channel=unique_channel)
    with Checkpointer(model_parts=[build_titan_model()], checkpoint_config=cfg("memory", memory=memory),
                      base_folder=str(tmp_path)) as c:
        for step in (2**63, -2):
            with pytest.raises(CheckpointError, match="int|step"):
                c.save(step)
        c.save(3)
        assert c.backend.steps() == [3]


def test_5_ckpt_exit_codes_are_deliberate(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    assert run_ckpt("verify", step_dir)[0] == 0
    assert run_ckpt("verify", str(tmp_path / "nowhere"))[0] == 2
    assert run_ckpt("verify", step_dir, "--mode", "bogus")[0] == 2
    _flip_middle(os.path.join(step_dir, "__0_0.distcp"))
    assert run_ckpt("verify", step_dir)[0] == 1


# ============================================================================== 6. bounds
def _shared_reference_list(depth: int):
    value: list = [0]
    for _ in range(depth):
        value = [value, value]
    return value


@pytest.fixture(scope="module")
def worker():
    """Loads that used to spin inside C code holding the GIL (an exponential repr or hash) can
    only be stopped from outside: they run in a worker process that is killed on a hang."""
    from tests.checkpointing.faults.judge import LoadWorker

    w = LoadWorker()
    yield w
    w.close()


def refused_in_worker(worker, root, error: str, seconds: float = 10.0):
    verdict, found = worker.judge(60.0, False, case="dcp", base_folder=str(root), channel="unused")
    assert not found, "; ".join(found)
    assert verdict.error_type and verdict.error_type.endswith(error), verdict
    assert verdict.untouched and verdict.seconds < seconds, verdict
    return verdict


def test_6_shared_references_in_metadata_are_refused_in_bounded_time(tmp_path, worker):
    """~2 KB on disk, 2**60 nodes when printed: the refusal used to build that repr."""
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    md = read_metadata_trusted(step_dir)
    md.state_dict_metadata["tok_embeddings.weight"].size = _shared_reference_list(60)
    write_metadata(step_dir, md)
    assert os.path.getsize(os.path.join(step_dir, ".metadata")) < 64 << 10
    refused_in_worker(worker, tmp_path, "CorruptCheckpointError")


def _hash_bomb_pickle(depth: int = 80) -> bytes:
    """A dict whose key is a tuple of tuples sharing references: a few hundred bytes, 2**depth
    hashes to insert (hand-assembled: building it in Python would hash it here)."""
    ops = [b"\x80\x02", b")", b"r" + struct.pack("<I", 0)]
    for i in range(depth):
        get = b"j" + struct.pack("<I", i)
        ops += [get, get, b"\x86", b"r" + struct.pack("<I", i + 1)]
    ops += [b"}", b"j" + struct.pack("<I", depth), b"K\x01", b"s", b"."]
    return b"".join(ops)


def test_6_hash_bomb_key_in_metadata_is_refused_in_bounded_time(tmp_path, worker):
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    with open(os.path.join(step_dir, ".metadata"), "wb") as f:
        f.write(_hash_bomb_pickle())
    verdict = refused_in_worker(worker, tmp_path, "UnsafeCheckpointError")
    assert "hash" in verdict.error_message


def test_6_oversized_metadata_is_refused_unread(tmp_path):
    """A sparse 3 GiB .metadata used to be read whole."""
    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    os.truncate(os.path.join(step_dir, ".metadata"), 3 << 30)
    with crafted.address_space_headroom(1 << 30):
        err = load_refused(tmp_path, seconds=10)
    assert not crafted.raised_memory_error(err) and "at most" in str(err)


def _legacy_bomb(numel: int) -> bytes:
    """torch.save's legacy (pre-zip) format of a 4-element tensor whose storage record claims
    ``numel`` elements: torch.load allocates the claimed storage before reading a byte of it."""
    buffer = io.BytesIO()
    torch.save(torch.ones(4), buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    declared = b"X\x03\x00\x00\x00cpuq\x04K\x04N"  # ('storage', FloatStorage, key, 'cpu', 4, None)
    assert raw.count(declared) == 1
    return raw.replace(declared, declared[:-3] + b"\x8a\x06" + numel.to_bytes(6, "little") + b"N")


def test_6_legacy_format_value_declaring_huge_storage_is_refused_without_allocating(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _, step_dir = save_dcp(tmp_path)
    drop_manifest(step_dir)
    md = read_metadata_trusted(step_dir)
    index, info = next((i, s) for i, s in md.storage_data.items() if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    bomb = _legacy_bomb(1 << 40)
    data_path = os.path.join(step_dir, info.relative_path)
    info.offset, info.length = os.path.getsize(data_path), len(bomb)
    with open(data_path, "ab") as f:
        f.write(bomb)
    write_metadata(step_dir, md)
    with crafted.address_space_headroom(1 << 30):
        err = load_refused(tmp_path)
    assert not crafted.raised_memory_error(err), f"tried a huge allocation: {err}"


def test_6_a_manifest_of_a_million_entries_fails_fast(tmp_path):
    _, step_dir = save_dcp(tmp_path)
    path = os.path.join(step_dir, "manifest.json")
    doc = json.load(open(path))
    doc["files"].update({f"f{i:07d}": {"size": 1, "crc32": 1} for i in range(600_000)})
    raw = json.dumps(doc)
    with open(path, "w") as f:
        f.write(raw)
    begin = time.monotonic()
    json.loads(raw)
    parse = time.monotonic() - begin
    begin = time.monotonic()
    load_refused(tmp_path, seconds=60)
    took = time.monotonic() - begin
    assert took < 5 + 10 * parse, f"{took:.1f}s to refuse a manifest that parses in {parse:.2f}s"


def test_6_thread_count_has_an_upper_bound(tmp_path):
    from checkpointing.backends.dcp import DCPOptions

    with pytest.raises(ConfigError, match="thread_count"):
        Checkpointer(model_parts=[build_titan_model()], checkpoint_config=cfg(dcp=DCPOptions(thread_count=300)),
                     base_folder=str(tmp_path))


def test_6_a_shm_reader_never_faults_in_a_planted_sparse_slot(tmp_path, unique_channel):
    from checkpointing.backends.memory import MemoryOptions
    from checkpointing.backends.memory.segments import channel_files

    memory = MemoryOptions(transport="shm", channel=unique_channel, keep_versions=1)
    model = build_titan_model(seed=0)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg("memory", memory=memory), base_folder=str(tmp_path)) as writer:
        writer.save(1)
        slot = next(p for p in channel_files(unique_channel) if p.endswith(".0"))
        os.truncate(slot, os.path.getsize(slot) + (256 << 20))  # a same-user process grows it, sparse
        blocks_before = os.stat(slot).st_blocks
        receiver = build_titan_model(seed=3)
        with Checkpointer(model_parts=[receiver], checkpoint_config=cfg("memory", memory=memory), base_folder=str(tmp_path)) as reader:
            assert bounded(reader.load)[0] is True
        assert_state_equal(model.state_dict(), receiver.state_dict())
        grown = (os.stat(slot).st_blocks - blocks_before) * 512
        assert grown < 1 << 20, f"the reader faulted in {grown >> 20} MiB of a sparse slot"


# ============================================================================== 7. step names
@pytest.mark.parametrize("odd", ["step-007", "step-\u0667", "step-7\n", "step-+7", "step-7 "])
def test_7_only_canonical_step_names_are_steps(tmp_path, odd):
    import shutil

    model, step_dir = save_dcp(tmp_path, step=5)
    shutil.copytree(step_dir, os.path.join(str(tmp_path), "checkpoint", odd))
    receiver = build_titan_model(seed=9)
    with Checkpointer(model_parts=[receiver], states={"train_state": TrainState()}, checkpoint_config=cfg(),
                      base_folder=str(tmp_path)) as c:
        assert c.backend.steps() == [5]
        loaded, err = bounded(c.load)
        assert err is None and loaded and c.loaded_step == 5
    assert_state_equal(model.state_dict(), receiver.state_dict())
    folder = os.path.join(str(tmp_path), "checkpoint")
    code, out, _ = run_ckpt("inspect", folder)
    assert code == 0 and "ignored" in out and ascii(odd) in out
    code, out, _ = run_ckpt("verify", folder)
    assert code == 0 and "step-5: ok" in out and ascii(odd) in out


# ============================================================================== 8. config loaders
def _toml(tmp_path, content: bytes) -> str:
    path = tmp_path / "job.toml"
    path.write_bytes(content)
    return str(path)


CONFIGS = {
    "not_utf8": b'[checkpoint]\nfolder = "\xff\xfe"\n',
    "deep_array": b"[job]\nx = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "deep_tables": b"[" + b".".join(b"t%d" % i for i in range(2000)) + b"]\nx = 1\n",
    "relative_module": b'[job]\ncustom_config_module = ".evil"\n',
    "module_not_a_string": b"[job]\ncustom_config_module = 5\n",
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_8_config_loaders_raise_config_errors(tmp_path, case):
    from checkpointing import load_job_config

    path = _toml(tmp_path, CONFIGS[case])
    _, err = bounded(lambda: load_job_config(path))
    assert isinstance(err, ConfigError), f"{case}: {err!r}"


@pytest.mark.parametrize("depth", [900, 1900])
def test_8_ckpt_convert_deep_model_arg_is_exit_2(tmp_path, depth):
    """Nested JSON in --model-arg: parsed (900 deep) or not (1900, past the parser's limit),
    the bad value is a config error, never a RecursionError traceback."""
    _, step_dir = save_dcp(tmp_path)
    deep = "[" * depth + "]" * depth
    code, _, err = run_ckpt("convert", step_dir, str(tmp_path / "out"), "--to", "hf", "--model", "qwen3", "--flavor",
                            "debugmodel", f"--model-arg=dim={deep}", "--no-progress", seconds=120)
    assert code == 2 and "dim" in err, err
