"""The ``[checkpoint]`` section: TorchTitan's Checkpoint config plus a backend selector.

Two ways in, one result:

* TorchTitan's own ``ConfigManager`` reads a TOML whose ``[job] custom_config_module`` names this
  module (or any module whose ``JobConfig`` extends ours): it merges :class:`JobConfig` into its
  own, nested tables included (``[checkpoint.memory]``).
* :func:`load_job_config` does the same parse, but first checks every key and type against the
  dataclasses and turns every mistake into a :class:`~checkpointing.errors.ConfigError` that
  names the key and the allowed values (the CLIs print it and exit 2).
"""

# No ``from __future__ import annotations`` here: TorchTitan's ConfigManager merges these
# dataclasses by their *field types* (``is_dataclass(f.type)``) and tyro resolves them in a
# generated class, so the annotations must be real types, not strings.
import difflib
import os
import re
import sys
import threading
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Literal

from torchtitan.config import Checkpoint as TitanCheckpoint

from .backend import BackendSpec, ValidatedOptions, available_backends, backend_spec, loadable_specs
from .dtypes import FLOAT_DTYPE_NAMES as DTYPE_NAMES
from .errors import BackendNotFoundError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
LOAD_MODES = ("auto", "copy")


@dataclass
class CheckpointSection(TitanCheckpoint):
    """TorchTitan 0.2.2's ``[checkpoint]`` keys (same names, same defaults) plus the keys every
    backend shares. :data:`CheckpointConfig` adds one table per registered backend."""

    backend: str = "dcp"
    """Registered backend name: ``dcp``, ``hf``, ``memory`` or a plugin's (``ckpt backends``)."""
    verify: Literal["checksum", "size", "off"] = "checksum"
    """What load checks against the step's manifest before reading any tensor."""
    load_mode: Literal["auto", "copy"] = "auto"
    """How a reader (``load_only``) takes a version from a backend that can lend it without a
    copy (``memory``): ``auto`` adopts the published snapshot as the model's weights when the
    receiver fits it exactly (same dtypes, plain tensors), else copies; ``copy`` always copies
    into the receiver's own tensors."""

    def __post_init__(self) -> None:
        validate_checkpoint_config(self, "checkpoint")


def checkpoint_config_class(specs: list[BackendSpec]) -> type:
    """``[checkpoint]`` with a ``[checkpoint.<name>]`` table for every backend in ``specs``
    that declares options: what both TorchTitan's ConfigManager and :func:`load_job_config`
    parse, so a plugin's table is read exactly like a built-in one."""
    tables = [(s.name, s.options, field(default_factory=s.options)) for s in specs if s.options is not None]
    clash = [name for name, _, _ in tables if name in {f.name for f in fields(CheckpointSection)}]
    if clash:
        raise ConfigError(f"backend names {clash} clash with [checkpoint] keys; rename the backend")
    return make_dataclass("CheckpointConfig", tables, bases=(CheckpointSection,), namespace={"__module__": __name__})


def job_config_class(checkpoint_cls: type) -> type:
    """What ``[job] custom_config_module = "checkpointing.config"`` adds to TorchTitan's JobConfig."""
    return make_dataclass(
        "JobConfig",
        [("checkpoint", checkpoint_cls, field(default_factory=checkpoint_cls))],
        namespace={"__module__": __name__, "__doc__": job_config_class.__doc__},
    )


_built: dict[str, type] = {}
_build_lock = threading.RLock()


def __getattr__(name: str) -> Any:
    """``CheckpointConfig`` and ``JobConfig`` are built on first use, from the backends
    registered then (built-ins and installed plugins), so importing this module discovers
    nothing and building a config instance discovers nothing either."""
    if name not in ("CheckpointConfig", "JobConfig"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _build_lock:
        if not _built:
            checkpoint_cls = checkpoint_config_class(loadable_specs())
            _built["CheckpointConfig"] = checkpoint_cls
            _built["JobConfig"] = job_config_class(checkpoint_cls)
            globals().update(_built)
    return _built[name]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_checkpoint_config(cfg: Any, prefix: str = "checkpoint") -> None:
    """Check one ``[checkpoint]``-shaped config (ours, TorchTitan's merged one, or a role such
    as ``[weight_sync]``): types, the backend name, shared bounds, then every backend table's
    own bounds."""
    check_types(cfg, prefix)
    backend = getattr(cfg, "backend", "dcp")
    try:
        backend_spec(backend)
    except BackendNotFoundError:
        raise ConfigError(
            f"{prefix}.backend = {backend!r} is not a registered backend; allowed: {', '.join(available_backends())}"
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
    if cfg.last_save_in_hf and not cfg.last_save_model_only:
        raise ConfigError(
            f"{prefix}.last_save_in_hf = true needs {prefix}.last_save_model_only = true: "
            "a Hugging Face directory holds only model weights"
        )
    if cfg.initial_load_in_hf and not cfg.initial_load_model_only:
        raise ConfigError(
            f"{prefix}.initial_load_in_hf = true needs {prefix}.initial_load_model_only = true: "
            "a Hugging Face directory holds only model weights"
        )
    for f in fields(cfg):
        table = getattr(cfg, f.name)
        if isinstance(table, ValidatedOptions) and is_dataclass(table):
            table.validate(f"{prefix}.{f.name}")


def hf_export_backend() -> str:
    """The backend that writes TorchTitan's ``last_save_in_hf`` export (a Hugging Face directory)."""
    return "hf"


def initial_load_reader(cfg: Any) -> str:
    """The backend that reads ``initial_load_path``: TorchTitan's ``initial_load_in_hf`` picks
    between a Hugging Face directory and a DCP step, whatever backend writes the new steps."""
    return "hf" if cfg.initial_load_in_hf else "dcp"


def backend_options(cfg: Any, name: str, prefix: str = "checkpoint") -> Any:
    """The validated ``[<prefix>.<name>]`` table for backend ``name``: the one the config holds,
    or the backend's defaults when the config predates the backend (a plugin installed after
    the config class was built, a config TorchTitan merged without our module)."""
    spec = backend_spec(name)
    if spec.options is None:
        return None
    table = getattr(cfg, name, None) if name in {f.name for f in fields(cfg)} else None
    if table is None:
        table = spec.default_options()
    elif not isinstance(table, spec.options):
        raise ConfigError(
            f"{prefix}.{name} is a {type(table).__name__}, but backend {name!r} reads a {spec.options.__name__} table"
        )
    return validated_options(table, f"{prefix}.{name}")


def validated_options(table: Any, prefix: str) -> Any:
    """A backend's options table, its types and then its own bounds checked."""
    check_types(table, prefix)
    if isinstance(table, ValidatedOptions):
        table.validate(prefix)
    return table


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
        key = f"{prefix}.{f.name}" if prefix else f.name
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


def _check_keys(cls: type, data: dict[str, Any], prefix: str, source: str = "") -> None:
    """Unknown TOML keys (with the nearest valid name suggested) and values of the wrong type
    are errors naming the key and the file, found *before* tyro turns them into warnings."""
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    where = f" in {source}" if source else ""
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}{where}{hint}; allowed keys in [{prefix or 'top level'}]: "
                + ", ".join(sorted(names))
            )
        tp = hints.get(key)
        if tp is None:
            continue
        if isinstance(tp, type) and is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}{where} must be a table ([{path}]), got {value!r}")
            _check_keys(tp, value, path, source)
            continue
        ok, allowed = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{path} = {value!r}{where} has the wrong type or value; allowed: {allowed}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 32
"""Tables and arrays nested deeper than this are refused: job configs are a few levels deep,
and the checks (and TorchTitan's parser) after this one recurse."""


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a dict, every failure a ConfigError naming the file: missing, not a
    regular file (a FIFO is refused, never waited on), too big, not UTF-8, not TOML, too deep."""
    from .errors import CheckpointError
    from .untrusted import read_regular

    path = os.fspath(path)
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES, "config file")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except CheckpointError as e:  # a directory, FIFO, device, symlink, or too big
        raise ConfigError(f"config path {path} is not a TOML file: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if _depth_exceeds(doc, MAX_CONFIG_DEPTH):
        raise ConfigError(f"config file {path} is nested too deeply (at most {MAX_CONFIG_DEPTH} levels of tables/arrays)")
    return doc


def _depth_exceeds(doc: Any, limit: int) -> bool:
    todo = [(doc, 0)]
    while todo:
        value, depth = todo.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def merged_config_class(module_path: str) -> type:
    """TorchTitan's JobConfig merged with ``module_path``'s JobConfig, as ConfigManager does it."""
    import importlib

    from torchtitan.config import JobConfig as TitanJobConfig

    from ._compat import merge_job_configs

    if not isinstance(module_path, str) or not _MODULE_PATH.fullmatch(module_path):
        from .untrusted import describe

        raise ConfigError(
            f"job.custom_config_module = {describe(module_path)}; allowed: an absolute dotted module path "
            "such as 'checkpointing.config' (no leading dot, no relative import)"
        )
    try:
        custom = importlib.import_module(module_path).JobConfig
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"job.custom_config_module = {module_path!r} cannot be imported: {e}") from None
    except Exception as e:  # the module's own code failed while importing
        raise ConfigError(f"job.custom_config_module = {module_path!r} failed while importing: {type(e).__name__}: {e}") from None
    if not (isinstance(custom, type) and is_dataclass(custom)):
        raise ConfigError(f"job.custom_config_module = {module_path!r}: its JobConfig is not a dataclass")
    return merge_job_configs(TitanJobConfig, custom)


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
    _check_keys(cls, toml, "", os.fspath(path) if path is not None else "")
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
    if getattr(cfg, "checkpoint", None) is not None:
        # TorchTitan builds its own merged dataclass, so our __post_init__ never ran on it.
        try:
            validate_checkpoint_config(cfg.checkpoint, "checkpoint")
        except ConfigError as e:
            origin = f"{os.fspath(path)}" if path is not None else "the defaults"
            if overrides:
                origin += f" with overrides {' '.join(overrides)}"
            raise type(e)(f"{e} (from {origin})") from None
    return cfg


def _split_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str | None]]:
    """``--a.b=v`` and ``--a.b v`` as (``a.b``, value); a bare flag has value None."""
    out: list[tuple[str, str | None]] = []
    args = list(overrides)
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, inline = arg[2:].partition("=")
        value: str | None = inline
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            value = following if following is not None and not following.startswith("--") else None
        out.append((name, value if (eq or value is not None) else None))
    return out


def _override_value_ok(value: str | None, tp: Any, negated: bool) -> tuple[bool, str]:
    """Would tyro accept this command-line text for a field of type ``tp``? (Checked here so the
    error names the key and the allowed values instead of printing a usage box.)"""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return True, str(tp)
        tp, origin = args[0], typing.get_origin(args[0])
    if tp is bool:
        ok = value is None or (not negated and value.lower() in ("true", "false"))
        return ok, "a boolean: --key, --no_key, or --key=true/false"
    if value is None:
        return True, ""  # tyro reports a missing value itself
    if origin is Literal:
        allowed = typing.get_args(tp)
        return value in [str(a) for a in allowed], "one of " + ", ".join(repr(a) for a in allowed)
    if tp is int:
        try:
            int(value)
        except ValueError:
            return False, "an integer"
        return True, ""
    if tp is float:
        try:
            float(value)
        except ValueError:
            return False, "a number"
        return True, ""
    return True, ""


def _check_overrides(cls: type, overrides: list[str] | tuple[str, ...]) -> None:
    """Name an unknown ``--a.b`` override, or a value of the wrong type, ourselves: tyro's
    message buries it in a usage dump and exits."""
    for raw_name, value in _split_overrides(overrides):
        dotted = raw_name.replace("-", "_")
        negated = dotted.startswith("no_") or ".no_" in dotted
        if negated:
            dotted = dotted.replace("no_", "", 1) if dotted.startswith("no_") else dotted.replace(".no_", ".", 1)
        parts = dotted.split(".")
        node: Any = cls
        for i, part in enumerate(parts):
            if not (isinstance(node, type) and is_dataclass(node)):
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
        if node is None or is_dataclass(node):
            continue
        ok, allowed = _override_value_ok(value, node, negated)
        if not ok:
            shown = f"--{raw_name}" + (f"={value}" if value is not None else "")
            raise ConfigError(f"override {shown}: {dotted} has the wrong type or value; allowed: {allowed}")
