"""What each ``[checkpoint]`` key accepts, written down independently of ``config.py``, and
hypothesis strategies for values it must refuse.

The spec is the oracle: if ``config.py`` grows a key that is not listed here, the completeness
test fails, so a new key cannot escape the property tests.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from hypothesis import strategies as st

CHANNEL_ALLOWED = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class KeySpec:
    kind: str
    """bool | int | float | str | str_or_none | enum | str_list | channel | init_method | table"""
    valid_int: Callable[[int], bool] | None = None
    """int and float keys: which numbers are in range."""
    allowed: tuple[str, ...] | None = None


def _registered_backends() -> tuple[str, ...]:
    from checkpointing import available_backends

    return tuple(available_backends())


BOOL, STR, STR_OR_NONE, STR_LIST, TABLE = (KeySpec(k) for k in ("bool", "str", "str_or_none", "str_list", "table"))


def INT(pred: Callable[[int], bool]) -> KeySpec:
    return KeySpec("int", valid_int=pred)


def FLOAT(pred: Callable[[float], bool]) -> KeySpec:
    return KeySpec("float", valid_int=pred)


def ENUM(*allowed: str) -> KeySpec:
    return KeySpec("enum", allowed=allowed)


SPEC: dict[str, KeySpec] = {
    "enable": BOOL,
    "enable_ft_dataloader_checkpoints": BOOL,
    "folder": STR,
    "interval": INT(lambda v: v >= 1),
    "initial_load_path": STR_OR_NONE,
    "initial_load_model_only": BOOL,
    "initial_load_in_hf": BOOL,  # true is valid: initial_load_model_only defaults to true
    "initial_load_in_hf_quantized": BOOL,
    "last_save_model_only": BOOL,
    "last_save_in_hf": BOOL,
    "export_dtype": ENUM("float16", "bfloat16", "float32"),
    "async_mode": ENUM("disabled", "async", "async_with_pinned_mem"),
    "keep_latest_k": INT(lambda v: v == 0 or v >= 2),
    "load_step": INT(lambda v: v >= -1),
    "exclude_from_loading": STR_LIST,
    "enable_first_step_checkpoint": BOOL,
    "create_seed_checkpoint": BOOL,
    "load_only": BOOL,
    "backend": KeySpec("enum", allowed=None),  # allowed: whatever is registered, read at run time
    "verify": ENUM("checksum", "size", "off"),
    "load_mode": ENUM("auto", "copy"),
    "dcp": TABLE,
    "dcp.thread_count": INT(lambda v: 1 <= v <= 64),
    "dcp.single_file_per_rank": BOOL,
    "hf": TABLE,
    "hf.max_shard_size_mb": INT(lambda v: 1 <= v <= 1 << 20),
    "hf.save_extras": BOOL,
    "memory": TABLE,
    "memory.transport": ENUM("local", "shm"),
    "memory.channel": KeySpec("channel"),
    "memory.bucket_size_mb": INT(lambda v: v >= 1),
    "memory.dtype": ENUM("auto", "float32", "bfloat16", "float16"),
    "memory.keep_versions": INT(lambda v: 1 <= v <= 63),  # + the spare slot: 64 segments at most
    "memory.verify_data": BOOL,
    "dist": TABLE,
    "dist.init_method": KeySpec("init_method"),
    "dist.publishers": INT(lambda v: v >= 1),
    "dist.role": ENUM("auto", "publish", "read"),
    "dist.backend": ENUM("auto", "gloo", "nccl"),
    "dist.bucket_size_mb": FLOAT(lambda v: math.isfinite(v) and v * 2**20 >= 4096),
    "dist.dtype": ENUM("auto", "float32", "bfloat16", "float16"),
    "dist.keep_versions": INT(lambda v: v >= 1),
    "dist.timeout_s": FLOAT(lambda v: math.isfinite(v) and v > 0),
    "dist.join_timeout_s": FLOAT(lambda v: math.isfinite(v) and v > 0),
}
INIT_METHOD_ALLOWED = re.compile(r"env://|tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


def init_method_ok(s: str) -> bool:
    match = INIT_METHOD_ALLOWED.fullmatch(s)
    return match is not None and (match.group("port") is None or 0 < int(match.group("port")) < 65536)

PLUGIN_KEYS: dict[str, dict[str, KeySpec]] = {
    # plugins/torch_checkpointing, installed separately: its table exists only when it is installed
    "torch_checkpointing": {
        "torch_checkpointing": TABLE,
        "torch_checkpointing.write_threads": INT(lambda v: 1 <= v <= 16),
    },
}
for _backend, _keys in PLUGIN_KEYS.items():
    if _backend in _registered_backends():
        SPEC.update(_keys)


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a config dataclass, nested tables as ``table`` and ``table.key``."""
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out += config_keys(type(default), key + ".")
    return out


def allowed_values(spec: KeySpec) -> tuple[str, ...]:
    return spec.allowed if spec.allowed is not None else _registered_backends()


# ------------------------------------------------------------------------------ strategies
TOML_INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_scalars = {
    "bool": st.booleans(),
    "int": TOML_INT,
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "str": st.text(max_size=12),
    "date": st.dates(min_value=dt.date(1, 1, 1)),
}


def _any_toml(exclude: set[str]) -> st.SearchStrategy:
    """A TOML value of any type except the named ones (arrays and inline tables included)."""
    leaf = st.one_of(*[s for name, s in _scalars.items() if name not in exclude])
    parts = [leaf]
    if "list" not in exclude:
        parts.append(st.lists(st.one_of(*_scalars.values()), max_size=3))
    if "table" not in exclude:
        parts.append(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.one_of(*_scalars.values()), max_size=2))
    return st.one_of(*parts)


def wrong_values(spec: KeySpec) -> st.SearchStrategy:
    """TOML values this key must refuse: every wrong type, and every out-of-range value."""
    kind = spec.kind
    if kind == "bool":
        return _any_toml({"bool"})
    if kind == "int":
        return st.one_of(_any_toml({"int"}), TOML_INT.filter(lambda v: not spec.valid_int(v)))
    if kind in ("str", "str_or_none"):
        return _any_toml({"str"})
    if kind == "enum":
        allowed = allowed_values(spec)
        return st.one_of(_any_toml({"str"}), st.text(max_size=24).filter(lambda s: s not in allowed))
    if kind == "str_list":
        return st.one_of(
            _any_toml({"list"}),
            st.lists(st.one_of(*[s for n, s in _scalars.items() if n != "str"]), min_size=1, max_size=3),
            st.lists(st.one_of(st.text(max_size=4), TOML_INT, st.booleans()), min_size=2, max_size=4).filter(
                lambda xs: not all(isinstance(x, str) for x in xs)
            ),
        )
    if kind == "float":
        numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), TOML_INT)
        return st.one_of(_any_toml({"int", "float"}), numbers.filter(lambda v: not spec.valid_int(v)))
    if kind == "init_method":
        return st.one_of(_any_toml({"str"}), st.one_of(st.text(max_size=24), st.from_regex(r"tcp://[a-z.]{1,8}:[0-9]{1,6}", fullmatch=True)).filter(lambda s: not init_method_ok(s)))
    if kind == "channel":
        return st.one_of(_any_toml({"str"}), st.text(max_size=16).filter(lambda s: not CHANNEL_ALLOWED.fullmatch(s)))
    if kind == "table":
        return _any_toml({"table"})
    raise AssertionError(kind)


PYTHON_ONLY = st.sampled_from([None, b"bytes", 1 + 2j, object(), (1, 2), frozenset({1})])
"""Values a TOML file cannot hold but a Python caller can pass to CheckpointConfig(...)."""


def wrong_python_values(spec: KeySpec) -> st.SearchStrategy:
    extra = PYTHON_ONLY
    if spec.kind == "str_or_none":
        extra = extra.filter(lambda v: v is not None)
    if spec.kind == "str_list":
        extra = extra.filter(lambda v: not isinstance(v, tuple))  # a tuple of str is a fair list
    return st.one_of(wrong_values(spec), extra)


# ------------------------------------------------------------------------------ TOML text
def toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\' or not (0x20 <= ord(ch) < 0x7F):
            out.append(f"\\u{ord(ch):04X}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v) if ("." in repr(v) or "e" in repr(v)) else repr(v) + ".0"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def checkpoint_toml(key: str, value: Any) -> str:
    """A job file whose only non-default entry is ``[checkpoint] key = value``."""
    table, _, leaf = key.rpartition(".")
    section = f"checkpoint.{table}" if table else "checkpoint"
    return f"[{section}]\n{leaf} = {toml_value(value)}\n"
