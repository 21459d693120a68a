"""The DCP reader's one-copy path: tensor bytes go straight from the file into the receiver, and
every case it does not handle (another dtype, a strided target or stored tensor) takes DCP's
general path with the same result."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from checkpointing import Checkpointer, CheckpointConfig
from checkpointing.backends.dcp import SafeFileSystemReader, SafeLoadPlanner
from tests.helpers import assert_state_equal, build_titan_model, build_training_parts, train_steps


def _load(step_dir, state: dict) -> SafeFileSystemReader:
    reader = SafeFileSystemReader(str(step_dir))
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    return reader


def _tensor_items(step_dir) -> int:
    md = SafeFileSystemReader(str(step_dir)).read_metadata()
    return sum(1 for index in md.storage_data if index.offset is not None)


def test_a_checkpointer_step_is_read_without_extra_copies(tmp_path):
    model = build_titan_model(seed=0)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1)
    cfg = CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    with Checkpointer(model_parts=[model], optimizers=opts, checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
        c.save(1)
    step = tmp_path / "checkpoint" / "step-1"
    receiver = build_titan_model(seed=1)
    ropts, _ = build_training_parts(receiver)
    train_steps(receiver, ropts, scheds, n=1, seed=3)
    state = {**receiver.state_dict(), "optimizer": ropts.state_dict()}
    reader = _load(step, state)
    assert reader.direct_reads == _tensor_items(step) > 0
    assert_state_equal(model.state_dict(), receiver.state_dict())
    ropts.load_state_dict(state["optimizer"])
    assert_state_equal(opts.state_dict(), ropts.state_dict())


def test_a_receiver_of_another_dtype_gets_the_cast_values(tmp_path):
    source = {"w": torch.randn(16, 8), "b": torch.randn(8)}
    dcp.save(source, checkpoint_id=str(tmp_path))
    receiver = {"w": torch.zeros(16, 8, dtype=torch.bfloat16), "b": torch.zeros(8, dtype=torch.bfloat16)}
    reader = _load(tmp_path, receiver)
    assert reader.direct_reads == 0
    assert_state_equal({k: v.to(torch.bfloat16) for k, v in source.items()}, receiver)


def test_a_strided_receiver_takes_the_general_path(tmp_path):
    source = {"w": torch.randn(8, 4)}
    dcp.save(source, checkpoint_id=str(tmp_path))
    receiver = {"w": torch.zeros(4, 8).t()}  # same shape, column-major
    reader = _load(tmp_path, receiver)
    assert reader.direct_reads == 0
    assert torch.equal(receiver["w"], source["w"])


def test_a_strided_stored_tensor_takes_the_general_path(tmp_path):
    """DCP stores a transposed tensor as is (its storage is exactly its bytes): the pickle is
    not the plain one, so its bytes are not in row-major order and must not be read raw."""
    stored = torch.arange(32, dtype=torch.float32).reshape(4, 8).t()
    dcp.save({"w": stored, "plain": torch.ones(3)}, checkpoint_id=str(tmp_path))
    receiver = {"w": torch.zeros(8, 4), "plain": torch.zeros(3)}
    reader = _load(tmp_path, receiver)
    assert reader.direct_reads == 1  # only "plain"
    assert torch.equal(receiver["w"], stored) and torch.equal(receiver["plain"], torch.ones(3))


def test_part_of_a_stored_tensor_is_read_at_its_offset(tmp_path):
    """Resharding reads a slice of a stored chunk: rows 4..7 of an 8-row tensor, as a DTensor
    shard would ask for. Built here with the planner DCP uses for that."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    source = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    dcp.save({"w": source}, checkpoint_id=str(tmp_path))

    class RowsPlanner(SafeLoadPlanner):
        """Asks for rows 4..7 only, into a 4-row target (what a shard's planner produces)."""

        def create_local_plan(self):
            from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

            md = self.metadata.state_dict_metadata["w"]
            wanted = ChunkStorageMetadata(offsets=torch.Size([4, 0]), sizes=torch.Size([4, 8]))
            items = create_read_items_for_chunk_list("w", md, [wanted])
            from torch.distributed.checkpoint.planner import LoadPlan

            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            return self.target

    planner = RowsPlanner()
    planner.target = torch.zeros(4, 8)
    reader = SafeFileSystemReader(str(tmp_path))
    dcp.load({"w": torch.zeros(8, 8)}, storage_reader=reader, planner=planner)
    assert reader.direct_reads == 1
    assert torch.equal(planner.target, source[4:])


def test_saves_skip_torch_zip_crcs_and_restore_the_setting(tmp_path):
    """The manifest's CRC32 replaces torch.save's per-record zip CRC32 during our saves; the
    process-wide torch setting is back to what it was afterwards, and TorchTitan-style plain
    DCP/torch.load reading of the step still works."""
    from torch.serialization import get_crc32_options

    from checkpointing.backends.dcp import zip_record_crc32_off

    assert get_crc32_options() is True
    with zip_record_crc32_off():
        assert get_crc32_options() is False
        with zip_record_crc32_off():  # nested / concurrent saves
            assert get_crc32_options() is False
        assert get_crc32_options() is False
    assert get_crc32_options() is True

    model = build_titan_model(seed=0)
    cfg = CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
        c.save(1)
    assert get_crc32_options() is True
    receiver = build_titan_model(seed=1)
    state = receiver.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint" / "step-1"))  # torch's own reader
    assert_state_equal(model.state_dict(), receiver.state_dict())
