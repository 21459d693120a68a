"""The ``[checkpoint]`` section: TorchTitan's Checkpoint config plus a backend selector.

Two ways in, one result:

* TorchTitan's own ``ConfigManager`` reads a TOML whose ``[job] custom_config_module`` names this
  module (or any module whose ``JobConfig`` extends ours): it merges :class:`JobConfig` into its
  own, nested tables included (``[checkpoint.memory]``).
* :func:`load_job_config` does the same parse, but first checks every key and type against the
  dataclasses and turns every mistake into a :class:`~checkpointing.errors.ConfigError` that
  names the key and the allowed values (the CLIs print it and exit 2).
"""

from __future__ import annotations

import difflib
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from torchtitan.config import Checkpoint as TitanCheckpoint

from .errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
VERIFY_MODES = ("checksum", "size", "off")


@dataclass
class DCPOptions:
    """``[checkpoint.dcp]``: torch.distributed.checkpoint on disk."""

    thread_count: int = 1
    """Writer threads per rank (FileSystemWriter ``thread_count``)."""
    single_file_per_rank: bool = True
    """One ``__R_0.distcp`` file per rank, as TorchTitan writes them."""


@dataclass
class HFOptions:
    """``[checkpoint.hf]``: Hugging Face safetensors model directories."""

    max_shard_size_mb: int = 2048
    """Largest ``model-XXXXX-of-YYYYY.safetensors`` shard, in MiB."""
    save_extras: bool = True
    """Keep optimizer / lr / dataloader / train state beside the safetensors (a DCP sidecar) so an
    ``hf`` checkpoint resumes training; model-only steps are plain HF directories either way."""


@dataclass
class MemoryOptions:
    """``[checkpoint.memory]``: in-memory handoff of model weights (no files)."""

    transport: Literal["local", "shm"] = "local"
    """``local``: publisher and reader in one process. ``shm``: another process on this host."""
    channel: str = "default"
    """Name both sides agree on; one channel carries one model's versions."""
    bucket_size_mb: int = 256
    """Copy granularity: bounds the transient memory of a publish or a load."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the published snapshot; ``auto`` keeps the publisher's (the receiver still casts
    into its own tensors)."""
    keep_versions: int = 2
    """Snapshots held at once; with 2 a reader copies one while the next is written."""


@dataclass
class CheckpointConfig(TitanCheckpoint):
    """TorchTitan 0.2.2's ``[checkpoint]`` keys (same names, same defaults) plus ours."""

    backend: str = "dcp"
    """Registered backend name: ``dcp``, ``hf``, ``memory`` or a plugin's."""
    verify: Literal["checksum", "size", "off"] = "checksum"
    """What load checks against the step's manifest before reading any tensor."""
    dcp: DCPOptions = field(default_factory=DCPOptions)
    hf: HFOptions = field(default_factory=HFOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)

    def __post_init__(self) -> None:
        validate_checkpoint_config(self, "checkpoint")


@dataclass
class JobConfig:
    """What ``[job] custom_config_module = "checkpointing.config"`` adds to TorchTitan's JobConfig."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_checkpoint_config(cfg: Any, prefix: str = "checkpoint") -> None:
    """Check one ``[checkpoint]``-shaped config (ours, TorchTitan's, or a merged one)."""
    check_types(cfg, prefix)
    backend = getattr(cfg, "backend", "dcp")
    from .backend import BackendNotFoundError, available_backends, get_backend_factory

    try:
        get_backend_factory(backend)
    except BackendNotFoundError:
        raise ConfigError(
            f"{prefix}.backend = {backend!r} is not a registered backend; allowed: "
            f"{', '.join(available_backends())}"
        ) from None
    if cfg.async_mode.lower() not in ASYNC_MODES:
        raise ConfigError(f"{prefix}.async_mode = {cfg.async_mode!r}; allowed: {', '.join(ASYNC_MODES)}")
    if cfg.export_dtype not in DTYPE_NAMES:
        raise ConfigError(f"{prefix}.export_dtype = {cfg.export_dtype!r}; allowed: {', '.join(DTYPE_NAMES)}")
    if cfg.interval < 1:
        raise ConfigError(f"{prefix}.interval = {cfg.interval}; it must be >= 1")
    if cfg.keep_latest_k < 0 or cfg.keep_latest_k == 1:
        raise ConfigError(
            f"{prefix}.keep_latest_k = {cfg.keep_latest_k}; allowed: 0 (keep all) or >= 2 "
            "(the newest step may still be in flight while the next one is written)"
        )
    if cfg.load_step < -1:
        raise ConfigError(f"{prefix}.load_step = {cfg.load_step}; allowed: -1 (newest) or a step >= 0")
    if cfg.initial_load_in_hf and not cfg.initial_load_model_only:
        raise ConfigError(
            f"{prefix}.initial_load_in_hf = true needs {prefix}.initial_load_model_only = true: "
            "a Hugging Face directory holds only model weights"
        )
    mem = getattr(cfg, "memory", None)
    if mem is not None:
        if mem.bucket_size_mb < 1:
            raise ConfigError(f"{prefix}.memory.bucket_size_mb = {mem.bucket_size_mb}; it must be >= 1")
        if mem.keep_versions < 1:
            raise ConfigError(f"{prefix}.memory.keep_versions = {mem.keep_versions}; it must be >= 1")
        if not mem.channel or "/" in mem.channel or mem.channel.startswith("."):
            raise ConfigError(
                f"{prefix}.memory.channel = {mem.channel!r}; use letters, digits, '-', '_' (no '/')"
            )
    hf = getattr(cfg, "hf", None)
    if hf is not None and hf.max_shard_size_mb < 1:
        raise ConfigError(f"{prefix}.hf.max_shard_size_mb = {hf.max_shard_size_mb}; it must be >= 1")


def _type_ok(value: Any, tp: Any) -> tuple[bool, str]:
    """(ok, description of the allowed type) for the annotation shapes configs use."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, "any"
    if origin is Literal:
        allowed = typing.get_args(tp)
        return value in allowed, "one of " + ", ".join(repr(a) for a in allowed)
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, a) for a in typing.get_args(tp)]
        return any(ok for ok, _ in results), " or ".join(d for _, d in results)
    if tp is type(None):
        return value is None, "none"
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            return False, f"a list of {getattr(inner, '__name__', inner)}"
        return all(_type_ok(v, inner)[0] for v in value), f"a list of {getattr(inner, '__name__', inner)}"
    if origin is dict:
        return isinstance(value, dict), "a table"
    if tp is bool:
        return isinstance(value, bool), "a boolean (true/false)"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if tp is str:
        return isinstance(value, str), "a string"
    if isinstance(tp, type):
        return isinstance(value, tp), tp.__name__
    return True, str(tp)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a foreign annotation we cannot resolve: skip type checks for it
        return {}


def check_types(obj: Any, prefix: str) -> None:
    """Recursively check a dataclass instance's values against its annotations."""
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        tp = hints.get(f.name)
        key = f"{prefix}.{f.name}"
        if is_dataclass(value):
            check_types(value, key)
            continue
        if tp is None:
            continue
        if is_dataclass(tp) and not is_dataclass(value):
            raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
        ok, allowed = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key} = {value!r} has the wrong type or value; allowed: {allowed}")


def _check_keys(cls: type, data: dict[str, Any], prefix: str) -> None:
    """Unknown TOML keys are errors, with the nearest valid name suggested."""
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}{hint}; allowed keys in [{prefix or 'top level'}]: "
                + ", ".join(sorted(names))
            )
        tp = hints.get(key)
        if tp is not None and is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table ([{path}]), got {value!r}")
            _check_keys(tp, value, path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a TOML file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def merged_config_class(module_path: str) -> type:
    """TorchTitan's JobConfig merged with ``module_path``'s JobConfig, as ConfigManager does it."""
    import importlib

    from torchtitan.config import ConfigManager
    from torchtitan.config import JobConfig as TitanJobConfig

    try:
        custom = importlib.import_module(module_path).JobConfig
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"job.custom_config_module = {module_path!r} cannot be imported: {e}") from None
    return ConfigManager._merge_configs(TitanJobConfig, custom)


def load_job_config(
    path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    default_module: str = "checkpointing.config",
) -> Any:
    """Parse a TorchTitan TOML job file (+ ``--section.key=value`` overrides) into a validated
    merged JobConfig. ``[job] custom_config_module`` in the file wins over ``default_module``."""
    from torchtitan.config import ConfigManager

    args = list(overrides)
    toml: dict[str, Any] = {}
    if path is not None:
        toml = read_toml(path)
        args = ["--job.config_file", os.fspath(path), *args]
    job = toml.get("job", {})
    module = job.get("custom_config_module") if isinstance(job, dict) else None
    module = module or default_module
    if not any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in args):
        args.append(f"--job.custom_config_module={module}")
    cls = merged_config_class(module)
    _check_keys(cls, toml, "")
    _check_overrides(cls, overrides)
    try:
        cfg = ConfigManager().parse_args(args)
    except ConfigError:
        raise
    except SystemExit as e:  # tyro prints its own usage message on a bad override
        raise ConfigError(f"bad command-line override in {list(overrides)} (exit {e.code}); see the message above") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config {os.fspath(path) if path else '(defaults)'}: {e}") from None
    check_types(cfg, "")
    return cfg


def _check_overrides(cls: type, overrides: list[str] | tuple[str, ...]) -> None:
    """Name an unknown ``--a.b`` override ourselves: tyro's message buries it in a usage dump."""
    for arg in overrides:
        if not arg.startswith("--"):
            continue
        dotted = arg[2:].split("=", 1)[0].replace("-", "_")
        if dotted.startswith("no_") or ".no_" in dotted:
            dotted = dotted.replace("no_", "", 1) if dotted.startswith("no_") else dotted.replace(".no_", ".", 1)
        parts = dotted.split(".")
        node: Any = cls
        for i, part in enumerate(parts):
            if not is_dataclass(node):
                break
            names = {f.name: f for f in fields(node)}
            if part not in names:
                where = ".".join(parts[:i]) or "top level"
                close = difflib.get_close_matches(part, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"unknown override --{'.'.join(parts)}{hint}; allowed keys in [{where}]: {', '.join(sorted(names))}"
                )
            node = _hints(node).get(part)
