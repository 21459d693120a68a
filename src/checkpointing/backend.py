"""The backend seam: the only thing a checkpoint library has to implement to plug in.

A backend moves one step's state in and out of storage. It knows nothing about intervals,
retention, async saves, model-only exports or initial loads: those policies live once in
:mod:`checkpointing.manager`. Each backend is described by a :class:`BackendSpec` (factory,
options table, capabilities) registered by name; third parties register theirs through the
``titan_checkpointing.backends`` entry point group, so adding a library touches neither this
package nor ``rl``.

Besides the five core methods, a backend may offer optional capabilities, each a small typed
protocol below. The manager and ``ckpt`` test for them once with ``isinstance`` and fall back
to a generic path when a backend lacks one, so a plugin only writes what it can do better.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

from .errors import BackendNotFoundError, ConfigError
from .receiver import TensorSpec

ENTRY_POINT_GROUP = "titan_checkpointing.backends"
VERIFY_MODES = ("checksum", "size", "off")


@dataclass
class StepState:
    """One step's state, split the way every backend needs it split.

    ``model`` is the flattened model state dict (FQN -> tensor or DTensor), exactly TorchTitan's
    ``ModelWrapper.state_dict()``. ``extras`` holds the rest (optimizer, lr_scheduler,
    dataloader, train_state, user states) as *plain* nested state dicts: the manager has
    already called ``state_dict()`` on every Stateful, so backends never see live objects.
    ``flat()`` is TorchTitan's on-disk layout: model keys at the top level, extras beside them.
    """

    model: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    model_is_scratch: bool = False
    """The model tensors are fresh memory that only this load sees (a sink's transfer tensors):
    a backend may read straight into them instead of staging a copy first, since a load that
    fails halfway leaves nothing that anyone keeps."""

    def flat(self) -> dict[str, Any]:
        clash = self.model.keys() & self.extras.keys()
        if clash:
            raise ValueError(f"state keys used by both the model and extra states: {sorted(clash)}")
        return {**self.extras, **self.model}

    @property
    def model_only(self) -> bool:
        return not self.extras

    def tensors_only(self, carrier: str, what: str) -> dict[str, Any]:
        """The model tensors, for a backend (``carrier``) that moves nothing else: training
        state is a ConfigError (it belongs in a persistent backend), a non-tensor model entry a
        StateMismatchError naming it. ``what``: the operation, for the message."""
        from .errors import StateMismatchError

        if self.extras:
            raise ConfigError(
                f"the {carrier} backend carries model tensors only, but this {what} also has {sorted(self.extras)}; "
                "keep training state in a persistent backend (dcp, hf)"
            )
        import torch

        bad = [k for k, v in self.model.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise StateMismatchError(f"the {carrier} backend carries tensors only; not tensors: {bad}", bad)
        return self.model


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise, so the manager refuses a config instead of losing state."""

    persistent: bool
    """Steps survive the writing process (files), so training can resume from them."""
    non_tensor_state: bool
    """Can hold optimizer / lr_scheduler / dataloader / train_state, not just model tensors."""
    cross_process: bool = True
    """Another process can read what this one wrote."""


@dataclass
class BackendContext:
    """Everything a backend may need to build itself, handed over by the manager."""

    folder: str
    """``{base_folder}/{checkpoint.folder}``: where a persistent backend keeps ``step-N``."""
    options: Any = None
    """The backend's own table (``[checkpoint.<name>]``), an instance of its spec's ``options``
    dataclass, already type-checked and validated; None for a backend that declares none."""
    verify: str = "checksum"
    """``checkpoint.verify``: what a load checks before reading (see :data:`VERIFY_MODES`)."""
    sd_adapter: Any = None
    """A TorchTitan ``BaseStateDictAdapter`` instance (``to_hf``/``from_hf``), or None."""
    process_group: Any = None
    """The torch.distributed group for collectives, or None when not distributed."""
    load_only: bool = False
    """A reader (a generator, ``ckpt``): it never writes, deletes or cleans up."""
    name: str = ""
    """The name the backend was selected by (what its manifests record)."""


@runtime_checkable
class Backend(Protocol):
    """Storage for committed steps. Steps are ints; a step is visible only once complete."""

    capabilities: Capabilities

    @property
    def location(self) -> str:
        """Where the steps live, for messages: a folder, a channel. Read-only (a plain attribute
        or a property both fit)."""

    def write(self, step: int, state: StepState) -> None:
        """Store ``state`` as ``step``; it becomes visible to ``steps()`` only when complete."""

    def read(self, step: int, state: StepState) -> None:
        """Fill ``state`` in place from ``step``: copy into its tensors, replace non-tensor leaves.

        Must raise :class:`~checkpointing.errors.StateMismatchError` (naming keys) rather than
        leave a target tensor unwritten, and must not touch ``state`` when it fails a check."""

    def steps(self) -> list[int]:
        """Committed steps, ascending."""

    def delete(self, step: int) -> None:
        """Forget ``step``; deleting a missing step is a no-op."""

    def close(self) -> None:
        """Release files, threads, segments."""


# ---------------------------------------------------------------------------- optional capabilities
@runtime_checkable
class CleansPartials(Protocol):
    """Leftovers of a crashed writer (staging directories, dead segments) can be removed; a
    writer's Checkpointer calls this once when it opens."""

    def cleanup_partials(self) -> list[str]: ...


@runtime_checkable
class ReadsExternal(Protocol):
    """Reads a checkpoint outside its folder: an ``initial_load_path`` (a DCP ``step-N``, a
    Hugging Face model directory) or the source of ``ckpt convert``."""

    def read_path(self, path: str, state: StepState) -> None: ...


@runtime_checkable
class WritesExternal(Protocol):
    """Writes one model into a new directory outside its step folder (``ckpt convert``)."""

    def write_path(self, path: str, state: StepState, progress: Callable[[int], None] | None = None) -> None:
        """``progress(n)`` is called with bytes written as the write advances."""


@runtime_checkable
class Inspects(Protocol):
    """Understands step directories on disk for ``ckpt inspect | verify``: recognises its own
    (also when another tool wrote them, without our manifest), lists their tensors and checks
    their structure beyond the manifest."""

    def recognizes(self, path: str) -> bool:
        """``path`` is a step directory in this backend's format, with or without a manifest."""

    def describe(self, path: str) -> dict[str, Any]:
        """``{"tensors": [{"name", "dtype", "shape", "bytes", ...}], ...}``: what ``inspect`` prints."""

    def check_structure(self, path: str) -> str:
        """Raise CorruptCheckpointError on damage the manifest cannot see; a one-line summary."""


@runtime_checkable
class Lease(Protocol):
    """A read-only view of one published version, pinned until released."""

    step: int
    tensors: Mapping[str, Any]
    """Name -> tensor views into the backend's own buffer, already checked against the specs."""

    def release(self) -> None:
        """Let the publisher reuse the buffer; the views must not be used afterwards."""


@runtime_checkable
class ViewReader(Protocol):
    """Hands out a published version without copying it: a sink reads straight from the
    backend's buffer, and a module receiver can adopt the buffer as its weights."""

    def open_views(self, step: int, specs: Mapping[str, TensorSpec]) -> Lease:
        """Pin ``step`` and return views of every tensor in ``specs`` (names both ways, shapes,
        dtypes checked first: StateMismatchError naming the keys otherwise)."""


# ---------------------------------------------------------------------------- the registry
BackendFactory = Callable[[BackendContext], Backend]


@dataclass(frozen=True)
class BackendSpec:
    """A backend as the registry knows it: how to build it, what it promises, what it reads
    from TOML. A plugin's entry point names one of these."""

    name: str
    factory: BackendFactory
    capabilities: Capabilities
    options: type | None = None
    """A dataclass: its fields are the ``[checkpoint.<name>]`` table (defaults, types and
    docstrings are the documentation). An optional ``validate(self, prefix)`` method checks
    bounds and raises ConfigError."""
    summary: str = ""

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise ValueError(f"backend name must be a non-empty identifier (letters, digits, '_'), got {self.name!r}")
        if not callable(self.factory):
            raise TypeError(f"backend {self.name!r}: factory must be callable, got {type(self.factory).__name__}")

    def default_options(self) -> Any:
        return self.options() if self.options is not None else None


def valid_name(name: str) -> bool:
    """Backend names become TOML table names and Python field names."""
    return bool(name) and name.isidentifier() and name.isascii()


class _EntryPointSpec:
    """A spec announced by an installed distribution, imported when first needed, so a broken
    plugin fails only when someone uses it, naming the plugin."""

    def __init__(self, ep: metadata.EntryPoint):
        self.ep = ep

    def resolve(self) -> BackendSpec:
        try:
            spec = self.ep.load()
        except Exception as e:
            raise ConfigError(
                f"checkpoint backend {self.ep.name!r} is registered by the entry point {self.ep.value!r} "
                f"(group {ENTRY_POINT_GROUP!r}) but cannot be loaded: {e!r}"
            ) from e
        if not isinstance(spec, BackendSpec):
            raise ConfigError(
                f"the entry point {self.ep.name} = {self.ep.value!r} (group {ENTRY_POINT_GROUP!r}) must name a "
                f"checkpointing.BackendSpec, not a {type(spec).__name__}"
            )
        if spec.name != self.ep.name:
            raise ConfigError(
                f"the entry point {self.ep.name!r} (group {ENTRY_POINT_GROUP!r}) names a BackendSpec called {spec.name!r}; "
                "the two names must match"
            )
        return spec


_registry: dict[str, BackendSpec | _EntryPointSpec] = {}
_discovered = False
_lock = threading.RLock()


def register_backend(spec: BackendSpec, *, replace: bool = False) -> None:
    """Make ``spec`` selectable as ``[checkpoint] backend = "<spec.name>"``."""
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"register_backend takes a BackendSpec, got {type(spec).__name__}")
    with _lock:
        old = _registry.get(spec.name)
        if isinstance(old, BackendSpec) and old is not spec and not replace:
            raise ValueError(f"a backend named {spec.name!r} is already registered")
        _registry[spec.name] = spec


def unregister_backend(name: str) -> None:
    """Drop a registration (tests that register throwaway backends clean up with this)."""
    with _lock:
        _registry.pop(name, None)


def _discover() -> None:
    """Built-in backends and installed plugins, found once per process."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        from .backends import BUILTIN_SPECS

        for name, ref in BUILTIN_SPECS.items():
            _registry.setdefault(name, _EntryPointSpec(metadata.EntryPoint(name, ref, ENTRY_POINT_GROUP)))
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if valid_name(ep.name):
                _registry.setdefault(ep.name, _EntryPointSpec(ep))


def available_backends() -> list[str]:
    _discover()
    return sorted(_registry)


def backend_spec(name: str) -> BackendSpec:
    """The spec registered under ``name`` (imported now if a plugin announced it)."""
    _discover()
    with _lock:
        entry = _registry.get(name)
    if entry is None:
        raise BackendNotFoundError(
            f"unknown checkpoint backend {name!r}; registered backends: {', '.join(available_backends())} "
            f"(third-party backends register through the {ENTRY_POINT_GROUP!r} entry point group)"
        )
    if isinstance(entry, _EntryPointSpec):
        spec = entry.resolve()
        with _lock:
            if _registry.get(name) is entry:
                _registry[name] = spec
        return spec
    return entry


def loadable_specs() -> list[BackendSpec]:
    """Every spec that imports; a broken plugin is left out here (it still fails, naming
    itself, when selected)."""
    specs = []
    for name in available_backends():
        try:
            specs.append(backend_spec(name))
        except ConfigError:
            continue
    return specs


def create_backend(name: str, ctx: BackendContext) -> Backend:
    return backend_spec(name).factory(ctx)


@runtime_checkable
class ValidatedOptions(Protocol):
    """An options table with bounds beyond its field types (the loader checks those)."""

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming ``{prefix}.<field>`` and what is allowed."""
