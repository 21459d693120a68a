"""The seam itself: specs in the registry, options tables from the backends' own dataclasses,
optional capabilities found by type, the stats and log lines every load and save leaves, and
the layering rules (no backend names above the seam, nothing heavy on import)."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import pathlib
import subprocess
import sys

import pytest
import torch

from checkpointing import (
    BackendSpec,
    Capabilities,
    CheckpointConfig,
    Checkpointer,
    CleansPartials,
    ConfigError,
    Inspects,
    ReadsExternal,
    WritesExternal,
    available_backends,
    backend_spec,
    register_backend,
)
from checkpointing.backend import unregister_backend
from tests.helpers import build_titan_model

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "checkpointing"
REPO = SRC.parents[1]


# ------------------------------------------------------------------ the registry
def test_builtin_specs_carry_options_and_capabilities_without_building_a_backend():
    for name in ("dcp", "hf", "memory"):
        spec = backend_spec(name)
        assert spec.name == name and dataclasses.is_dataclass(spec.options) and spec.summary
    assert backend_spec("memory").capabilities == Capabilities(persistent=False, non_tensor_state=False, cross_process=True)
    assert backend_spec("dcp").capabilities.persistent and backend_spec("hf").capabilities.non_tensor_state


def test_every_registered_backend_has_a_table_in_the_config():
    names = {f.name for f in dataclasses.fields(CheckpointConfig)}
    for name in available_backends():
        if backend_spec(name).options is not None:
            assert name in names, name


def test_register_backend_takes_a_spec_and_refuses_a_silent_replacement():
    class Nothing:
        capabilities = Capabilities(persistent=False, non_tensor_state=False)

    spec = BackendSpec("_seam_probe", Nothing, Nothing.capabilities)
    register_backend(spec)
    try:
        assert backend_spec("_seam_probe") is spec
        with pytest.raises(ValueError, match="already registered"):
            register_backend(BackendSpec("_seam_probe", Nothing, Nothing.capabilities))
        with pytest.raises(TypeError, match="BackendSpec"):
            register_backend(Nothing)  # type: ignore[arg-type]
    finally:
        unregister_backend("_seam_probe")
    with pytest.raises(ValueError, match="identifier"):
        BackendSpec("no such", Nothing, Nothing.capabilities)


def test_optional_capabilities_are_found_by_type(tmp_path):
    dcp = Checkpointer(model_parts=[build_titan_model()], checkpoint_config=CheckpointConfig(enable=True), base_folder=str(tmp_path))
    try:
        backend = dcp.backend
        assert isinstance(backend, (CleansPartials, ReadsExternal, WritesExternal, Inspects))
        assert all(isinstance(backend, p) for p in (CleansPartials, ReadsExternal, WritesExternal, Inspects))
    finally:
        dcp.close()


def test_backend_option_bounds_are_named_from_python_too():
    from checkpointing.backends.memory import MemoryOptions

    with pytest.raises(ConfigError, match=r"checkpoint.memory.keep_versions = 0; allowed: 1 to 63"):
        CheckpointConfig(memory=MemoryOptions(keep_versions=0))


# ------------------------------------------------------------------ stats and log lines
def test_saves_and_loads_log_step_backend_folder_seconds_and_bytes(tmp_path, caplog):
    model = build_titan_model()
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    with caplog.at_level(logging.INFO, logger="checkpointing.manager"):
        with Checkpointer(model_parts=[model], checkpoint_config=CheckpointConfig(enable=True), base_folder=str(tmp_path)) as c:
            c.save(3, last_step=True)
            assert c.stats.saves == 1 and c.stats.last_save_step == 3 and c.stats.last_save_bytes == nbytes
            assert c.load() and c.stats.last_load_path == "copy" and c.stats.last_load_bytes == nbytes
    lines = [r.getMessage() for r in caplog.records]
    folder = str(tmp_path / "checkpoint")
    assert any(m.startswith("Finished saving the checkpoint step 3 (backend dcp, " + folder) and "seconds" in m
               and "KiB" in m for m in lines), lines
    assert any(m.startswith("Finished loading the checkpoint step 3 (backend dcp, " + folder + ", copy)") for m in lines), lines


def test_clear_forgets_every_step(tmp_path):
    with Checkpointer(model_parts=[build_titan_model()], checkpoint_config=CheckpointConfig(enable=True, interval=1),
                      base_folder=str(tmp_path)) as c:
        c.save(1)
        c.save(2)
        c.clear()
        assert c.latest_step() == -1 and not c.load()


# ------------------------------------------------------------------ ckpt backends
@pytest.mark.parametrize("backend", ["dcp", "hf"])
def test_a_sink_load_reads_straight_into_the_scratch_tensors(backend, tmp_path, monkeypatch):
    """A sink's transfer tensors are scratch (StepState.model_is_scratch): the file backends read
    into them without staging a second copy. Staging is made to fail: the sink load still works,
    while a load into a live model (which must stage) hits it."""
    import importlib

    from checkpointing import TensorSpec

    model = build_titan_model(seed=0)
    cfg = CheckpointConfig(enable=True, backend=backend, folder="c", interval=1)
    with Checkpointer(model_parts=[model], checkpoint_config=cfg, base_folder=str(tmp_path)) as w:
        w.save(1)

    def no_staging(tree):
        raise AssertionError("staged a copy")

    monkeypatch.setattr(importlib.import_module(backend_spec(backend).factory.__module__), "stage", no_staging)
    received = {}

    class Sink:
        def specs(self):
            return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

        def receive(self, step, tensors):
            received.update((k, v.clone()) for k, v in tensors)

    reader = dataclasses.replace(cfg, load_only=True)
    with Checkpointer(checkpoint_config=reader, base_folder=str(tmp_path), sink=Sink()) as r:
        assert r.load() and r.stats.last_load_path == "sink"
    assert all(torch.equal(received[k], v) for k, v in model.state_dict().items()) and received
    with Checkpointer(model_parts=[build_titan_model(seed=1)], checkpoint_config=reader, base_folder=str(tmp_path)) as m:
        with pytest.raises(AssertionError, match="staged a copy"):
            m.load()


def test_ckpt_backends_lists_capabilities_and_documented_options(capsys):
    from checkpointing.cli import main

    assert main(["backends", "--json"]) == 0
    listed = {b["name"]: b for b in json.loads(capsys.readouterr().out)}
    assert {"dcp", "hf", "memory"} <= set(listed)
    memory = {row["name"]: row for row in listed["memory"]["options"]}
    assert memory["transport"]["type"] == "'local' | 'shm'" and memory["transport"]["default"] == "'local'"
    assert "another process on this host" in memory["transport"]["doc"]
    assert listed["hf"]["capabilities"]["non_tensor_state"] is True
    assert main(["backends"]) == 0
    assert "[checkpoint.dcp]" in capsys.readouterr().out


# ------------------------------------------------------------------ layering
BACKEND_NAMES = {"dcp", "hf", "memory", "shm", "local", "dist"}


def _string_constants_outside_docstrings(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("module", ["manager.py", "cli.py", "convert.py", "receiver.py", "state.py"])
def test_no_backend_is_named_above_the_seam(module):
    named = [(line, s) for line, s in _string_constants_outside_docstrings(SRC / module) if s in BACKEND_NAMES]
    assert not named, f"{module} names backends: {named}"


def test_the_layering_check_would_catch_a_backend_name():
    probe = pathlib.Path(__file__).with_name("_probe_module.txt")
    probe.write_text('"""doc: dcp is fine here"""\nx = 1 if name == "hf" else 2\n')
    try:
        assert _string_constants_outside_docstrings(probe) == [(2, "hf")]
    finally:
        probe.unlink()


def test_import_checkpointing_loads_neither_torch_nor_torchtitan():
    code = "import sys, checkpointing; print(sorted(m for m in ('torch', 'torchtitan', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ckpt_help_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom checkpointing.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


# ------------------------------------------------------------------ private APIs, one place
def test_compat_symbols_behave_as_this_library_needs():
    from checkpointing import _compat

    merged = _compat.merge_job_configs(*_titan_and_ours())
    assert {"checkpoint", "job"} <= {f.name for f in dataclasses.fields(merged)}
    src = {"a": torch.arange(6.0).reshape(2, 3), "b": 7}
    staged = _compat.cpu_state_dict_like(src, pin_memory=False)
    _compat.copy_state_dict(src, staged, non_blocking=False)
    assert torch.equal(staged["a"], src["a"]) and staged["a"].data_ptr() != src["a"].data_ptr()
    assert _compat.flatten_state_dict({"x": {"y": 1}}) == {"x.y": 1}
    assert {"llama3", "qwen3"} <= set(_compat.torchtitan_model_names())


def test_compat_save_without_record_crc_is_torch_save_minus_the_crcs():
    """Same bytes as torch.save but for the zip records' CRC32 fields (zero), torch.load reads
    it, and the process-wide torch.save setting is never touched."""
    import io
    import zipfile

    from torch.serialization import get_crc32_options

    from checkpointing import _compat

    tensor = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    ours, theirs = io.BytesIO(), io.BytesIO()
    _compat.save_without_record_crc(tensor, ours)
    torch.save(tensor, theirs)
    assert get_crc32_options() is True
    assert torch.equal(torch.load(io.BytesIO(ours.getvalue()), weights_only=True), tensor)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert [i.header_offset for i in a.infolist()] == [i.header_offset for i in b.infolist()]
        data = [i for i in a.infolist() if i.filename.endswith("data/0")]
        assert data and all(i.CRC == 0 for i in data)
        assert all(j.CRC != 0 for j in b.infolist() if j.filename.endswith("data/0"))
    parts = _compat.dcp_storage_writer_parts()
    assert parts.suffix == ".distcp" and callable(parts.split_by_size_and_type) and callable(parts.item_size)
    assert parts.StorageInfo("f", 0, 1, transform_descriptors=None).relative_path == "f"


def test_compat_dtensor_box_on_a_one_rank_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from checkpointing import _compat

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
        assert _compat.local_shard_box(dt) == ((4, 3), (0, 0))
        assert _compat.local_shard_slices(dt) == (slice(0, 4), slice(0, 3))
    finally:
        if owned:
            dist.destroy_process_group()


def _titan_and_ours():
    from torchtitan.config import JobConfig as TitanJobConfig

    from checkpointing import JobConfig

    return TitanJobConfig, JobConfig


def test_every_private_name_is_used_only_through_compat():
    """A new private torch/TorchTitan import outside _compat fails here, naming the file."""
    allowed = {"_compat.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "torchtitan"):
                private = [p for p in node.module.split(".") if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.module} {private}")
    assert not offenders, "\n".join(offenders)
