"""Hostile and damaged Hugging Face directories.

An HF directory is usually downloaded: its index and every safetensors header are untrusted.
Each attack here must end in a typed error naming the file, with the receiving model untouched
and (checked with a real audit hook on every ``open``) no file outside the directory opened.
Damage to our own steps (flipped byte, truncation, missing shard) is caught by the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tracemalloc

import pytest
import torch

from checkpointing import Checkpointer, CorruptCheckpointError, UnsafeCheckpointError
from checkpointing.backends.hf.safetensors_io import read_header
from tests.checkpointing.test_hf_backend import adapter_for, hf_config, save_model_step, snapshot
from tests.helpers import assert_state_equal, build_titan_model

# ---------------------------------------------------------------------------------- open() audit
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recorded_opens():
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


# ---------------------------------------------------------------------------------- crafting
def craft(path, header: dict | bytes, data: bytes = b"", declared: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


BAD_HEADERS = {
    "overlap": ({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, bytes(24), "overlaps"),
    "past the end": ({"a": f32([4], 0, 16), "b": f32([4], 16, 32)}, bytes(20), "truncated"),
    "lies about size": ({"a": f32([4], 0, 8)}, bytes(8), "lies about sizes"),
    "gap": ({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20), "unaccounted"),
    "trailing bytes": ({"a": f32([2], 0, 8)}, bytes(12), "trailing"),
    "unknown dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "dtype"),
    "negative dim": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
    "bad offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, bytes(1), "data_offsets"),
    "not json": (b"{nope", b"", "not valid JSON"),
    "duplicate key": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1), "twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_is_a_corrupt_error_naming_the_file(tmp_path, case):
    header, data, message = BAD_HEADERS[case]
    path = tmp_path / "model.safetensors"
    craft(path, header, data)
    with pytest.raises(CorruptCheckpointError, match=message) as err:
        read_header(str(path))
    assert str(path) in str(err.value) and err.value.path == str(path)


@pytest.mark.parametrize("declared", [2**63 - 1, 2**40, 50])
def test_huge_declared_header_is_refused_without_allocating(tmp_path, declared):
    path = tmp_path / "model.safetensors"
    craft(path, b'{"a": 1}', declared=declared)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="header") as err:
            read_header(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a bogus header"
    assert str(path) in str(err.value)


def test_valid_header_is_accepted(tmp_path):
    path = tmp_path / "ok.safetensors"
    craft(path, {"__metadata__": {"format": "pt"}, "b": f32([2], 8, 16), "a": f32([2], 0, 8)}, bytes(16))
    header = read_header(str(path))
    assert sorted(header.entries) == ["a", "b"] and header.entries["b"].shape == (2,)


# ---------------------------------------------------------------------------------- hostile directories
@pytest.fixture
def foreign_step(tmp_path):
    """A qwen3 step with its manifest removed: what a downloaded HF directory looks like."""
    model, step_dir = save_model_step(tmp_path, "qwen3")
    os.remove(os.path.join(step_dir, "manifest.json"))
    return model, step_dir


def _index_path(step_dir):
    return os.path.join(step_dir, "model.safetensors.index.json")


def _rewrite_index(step_dir, change):
    path = _index_path(step_dir)
    index = json.loads(open(path).read())
    change(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)


def _load_expecting(tmp_path, step_dir, error, match):
    """Load the foreign step as an initial load; the error must come with the receiver untouched
    and without opening anything outside the step directory."""
    model = build_titan_model("qwen3", seed=5)
    before = snapshot(model)
    cfg = hf_config(initial_load_path=step_dir, initial_load_in_hf=True, initial_load_model_only=True)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path / "run")) as c:
        with recorded_opens() as opened:
            with pytest.raises(error, match=match) as err:
                c.load()
    inside = os.path.realpath(step_dir)
    outside = [p for p in opened if not p.startswith(inside + os.sep) and p.endswith((".safetensors", ".bin", ".txt"))]
    assert not outside, f"opened outside the checkpoint: {outside}"
    assert_state_equal(before, model.state_dict())
    return err.value


def _secret(tmp_path) -> str:
    """A perfectly valid safetensors file outside the checkpoint: reading it would 'work'."""
    from safetensors.torch import save_file

    path = str(tmp_path / "outside.safetensors")
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, path)
    return path


def test_weight_map_with_dotdot_is_unsafe(tmp_path, foreign_step):
    _, step_dir = foreign_step
    _secret(tmp_path)
    rel = os.path.relpath(str(tmp_path / "outside.safetensors"), step_dir)  # ../../outside.safetensors
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.embed_tokens.weight", rel))
    err = _load_expecting(tmp_path, step_dir, UnsafeCheckpointError, r"escapes")
    assert "model.safetensors.index.json" in str(err)


def test_weight_map_with_absolute_path_is_unsafe(tmp_path, foreign_step):
    _, step_dir = foreign_step
    secret = _secret(tmp_path)
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.embed_tokens.weight", secret))
    _load_expecting(tmp_path, step_dir, UnsafeCheckpointError, "absolute path")


def test_shard_symlinked_outside_is_unsafe(tmp_path, foreign_step):
    _, step_dir = foreign_step
    secret = _secret(tmp_path)
    os.symlink(secret, os.path.join(step_dir, "model-00002-of-00002.safetensors"))
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.embed_tokens.weight", "model-00002-of-00002.safetensors"))
    _load_expecting(tmp_path, step_dir, UnsafeCheckpointError, "outside")


def test_missing_shard_is_named(tmp_path, foreign_step):
    _, step_dir = foreign_step
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.norm.weight", "model-00009-of-00009.safetensors"))
    err = _load_expecting(tmp_path, step_dir, CorruptCheckpointError, "missing")
    assert "model-00009-of-00009.safetensors" in str(err)


def test_index_mapping_a_tensor_to_the_wrong_shard_is_corrupt(tmp_path, foreign_step):
    _, step_dir = foreign_step
    empty = os.path.join(step_dir, "model-00002-of-00002.safetensors")
    craft(empty, {"__metadata__": {"format": "pt"}})
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.norm.weight", "model-00002-of-00002.safetensors"))
    _load_expecting(tmp_path, step_dir, CorruptCheckpointError, "does not hold it")


def test_duplicate_weight_map_key_is_corrupt(tmp_path, foreign_step):
    _, step_dir = foreign_step
    path = _index_path(step_dir)
    text = open(path).read().replace(
        '"weight_map": {', '"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors", ', 1
    )
    open(path, "w").write(text)
    _load_expecting(tmp_path, step_dir, CorruptCheckpointError, "twice")


def test_tensor_defined_in_two_shards_is_corrupt(tmp_path, foreign_step):
    _, step_dir = foreign_step
    copy = os.path.join(step_dir, "model-00002-of-00002.safetensors")
    shutil.copy(os.path.join(step_dir, "model-00001-of-00001.safetensors"), copy)
    _rewrite_index(step_dir, lambda wm: wm.__setitem__("model.norm.weight", "model-00002-of-00002.safetensors"))
    _load_expecting(tmp_path, step_dir, CorruptCheckpointError, "defined in both")


def test_shard_header_that_lies_is_refused_before_any_copy(tmp_path, foreign_step):
    _, step_dir = foreign_step
    shard = os.path.join(step_dir, "model-00001-of-00001.safetensors")
    header = read_header(shard)
    raw = open(shard, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + n])
    name = "model.norm.weight"
    begin, end = doc[name]["data_offsets"]
    doc[name]["data_offsets"] = [begin, end + 4]  # claims 4 more bytes than its shape needs
    craft(shard, doc, raw[8 + n :])
    err = _load_expecting(tmp_path, step_dir, CorruptCheckpointError, "lies about sizes")
    assert shard in str(err) and header.entries[name].nbytes == end - begin


# ---------------------------------------------------------------------------------- our own steps, damaged
def _committed(tmp_path):
    model, step_dir = save_model_step(tmp_path, "qwen3")
    return model, step_dir, os.path.join(step_dir, "model-00001-of-00001.safetensors")


def _load_committed_expecting(tmp_path, match):
    model = build_titan_model("qwen3", seed=5)
    before = snapshot(model)
    with Checkpointer(model_parts=[model], checkpoint_config=hf_config(), sd_adapter=adapter_for(model, "qwen3"), base_folder=str(tmp_path)) as c:
        with pytest.raises(CorruptCheckpointError, match=match) as err:
            c.load()
        assert c.loaded_step == -1
    assert_state_equal(before, model.state_dict())
    return err.value


def test_flipped_byte_fails_the_checksum(tmp_path):
    _, _, shard = _committed(tmp_path)
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    err = _load_committed_expecting(tmp_path, "checksum")
    assert err.path == shard


def test_truncated_shard_is_named(tmp_path):
    _, _, shard = _committed(tmp_path)
    os.truncate(shard, os.path.getsize(shard) - 8)
    err = _load_committed_expecting(tmp_path, "truncated")
    assert err.path == shard


def test_missing_shard_of_a_committed_step_is_named(tmp_path):
    _, _, shard = _committed(tmp_path)
    os.remove(shard)
    err = _load_committed_expecting(tmp_path, "missing")
    assert err.path == shard
