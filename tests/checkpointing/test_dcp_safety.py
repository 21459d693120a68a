"""Untrusted DCP checkpoints: nothing in one may run code, escape its directory, or make the
reader read outside a file or allocate what the disk does not hold.

Every attack is crafted for real: a pickle whose ``__reduce__`` would create a marker
directory, metadata rewritten with bad paths and byte ranges, a non-tensor value that needs
full unpickling. Each must raise the typed error and leave the receiver (and the filesystem)
untouched.
"""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpointing import (
    CheckpointConfig,
    Checkpointer,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from checkpointing.backends.dcp import read_metadata
from checkpointing.backends.safe_metadata import safe_load_metadata
from tests.helpers import TrainState, assert_state_equal, build_titan_model


class MakesMarker:
    """Unpickling this calls ``os.mkdir(marker)``: the visible trace of code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class EvalsMarker(MakesMarker):
    def __reduce__(self):
        return (eval, (f"__import__('os').mkdir({self.marker!r})",))


PAYLOADS = [MakesMarker, EvalsMarker]


def _config(**overrides) -> CheckpointConfig:
    return CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0, **overrides)


def _save_step(base, step: int = 1, seed: int = 0):
    model = build_titan_model(seed=seed)
    ts = TrainState(step=step)
    ts.losses = [0.5]
    with Checkpointer(model_parts=[model], states={"train_state": ts}, checkpoint_config=_config(), base_folder=str(base)) as c:
        c.save(step)
    return model, base / "checkpoint" / f"step-{step}"


def _receiver(base, **cfg):
    model = build_titan_model(seed=9)
    ts = TrainState()
    ckpt = Checkpointer(model_parts=[model], states={"train_state": ts}, checkpoint_config=_config(**cfg), base_folder=str(base))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    return model, ts, ckpt, snapshot


def _assert_refused(base, error=UnsafeCheckpointError, match=None, **cfg):
    """Loading raises ``error``; the receiver keeps every value and its policy version."""
    model, ts, ckpt, snapshot = _receiver(base, **cfg)
    with ckpt:
        with pytest.raises(error, match=match) as info:
            ckpt.load()
        assert ckpt.loaded_step == -1
    assert_state_equal(snapshot, model.state_dict())
    assert ts.step == 0
    return info.value


def _rewrite_metadata(step_dir, mutate) -> None:
    """Parse the real metadata (safely), change it, and pickle it back as an attacker would."""
    path = step_dir / ".metadata"
    metadata = safe_load_metadata(path.read_bytes(), str(path))
    mutate(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _drop_manifest(step_dir) -> None:
    """Make it a foreign (TorchTitan-written) step: loaded without checksums, so the reader's
    own defenses are all that stands between the bytes and the process."""
    os.remove(step_dir / "manifest.json")


# ------------------------------------------------------------------ crafted pickle in .metadata
def test_premise_stock_dcp_reader_runs_code_from_metadata(tmp_path):
    """Why all this exists: torch's own FileSystemReader unpickles .metadata."""
    _, step_dir = _save_step(tmp_path)
    marker = tmp_path / "pwned"
    _rewrite_metadata(step_dir, lambda md: setattr(md, "planner_data", MakesMarker(str(marker))))
    try:
        dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("where", ["foreign-step", "verify-off"])
def test_crafted_metadata_pickle_is_refused_and_runs_nothing(tmp_path, payload, where):
    _, step_dir = _save_step(tmp_path)
    marker = tmp_path / "pwned"
    _rewrite_metadata(step_dir, lambda md: setattr(md, "planner_data", payload(str(marker))))
    cfg = {}
    if where == "foreign-step":
        _drop_manifest(step_dir)
    else:
        cfg["verify"] = "off"
    err = _assert_refused(tmp_path, UnsafeCheckpointError, **cfg)
    assert ".metadata" in str(err) and "refusing" in str(err)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        read_metadata(str(step_dir))  # what `ckpt inspect` uses
    assert not marker.exists()


def test_crafted_metadata_in_a_manifested_step_fails_its_checksum_first(tmp_path):
    _, step_dir = _save_step(tmp_path)
    marker = tmp_path / "pwned"
    _rewrite_metadata(step_dir, lambda md: setattr(md, "planner_data", MakesMarker(str(marker))))
    err = _assert_refused(tmp_path, CorruptCheckpointError)
    assert err.path.endswith(".metadata")
    assert not marker.exists()


def test_crafted_metadata_through_initial_load_path_runs_nothing(tmp_path):
    _, step_dir = _save_step(tmp_path / "old")
    _drop_manifest(step_dir)
    marker = tmp_path / "pwned"
    _rewrite_metadata(step_dir, lambda md: setattr(md, "planner_data", MakesMarker(str(marker))))
    _assert_refused(tmp_path / "new", UnsafeCheckpointError, initial_load_path=str(step_dir))
    assert not marker.exists()


def test_metadata_that_is_not_dcp_metadata_is_refused(tmp_path):
    _, step_dir = _save_step(tmp_path)
    _drop_manifest(step_dir)
    (step_dir / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    _assert_refused(tmp_path, CorruptCheckpointError, match="does not hold DCP Metadata")


# ------------------------------------------------------------------ paths out of the directory
def _point_first_item_at(step_dir, relative_path: str) -> None:
    def mutate(md):
        for info in md.storage_data.values():
            info.relative_path = relative_path

    _rewrite_metadata(step_dir, mutate)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_data_paths_outside_the_step_are_refused(tmp_path, how):
    """The outside file is a perfectly valid copy of the data, so a naive reader would load it."""
    _, step_dir = _save_step(tmp_path)
    _drop_manifest(step_dir)
    outside = tmp_path / "outside.distcp"
    shutil.copy(step_dir / "__0_0.distcp", outside)
    if how == "dotdot":
        _point_first_item_at(step_dir, "../../outside.distcp")
    elif how == "absolute":
        _point_first_item_at(step_dir, str(outside))
    else:
        os.remove(step_dir / "__0_0.distcp")
        os.symlink(outside, step_dir / "__0_0.distcp")
    err = _assert_refused(tmp_path, UnsafeCheckpointError)
    assert "outside" in str(err) or ".." in str(err) or "absolute" in str(err)


def test_symlinked_step_directory_is_not_listed(tmp_path):
    _, step_dir = _save_step(tmp_path / "elsewhere")
    (tmp_path / "checkpoint").mkdir()
    os.symlink(step_dir, tmp_path / "checkpoint" / "step-5")
    model, ts, ckpt, snapshot = _receiver(tmp_path)
    with ckpt:
        assert ckpt.backend.steps() == []
        assert ckpt.load() is False
        assert ckpt.loaded_step == -1
    assert_state_equal(snapshot, model.state_dict())  # the module's promise: receiver untouched
    assert ts.step == 0


# ------------------------------------------------------------------ byte ranges and geometry
def _tensor_entries(md):
    return [(i, s) for i, s in md.storage_data.items() if i.offset is not None]


def _huge_length(md):
    index, info = _tensor_entries(md)[0]
    info.length = 1 << 40  # DCP would read(1 TiB) into one buffer


def _offset_past_end(md):
    _, info = _tensor_entries(md)[0]
    info.offset = 1 << 30


def _negative_offset(md):
    _, info = _tensor_entries(md)[0]
    info.offset = -8


def _overlap(md):
    (_, a), (_, b) = _tensor_entries(md)[:2]
    b.offset = a.offset  # both items claim the same bytes


def _shorter_than_data(md):
    _, info = _tensor_entries(md)[0]
    info.length = 16


def _chunk_outside_tensor(md):
    entry = md.state_dict_metadata["tok_embeddings.weight"]
    entry.chunks[0].offsets = torch.Size([10**9, 0])


def _non_int_length(md):
    _, info = _tensor_entries(md)[0]
    info.length = "12"


def _missing_field(md):
    del md.state_dict_metadata["tok_embeddings.weight"].__dict__["size"]  # a flipped bit in its name


def _missing_path(md):
    _, info = _tensor_entries(md)[0]
    del info.__dict__["relative_path"]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (_missing_field, "malformed"),
        (_missing_path, "malformed"),
        (_huge_length, "the file has"),
        (_offset_past_end, "the file has"),
        (_negative_offset, "non-negative"),
        (_overlap, "overlaps"),
        (_shorter_than_data, "needs"),
        (_chunk_outside_tensor, "outside its size"),
        (_non_int_length, "non-negative int"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_bad_byte_ranges_are_refused_before_reading(tmp_path, mutate, words):
    _, step_dir = _save_step(tmp_path)
    _drop_manifest(step_dir)
    _rewrite_metadata(step_dir, mutate)
    err = _assert_refused(tmp_path, CorruptCheckpointError, match=words)
    assert err.path  # names the file


def test_compressed_items_are_refused(tmp_path):
    _, step_dir = _save_step(tmp_path)
    _drop_manifest(step_dir)

    def mutate(md):
        for info in md.storage_data.values():
            info.transform_descriptors = ["zstandard/1"]

    _rewrite_metadata(step_dir, mutate)
    _assert_refused(tmp_path, UnsafeCheckpointError, match="transforms")


# ------------------------------------------------------------------ non-tensor values
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_non_tensor_value_needing_full_unpickling_is_refused(tmp_path, payload):
    """A step whose train_state holds an object with a __reduce__ (written by plain DCP, which
    pickles anything): DCP's own planner would load it with weights_only=False."""
    marker = tmp_path / "pwned"
    model = build_titan_model(seed=0)
    step_dir = tmp_path / "checkpoint" / "step-3"
    state = {**model.state_dict(), "train_state": {"step": 3, "losses": [payload(str(marker))]}}
    dcp.save(state, checkpoint_id=str(step_dir))
    err = _assert_refused(tmp_path, UnsafeCheckpointError, match="train_state.losses")
    assert "weights_only" in str(err)
    assert not marker.exists()


def test_plain_non_tensor_values_still_load(tmp_path):
    """The weights_only path is not a blanket refusal: ints, floats, strings, lists, dicts load."""
    model = build_titan_model(seed=0)
    step_dir = tmp_path / "checkpoint" / "step-4"
    value = {"step": 4, "losses": [1.0, 0.5], "note": "ok", "nested": {"t": (1, 2)}}
    dcp.save({**model.state_dict(), "extra": value}, checkpoint_id=str(step_dir))
    receiver = build_titan_model(seed=1)
    with Checkpointer(model_parts=[receiver], states={"extra": {"step": 0, "losses": [], "note": "", "nested": {"t": (0, 0)}}},
                      checkpoint_config=_config(), base_folder=str(tmp_path)) as c:
        assert c.load() and c.loaded_step == 4
        assert c.states["extra"] == value
    assert_state_equal(model.state_dict(), receiver.state_dict())
