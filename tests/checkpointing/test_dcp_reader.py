"""The DCP reader's one-copy path: tensor bytes go straight from the file into the receiver, and
every case it does not handle (another dtype, a strided target or stored tensor) takes DCP's
general path with the same result."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from checkpointing import CheckpointConfig, Checkpointer
from checkpointing.backends.dcp import SafeFileSystemReader, SafeLoadPlanner, read_metadata
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


def _record_crcs(blob: bytes) -> dict[str, int]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {info.filename.split("/", 1)[-1]: info.CRC for info in z.infolist()}


def test_our_saves_skip_zip_crcs_without_touching_anyone_elses_torch_save(tmp_path):
    """Our DCP items carry no per-record zip CRC32 (the manifest digest covers those bytes),
    and nothing process-wide changes for it: another thread's torch.save, running while our
    saves run, still writes CRCs. TorchTitan's stock DCP reader and torch.load read our files."""
    import io
    import sys
    import threading
    import zlib

    from torch.serialization import get_crc32_options

    model = torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.randn(64, 64)) for i in range(300)})
    cfg = CheckpointConfig(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    saving, checked, bad = threading.Event(), [], []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the other thread in often, as a busy process would

    def other_thread() -> None:
        tensor = torch.arange(4096, dtype=torch.float32)
        saving.wait(60)
        while saving.is_set():
            buffer = io.BytesIO()
            torch.save(tensor, buffer)
            crcs = _record_crcs(buffer.getvalue())
            ok = crcs["data/0"] == zlib.crc32(tensor.numpy().tobytes())
            (checked if ok else bad).append(crcs["data/0"])

    other = threading.Thread(target=other_thread)
    other.start()
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as c:
        saving.set()
        for step in range(1, 6):
            c.save(step)
        saving.clear()
    other.join(60)
    sys.setswitchinterval(switch)
    assert checked and not bad, f"another thread's torch.save lost its CRCs during our save ({len(bad)} of {len(checked) + len(bad)})"
    assert get_crc32_options() is True

    step_dir = tmp_path / "checkpoint" / "step-5"
    metadata = read_metadata(str(step_dir))
    for info in metadata.storage_data.values():
        blob = (step_dir / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
        assert _record_crcs(blob)["data/0"] == 0  # our item: no record CRC
        torch.load(io.BytesIO(blob), weights_only=True)  # torch.load reads it as any save
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(step_dir))  # torch's own reader, as TorchTitan's loads it
    assert_state_equal(model.state_dict(), state)
