"""Training state (optimizer, lr scheduler, dataloader, train state) in a form torch-checkpointing
can store without pickle, and read back checked against the receiver before anything is touched.

torch-checkpointing 0.1.1 keeps nested state in one of two ways: ``TorchSerialization``
(``torch.save``; its reader unpickles with plain ``pickle``, so loading a crafted file runs
code) or ``JsonSerialization`` (``json.dumps``: tuples come back as lists, int keys as strings,
bytes not at all). So the state is split here: every tensor goes to a safetensors file under a
name derived from its path, and the rest becomes *tagged* JSON that keeps what plain JSON loses::

    null, true, 3, 2.5, "text"        themselves (NaN and infinities as JSON's NaN/Infinity)
    {"list": [...]}, {"tuple": [...]}  sequences, by kind
    {"dict": [[key, value], ...]}     mappings; keys are JSON scalars, so int keys stay ints
    {"tensor": "name"}                a tensor in the safetensors file
    {"bytes": "<base64>"}             bytes (TorchTitan's dataloader state is pickled bytes)
    {"pickle": "<base64>"}            anything else, as ``torch.save`` bytes, read back only with
                                      ``torch.load(weights_only=True)``: what DCP does with such
                                      values, so a value DCP can restore restores here too, and a
                                      crafted object is an UnsafeCheckpointError, never code run

Reading is receiver-driven like DCP's: every key the receiver's dicts hold must be stored, every
tensor it holds must be stored as a tensor of the same shape (floating dtypes may be cast);
non-tensor values are taken from the checkpoint. All of it is checked by :func:`plan_extras`
before a byte of tensor data is read.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpointing.plugin import (
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    TensorSpec,
    UnsafeCheckpointError,
    is_dtensor,
)

SCALARS = (type(None), bool, int, float, str)
TAGS = ("list", "tuple", "dict", "tensor", "bytes", "pickle")


def refuse_dtensor(value: Any, where: str) -> None:
    if is_dtensor(value):
        raise ConfigError(
            f"checkpoint.backend = 'torch_checkpointing' cannot keep DTensor shards ({where}): torch-checkpointing "
            "0.1.1 saves and reshards them only through pickled metadata (metadata.pkl) and torch.save files that "
            "it reads back with plain pickle; use the dcp backend for FSDP / tensor-parallel state"
        )


# ------------------------------------------------------------------------------- writing
@dataclass
class EncodedExtras:
    state: dict[str, Any]
    """Top-level state name -> tagged JSON value."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Name in the safetensors file -> tensor (views of one storage already told apart)."""


def encode_extras(extras: Mapping[str, Any]) -> EncodedExtras:
    """Tagged JSON + named tensors for the non-model state of one step."""
    out = EncodedExtras(state={})
    used: set[str] = set()

    def name_for(path: tuple[Any, ...]) -> str:
        base = "/".join(str(p) for p in path)
        name, n = base, 1
        while name in used:  # int key 1 and str key "1" would otherwise collide
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        return name

    def encode(value: Any, path: tuple[Any, ...]) -> Any:
        kind = type(value)
        if kind in SCALARS:
            return value
        if isinstance(value, torch.Tensor):
            refuse_dtensor(value, "/".join(map(str, path)))
            name = name_for(path)
            out.tensors[name] = value.detach()
            return {"tensor": name}
        if kind is bytes:
            return {"bytes": base64.b64encode(value).decode("ascii")}
        if kind in (list, tuple):
            return {kind.__name__: [encode(v, path + (i,)) for i, v in enumerate(value)]}
        if isinstance(value, Mapping) and all(type(k) in SCALARS for k in value):
            return {"dict": [[k, encode(v, path + (k,))] for k, v in value.items()]}
        return {"pickle": _pickled(value, path)}

    for key, value in extras.items():
        out.state[key] = encode(value, (key,))
    return out


def _pickled(value: Any, path: tuple[Any, ...]) -> str:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
    except Exception as e:
        raise ConfigError(
            f"the training state value at {'/'.join(map(str, path))} ({type(value).__name__}) cannot be stored: "
            f"it is neither JSON, bytes nor a tensor, and torch.save refuses it ({e!r})"
        ) from e
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def split_aliases(named: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, alias -> stored name). safetensors refuses tensors that share memory:
    an exact second view of a tensor (tied embeddings) is stored once and recorded as an alias;
    a different view of a storage already stored gets bytes of its own (a clone)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in named.items():
        if tensor.numel() == 0:
            unique[name] = tensor
            continue
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        unique[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    return unique, aliases


# ------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Stored:
    """A tensor the checkpoint holds where the receiver has none: loaded into a new tensor."""

    name: str


def decode(node: Any, source: str) -> Any:
    """Tagged JSON -> Python values, tensors as :class:`Stored` placeholders. Anything that is not
    exactly what :func:`encode_extras` writes is corruption, named with ``source``."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: {why}", source)

    def walk(n: Any) -> Any:
        if type(n) in SCALARS:
            return n
        if not (isinstance(n, dict) and len(n) == 1):
            raise bad(f"unexpected value {str(n)[:80]!r} in the training state structure")
        ((tag, body),) = n.items()
        if tag in ("list", "tuple") and isinstance(body, list):
            items = [walk(v) for v in body]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(body, list):
            out: dict[Any, Any] = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in SCALARS):
                    raise bad(f"malformed dict entry {str(pair)[:80]!r}")
                if pair[0] in out:
                    raise bad(f"dict key {pair[0]!r} appears twice")
                out[pair[0]] = walk(pair[1])
            return out
        if tag == "tensor" and isinstance(body, str):
            return Stored(body)
        if tag == "bytes" and isinstance(body, str):
            return _b64(body, bad)
        if tag == "pickle" and isinstance(body, str):
            return _unpickle_weights_only(_b64(body, bad), source)
        raise bad(f"unknown or malformed tag {tag!r}; allowed: {', '.join(TAGS)}")

    try:
        return walk(node)
    except RecursionError:
        raise bad("the training state structure is nested too deeply") from None


def _b64(text: str, bad) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise bad("a base64 value is malformed") from None


def _unpickle_weights_only(raw: bytes, source: str) -> Any:
    try:
        return torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:  # weights_only refuses every global outside torch's allowlist
        raise UnsafeCheckpointError(
            f"{source}: a stored training-state value is a pickle that torch.load(weights_only=True) refuses to "
            f"load (it may run code): {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
            source,
        ) from None


@dataclass
class ExtrasPlan:
    """What a read of the training state will do, decided before any data is read."""

    values: dict[str, Any]
    """State name -> value to hand back: the receiver's own tensors (filled in place) where it
    had them, :class:`Stored` placeholders where the checkpoint adds tensors."""
    targets: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Stored tensor name -> receiver tensors it fills."""
    fresh: set[str] = field(default_factory=set)
    """Stored tensor names loaded into new tensors."""


def plan_extras(
    stored: Mapping[str, Any],
    receiver: Mapping[str, Any],
    specs: Mapping[str, TensorSpec],
    aliases: Mapping[str, str],
    source: str,
) -> ExtrasPlan:
    """Match the decoded ``stored`` state with the receiver's; StateMismatchError naming every
    path that does not fit, CorruptCheckpointError if the structure names a tensor the file lacks."""
    plan = ExtrasPlan(values={})
    problems: list[str] = []
    bad: list[str] = []

    def stored_name(ref: Stored) -> str:
        name = aliases.get(ref.name, ref.name)
        if name not in specs:
            raise CorruptCheckpointError(f"{source}: the structure names tensor {ref.name!r}, which is not stored", source)
        return name

    def adopt(value: Any) -> Any:
        if isinstance(value, Stored):
            name = stored_name(value)
            plan.fresh.add(name)
            return Stored(name)
        if isinstance(value, (list, tuple)):
            return type(value)(adopt(v) for v in value)
        if isinstance(value, dict):
            return {k: adopt(v) for k, v in value.items()}
        return value

    def complain(path: str, why: str) -> None:
        bad.append(path)
        problems.append(f"{path}: {why}")

    def merge(value: Any, target: Any, path: str) -> Any:
        if isinstance(target, torch.Tensor):
            refuse_dtensor(target, path)
            if not isinstance(value, Stored):
                complain(path, f"stored as {type(value).__name__}, receiver has a tensor")
                return target
            name = stored_name(value)
            have = specs[name]
            if have.shape != tuple(target.shape):
                complain(path, f"shape {have.shape} stored, receiver has {tuple(target.shape)}")
            elif not (have.dtype == target.dtype or (have.dtype.is_floating_point and target.dtype.is_floating_point)):
                complain(path, f"dtype {have.dtype} stored, receiver has {target.dtype} (only floating types are cast)")
            else:
                plan.targets.setdefault(name, []).append(target)
            return target
        if isinstance(target, Mapping):
            if not isinstance(value, dict):
                complain(path, f"stored as {type(value).__name__}, receiver has a mapping")
                return target
            out = {}
            for key, sub in target.items():
                if key in value:
                    out[key] = merge(value[key], sub, f"{path}/{key}")
                else:
                    complain(f"{path}/{key}", "missing from the checkpoint")
            for key in value:
                if key not in target:
                    out[key] = adopt(value[key])  # the checkpoint holds more than asked: kept
            return out
        if isinstance(target, (list, tuple)) and _holds_tensors(target):
            if not isinstance(value, (list, tuple)) or len(value) != len(target):
                complain(path, f"stored {type(value).__name__} does not match the receiver's {len(target)} entries")
                return target
            return type(value)(merge(v, t, f"{path}/{i}") for i, (v, t) in enumerate(zip(value, target, strict=True)))
        return adopt(value)

    for key, target in receiver.items():
        if key not in stored:
            complain(key, "not in this checkpoint")
            continue
        plan.values[key] = merge(stored[key], target, key)
    if problems:
        raise StateMismatchError(
            f"{source} does not fit the receiving training state: " + "; ".join(problems[:20])
            + (" ..." if len(problems) > 20 else ""),
            bad,
        )
    return plan


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def materialize(value: Any, loaded: Mapping[str, torch.Tensor]) -> Any:
    """Replace :class:`Stored` placeholders with the tensors the library loaded."""
    if isinstance(value, Stored):
        return loaded[value.name]
    if isinstance(value, (list, tuple)):
        return type(value)(materialize(v, loaded) for v in value)
    if isinstance(value, dict):
        return {k: materialize(v, loaded) for k, v in value.items()}
    return value
