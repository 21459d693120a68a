"""The ``[checkpoint]`` section in a TorchTitan TOML job file, read by TorchTitan's own
ConfigManager and by ``load_job_config`` alike; every mistake is a ConfigError that names the
key (or file) and what is allowed."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from checkpointing import BackendNotFoundError, CheckpointConfig, Checkpointer, ConfigError, load_job_config
from checkpointing.backends.dcp import DCPOptions
from checkpointing.backends.memory import MemoryOptions
from tests.helpers import build_titan_model

JOB = """
[job]
dump_folder = "{dump}"
custom_config_module = "checkpointing.config"

[checkpoint]
enable = true
backend = "dcp"
interval = 5
keep_latest_k = 3
verify = "size"
exclude_from_loading = ["dataloader"]

[checkpoint.dcp]
thread_count = 2

[checkpoint.memory]
transport = "shm"
bucket_size_mb = 64
"""


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(dump=tmp_path / "out"))
    return path


def _write(tmp_path, body: str, name: str = "bad.toml"):
    path = tmp_path / name
    path.write_text('[job]\ncustom_config_module = "checkpointing.config"\n' + textwrap.dedent(body))
    return path


def _checkpoint_dict(cfg) -> dict:
    return dataclasses.asdict(cfg.checkpoint)


# ------------------------------------------------------------------ parsing
def test_torchtitans_own_config_manager_parses_our_section(job_file):
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(["--job.config_file", str(job_file)])
    ck = cfg.checkpoint
    assert (ck.backend, ck.interval, ck.keep_latest_k, ck.verify) == ("dcp", 5, 3, "size")
    assert ck.dcp == DCPOptions(thread_count=2)
    assert (ck.memory.transport, ck.memory.bucket_size_mb, ck.memory.channel) == ("shm", 64, "default")
    assert ck.hf.max_shard_size_mb == 2048  # a table absent from the file keeps its defaults
    assert ck.exclude_from_loading == ["dataloader"]
    assert cfg.job.dump_folder.endswith("out")  # TorchTitan's own sections still parse


def test_torchtitan_accepts_our_overrides(job_file):
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(
        ["--job.config_file", str(job_file), "--checkpoint.backend=hf", "--checkpoint.memory.transport=local"]
    )
    assert cfg.checkpoint.backend == "hf" and cfg.checkpoint.memory.transport == "local"


def test_our_loader_gives_the_same_result_as_torchtitans(job_file):
    from torchtitan.config import ConfigManager

    theirs = ConfigManager().parse_args(["--job.config_file", str(job_file), "--checkpoint.backend=hf"])
    ours = load_job_config(job_file, ["--checkpoint.backend=hf"])
    assert ours.checkpoint.backend == "hf"
    assert _checkpoint_dict(ours) == _checkpoint_dict(theirs)


def test_overrides_in_both_spellings(job_file):
    cfg = load_job_config(job_file, ["--checkpoint.interval", "7", "--checkpoint.memory.bucket-size-mb=8",
                                     "--checkpoint.no-enable"])
    assert (cfg.checkpoint.interval, cfg.checkpoint.memory.bucket_size_mb, cfg.checkpoint.enable) == (7, 8, False)


def test_defaults_without_a_file_match_torchtitans_checkpoint_defaults():
    from torchtitan.config import Checkpoint as TitanCheckpoint

    cfg = load_job_config(None)
    ours, theirs = dataclasses.asdict(cfg.checkpoint), dataclasses.asdict(TitanCheckpoint())
    assert {k: ours[k] for k in theirs} == theirs
    assert (ours["backend"], ours["verify"]) == ("dcp", "checksum")


def test_a_torchtitan_parsed_config_drives_a_checkpointer(job_file, tmp_path):
    """The merged config TorchTitan builds is not our class; the Checkpointer takes it as is."""
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(["--job.config_file", str(job_file), "--checkpoint.interval=1"])
    model = build_titan_model()
    with Checkpointer(model_parts=[model], checkpoint_config=cfg.checkpoint, base_folder=cfg.job.dump_folder) as ckpt:
        ckpt.save(1)
        assert ckpt.backend.steps() == [1]
        assert ckpt.load() and ckpt.loaded_step == 1


def test_a_torchtitan_parsed_unknown_backend_is_refused_by_the_checkpointer(job_file):
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(["--job.config_file", str(job_file), "--checkpoint.backend=nosuch"])
    with pytest.raises(ConfigError, match=r"checkpoint.backend = 'nosuch'.*allowed: .*dcp"):
        Checkpointer(model_parts=[build_titan_model()], checkpoint_config=cfg.checkpoint)


# ------------------------------------------------------------------ errors
def test_unknown_backend_in_toml_lists_the_registered_ones(tmp_path):
    path = _write(tmp_path, '[checkpoint]\nbackend = "orbax"\n')
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    msg = str(info.value)
    assert "checkpoint.backend = 'orbax'" in msg and str(path) in msg
    for name in ("dcp", "hf", "memory"):
        assert name in msg


def test_unknown_backend_override(job_file):
    with pytest.raises(ConfigError, match=r"checkpoint.backend = 'orbax'.*allowed: .*dcp.*overrides --checkpoint.backend=orbax"):
        load_job_config(job_file, ["--checkpoint.backend=orbax"])


@pytest.mark.parametrize(
    "body, key, suggestion",
    [
        ("[checkpoint]\nintervall = 3\n", "checkpoint.intervall", "interval"),
        ("[checkpoint.memory]\ntransprot = 'shm'\n", "checkpoint.memory.transprot", "transport"),
        ("[checkpoint.dcp]\nthread_cout = 2\n", "checkpoint.dcp.thread_cout", "thread_count"),
        ("[checkpointt]\nenable = true\n", "checkpointt", "checkpoint"),
    ],
)
def test_unknown_key_names_it_suggests_and_lists_allowed(tmp_path, body, key, suggestion):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    msg = str(info.value)
    assert repr(key) in msg and f"did you mean {suggestion!r}" in msg and str(path) in msg
    assert "allowed keys" in msg


def test_unknown_override_key_is_named(job_file):
    with pytest.raises(ConfigError, match=r"--checkpoint.memory.bucket_sise_mb.*did you mean 'bucket_size_mb'"):
        load_job_config(job_file, ["--checkpoint.memory.bucket_sise_mb=3"])


@pytest.mark.parametrize(
    "body, message",
    [
        ("[checkpoint]\ninterval = 'often'\n", r"checkpoint.interval = 'often'.*allowed: an integer"),
        ("[checkpoint]\nenable = 'yes'\n", r"checkpoint.enable = 'yes'.*allowed: a boolean"),
        ("[checkpoint.memory]\nbucket_size_mb = 1.5\n", r"checkpoint.memory.bucket_size_mb = 1.5.*an integer"),
        ("[checkpoint.memory]\ntransport = 'tcp'\n", r"checkpoint.memory.transport = 'tcp'.*'local', 'shm'"),
        ("[checkpoint]\nasync_mode = 'sometimes'\n", r"checkpoint.async_mode.*'disabled', 'async', 'async_with_pinned_mem'"),
        ("[checkpoint]\nverify = 'md5'\n", r"checkpoint.verify = 'md5'.*'checksum', 'size', 'off'"),
        ("[checkpoint]\nexclude_from_loading = 'optimizer'\n", r"checkpoint.exclude_from_loading.*a list of str"),
        ("[checkpoint]\nmemory = 3\n", r"checkpoint.memory .*must be a table"),
        ("[checkpoint]\nkeep_latest_k = 1\n", r"checkpoint.keep_latest_k = 1; allowed: 0 .* or >= 2"),
        ("[checkpoint.dcp]\nthread_count = 0\n", r"checkpoint.dcp.thread_count = 0; allowed: 1 to 64"),
        ("[checkpoint.dcp]\nthread_count = 300\n", r"checkpoint.dcp.thread_count = 300; allowed: 1 to 64"),
        ("[checkpoint.memory]\nchannel = '../x'\n", r"checkpoint.memory.channel = '../x'; allowed: .*letters"),
    ],
)
def test_wrong_type_or_value_in_toml_names_key_and_allowed(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(_write(tmp_path, body))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--checkpoint.interval=often", r"checkpoint.interval has the wrong type.*an integer"),
        ("--checkpoint.memory.transport=tcp", r"checkpoint.memory.transport .*'local', 'shm'"),
        ("--checkpoint.enable=maybe", r"checkpoint.enable .*a boolean"),
        ("--checkpoint.keep_latest_k=1", r"checkpoint.keep_latest_k = 1"),
    ],
)
def test_wrong_override_values_name_key_and_allowed(job_file, override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_job_config(job_file, [override])
    assert "usage" not in capsys.readouterr().err.lower()  # our message, not tyro's usage dump


def test_bad_toml_names_the_file_and_position(tmp_path):
    path = _write(tmp_path, "[checkpoint\nbackend = 'dcp'\n")
    with pytest.raises(ConfigError, match=rf"{path}.*not valid TOML.*line 3"):
        load_job_config(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file not found: {tmp_path / 'nope.toml'}"):
        load_job_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_job_config(tmp_path)


def test_unimportable_custom_config_module(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\ncustom_config_module = "no_such_module_here"\n')
    with pytest.raises(ConfigError, match="job.custom_config_module = 'no_such_module_here'"):
        load_job_config(path)


# ------------------------------------------------------------------ from Python
def test_python_construction_is_validated_too():
    with pytest.raises(BackendNotFoundError.__mro__[1], match="checkpoint.backend = 'nosuch'"):
        CheckpointConfig(backend="nosuch")
    with pytest.raises(ConfigError, match="checkpoint.memory.bucket_size_mb"):
        CheckpointConfig(memory=MemoryOptions(bucket_size_mb=0))
    with pytest.raises(ConfigError, match="checkpoint.dcp must be a table"):
        CheckpointConfig(dcp=3)
    with pytest.raises(ConfigError, match="checkpoint.initial_load_in_hf = true needs"):
        CheckpointConfig(initial_load_in_hf=True, initial_load_model_only=False)


# ------------------------------------------------------------------ the reference stays complete
def test_docs_config_md_lists_every_key_in_its_table():
    """docs/config.md documents every [checkpoint] key (nested tables included), each in the
    table of its own section, so a new key cannot ship undocumented."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    sections = {}
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip().strip("`")] = body
    for f in dataclasses.fields(CheckpointConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            table = f"[checkpoint.{f.name}]"
            assert table in sections, f"docs/config.md has no section {table}"
            for g in dataclasses.fields(default):
                assert f"| `{g.name}` |" in sections[table], f"{table} {g.name} is not documented"
        else:
            assert f"| `{f.name}` |" in sections["[checkpoint]"], f"[checkpoint] {f.name} is not documented"
